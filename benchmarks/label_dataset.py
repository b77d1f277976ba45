"""Labelling throughput (issue 23): images per hour of segment everything over a folder and of
boxes to masks, against SAM's ``scripts/amg.py`` logic on the same images and weights, in one run.

    .venv/bin/python benchmarks/label_dataset.py --images 4 \
        --out benchmarks/results/label_dataset.json

Rows, each on the first ``--images`` coco-mini val images, 32 x 32 grid, no crops, SAM's default
thresholds unless ``--relaxed``:

- ``amg.py``: the reference generator (efficientsam's copy of segment_anything's
  ``SamAutomaticMaskGenerator``, what SAM's ``scripts/amg.py`` runs) image after image in one
  process, images read with Pillow;
- ``leansam x1``: ``leansam everything DIR`` (one process, a decoding worker);
- ``leansam x2``: ``torchrun --nproc_per_node 2 ... everything DIR`` (one thread per process);
- ``boxes -> masks``: ``leansam segment --detections`` with the ground-truth boxes (at most 7 per
  image), one process.

Models: leansam's shipped student and EfficientViT-SAM-L0 with random weights (seeded). Mask
agreement: the share of the reference's masks that leansam's output has at IoU >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco-mini"
sys.path.insert(0, str(REPO / "tests"))


def _cli(*args, env=None, nproc: int = 1) -> float:
    cmd = [sys.executable, "-m", "leansam.cli", *map(str, args)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 2000), "-m", "leansam.cli",
               *map(str, args)]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return time.perf_counter() - t0


def _match(ref: list[np.ndarray], ours: list[np.ndarray]) -> float:
    if not ref:
        return 1.0 if not ours else 0.0
    if not ours:
        return 0.0
    stack = np.stack(ours)
    hits = 0
    for m in ref:
        iou = (stack & m).sum((1, 2)) / np.maximum((stack | m).sum((1, 2)), 1)
        hits += bool((iou >= 0.95).any())
    return hits / len(ref)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--relaxed", action="store_true", help="pred IoU 0, stability 0.3")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from efficientsam.models.efficientvit.sam import EfficientViTSamAutomaticMaskGenerator
    from reference import build_reference

    from leansam import create_model, load_model
    from leansam.io import coco_rle_to_mask, load_image
    from leansam.provenance import describe_environment

    work = Path(tempfile.mkdtemp(prefix="label-bench-"))
    folder = work / "images"
    folder.mkdir()
    files = sorted((COCO / "val2017").glob("*.jpg"))[: args.images]
    for f in files:
        shutil.copy(f, folder / f.name)
    thresholds = (
        ["--pred-iou-thresh", "0", "--stability-score-thresh", "0.3"] if args.relaxed else []
    )
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.3) if args.relaxed else {}
    threads = torch.get_num_threads()
    results = {}
    for name in ("leansam-efficientvit-s", "efficientvit-sam-l0"):
        if name.startswith("leansam"):
            ours = load_model(name).float().eval()
            ckpt = []
        else:
            ours = create_model(name, seed=0).eval()
            ckpt_path = work / f"{name}.pt"
            torch.save(ours.state_dict(), ckpt_path)
            ckpt = ["--checkpoint", ckpt_path]
        ref = build_reference(name)
        ref.load_state_dict(ours.state_dict())
        gen = EfficientViTSamAutomaticMaskGenerator(ref, points_per_side=32, **kw)
        t0 = time.perf_counter()
        ref_masks = [[r["segmentation"] for r in gen.generate(load_image(f))] for f in files]
        t_ref = time.perf_counter() - t0
        env1 = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out1 = work / f"{name}-x1"
        common = ["everything", folder, "--model", name, *ckpt, "--no-progress", *thresholds]
        wall1 = _cli(*common, "--out", out1, env=env1)
        env2 = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // 2))}
        wall2 = _cli(*common, "--out", work / f"{name}-x2", env=env2, nproc=2)
        # labelling time as the runs measured it (no interpreter start or model loading), like
        # the amg.py row's
        t1 = json.loads((out1 / "summary.json").read_text())["seconds_rank0"]
        t2 = json.loads((work / f"{name}-x2" / "summary.json").read_text())["seconds_rank0"]
        ours_masks = []
        for f in files:
            data = json.loads((out1 / f"sa_{f.stem}.json").read_text())
            ours_masks.append([coco_rle_to_mask(a["segmentation"]) for a in data["annotations"]])
        agreement = [_match(r, o) for r, o in zip(ref_masks, ours_masks, strict=True)]
        # boxes -> masks: ground-truth boxes, at most 7 per image
        anns = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())
        ids = {int(f.stem) for f in files}
        dets, per = [], {}
        for a in anns["annotations"]:
            if a["image_id"] in ids and not a.get("iscrowd") and per.get(a["image_id"], 0) < 7:
                per[a["image_id"]] = per.get(a["image_id"], 0) + 1
                dets.append({k: a[k] for k in ("image_id", "category_id", "bbox")} | {"score": 1})
        (work / "dets.json").write_text(json.dumps(dets))
        masks_out = work / f"{name}-masks.json"
        tb = _cli("segment", "--images", folder, "--detections", work / "dets.json", "--model",
                  name, *ckpt, "--no-progress", "--out", masks_out, env=env1)  # fmt: skip
        n = len(files)
        results[name] = {
            "images": n,
            "seconds": {"amg.py": t_ref, "leansam x1": t1, "leansam x2": t2, "boxes": tb},
            "wall_seconds_with_start_up": {"leansam x1": wall1, "leansam x2": wall2},
            "images_per_hour": {
                "amg.py": 3600 * n / t_ref,
                "leansam x1": 3600 * n / t1,
                "leansam x2": 3600 * n / t2,
                "boxes -> masks": 3600 * n / tb,
            },
            "boxes": len(dets),
            "masks": {
                "amg.py": sum(map(len, ref_masks)),
                "leansam": sum(map(len, ours_masks)),
            },
            "reference_masks_matched": float(np.mean(agreement)),
        }
        print(json.dumps({name: results[name]["images_per_hour"]}), file=sys.stderr)
    record = {
        "relaxed": args.relaxed,
        "threads": threads,
        "results": results,
        "environment": describe_environment(),
        "note": "images/hour from labelling time only (the runs' own timers, no start-up); the "
        "boxes -> masks row includes process start and model loading",
    }
    text = json.dumps(record, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
