"""What flushing subnormal softmax weights saves: segment everything with the shipped student.

    .venv/bin/python benchmarks/subnormal_softmax.py [--points-per-side 8] [--runs 3]

Runs ``SamAutomaticMaskGenerator`` on a coco-mini val image with the inference softmax as
shipped (``leansam.modeling.common.softmax_ftz``: subnormal weights flushed to zero) and with a
plain softmax patched in, interleaved run by run, on 1 thread; prints the share of subnormal
weights in the decoder's attention maps, both median times and whether the masks agree.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import leansam.modeling.transformer as transformer
from leansam import create_model
from leansam.amg import SamAutomaticMaskGenerator
from leansam.io import load_image

IMAGE = Path(__file__).resolve().parents[2] / "shared/data/coco-mini/val2017/000000000139.jpg"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points-per-side", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = create_model("leansam-efficientvit-s", pretrained=True).float().eval()
    image = load_image(IMAGE)
    gen = SamAutomaticMaskGenerator(model, points_per_side=args.points_per_side)
    shipped = transformer.softmax_ftz
    tiny = torch.finfo(torch.float32).tiny
    counts = [0, 0, 0.0]  # subnormal, all, largest share in one attention map

    def plain(x: torch.Tensor, dim: int) -> torch.Tensor:
        y = torch.softmax(x, dim=dim)
        sub = int(((y > 0) & (y < tiny)).sum())
        counts[0] += sub
        counts[1] += y.numel()
        counts[2] = max(counts[2], sub / y.numel())
        return y

    variants = {"flushed (shipped)": shipped, "plain softmax": plain}
    times: dict[str, list[float]] = {k: [] for k in variants}
    masks = {}
    for i in range(args.runs + 1):  # the first round warms up
        for name, fn in variants.items():
            transformer.softmax_ftz = fn
            t0 = time.perf_counter()
            records = gen.generate(image)
            if i:
                times[name].append(time.perf_counter() - t0)
            masks[name] = np.stack([r["segmentation"] for r in records]) if records else None
    transformer.softmax_ftz = shipped
    share, worst = 100 * counts[0] / max(counts[1], 1), 100 * counts[2]
    print(f"subnormal attention weights: {share:.1f} % (largest in one map: {worst:.1f} %)")
    for name, ts in times.items():
        print(f"{name}: median {statistics.median(ts):.2f} s ({min(ts):.2f}-{max(ts):.2f})")
    a, b = masks.values()
    same = (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
    ratio = statistics.median(times["plain softmax"]) / statistics.median(
        times["flushed (shipped)"]
    )
    print(f"speed-up from flushing: {ratio:.2f}x; identical masks: {same}")


if __name__ == "__main__":
    main()
