"""Object recall of segment everything (MODEL_CARD.md): over the images of a COCO dataset, masks per
image and the share of ground-truth objects (area >= 32 x 32, not crowd) that some generated mask
covers at IoU >= 0.5.

    leansam everything ../shared/data/coco-mini/val2017 --model leansam-efficientvit-s --out out/ev
    python scripts/everything_recall.py out/ev --images ../shared/data/coco-mini/val2017 \
        --annotations ../shared/data/coco-mini/annotations/instances_val2017.json \
        --out out/ev-recall.json

The folder is the output of ``leansam everything`` over the dataset's image folder (one
``sa_<name>.json`` per image, named by ``leansam.amg.dataset.output_name``). The figures are
printed as JSON; ``--out`` also writes them with the labelling run's configuration (its
``run.json``: model, checkpoint and its sha256, thresholds) and this machine's environment.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from leansam.amg.dataset import output_name
from leansam.data.coco import ann_to_mask, load_coco
from leansam.io import atomic_write_json, coco_rle_to_mask
from leansam.provenance import describe_environment

MIN_AREA = 32 * 32
IOU = 0.5


def recall(labels: Path, images_dir: Path, annotations: Path, limit: int | None = None) -> dict:
    """The figures over the first ``limit`` images by id (all with None), as ``leansam eval
    --limit`` takes them."""
    images, anns = load_coco(annotations)
    images = images[:limit]
    masks_per_image, found, total = [], 0, 0
    for info in images:
        path = labels / f"{output_name(images_dir / info['file_name'], images_dir)}.json"
        if not path.exists():
            raise SystemExit(
                f"everything_recall.py: {path} missing: run leansam everything over the dataset "
                "first"
            )
        generated = [
            coco_rle_to_mask(a["segmentation"]) for a in json.loads(path.read_text())["annotations"]
        ]
        masks_per_image.append(len(generated))
        stack = np.stack(generated) if generated else None
        for a in anns.get(info["id"], []):
            if a.get("iscrowd", 0) or a.get("area", 0) < MIN_AREA:
                continue
            total += 1
            if stack is None:
                continue
            gt = ann_to_mask(a, info["height"], info["width"])
            inter = (stack & gt).sum((1, 2))
            union = (stack | gt).sum((1, 2))
            found += bool((inter / np.maximum(union, 1) >= IOU).any())
    return {
        "images": len(images),
        "masks_per_image": float(np.mean(masks_per_image)),
        "objects": total,
        "object_recall": found / max(total, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("labels", type=Path, help="output folder of leansam everything")
    ap.add_argument("--images", type=Path, required=True, help="the image folder labelled")
    ap.add_argument("--annotations", type=Path, required=True, help="COCO instances JSON")
    ap.add_argument("--out", type=Path, help="write the figures, run and environment here")
    ap.add_argument("--limit", type=int, help="only the first N images by id (all by default)")
    args = ap.parse_args()
    if not args.annotations.is_file():
        raise SystemExit(f"everything_recall.py: --annotations {args.annotations} not found")
    if args.limit is not None and args.limit < 1:
        raise SystemExit(f"everything_recall.py: --limit must be at least 1, not {args.limit}")
    r = recall(args.labels, args.images, args.annotations, args.limit)
    print(json.dumps(r, indent=2))
    if args.out:
        run = args.labels / "run.json"
        atomic_write_json(
            args.out,
            {
                **r,
                "min_area": MIN_AREA,
                "iou": IOU,
                "limit": args.limit,
                "annotations": str(args.annotations),
                "run": json.loads(run.read_text()) if run.is_file() else None,
                "environment": describe_environment(),
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
