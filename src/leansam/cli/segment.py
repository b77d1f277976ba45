"""``leansam segment``: masks of an image from box / point prompts
(:func:`leansam.segment.segment`)."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError
from .parsing import (
    check_dataset_args,
    dataset_args,
    dataset_model,
    dataset_only_flags,
    model_args,
    print_skipped,
    runtime_args,
)


def _cmd_segment(args: argparse.Namespace) -> int:
    if args.detections is not None or args.images is not None:
        return _detections(args)
    if args.image is None:
        raise InputError("give an image, or --images DIR --detections FILE for a dataset")
    flags = dataset_only_flags(args)
    if flags:
        raise InputError(f"{', '.join(flags)}: for --images DIR --detections FILE, not one image")
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


def _detections(args: argparse.Namespace) -> int:
    import os

    from ..io import file_digest
    from ..label import boxes_to_masks, read_detections
    from ..predictor import SamPredictor
    from ..runtime import check_runtime, runtime_calibration

    if args.image is not None or args.box or args.point:
        raise InputError("--detections takes its boxes from the file: no image or --box / --point")
    if args.multimask or args.separate_points:
        raise InputError(
            "--detections keeps the best of 3 masks per box (the detector protocol): "
            "no --multimask / --separate-points"
        )
    if args.images is None or args.detections is None:
        raise InputError("boxes to masks needs both --images DIR and --detections FILE")
    check_dataset_args(args)
    images, dets = read_detections(args.detections, args.images)
    if not dets:
        raise InputError(f"{args.detections} holds no detections")
    check_runtime(args.runtime)
    calib = runtime_calibration(args.runtime, args.calib_images)
    rank, sam, config = dataset_model(args)
    predictor = SamPredictor(sam, args.runtime, calibration_images=calib)
    config = {
        **config,
        "images": os.path.realpath(args.images),
        "detections_sha256": file_digest(args.detections),
    }
    summary = boxes_to_masks(
        predictor, images, dets, args.out, score=args.score, config=config, fresh=args.fresh,
        progress=not args.no_progress, workers=args.workers, image_batch=args.image_batch,
    )  # fmt: skip
    if rank == 0:
        skipped = summary["skipped"]
        print(
            f"wrote {summary['detections']} masks of {summary['images']} image(s) to {args.out} "
            f"({summary['already_done']} images already done, {len(skipped)} skipped) "
            f"in {summary['seconds_rank0']:.1f} s"
        )
        print_skipped(skipped, f"{args.out}.summary.json")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "segment",
        help="segment an image from box / point prompts, or a dataset from a detector's boxes",
    )
    s.add_argument("image", nargs="?", help="image file (JPEG, PNG, ...)")
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
    s.add_argument(
        "--out",
        required=True,
        help="output folder; with --detections the output COCO results file (.json)",
    )
    s.add_argument(
        "--images", default=None, help="dataset: the folder of the images of --detections"
    )
    s.add_argument(
        "--detections",
        default=None,
        help="dataset: boxes from a COCO results file, a COCO instances file or a folder of "
        "YOLO .txt labels; writes the same records with 'segmentation' (COCO RLE) and "
        "'predicted_iou' to --out, resumable and sharded under torchrun",
    )
    s.add_argument(
        "--score",
        choices=("detector", "detector*iou"),
        default="detector",
        help="dataset: each record's score (the detector's, or times the predicted IoU)",
    )
    dataset_args(s)
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument(
        "--device",
        default=None,
        help="cpu (default) or cuda; with --detections under torchrun on GPUs, each process's GPU",
    )
    runtime_args(s)
    s.set_defaults(func=_cmd_segment)
