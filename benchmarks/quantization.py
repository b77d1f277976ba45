"""Post-training quantization of leansam's own models: every method x bit setting, box mIoU.

    .venv/bin/python benchmarks/quantization.py --models leansam-efficientvit-s \
        --out benchmarks/results/quantization-student.json
    .venv/bin/python benchmarks/quantization.py --markdown \
        benchmarks/results/quantization-student.json benchmarks/results/quantization-teacher.json

For each model (its shipped weights): FP32, then each method x bit setting quantized with
calibration on coco-mini **train** (``--calib-count`` images, their GT boxes as prompts) and
evaluated with the box protocol on coco-mini **val** (never used for calibration). Before each
evaluation ``check_active`` runs the quantized model on a val image and fails unless every
quantizer is enabled, calibrated and changes its input. Records (mIoU by size, wall times, CAG
register counts, active quantizers) go to ``--out`` after every configuration; a rerun skips
the configurations already there (resumable), but only for the weights they were measured on
(their sha256 in ``setup.weights_sha256``; a record of other weights is refused).
``--markdown`` prints the QUANTIZATION.md tables.
A method ``ahcptq+kernel-bug`` runs AHCPTQ with the published HLUQ kernel's behaviour,
``METHOD+mean`` with CAG groups merged at their members' mean instead of by range (the default,
``QuantConfig.cag_merge``), ``METHOD+log2`` with plain log2 softmax quantizers instead of the
calibrated granularity (the default, ``QuantConfig.softmax``). ``--seed`` (rows labelled
``METHOD (seed N)``), ``--iters`` and ``--keep-8bit TENSOR`` (mixed precision) set the
corresponding ``QuantConfig`` fields; QUANTIZATION.md keeps each such study in its own record.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from leansam import SamPredictor, create_model
from leansam.errors import CheckpointError
from leansam.eval import EvalDataset, evaluate
from leansam.io import atomic_write_json, file_sha256, load_image
from leansam.pretrained import pretrained_path
from leansam.provenance import describe_environment
from leansam.quant import (
    BIT_SETTINGS,
    METHODS,
    CalibSample,
    QuantConfig,
    calibration_samples,
    check_active,
    quantize,
    report,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-mini"


def _val_sample(model, dataset: EvalDataset) -> list[CalibSample]:
    """The first val image with its boxes, for the activity check."""
    info = dataset.images[0]
    image = load_image(dataset.path(info))
    pred = SamPredictor(model)
    boxes = np.array([o["bbox"] for o in dataset.objects(info["id"])], dtype=np.float64)[:4]
    boxes[:, 2:] += boxes[:, :2]
    boxes = pred.transform.apply_boxes(boxes, image.shape[:2])
    return [CalibSample(pred.encoder_input(image), torch.as_tensor(boxes, dtype=torch.float32))]


def _miou(result: dict) -> dict:
    m = result["metrics"]
    return {k: round(m["mIoU"][k], 2) for k in ("all", "small", "medium", "large")}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {"runs": []}
    done = {(r["model"], _label(r), r["bits"]) for r in record["runs"]}
    try:
        shas = weights_digests(record, args.models.split(","), out)
    except CheckpointError as e:
        sys.exit(str(e))
    val = EvalDataset.load(DATA / "val2017", DATA / "annotations" / "instances_val2017.json")
    record["setup"] = {
        "calibration": f"coco-mini train, first {args.calib_count} annotated images, <= 4 GT "
        "boxes each",
        "evaluation": f"coco-mini val, box protocol, {val.num_objects()} objects",
        "iters_per_block": args.iters,
        "seed": args.seed,
        "keep_8bit": args.keep_8bit,
        "threads": args.threads,
        "weights_sha256": shas,
        "environment": describe_environment(),
    }
    for name in args.models.split(","):
        model = create_model(name, pretrained=True)
        if (name, "fp32", "-") not in done:
            t0 = time.perf_counter()
            res = evaluate(SamPredictor(model), val, "box", progress=False)
            record["runs"].append(
                {
                    "model": name,
                    "method": "fp32",
                    "bits": "-",
                    "miou": _miou(res),
                    "eval_s": round(time.perf_counter() - t0, 1),
                }
            )
            atomic_write_json(out, record)
        samples = calibration_samples(
            model,
            DATA / "train2017",
            DATA / "annotations" / "instances_train2017.json",
            count=args.calib_count,
        )
        check = _val_sample(model, val)
        for bits in args.bits.split(","):
            for method in args.methods.split(","):
                if (name, _label({"method": method, "seed": args.seed}), bits) in done:
                    continue
                # variants: ahcptq+kernel-bug (the published HLUQ kernel), METHOD+mean (CAG
                # groups merged at the mean instead of by range), METHOD+log2 (plain log2 softmax)
                base, _, flag = method.partition("+")
                cfg = QuantConfig.from_bits(
                    base,
                    bits,
                    iters=args.iters,
                    kernel_bug=flag == "kernel-bug",
                    cag_merge="mean" if flag == "mean" else "range",
                    softmax="log2" if flag == "log2" else "agq",
                    seed=args.seed,
                    keep_8bit=tuple(args.keep_8bit),
                )
                q = quantize(model, cfg, samples, progress=False)
                active = check_active(q, check)
                rep = report(q)
                t0 = time.perf_counter()
                res = evaluate(SamPredictor(q), val, "box", progress=False)
                row = {
                    "model": name,
                    "method": method,
                    "bits": bits,
                    "seed": args.seed,
                    "softmax": cfg.softmax,
                    "cag_merge": cfg.cag_merge if cfg.cag else "-",
                    "miou": _miou(res),
                    "quantize_s": q.quant_info["total_s"],
                    "eval_s": round(time.perf_counter() - t0, 1),
                    "quantized_tensors": len(rep["tensors"]),
                    "active_quantizers": f"{len(active)}/{len(active)}",
                    "cag_registers": rep["cag_registers"],
                    "sign_folded": q.quant_info["sign_folded"],
                    "kept": q.quant_info["kept"],
                }
                record["runs"].append(row)
                atomic_write_json(out, record)
                print(json.dumps(row), flush=True)


def weights_digests(record: dict, names: list[str], out: Path) -> dict[str, str]:
    """The sha256 of each model's shipped weights, added to those ``record`` has of other models.
    Raises CheckpointError when ``record`` holds runs of one of ``names`` measured on other
    weights, or on weights it did not record (before they were recorded): its rows would be
    skipped as done."""
    shas = dict(record.get("setup", {}).get("weights_sha256", {}))
    for name in names:
        sha = file_sha256(pretrained_path(name))
        if any(r["model"] == name for r in record["runs"]) and shas.get(name) != sha:
            old = shas.get(name, "")[:12] + "..." if shas.get(name) else "not recorded"
            raise CheckpointError(
                f"{out} holds results of other {name} weights (sha256 {old}, shipped now "
                f"{sha[:12]}...): move it away or pass another --out"
            )
        shas[name] = sha
    return shas


def _label(row: dict) -> str:
    """A run's row label: its method, and its seed where that is not the default 0."""
    seed = row.get("seed", 0)
    return row["method"] + (f" (seed {seed})" if seed else "")


def markdown(paths: list[str]) -> str:
    runs = [r for p in paths for r in json.loads(Path(p).read_text())["runs"]]
    lines = []
    for name in dict.fromkeys(r["model"] for r in runs):
        mine = {(_label(r), r["bits"]): r for r in runs if r["model"] == name}
        fp = mine.get(("fp32", "-"))
        lines += [f"### {name}", ""]
        if fp:
            lines += [f"FP32: {fp['miou']['all']:.1f} box mIoU", ""]
        bits = [b for b in BIT_SETTINGS if any(k[1] == b for k in mine)]
        lines += ["| method | " + " | ".join(b.upper() for b in bits) + " | quantize time |"]
        lines += ["|---|" + "---:|" * (len(bits) + 1)]
        extra = [m for m, _ in mine if m not in METHODS and m != "fp32"]
        for method in [*METHODS, *dict.fromkeys(extra)]:
            if not any((method, b) in mine for b in bits):
                continue
            cells = [
                f"{mine[(method, b)]['miou']['all']:.1f}" if (method, b) in mine else "-"
                for b in bits
            ]
            times = [mine[(method, b)]["quantize_s"] for b in bits if (method, b) in mine]
            t = f"{np.median(times):.0f} s" if times else "-"
            lines += [f"| {method} | " + " | ".join(cells) + f" | {t} |"]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="leansam-efficientvit-s,leansam-vit-s")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--bits", default=",".join(BIT_SETTINGS))
    p.add_argument("--calib-count", type=int, default=16)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--keep-8bit", action="append", default=[], help="QuantConfig.keep_8bit")
    p.add_argument("--seed", type=int, default=0, help="QuantConfig.seed (dropping, KMeans, order)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="benchmarks/results/quantization.json")
    p.add_argument("--markdown", nargs="+", metavar="JSON", help="print tables and exit")
    args = p.parse_args()
    if args.markdown:
        sys.stdout.write(markdown(args.markdown))
        return
    run(args)


if __name__ == "__main__":
    main()
