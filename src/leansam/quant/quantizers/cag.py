"""AHCPTQ's channel-aware grouping (CAG): per-channel activation parameters merged into groups."""

from __future__ import annotations

import torch
from torch import nn

from .base import MinMaxObserver, UniformQuantizer, broadcast


class CAGQuantizer(MinMaxObserver):
    """Channel-aware grouping (AHCPTQ): per-channel asymmetric (scale, zero point) from
    calibration, then :meth:`regroup` merges channels with KMeans into fewer groups; group zero
    points are rounded and frozen, group scales stay learnable. ``channel_axis`` is the channel
    dimension of the input (``-1`` for token activations)."""

    kind = "cag"

    def __init__(self, bits: int, *, channel_axis: int = -1) -> None:
        super().__init__(bits, channel_axis, keep_sample=False)  # min / max are enough
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self.register_buffer("group", torch.zeros(1, dtype=torch.long))

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def num_groups(self) -> int:
        return int(self.scale.numel())

    def init_params(self) -> None:
        lo, hi, _ = self.observed()
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / self.qmax).clamp(min=1e-8)
        with torch.no_grad():
            self.scale = nn.Parameter(scale.clone())
            self.zero_point = (-lo / scale).round()
            self.group = torch.arange(len(scale))
            self.initialized.fill_(True)
        self.observing = False

    def channel_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (scale, zero point) as used in the forward (through the groups)."""
        return self.scale[self.group], self.zero_point[self.group]

    def regroup(self, n_groups: int, seed: int = 0, merge: str = "range") -> None:
        """Merge the channels' current (scale, zero point) into ``n_groups`` KMeans clusters
        (n_init 10, fixed seed). ``merge="mean"``: each group starts at its members' mean
        (zero point rounded); ``"range"``: at the MinMax parameters of the union of its members'
        ranges (no member is clipped)."""
        from ...errors import require

        if n_groups >= self.num_groups:
            return
        kmeans = require("sklearn.cluster", "quant").KMeans
        scale, zp = (t.detach().float() for t in self.channel_params())
        # scales are tiny next to zero points: standardise both features for the clustering
        feats = torch.stack([scale, zp], 1)
        feats = (feats - feats.mean(0)) / feats.std(0).clamp(min=1e-12)
        labels = kmeans(n_clusters=n_groups, n_init=10, random_state=seed).fit_predict(
            feats.double().numpy()
        )
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.group.device)
        if merge == "range":
            lo, hi = -zp * scale, (self.qmax - zp) * scale
            los = torch.stack([lo[labels == k].min() for k in range(n_groups)])
            his = torch.stack([hi[labels == k].max() for k in range(n_groups)])
            new_scale = ((his - los) / self.qmax).clamp(min=1e-8)
            new_zp = (-los / new_scale).round()
        else:
            new_scale = torch.stack([scale[labels == k].mean() for k in range(n_groups)])
            new_zp = torch.stack([zp[labels == k].mean() for k in range(n_groups)]).round()
        with torch.no_grad():
            self.scale = nn.Parameter(new_scale.to(self.scale.device))
            self.zero_point = new_zp.to(self.zero_point.device)
            self.group = labels

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        scale, zp = self.channel_params()
        s = broadcast(scale, x, self.channel_axis).to(x.dtype)
        z = broadcast(zp, x, self.channel_axis).to(x.dtype)
        return UniformQuantizer._fake(x, s, z, self.qmax)

    def num_params(self) -> int:
        return self.num_groups

    def learnable(self) -> list[nn.Parameter]:
        return [self.scale]
