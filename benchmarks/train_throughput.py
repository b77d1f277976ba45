"""Training-step throughput (images/s) of stage 1 and stage 2 on this machine.

    .venv/bin/python benchmarks/train_throughput.py --models efficientvit-sam-tiny-l,sam-vit-tiny

Runs a few real steps of each stage through the library trainers on coco-mini train (converted to
SA-1B layout in a temporary folder) and reports the median images/s after the first step, with the
full configuration and machine in a JSON record.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from leansam.data.sa1b import coco_to_sa1b
from leansam.io import atomic_write_json
from leansam.provenance import describe_environment
from leansam.train.config import TrainConfig
from leansam.train.distill import distill
from leansam.train.finetune import finetune

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco-mini"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="efficientvit-sam-tiny-l,sam-vit-tiny")
    ap.add_argument("--teacher", default="sam-vit-tiny", help="teacher for the stage-1 rows")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--masks-per-image", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/train_throughput.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sa1b = Path(tmp) / "sa1b"
        coco_to_sa1b(
            COCO / "train2017", COCO / "annotations/instances_train2017.json", sa1b, progress=False
        )
        for name in args.models.split(","):
            for stage in ("finetune", "distill"):
                if stage == "distill" and name == args.teacher:
                    continue
                cfg = TrainConfig(
                    stage=stage,
                    model=name,
                    teacher=args.teacher if stage == "distill" else None,
                    data=[str(sa1b)],
                    out=str(Path(tmp) / f"{name}-{stage}"),
                    epochs=1,
                    max_steps=args.steps,
                    batch_size=args.batch_size,
                    masks_per_image=args.masks_per_image,
                    lr=1e-4,
                    num_points=56 * 56,
                    save_every=10**6,
                )
                result = (finetune if stage == "finetune" else distill)(cfg)
                speeds = [r["images_per_s"] for r in result["records"][1:]]
                rows.append(
                    {
                        "model": name,
                        "stage": stage,
                        "images_per_s_median": statistics.median(speeds),
                        "images_per_s_min": min(speeds),
                        "images_per_s_max": max(speeds),
                        "steps_timed": len(speeds),
                        "config": cfg.as_dict(),
                    }
                )
                print(
                    f"{name} {stage}: {rows[-1]['images_per_s_median']:.2f} img/s", file=sys.stderr
                )
    atomic_write_json(
        args.out,
        {
            "benchmark": "train_throughput",
            "config": vars(args),
            "environment": describe_environment(),
            "results": rows,
        },
    )
    print("| model | stage | images/s median (min-max) |\n|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['stage']} | {r['images_per_s_median']:.2f} "
            f"({r['images_per_s_min']:.2f}-{r['images_per_s_max']:.2f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
