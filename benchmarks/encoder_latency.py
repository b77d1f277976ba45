"""Image-encoder latency: leansam vs the reference EfficientViT-SAM code, same weights, same run.

    .venv/bin/python benchmarks/encoder_latency.py --models efficientvit-sam-l0,efficientvit-sam-xl0
    .venv/bin/python benchmarks/encoder_latency.py --runtime torch-opt \
        --out benchmarks/results/encoder_latency_torch_opt.json

For each model the reference (``efficientsam``, with random weights) and leansam (loaded from
the reference's state dict through ``create_model(checkpoint=...)``, its encoder on
``--runtime``, default eager) encode the same preprocessed coco-mini image, interleaved round by
round, batch 1, fp32. Prints a markdown table and writes a JSON record with every sample
statistic, the outputs' max abs difference, the full configuration and the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from leansam import SamPredictor, create_model
from leansam.bench import interleaved_timings
from leansam.io import atomic_write_json, load_image
from leansam.provenance import describe_environment

REPO = Path(__file__).resolve().parents[1]


def build_reference(name: str) -> torch.nn.Module:
    # efficientsam imports torchvision at module level although its model code does not use it;
    # where torchvision is absent, the test suite's stand-in (tests/stubs) satisfies the import.
    if importlib.util.find_spec("torchvision") is None:
        sys.path.insert(0, str(REPO / "tests" / "stubs"))
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    return create_efficientvit_sam_model(name, pretrained=False).eval()


def bench_model(
    name: str, image: np.ndarray, runs: int, warmup: int, runtime: str = "torch"
) -> dict:
    torch.manual_seed(0)
    ref = build_reference(name)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "weights.pt"
        torch.save(ref.state_dict(), path)
        ours = create_model(name, checkpoint=path)
    # One preprocessing for both: this measures the encoders alone.
    predictor = SamPredictor(ours)
    x = ours.preprocess(
        torch.as_tensor(predictor.image_transform.apply_image(image)).permute(2, 0, 1)[None]
    )
    from leansam.runtime import make_encoder

    encode = make_encoder(ours, runtime)
    with torch.inference_mode():
        diff = (ref.image_encoder(x) - encode(x)).abs().max().item()  # compiles for torch-opt

        def run_ref():
            ref.image_encoder(x)

        def run_ours():
            encode(x)

        stats = interleaved_timings(
            {"reference": run_ref, "leansam": run_ours}, runs=runs, warmup=warmup
        )
    return {
        "model": name,
        "input": list(x.shape),
        "dtype": "float32",
        "runtime": runtime,
        "max_abs_diff": diff,
        "reference": stats["reference"].as_dict(),
        "leansam": stats["leansam"].as_dict(),
        "ratio_median": stats["leansam"].median / stats["reference"].median,
    }


def markdown(rows: list[dict]) -> str:
    out = [
        "| model | input | reference median (min-max) s | leansam median (min-max) s | "
        "leansam / reference | max abs diff |",
        "|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        a, b = r["reference"], r["leansam"]
        ref = f"{a['median']:.3f} ({a['min']:.3f}-{a['max']:.3f})"
        ours = f"{b['median']:.3f} ({b['min']:.3f}-{b['max']:.3f})"
        out.append(
            f"| {r['model']} | {r['input'][-1]} | {ref} | {ours} | {r['ratio_median']:.3f} "
            f"| {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="efficientvit-sam-l0,efficientvit-sam-xl0")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--image", default=str(REPO.parent / "shared/data/coco-mini/val2017/000000000139.jpg")
    )
    ap.add_argument(
        "--runtime", default="torch", help="leansam's encoder runtime (leansam.runtime.RUNTIMES)"
    )
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/encoder_latency.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    image = load_image(args.image)
    rows = []
    for name in args.models.split(","):
        rows.append(bench_model(name, image, args.runs, args.warmup, args.runtime))
        r = rows[-1]
        print(
            f"{name}: ratio {r['ratio_median']:.3f}, max abs diff {r['max_abs_diff']:.1e}",
            file=sys.stderr,
        )
    record = {
        "benchmark": "encoder_latency",
        "config": {**vars(args), "batch": 1},
        "environment": describe_environment(),
        "results": rows,
    }
    atomic_write_json(args.out, record)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
