"""``leansam demo``: segment coco-mini images from their annotation boxes
(:func:`leansam.demo.run_demo`)."""

from __future__ import annotations

import argparse

from .parsing import default_of


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(
        data=args.data,
        out_dir=args.out,
        model=args.model,
        checkpoint=args.checkpoint,
        num_images=args.images,
        device=args.device,
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..demo import run_demo

    d = sub.add_parser("demo", help="segment coco-mini images from their annotation boxes")
    d.add_argument("--data", default="../shared/data/coco-mini", help="coco-mini folder")
    d.add_argument("--out", default="out/demo", help="output folder")
    d.add_argument(
        "--model",
        help="model name (default: the model --checkpoint is for, else leansam's own trained "
        "student leansam-efficientvit-s)",
    )
    d.add_argument(
        "--checkpoint",
        help="weights for --model (default: the shipped ones for leansam-* models, "
        "else random weights)",
    )
    d.add_argument(
        "--images",
        type=int,
        default=default_of(run_demo, "num_images"),
        help="number of val images",
    )
    d.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    d.set_defaults(func=_cmd_demo)
