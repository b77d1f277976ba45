"""``leansam segment``: masks of an image from box / point prompts
(:func:`leansam.segment.segment`)."""

from __future__ import annotations

import argparse
import sys

from .parsing import model_args, runtime_args


def _cmd_segment(args: argparse.Namespace) -> int:
    from ..segment import parse_box, parse_point, segment

    record = segment(
        args.image,
        model=args.model,
        checkpoint=args.checkpoint,
        boxes=[parse_box(b) for b in args.box],
        points=[parse_point(p) for p in args.point],
        separate_points=args.separate_points,
        multimask=args.multimask,
        out_dir=args.out,
        device=args.device,
        runtime=args.runtime,
        calib_images=args.calib_images,
    )
    n = len(record["results"])
    empty = [i for i, r in enumerate(record["results"]) if r["masks"][r["best"]]["area"] == 0]
    print(f"wrote {n} mask(s), overlay.png and result.json to {args.out}")
    if empty:
        which = ", ".join(f"mask_{i:03d}.png" for i in empty)
        print(
            f"note: {len(empty)} of {n} masks are empty ({which}): the model found no object at "
            "that prompt; try a box or more points"
            + ("" if args.multimask else ", or --multimask"),
            file=sys.stderr,
        )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("segment", help="segment an image from box / point prompts")
    s.add_argument("image", help="image file (JPEG, PNG, ...)")
    model_args(s)
    s.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="x0,y0,x1,y1",
        help="box prompt in image pixels; repeat for several objects (decoded in one batch)",
    )
    s.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="x,y[,label]",
        help="point prompt, label 1 (default) foreground or 0 background; points form one "
        "prompt together unless --separate-points",
    )
    s.add_argument("--separate-points", action="store_true", help="one prompt per point")
    s.add_argument("--multimask", action="store_true", help="3 candidate masks per prompt")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--device", default=None, help="cpu (default) or cuda")
    runtime_args(s)
    s.set_defaults(func=_cmd_segment)
