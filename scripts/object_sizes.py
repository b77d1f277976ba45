"""Object sizes of training data against the evaluation split, in COCO's size classes.

    .venv/bin/python scripts/object_sizes.py out/sa1b/coco-mini-train out/sa1b/coco-mval \
        --coco ../shared/data/coco-mini/annotations/instances_val2017.json

For each SA-1B folder, the share of its masks that COCO would call small (area < 32^2 pixels),
medium (< 96^2) or large, with every image rescaled to a 640-pixel long side first (COCO's image
size, so that synthetic scenes of another size compare), and the masks per image; the same for a
COCO annotation file (``--coco``, crowd regions left out, at the images' own size as COCO's
evaluation counts them). Reads the annotation files only (their ``area`` fields).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SMALL, MEDIUM = 32**2, 96**2
LONG_SIDE = 640


def size_class(area: float) -> str:
    return "small" if area < SMALL else "medium" if area < MEDIUM else "large"


def shares(areas: list[float], images: int) -> dict:
    n = len(areas)
    counts = {c: sum(1 for a in areas if size_class(a) == c) for c in ("small", "medium", "large")}
    return {
        "images": images,
        "masks": n,
        "masks_per_image": n / max(images, 1),
        **{c: counts[c] / max(n, 1) for c in counts},
    }


def sa1b_areas(folder: Path) -> tuple[list[float], int]:
    areas, images = [], 0
    for path in sorted(folder.glob("sa_*.json")):
        data = json.loads(path.read_text())
        info = data["image"]
        scale = (LONG_SIDE / max(info["height"], info["width"])) ** 2
        areas += [a["area"] * scale for a in data["annotations"]]
        images += 1
    return areas, images


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="*", type=Path, help="SA-1B folders")
    ap.add_argument("--coco", type=Path, help="a COCO instances file (the evaluation split)")
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    if not args.folders and not args.coco:
        ap.error("give SA-1B folders, --coco FILE, or both")
    rows = {}
    for folder in args.folders:
        if not folder.is_dir() or not any(folder.glob("sa_*.json")):
            print(f"error: {folder} is not a folder of sa_*.json files", file=sys.stderr)
            return 2
        rows[str(folder)] = shares(*sa1b_areas(folder))
    if args.coco:
        if not args.coco.is_file():
            print(f"error: --coco {args.coco} is not a file", file=sys.stderr)
            return 2
        coco = json.loads(args.coco.read_text())
        anns = [a for a in coco["annotations"] if not a.get("iscrowd")]
        rows[str(args.coco)] = shares([a["area"] for a in anns], len(coco["images"]))
    print("| data | images | masks | masks per image | small | medium | large |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['images']} | {r['masks']} | {r['masks_per_image']:.1f} | "
            f"{100 * r['small']:.0f} % | {100 * r['medium']:.0f} % | {100 * r['large']:.0f} % |"
        )
    if args.json:
        from leansam.io import atomic_write_json
        from leansam.provenance import describe_environment

        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        config["folders"] = [str(f) for f in args.folders]
        record = {"config": config, "long_side": LONG_SIDE, "environment": describe_environment()}
        atomic_write_json(args.json, {**record, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
