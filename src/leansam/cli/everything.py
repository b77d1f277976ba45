"""``leansam everything``: SAM's automatic mask generator on one image
(:func:`leansam.amg.everything`) or over a dataset, sharded under torchrun and resumable
(:func:`leansam.amg.dataset.label_images`); the generator's defaults are
:class:`~leansam.amg.SamAutomaticMaskGenerator`'s."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InputError
from .parsing import (
    check_dataset_args,
    dataset_args,
    dataset_model,
    dataset_only_flags,
    default_of,
    model_args,
    print_skipped,
    runtime_args,
)


def _generator_args(args: argparse.Namespace) -> dict:
    return dict(
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers,
        min_mask_region_area=args.min_mask_region_area,
    )


def _no_mask_note(args: argparse.Namespace) -> None:
    print(
        f"note: no mask passed --pred-iou-thresh {args.pred_iou_thresh} and "
        f"--stability-score-thresh {args.stability_score_thresh} (SAM's defaults assume "
        "SAM's confidence; a weaker model, such as leansam's shipped ones, may need lower "
        "thresholds: 0 and 0 for those, README 'everything')",
        file=sys.stderr,
    )


def _cmd_everything(args: argparse.Namespace) -> int:
    if Path(args.image).is_file() and Path(args.image).suffix.lower() != ".txt":
        flags = [f for f, on in (("--png", args.png), ("--overlay", args.overlay)) if on]
        flags += dataset_only_flags(args)
        if flags:
            raise InputError(
                f"{', '.join(flags)}: only for a dataset (a folder, glob or .txt list), not one "
                "image file, which always gets <i>.png, overlay.png and masks.json in --out"
            )
        return _one_image(args)
    return _dataset(args)


def _one_image(args: argparse.Namespace) -> int:
    from ..amg import everything

    record = everything(
        args.image,
        model=args.model,
        checkpoint=args.checkpoint,
        out_dir=args.out,
        device=args.device,
        runtime=args.runtime,
        calib_images=args.calib_images,
        progress=not args.no_progress,
        **_generator_args(args),
    )
    n = len(record["masks"])
    files = "<i>.png, " if n else ""
    print(
        f"wrote {n} mask(s) in {record['seconds']:.1f} s: {files}metadata.csv, masks.json and "
        f"overlay.png in {args.out}"
    )
    if n == 0:
        _no_mask_note(args)
    return 0


def _dataset(args: argparse.Namespace) -> int:
    import os

    from ..amg.dataset import label_images, list_images
    from ..runtime import runtime_calibration

    listed = list_images(args.image)  # a bad input fails before the model loads
    check_dataset_args(args)
    rank, sam, config = dataset_model(args)
    summary = label_images(
        listed,
        sam,
        args.out,
        write_png=args.png,
        write_overlay=args.overlay,
        progress=not args.no_progress,
        config=config,
        fresh=args.fresh,
        runtime=args.runtime,
        workers=args.workers,
        image_batch=args.image_batch,
        calibration_images=runtime_calibration(args.runtime, args.calib_images),
        **_generator_args(args),
    )
    if rank == 0:
        skipped = summary["skipped"]
        print(
            f"labelled {summary['labelled']} image(s) with {summary['masks']} mask(s) in "
            f"{summary['seconds_rank0']:.1f} s ({summary['already_done']} already done, "
            f"{len(skipped)} skipped): sa_*.json and summary.json in {args.out}"
        )
        print_skipped(skipped, os.path.join(args.out, "summary.json"))
        if summary["labelled"] and not summary["masks"]:
            _no_mask_note(args)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..amg import SamAutomaticMaskGenerator  # imported by `import leansam` anyway

    def default(name: str):
        return default_of(SamAutomaticMaskGenerator, name)

    ev = sub.add_parser(
        "everything",
        help="segment everything in an image (SAM's automatic mask generator)",
        description="A grid of point prompts, filtered by predicted IoU and stability, box NMS; "
        "writes <i>.png per mask (by decreasing area), metadata.csv, masks.json (COCO RLE) and "
        "overlay.png.",
    )
    ev.add_argument(
        "image",
        help="an image file (JPEG, PNG, ...), or a dataset: a folder (recursive), a glob pattern "
        "('imgs/*.jpg') or a .txt list of images, one SA-1B JSON per image",
    )
    model_args(ev)
    ev.add_argument("--out", required=True, help="output folder")
    ev.add_argument("--points-per-side", type=int, default=default("points_per_side"))
    ev.add_argument(
        "--points-per-batch",
        type=int,
        default=default("points_per_batch"),
        help="prompts per decoder call (memory)",
    )
    ev.add_argument("--pred-iou-thresh", type=float, default=default("pred_iou_thresh"))
    ev.add_argument(
        "--stability-score-thresh", type=float, default=default("stability_score_thresh")
    )
    ev.add_argument("--box-nms-thresh", type=float, default=default("box_nms_thresh"))
    ev.add_argument(
        "--crop-n-layers",
        type=int,
        default=default("crop_n_layers"),
        help="also segment 4^i crops in layer i",
    )
    ev.add_argument(
        "--min-mask-region-area",
        type=int,
        default=default("min_mask_region_area"),
        help="fill holes / drop islands below this many pixels",
    )
    ev.add_argument("--png", action="store_true", help="dataset: also OUT/<name>/<i>.png per mask")
    ev.add_argument(
        "--overlay", action="store_true", help="dataset: also OUT/<name>.overlay.png per image"
    )
    dataset_args(ev)
    ev.add_argument(
        "--device",
        default=None,
        help="cpu (default), cuda or cuda:N; under torchrun on GPUs each process's own GPU",
    )
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    runtime_args(ev)
    ev.set_defaults(func=_cmd_everything)
