"""IoU by object size: a box plot per COCO size bucket (needs matplotlib)."""

from __future__ import annotations

import io
import os

from ..errors import require
from ..io import atomic_write_bytes
from .metrics import size_of


def plot_iou_by_size(objects: list[dict], path: str | os.PathLike, title: str) -> None:
    """``objects``: per-object records with ``area`` and ``iou`` (a number, or {k: iou} for clicks,
    of which the largest k is drawn)."""
    matplotlib = require("matplotlib", "lvis")
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    sizes = ("small", "medium", "large")
    groups: dict[str, list[float]] = {s: [] for s in sizes}
    for o in objects:
        iou = o["iou"]
        if isinstance(iou, dict):
            iou = iou[max(iou, key=int)]
        groups[size_of(o["area"])].append(100 * iou)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.boxplot([groups[s] or [float("nan")] for s in sizes], showmeans=True)
    ax.set_xticks(range(1, len(sizes) + 1), [f"{s}\n(n={len(groups[s])})" for s in sizes])
    ax.set_ylabel("IoU x 100")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
