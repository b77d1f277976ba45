"""Integer-arithmetic reference of AHCPTQ layers: what a hardware datapath computes.

A quantized linear layer ``y = W^ x^ + b`` with per-output-channel symmetric integer weights
``W^ = s_w[o] Wq[o, i]`` is evaluated with integer accumulators only, plus one rescale per output:

- **HLUQ input** (``x^ = m + x^'``): a log-coded value ``s_log 2^-k`` times ``Wq`` is a left shift
  ``Wq << (K - k)`` into an accumulator of scale ``s_log 2^-K`` (``K = L_log - 1``); a uniform value
  ``s_log + j s_uni`` is an ordinary integer MAC ``Wq j`` plus a count ``Wq``; the zero code adds
  nothing; ``m`` folds into the bias: ``b' = b + m s_w sum_i Wq``.
- **CAG input** (``x^ = s_g (q - z_g)`` for the channel's group ``g``): one integer partial sum per
  group ``P_g = sum_{i in g} Wq q_i``; zero points fold into the bias
  (``b' = b - s_w sum_g s_g z_g sum_{i in g} Wq``); output ``s_w sum_g s_g P_g + b'``: 4 rescales
  per output for 4 groups instead of one per input channel.

Outputs equal the fake-quantized float layer up to float32 rounding (tested to 1e-5 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import HLUQ, CAGQuantizer, UniformQuantizer


def _int_weights(linear: nn.Linear, w_quant: UniformQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(Wq int64 [out, in], s_w float64 [out]) of a symmetric per-output-channel quantizer."""
    if not (w_quant.symmetric and w_quant.channel_axis == 0):
        raise ValueError("the integer view needs symmetric per-output-channel weights")
    # codes computed in float32 exactly as the fake quantizer does (rounding to nearest, or
    # AdaRound's learned rounding), so both agree
    q = w_quant.codes(linear.weight.detach())
    return q.long(), w_quant.scale.detach().double()


def fake_quant_linear(
    linear: nn.Linear, w_quant: UniformQuantizer, act_quant: nn.Module, x: torch.Tensor
) -> torch.Tensor:
    """The float (fake-quantized) layer the integer versions must reproduce."""
    return F.linear(act_quant(x), w_quant(linear.weight), linear.bias)


class IntegerLinearHLUQ(nn.Module):
    """Integer reference of a linear layer whose input is HLUQ-quantized (e.g. ``mlp.lin2``)."""

    def __init__(self, linear: nn.Linear, w_quant: UniformQuantizer, act: HLUQ) -> None:
        super().__init__()
        wq, s_w = _int_weights(linear, w_quant)
        self.wq, self.s_w = wq, s_w
        self.act = act  # its float32 parameters give the codes, as in the fake quantizer
        self.m = float(act.minimum)
        self.s_log, self.s_uni = float(act.s_log.detach()), float(act.s_uni.detach())
        self.n_log, self.n_uni = act.levels_log, act.levels_uni
        self.shift = self.n_log - 1  # K: the smallest log level is s_log 2^-K
        bias = linear.bias.detach().double() if linear.bias is not None else torch.zeros(len(wq))
        self.bias = bias + self.m * s_w * wq.sum(1).double()  # m folded into the bias

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """HLUQ codes: (is_log, k, j) per element; k >= L_log is the zero code."""
        act = self.act
        s_log, s_uni = act.s_log.detach().float(), act.s_uni.detach().float()
        xs = x.float() - act.minimum.float()
        is_log = xs <= s_log
        k = torch.round(-torch.log2(torch.clamp(xs, min=1e-20) / s_log)).clamp(min=0).long()
        j = torch.clamp(torch.round((xs - s_log) / s_uni), 0, self.n_uni - 1).long()
        return is_log, k, j

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        is_log, k, j = self.encode(x)
        live = is_log & (k < self.n_log)
        # log region: Wq << (K - k), accumulated as integers (the shift is per input element)
        shifts = torch.where(live, self.shift - k.clamp(max=self.shift), 0)
        ones = torch.where(live, torch.ones_like(k) << shifts, 0)
        acc_log = ones @ self.wq.T  # sum_i Wq[o, i] 2^(K - k_i), exact in int64
        uni = ~is_log
        acc_cnt = uni.long() @ self.wq.T  # sum over uniform-region inputs of Wq
        acc_uni = torch.where(uni, j, 0) @ self.wq.T  # integer MAC
        total = (
            acc_log.double() * (self.s_log * 2.0**-self.shift)
            + acc_cnt.double() * self.s_log
            + acc_uni.double() * self.s_uni
        )
        return (total * self.s_w + self.bias).to(x.dtype)


class IntegerLinearCAG(nn.Module):
    """Integer reference of a linear layer whose input is CAG-quantized (e.g. ``attn.qkv``)."""

    def __init__(self, linear: nn.Linear, w_quant: UniformQuantizer, act: CAGQuantizer) -> None:
        super().__init__()
        wq, s_w = _int_weights(linear, w_quant)
        self.wq, self.s_w = wq, s_w
        self.group = act.group.detach().clone()
        self.g_scale32 = act.scale.detach().float()
        self.g_scale = self.g_scale32.double()
        self.g_zero = act.zero_point.detach().long()
        self.qmax = act.qmax
        bias = linear.bias.detach().double() if linear.bias is not None else torch.zeros(len(wq))
        fold = torch.zeros_like(bias)
        for g in range(len(self.g_scale)):
            cols = self.group == g
            fold += self.g_scale[g] * self.g_zero[g] * wq[:, cols].sum(1).double()
        self.bias = bias - s_w * fold

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Unsigned integer codes q in [0, 2^b - 1], each channel with its group's parameters."""
        s = self.g_scale32[self.group]
        z = self.g_zero[self.group].float()
        return torch.clamp(torch.round(x.float() / s) + z, 0, self.qmax).long()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.encode(x)
        out = torch.zeros(*x.shape[:-1], len(self.wq), dtype=torch.float64)
        for g in range(len(self.g_scale)):
            cols = self.group == g
            partial = q[..., cols] @ self.wq[:, cols].T  # integer partial sum of group g
            out += self.g_scale[g] * partial.double()
        return (out * self.s_w + self.bias).to(x.dtype)


def datapath_registers(act: nn.Module, channels: int) -> dict:
    """Activation-quantization parameters a datapath holds for one layer input: per channel vs
    what this quantizer needs (CAG groups, one HLUQ set, one per-tensor pair)."""
    used = act.num_params() if hasattr(act, "num_params") else channels
    return {
        "channels": channels,
        "per_channel_pairs": channels,
        "pairs": used,
        "reduction": 1 - used / channels,
    }
