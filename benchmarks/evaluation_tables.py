"""Render the tables of EVALUATION.md from ``leansam eval`` result folders.

    .venv/bin/python benchmarks/evaluation_tables.py out/eval

Every figure comes from a ``results.json`` written by ``leansam eval``; the rows are grouped by
protocol and list the model, the figures and the number of objects / detections. The records
behind EVALUATION.md are kept in ``benchmarks/results/eval/<run>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _f(v: float | None, scale: float = 1.0) -> str:
    return "n/a" if v is None or v < 0 else f"{v * scale:.1f}"


def _name(r: dict) -> str:
    """The model, plus the folder of its weights when they are not the shipped ones (weights/)
    and the runtime when it is not plain torch."""
    name = r["config"]["model"]
    ckpt = r["config"].get("checkpoint")
    if ckpt and Path(ckpt).parent.name != "weights":
        name += f" ({Path(ckpt).parent.name})"
    runtime = r["config"].get("runtime")
    return name + (f" [{runtime}]" if runtime and runtime != "torch" else "")


def tables(runs: list[dict]) -> str:
    out = []
    box = [r for r in runs if r["protocol"] == "box"]
    if box:
        out += [
            "### Box prompts (GT boxes), mIoU x 100",
            "",
            "| model | all | small | medium | large | objects |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in box:
            m = r["metrics"]
            sizes = " | ".join(_f(m["mIoU"][s]) for s in ("all", "small", "medium", "large"))
            out.append(f"| {_name(r)} | {sizes} | {m['count']['all']} |")
        out.append("")
    click = [r for r in runs if r["protocol"] == "click"]
    if click:
        ks = list(click[0]["metrics"])
        out += [
            "### Point prompts (simulated clicks), mIoU x 100",
            "",
            # the records' keys are "K clicks" for every K (leansam.eval.runner)
            "| model | "
            + " | ".join("1 click" if k == "1 clicks" else k for k in ks)
            + " | objects |",
            "|---|" + "---:|" * (len(ks) + 1),
        ]
        for r in click:
            m = r["metrics"]
            vals = " | ".join(_f(m[k]["mIoU"]["all"]) if k in m else "n/a" for k in ks)
            out.append(f"| {_name(r)} | {vals} | {m[ks[0]]['count']['all']} |")
        out.append("")
    det = [r for r in runs if r["protocol"] == "detector"]
    if det:
        keys = list(det[0]["metrics"]["segm"])
        out += [
            "### Detector boxes, mask AP x 100 (COCOeval segm)",
            "",
            "| model | detections | " + " | ".join(keys) + " | boxes from |",
            "|---|---:|" + "---:|" * len(keys) + "---|",
        ]
        for r in det:
            segm = r["metrics"]["segm"]
            vals = " | ".join(_f(segm[k], 100) for k in keys)
            src = r["config"]["detections"]
            src = "ground truth (oracle)" if src == "gt" else Path(src).name
            n = r["metrics"]["detections"]
            out.append(f"| {_name(r)} | {n} | {vals} | {src} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="folder whose subfolders hold results.json files")
    args = ap.parse_args(argv)
    root = Path(args.root)
    paths = sorted(root.glob("*/results.json")) or sorted(root.glob("*.json"))
    runs = [json.loads(p.read_text()) for p in paths]
    if not runs:
        print(f"no results.json under {args.root}", file=sys.stderr)
        return 2
    print(tables(runs))
    machines: dict[str, list[str]] = {}  # each machine with the rows measured on it
    for r in runs:
        env = r["environment"]
        key = (
            f"{env['cpu']}, {env['logical_cpus']} logical CPUs; torch {env['torch']}, "
            f"leansam {env['leansam']}"
        )
        machines.setdefault(key, []).append(f"{_name(r)} {r['protocol']}")
    for key, rows in machines.items():
        which = f" ({', '.join(rows)})" if len(machines) > 1 else ""
        print(f"Machine: {key}{which}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
