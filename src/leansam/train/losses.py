"""Stage-2 mask loss (SPEC section 5): 20 x BCE + Dice on uncertainty-sampled points.

The loss is computed at 112 x 112 = 12,544 points per mask instead of every pixel: 3x as many
candidates are drawn uniformly, the 75% most uncertain of them (logit closest to 0) are kept and the
rest drawn uniformly again (PointRend / Mask2Former point sampling). With multimask output the loss
of the best of the 3 masks is taken per prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NUM_POINTS = 112 * 112
BCE_WEIGHT = 20.0


def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """x: B x C x H x W; coords: B x P x 2, (x, y) in [0, 1] -> B x C x P (bilinear).

    Border padding: zero padding would pull logits towards 0 within half a pixel of the frame edge
    and make those points look uncertain."""
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # B x P x 1 x 2 in [-1, 1]
    return F.grid_sample(
        x, grid, mode="bilinear", padding_mode="border", align_corners=False
    ).squeeze(3)


def uncertain_point_coords(
    logits: torch.Tensor,
    num_points: int = NUM_POINTS,
    *,
    oversample_ratio: float = 3.0,
    importance_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """B x 1 x H x W logits -> B x num_points x 2 coordinates in [0, 1]."""
    b, device = logits.shape[0], logits.device
    n = int(num_points * oversample_ratio)
    cand = torch.rand(b, n, 2, device=device, generator=generator)
    uncertainty = -point_sample(logits.detach(), cand).abs().squeeze(1)  # B x n
    k = int(importance_ratio * num_points)
    idx = uncertainty.topk(k, dim=1).indices
    chosen = torch.gather(cand, 1, idx[..., None].expand(-1, -1, 2))
    rest = torch.rand(b, num_points - k, 2, device=device, generator=generator)
    return torch.cat([chosen, rest], dim=1)


def _dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row Dice loss of ... x P logits against {0, 1} targets (the +1 smooths empty masks)."""
    p = logits.sigmoid()
    return 1 - (2 * (p * target).sum(-1) + 1) / (p.sum(-1) + target.sum(-1) + 1)


def _focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    return ((alpha * target + (1 - alpha) * (1 - target)) * loss).mean(-1)


def _class_balanced_mean(per_logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row of ... x P: the mean of ``per_logit`` over the (soft) target's object and its mean
    over the background, averaged (``bce_balanced``, ``prior_distill_loss``)."""
    pos = (per_logit * target).sum(-1) / target.sum(-1).clamp(min=1e-6)
    neg = (per_logit * (1 - target)).sum(-1) / (1 - target).sum(-1).clamp(min=1e-6)
    return 0.5 * (pos + neg)


def mask_loss(
    logits: torch.Tensor,
    gt: torch.Tensor,
    *,
    num_points: int = NUM_POINTS,
    focal: bool = False,
    bce_weight: float = BCE_WEIGHT,
    bce_balanced: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Loss per prompt, best over the C predicted masks.

    Arguments:
      logits: B x C x h x w low-res mask logits (C = 1, or 3 with multimask), covering the padded
        square input frame.
      gt: B x H x W ground-truth masks in the same padded frame (any resolution).
      num_points: points sampled by uncertainty per mask; 0 for a dense loss on every logit
        (the ground truth area-averaged onto the logits' grid), which a decoder trained from
        scratch needs: uncertainty sampling rarely hits small objects while every logit is
        still confidently background.

      bce_balanced: the BCE term as the mean of its mean over the target's object and over its
        background (soft targets weight both), so that small objects count as much as large ones.

    Returns B losses: min over C of (20 x BCE + Dice), or (20 x focal + Dice) with ``focal``
    (``bce_weight`` replaces the 20).
    """
    b, c, h, w = logits.shape
    if num_points:
        flat = logits.reshape(b * c, 1, h, w)
        coords = uncertain_point_coords(flat, num_points, generator=generator)
        pred = point_sample(flat, coords).squeeze(1)  # (B*C) x P
        target = point_sample(gt.float().repeat_interleave(c, 0)[:, None], coords).squeeze(1)
    else:  # dense: every logit, against the ground truth averaged onto the logits' grid
        pred = logits.reshape(b * c, h * w)
        target = F.adaptive_avg_pool2d(gt.float()[:, None], (h, w)).reshape(b, 1, h * w)
        target = target.expand(b, c, h * w).reshape(b * c, h * w)
    if focal:
        first = _focal(pred, target)
    elif bce_balanced:
        first = _class_balanced_mean(
            F.binary_cross_entropy_with_logits(pred, target, reduction="none"), target
        )
    else:
        first = F.binary_cross_entropy_with_logits(pred, target, reduction="none").mean(-1)
    loss = bce_weight * first + _dice(pred, target)
    return loss.reshape(b, c).min(dim=1).values


def iou_loss(logits: torch.Tensor, gt: torch.Tensor, iou_pred: torch.Tensor) -> torch.Tensor:
    """SAM's IoU-head loss: mean square error between each predicted mask's IoU prediction and its
    actual IoU with the ground truth, measured at the logits' resolution. Returns B losses (mean
    over the C masks). Not part of the paper's stage 2, which starts from a trained IoU head."""
    h, w = logits.shape[2:]
    target = F.interpolate(gt.float()[:, None], (h, w), mode="bilinear") > 0.5
    pred = logits.detach() > 0
    inter = (pred & target).flatten(2).sum(-1).float()
    union = (pred | target).flatten(2).sum(-1).float()
    actual = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return F.mse_loss(iou_pred.float(), actual, reduction="none").mean(dim=1)


def prior_distill_loss(logits: torch.Tensor, prior_logits: torch.Tensor) -> torch.Tensor:
    """Learning without Forgetting for a box prior (``TrainConfig.prior_distill_weight``): the
    per-logit KL divergence of B x C x h x w low-res logits from the frozen prior's probabilities
    (``prior_logits``, same shape, no gradient), class-balanced as ``bce_balanced`` is: the mean
    over the prior's object (weighted by its probability) and the mean over its background,
    averaged, so that a small object's prior counts as much as a large one's and a mask's far
    background does not swamp it. Zero, with zero gradient, where the logits equal the prior's.
    Returns B losses (mean over the C masks)."""
    b, c, h, w = logits.shape
    pred = logits.reshape(b * c, h * w).float()
    prior = prior_logits.detach().reshape(b * c, h * w).float()
    target = prior.sigmoid()
    # KL = cross-entropy - entropy; both from logits, which autocast allows on every device
    entropy = F.binary_cross_entropy_with_logits(prior, target, reduction="none")
    kl = F.binary_cross_entropy_with_logits(pred, target, reduction="none") - entropy
    return _class_balanced_mean(kl, target).reshape(b, c).mean(dim=1)
