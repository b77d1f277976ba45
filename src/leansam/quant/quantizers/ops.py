"""Helpers around quantization: PTQ4SAM's bimodal key fold and the SQNR measure."""

from __future__ import annotations

import math

import torch
from torch import nn


def sign_fold(q_proj: nn.Linear, k_proj: nn.Linear, keys: torch.Tensor) -> torch.Tensor:
    """Bimodal key fold (PTQ4SAM): flip the sign of every key channel whose mean over ``keys``
    (the layer's input sample, ... x C_in) is negative, in both ``k_proj`` and ``q_proj`` rows,
    so that q . k is unchanged while each key channel becomes one-sided. Returns the signs."""
    with torch.no_grad():
        k = k_proj(keys.float()).reshape(-1, k_proj.out_features)
        signs = torch.where(k.mean(0) < 0, -1.0, 1.0)
        for lin in (q_proj, k_proj):
            lin.weight.mul_(signs[:, None].to(lin.weight.dtype))
            if lin.bias is not None:
                lin.bias.mul_(signs.to(lin.bias.dtype))
    return signs


def sqnr_db(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference.float() - quantized.float()).pow(2).mean()
    signal = reference.float().pow(2).mean()
    return float(10 * math.log10(float(signal) / max(float(noise), 1e-30)))
