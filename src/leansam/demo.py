"""``make demo``: segment a few coco-mini val images from their annotation boxes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .data.coco import ann_to_mask, load_coco, xywh_to_xyxy
from .errors import InputError
from .eval.metrics import mask_iou
from .eval.predictors import box_masks
from .io import atomic_write_bytes, atomic_write_json, atomic_write_png, draw_overlay, load_image
from .provenance import describe_environment

#: the demo's model without --model and --checkpoint: leansam's own trained student
DEFAULT_MODEL = "leansam-efficientvit-s"


#: the report's note for random weights (the command line warns once, from load_model)
UNTRAINED = (
    "WARNING: no --checkpoint given, so the model has untrained (random) weights and the masks "
    "are meaningless. Pass an official checkpoint, e.g. `make demo DEMO_ARGS='--model "
    "efficientvit-sam-l0 --checkpoint efficientvit_sam_l0.pt'`, or use leansam's own model "
    "(the default, leansam-efficientvit-s)."
)


def run_demo(
    *,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    num_images: int = 4,
    objects_per_image: int = 5,
    device: str | None = None,
) -> dict:
    """Segment the first ``num_images`` val images (by id) from their largest annotation boxes;
    write ``overlays/*.png``, ``report.md`` and ``report.json`` into ``out_dir``. Without a
    checkpoint, leansam's own models use their shipped weights (MODEL_CARD.md). ``model``
    defaults to the variant ``checkpoint`` is for, and without a checkpoint to
    ``leansam-efficientvit-s``."""
    from .loading import load_model
    from .predictor import SamPredictor
    from .registry import model_for_checkpoint

    if model is None:
        model = model_for_checkpoint(checkpoint) if checkpoint else DEFAULT_MODEL

    data = Path(data)
    images, anns = load_coco(data / "annotations" / "instances_val2017.json")
    if num_images < 1:
        raise InputError("--images must be at least 1")
    sam = load_model(model, checkpoint, device=device)  # warns once on random weights
    checkpoint = sam.checkpoint_path
    predictor = SamPredictor(sam)
    out = Path(out_dir)

    rows, chosen = (
        [],
        [im for im in images if any(not a["iscrowd"] for a in anns.get(im["id"], []))],
    )
    for info in chosen[:num_images]:
        objs = sorted((a for a in anns[info["id"]] if not a["iscrowd"]), key=lambda a: -a["area"])[
            :objects_per_image
        ]
        image = load_image(data / "val2017" / info["file_name"])
        h, w = image.shape[:2]
        boxes = np.array([xywh_to_xyxy(a["bbox"]) for a in objs])
        t0 = time.perf_counter()
        predictor.set_image(image)
        t1 = time.perf_counter()
        masks, scores, _ = predictor.predict(box=boxes, multimask_output=False)
        t2 = time.perf_counter()
        masks = masks.reshape(len(objs), h, w)  # one mask per box
        gts = [ann_to_mask(a, h, w) for a in objs]
        ious = [mask_iou(m, g) for m, g in zip(masks, gts, strict=True)]
        box_fill = [mask_iou(b, g) for b, g in zip(box_masks(boxes, h, w), gts, strict=True)]
        overlay = draw_overlay(
            image, list(masks), boxes=[tuple(b) for b in boxes], labels=[f"{i:.2f}" for i in ious]
        )
        atomic_write_png(out / "overlays" / f"{Path(info['file_name']).stem}.png", overlay)
        rows.append(
            {
                "file_name": info["file_name"],
                "size": [h, w],
                "objects": len(objs),
                "iou": ious,
                "box_fill_iou": box_fill,
                "predicted_iou": [float(s) for s in np.ravel(scores)],
                "embed_ms": 1000 * (t1 - t0),
                "decode_ms": 1000 * (t2 - t1),
            }
        )
        print(
            f"{info['file_name']}: {len(objs)} objects, mIoU {100 * np.mean(ious):.1f} "
            f"(box-fill {100 * np.mean(box_fill):.1f})"
        )

    all_ious = [i for r in rows for i in r["iou"]]
    all_box_fill = [i for r in rows for i in r["box_fill_iou"]]
    report = {
        "model": model,
        "checkpoint": os.fspath(checkpoint) if checkpoint else None,
        "trained": checkpoint is not None,
        "mIoU": 100 * float(np.mean(all_ious)),
        "box_fill_mIoU": 100 * float(np.mean(all_box_fill)),
        "images": rows,
        "environment": describe_environment(),
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "report.md", _markdown(report).encode())
    print(
        f"mIoU over {len(all_ious)} objects: {report['mIoU']:.1f} (box-fill baseline "
        f"{report['box_fill_mIoU']:.1f}); report: {out / 'report.md'}"
    )
    return report


def _markdown(report: dict) -> str:
    lines = [
        "# leansam demo",
        "",
        f"Model `{report['model']}`, weights: "
        + (f"`{report['checkpoint']}`" if report["trained"] else "**untrained (random)**"),
        "",
    ]
    if not report["trained"]:
        lines += [f"> {UNTRAINED}", ""]
    lines += [
        "Each image's largest annotated objects are segmented from their ground-truth boxes",
        "(one batched decoder call per image) and compared with the ground-truth masks. The",
        "overlays label each mask with its IoU against the ground-truth mask (measured, not the",
        "model's predicted IoU, which `report.json` lists as `predicted_iou`).",
        "",
        "| image | objects | mIoU | box-fill mIoU | embed ms | decode ms | overlay |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["images"]:
        stem = Path(r["file_name"]).stem
        lines.append(
            f"| {r['file_name']} | {r['objects']} | {100 * np.mean(r['iou']):.1f} | "
            f"{100 * np.mean(r['box_fill_iou']):.1f} | "
            f"{r['embed_ms']:.0f} | {r['decode_ms']:.0f} | [png](overlays/{stem}.png) |"
        )
    env = report["environment"]
    lines += [
        "",
        f"Overall mIoU: **{report['mIoU']:.1f}** (box-fill baseline on the same boxes: "
        f"{report['box_fill_mIoU']:.1f})",
        "",
        f"leansam {env['leansam']}, torch {env['torch']}, {env['machine']}, "
        f"{env['torch_threads']} threads.",
        "",
    ]
    return "\n".join(lines)
