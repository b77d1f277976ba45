"""``leansam eval``: zero-shot evaluation on COCO-format data (:func:`leansam.eval.evaluate`),
sharded over processes under torchrun."""

from __future__ import annotations

import argparse
import os
import sys

from .parsing import checkpoint_record, default_of, int_list, runtime_args, runtime_record


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..distributed import default_device
    from ..eval import EvalDataset, evaluate, make_mask_source, markdown

    clicks = int_list(args.clicks, "--clicks", "1,3,5")
    dataset = EvalDataset.load(args.images, args.annotations, limit=args.limit)
    source = make_mask_source(
        args.model,
        checkpoint=args.checkpoint,
        device=args.device or default_device(),
        batch_size=args.batch_size,
        runtime=args.runtime,
        calib_images=args.calib_images,
    )
    try:
        result = evaluate(
            source,
            dataset,
            args.protocol,
            clicks=clicks,
            detections=args.detections,
            score=args.score,
            out_dir=args.out,
            fresh=args.fresh,
            save_per_object=args.save_per_object,
            plot=args.plot,
            progress=not args.no_progress,
            config={
                **checkpoint_record(getattr(source, "checkpoint", None)),
                "limit": args.limit,
                **runtime_record(args),
            },
        )
    except KeyboardInterrupt:
        print(
            f"leansam: interrupted; rerun the same command to resume ({args.out})", file=sys.stderr
        )
        return 130

    if int(os.environ.get("RANK", "0")) == 0:  # one report under torchrun
        print(markdown(result), end="")
        print(f"results: {args.out}/results.json")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..eval import evaluate, make_mask_source

    e = sub.add_parser(
        "eval",
        help="zero-shot evaluation on COCO-format data (box / click / detector protocols)",
        description="Run under torchrun to shard images over processes: "
        "torchrun --nproc_per_node N -m leansam.cli eval ...",
    )
    e.add_argument("--images", required=True, help="image folder")
    e.add_argument("--annotations", required=True, help="COCO (or LVIS) instances JSON")
    e.add_argument(
        "--model", required=True, help="model name, or a baseline: box-fill, ellipse-fill, grabcut"
    )
    e.add_argument(
        "--checkpoint",
        help="weights for --model (default: leansam's own weights for leansam-* models, "
        "else random weights, seed 0)",
    )
    e.add_argument("--protocol", required=True, choices=["box", "click", "detector"])
    e.add_argument(
        "--clicks",
        default=",".join(map(str, default_of(evaluate, "clicks"))),
        help="click counts for --protocol click",
    )
    e.add_argument("--detections", help="COCO results JSON of a detector, or 'gt' for oracle boxes")
    e.add_argument(
        "--score",
        default=default_of(evaluate, "score"),
        choices=["detector", "detector*iou"],
        help="mask score for the detector protocol",
    )
    e.add_argument("--limit", type=int, help="evaluate the first N images (by id)")
    e.add_argument("--out", required=True, help="output folder (per-image results: resumable)")
    e.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    e.add_argument("--save-per-object", action="store_true", help="write per_object.jsonl")
    e.add_argument("--plot", action="store_true", help="write iou_by_size.png (box, click)")
    e.add_argument(
        "--batch-size",
        type=int,
        default=default_of(make_mask_source, "batch_size"),
        help="prompts per decoder call",
    )
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    runtime_args(e)
    e.set_defaults(func=_cmd_eval)
