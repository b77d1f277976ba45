"""torchvision.ops' box helpers as upstream's automatic mask generator uses them.

A plain restatement of torchvision's documented semantics, written independently of leansam's
vectorised NMS so that the AMG parity test compares two implementations: boxes are visited by
decreasing score (stable for ties); a box is dropped when its IoU with an already kept box of the
same category is greater than the threshold.
"""

import torch


def box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def batched_nms(boxes, scores, idxs, iou_threshold):
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    b = boxes.float().tolist()
    cat = idxs.tolist()
    keep = []
    for i in order:
        if all(cat[i] != cat[k] or _iou(b[i], b[k]) <= iou_threshold for k in keep):
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)
