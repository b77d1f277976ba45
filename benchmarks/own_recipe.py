"""Compute and throughput of `make weights` (leansam's own models), from the runs' own logs.

    .venv/bin/python benchmarks/own_recipe.py --out benchmarks/results/own_recipe.json

Reads each stage's ``metrics.jsonl`` (seconds and images/s of every step) and ``run.json``, and
prints the table of MODEL_CARD.md / BENCHMARKS.md: steps, images per step, median and spread of
images/s, and the summed step time per stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

STAGES = (
    ("decoder-warmup", "decoder warm start (synthetic boxes, 1 thread; 'images' are boxes)"),
    ("decoder-shapes", "box prior of real shapes (synthetic boxes; 'images' are boxes)"),
    ("teacher", "teacher `leansam-vit-s` (stage-2 pipeline, boxes)"),
    ("student-stage1", "student `leansam-efficientvit-s`, stage 1 (distill; cache not included)"),
    ("student-stage2", "student `leansam-efficientvit-s`, stage 2 (finetune, boxes)"),
    ("student", "student `leansam-efficientvit-s`, clicks (finetune, boxes and clicks)"),
    ("student-stage2-only", "ablation: student by stage 2 only"),
)


def collect(root: Path) -> list[dict]:
    rows = []
    for folder, label in STAGES:
        log = root / folder / "metrics.jsonl"
        if not log.is_file():
            continue
        steps = [json.loads(line) for line in log.read_text().splitlines()]
        run = json.loads((root / folder / "run.json").read_text())
        ips = [s["images_per_s"] for s in steps[1:]] or [steps[0]["images_per_s"]]
        rows.append(
            {
                "stage": folder,
                "label": label,
                "steps": len(steps),
                "images_per_step": run["config"]["batch_size"] * run["world_size"],
                "masks_per_image": run["config"]["masks_per_image"],
                "amp": run["config"]["amp"],
                "images_per_s_median": statistics.median(ips),
                "images_per_s_min": min(ips),
                "images_per_s_max": max(ips),
                "step_seconds_total": sum(s["seconds"] for s in steps),
                # steps x median step time: the stage's time on uncontended cores
                "step_seconds_median_x_steps": len(steps)
                * statistics.median(s["seconds"] for s in steps),
                "environment": run["environment"],
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    out = [
        "| stage | steps | images/step | images/s median (min-max) | step time, min "
        "| steps x median step, min |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r['label']} | {r['steps']} | {r['images_per_step']} | "
            f"{r['images_per_s_median']:.2f} ({r['images_per_s_min']:.2f}-"
            f"{r['images_per_s_max']:.2f}) | {r['step_seconds_total'] / 60:.1f} | "
            f"{r['step_seconds_median_x_steps'] / 60:.1f} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="out/own", help="folder with the make-weights runs")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args(argv)
    rows = collect(Path(args.runs))
    if not rows:
        print(f"no runs in {args.runs}: run `make weights` first", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
