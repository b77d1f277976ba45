"""Sizes of quantized-model files (issue 22): the shipped student's float32 state dict against its
``leansam quantize`` file in format version 1 (float weights) and version 2 (integer codes), at W8,
W6 and W4 with MinMax calibration on one coco-mini train2017 image (the codes take the same room
whatever the method).

    .venv/bin/python benchmarks/quant_file_sizes.py --out benchmarks/results/quant_file_sizes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco-mini"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from leansam import create_model
    from leansam.provenance import describe_environment
    from leansam.quant import QuantConfig, calibration_samples, load, quantize, save

    model = create_model("leansam-efficientvit-s", pretrained=True).float().eval()
    train = (COCO / "train2017", COCO / "annotations" / "instances_train2017.json")
    samples = calibration_samples(model, *train, count=1, max_boxes=2)
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        torch.save(model.state_dict(), d / "fp32.pt")
        fp32 = (d / "fp32.pt").stat().st_size
        for bits in ("w8a8", "w6a6", "w4a4"):
            q = quantize(model, QuantConfig.from_bits("minmax", bits), samples, progress=False)
            v2 = save(q, d / f"{bits}.pt").stat().st_size
            load(d / f"{bits}.pt")  # it loads back
            v1 = {"format": "leansam-quant", "version": 1,
                  "state_dict": {k: v.detach() for k, v in q.state_dict().items()}}  # fmt: skip
            torch.save(v1, d / "v1.pt")
            rows[bits] = {"version_1_bytes": (d / "v1.pt").stat().st_size, "version_2_bytes": v2,
                          "ratio_to_fp32": v2 / fp32}  # fmt: skip
            print(bits, rows[bits], file=sys.stderr)
    record = {"fp32_state_dict_bytes": fp32, "files": rows, "environment": describe_environment()}
    text = json.dumps(record, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
