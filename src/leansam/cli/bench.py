"""``leansam bench``: time a model on this machine (:func:`leansam.bench.quick.quick_bench`)."""

from __future__ import annotations

import argparse

from .parsing import default_of, int_list, model_args


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.quick import format_bench, quick_bench
    from ..io import atomic_write_json, load_image

    boxes = int_list(args.boxes, "--boxes", "1,16,64")
    result = quick_bench(
        args.model,
        checkpoint=args.checkpoint,
        runtimes=tuple(args.runtime or default_of(quick_bench, "runtimes")),
        batch=args.batch,
        boxes=boxes,
        runs=args.runs,
        calib_images=args.calib_images,
        image=load_image(args.image) if args.image else None,
        progress=not args.no_progress,
    )
    print(format_bench(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..bench.quick import quick_bench
    from ..runtime import RUNTIMES

    b = sub.add_parser(
        "bench",
        help="time a model on this machine: encoder per runtime, decoder per box",
        description="For leansam against the reference implementations see benchmarks/speed.py.",
    )
    model_args(b)
    b.add_argument(
        "--runtime",
        action="append",
        choices=RUNTIMES,
        help="encoder runtime to time; repeat for several (default: torch and torch-opt)",
    )
    b.add_argument(
        "--batch",
        type=int,
        default=default_of(quick_bench, "batch"),
        help="images per encoder call",
    )
    b.add_argument(
        "--boxes",
        default=",".join(map(str, default_of(quick_bench, "boxes"))),
        help="boxes per decoder call to time",
    )
    b.add_argument(
        "--runs",
        type=int,
        default=default_of(quick_bench, "runs"),
        help="timed rounds (median reported)",
    )
    b.add_argument("--image", help="image to use (default: random pixels, 640 x 480)")
    b.add_argument("--calib-images", metavar="DIR", help="calibration folder for the INT8 runtimes")
    b.add_argument("--json", metavar="FILE", help="also write the full record here")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_bench)
