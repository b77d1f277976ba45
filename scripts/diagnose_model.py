"""Box-protocol diagnosis of a model on coco-mini val (MODEL_CARD.md, "Diagnosis").

    python scripts/diagnose_model.py --model leansam-efficientvit-s [--checkpoint F] [--limit 20]

Prints the markdown rows of ``leansam.eval.diagnose`` (predicted-IoU choice, best of 3 by true
IoU, single-mask output, box-fill; empty masks, area ratio, IoU with the box) and writes them as
JSON with ``--json``. ``--content-free`` diagnoses the model with an all-zero image embedding (its
prompt encoder and decoder's box prior alone: ``leansam.train.warmup.content_free``).
``--box-drawing`` measures instead how well the decoder alone draws boxes of each size on a zero
image embedding. ``--grid-ceiling`` (no model) scores the box and its inscribed ellipse at pixel
resolution and quantized to the 64 x 64 embedding grid's cells (``diagnose.grid_ceiling``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import leansam
from leansam.eval.dataset import EvalDataset
from leansam.eval.diagnose import box_drawing, diagnose_boxes, diagnosis_markdown, grid_ceiling
from leansam.eval.metrics import SIZES
from leansam.io import atomic_write_json

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "coco-mini"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", default="leansam-efficientvit-s", help="model name (default: %(default)s)"
    )
    ap.add_argument(
        "--checkpoint",
        default=None,
        help="weights (default: leansam's own for leansam-* models, else random)",
    )
    ap.add_argument("--name", default=None, help="row label (default: the model or checkpoint)")
    ap.add_argument("--limit", type=int, default=None, help="first N val images by id")
    ap.add_argument(
        "--images", default=str(DATA / "val2017"), help="image folder (default: coco-mini val2017)"
    )
    ap.add_argument(
        "--annotations",
        default=str(DATA / "annotations" / "instances_val2017.json"),
        help="COCO instances JSON (default: coco-mini val2017's)",
    )
    ap.add_argument("--json", default=None, help="also write the diagnosis here")
    ap.add_argument(
        "--box-drawing",
        action="store_true",
        help="only the decoder's box drawing on a zero embedding (diagnose.box_drawing)",
    )
    ap.add_argument(
        "--content-free",
        action="store_true",
        help="replace the image embedding by zeros: the prompt's box prior alone",
    )
    ap.add_argument(
        "--grid-ceiling",
        action="store_true",
        help="no model: box and ellipse fills at pixel and at embedding-cell resolution "
        "(diagnose.grid_ceiling)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = ap.parse_args(argv)
    if args.grid_ceiling:
        d = grid_ceiling(EvalDataset.load(args.images, args.annotations, limit=args.limit))
        print("| fill | all | small | medium | large |\n|---|---:|---:|---:|---:|")
        for name, m in d["mIoU"].items():
            print(f"| {name} | " + " | ".join(f"{m[s]:.1f}" for s in SIZES) + " |")
        print(f"objects: {d['count']}")
        if args.json:
            atomic_write_json(args.json, {"limit": args.limit, **d})
        return 0
    model = leansam.load_model(args.model, checkpoint=args.checkpoint)
    if args.content_free:
        from leansam.train.warmup import content_free

        model = content_free(model)
    if args.box_drawing:
        drawn = box_drawing(model)
        print("| box side (px of 1024) | " + " | ".join(str(k) for k in drawn) + " |")
        print("|---|" + "---:|" * len(drawn))
        print(
            "| IoU with the box x 100 | "
            + " | ".join(f"{100 * v:.1f}" for v in drawn.values())
            + " |"
        )
        return 0
    data = EvalDataset.load(args.images, args.annotations, limit=args.limit)
    d = diagnose_boxes(model, data, progress=not args.no_progress)
    name = args.name or (Path(args.checkpoint).parent.name if args.checkpoint else args.model)
    sys.stdout.write(diagnosis_markdown(name, d))
    print(f"objects: {d['count']}")
    if args.json:
        atomic_write_json(args.json, {"name": name, "limit": args.limit, **d})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
