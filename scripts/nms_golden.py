"""Record torchvision's NMS on real boxes for tests/test_amg.py (run where torchvision imports).

    python scripts/nms_golden.py ../shared/data/coco-mini tests/data/nms_torchvision.json

segment_anything's automatic mask generator suppresses duplicates with
``torchvision.ops.batched_nms`` (one category); torchvision does not import beside leansam's CPU
torch wheel, so its answers on real boxes are recorded once, in a separate environment
(``pip install torch==2.14.1 torchvision==0.29.1``), and leansam's own NMS is tested against the
record. Boxes: the ground-truth boxes of the first 20 coco-mini val images, each with two jittered
copies (overlaps to suppress); scores: seeded, rounded to 2 decimals (ties included).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.ops import batched_nms


def main(data: str, out: str) -> None:
    anns = json.loads((Path(data) / "annotations" / "instances_val2017.json").read_text())
    by_image: dict[int, list] = {}
    for a in anns["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    rng = np.random.default_rng(0)
    cases = []
    for image_id in sorted(by_image)[:20]:
        xywh = np.array(by_image[image_id], dtype=np.float64)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        jitter = [
            xyxy + rng.normal(0, 0.08, xyxy.shape) * np.tile(xywh[:, 2:], 2) for _ in range(2)
        ]
        boxes = np.round(np.concatenate([xyxy, *jitter]), 2)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        scores = np.round(rng.uniform(0, 1, len(boxes)), 2)
        for thr in (0.3, 0.5, 0.7):
            keep = batched_nms(
                torch.tensor(boxes, dtype=torch.float32),
                torch.tensor(scores, dtype=torch.float32),
                torch.zeros(len(boxes), dtype=torch.long),
                thr,
            )
            cases.append({"image_id": image_id, "iou_threshold": thr, "boxes": boxes.tolist(),
                          "scores": scores.tolist(), "keep": keep.tolist()})  # fmt: skip
    record = {
        "source": "torchvision.ops.batched_nms (as segment_anything's AMG calls it)",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cases": cases,
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record) + "\n")
    print(f"{len(cases)} cases -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
