"""Wrap a model for quantization: every quantized layer and matmul input gets its quantizer.

Mapping (SPEC section 7; the "role" of each layer input picks its quantizer):

=================================== ========================================================
SAM-ViT encoder                     ``blocks.i.attn.qkv`` / ``mlp.lin1`` (input: CAG role),
                                    ``mlp.lin2`` (post-GELU: HLUQ role), ``attn.proj`` (plain),
                                    q / k / v and softmax (log2), neck convs (plain)
EfficientViT encoder (BN folded)    first conv of every MBConv / FusedMBConv / ResBlock and
                                    LiteMLA's ``qkv`` (block input: CAG role), every conv fed by
                                    a GELU (depthwise and point convs: HLUQ role), LiteMLA's
                                    aggregation convs and ``proj`` (plain), LiteMLA's q, k
                                    (after ReLU), v and context ``v k^T`` (plain); neck
                                    ``input_ops`` convs (CAG), ``middle`` like the backbone,
                                    ``output_ops`` conv (plain)
mask decoder (both)                 every attention's ``q/k/v_proj`` (CAG), ``out_proj``
                                    (plain), projected q / k / v (plain), softmax (log2); MLP
                                    ``lin1`` (CAG), ``lin2`` (post-ReLU: HLUQ)
full precision                      patch embedding / stem conv, positional terms, LayerNorms,
                                    residual adds, the prompt encoder, output upscaling,
                                    hypernetwork MLPs, IoU head
=================================== ========================================================

Weights: per output channel, symmetric (round to nearest, or AdaRound for the methods with
reconstruction). Activations: one width for all; the CAG role is per-channel-then-grouped CAG
(``ahcptq``, ``ahcptq-no-hluq``) or per tensor; the HLUQ role is HLUQ (``ahcptq``,
``ahcptq-no-cag``) or per tensor; plain inputs are per tensor (MinMax for ``minmax``,
percentile for ``percentile``, MSE-initialised with learnable scale otherwise); softmax outputs
use the log2 quantizer in every method, by default with a calibrated granularity
(``QuantConfig.softmax``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import InputError
from ..modeling import efficientvit, transformer, vit
from ..modeling.common import MLPBlock, QuantPoints
from ..modeling.efficientvit import fold_batchnorm
from ..modeling.sam import Sam
from .config import QuantConfig
from .modules import (
    QuantConv2d,
    QuantLayer,
    QuantLinear,
)
from .quantizers import (
    HLUQ,
    AdaRoundQuantizer,
    CAGQuantizer,
    Log2Quantizer,
    Quantizer,
    UniformQuantizer,
)


def _act_quantizer(role: str, cfg: QuantConfig, channel_axis: int) -> Quantizer:
    bits = cfg.a_bits
    if role == "softmax":
        return Log2Quantizer(bits, search=cfg.softmax == "agq")
    if role == "cag" and cfg.cag:
        return CAGQuantizer(bits, channel_axis=channel_axis)
    if role == "hluq" and cfg.hluq:
        return HLUQ(bits, kernel_bug=cfg.kernel_bug)
    init = cfg.method if cfg.method in ("minmax", "percentile") else "mse"
    return UniformQuantizer(bits, method=init, learn_scale=cfg.reconstruct)


def _w_quantizer(cfg: QuantConfig) -> Quantizer:
    if cfg.reconstruct:
        return AdaRoundQuantizer(cfg.w_bits)
    return UniformQuantizer(cfg.w_bits, channel_axis=0, symmetric=True, learn_scale=False)


def _linear(lin: nn.Linear, role: str, cfg: QuantConfig) -> QuantLinear:
    return QuantLinear(lin, _w_quantizer(cfg), _act_quantizer(role, cfg, -1), role)


def _conv(conv: nn.Conv2d, role: str, cfg: QuantConfig) -> QuantConv2d:
    return QuantConv2d(conv, _w_quantizer(cfg), _act_quantizer(role, cfg, 1), role)


def _matmul_points(cfg: QuantConfig, softmax: bool = True) -> list[Quantizer]:
    points = [_act_quantizer("plain", cfg, -1) for _ in range(3)]
    return [*points, _act_quantizer("softmax" if softmax else "plain", cfg, -1)]


def _wrap_mlp(mlp: MLPBlock, cfg: QuantConfig) -> None:
    mlp.lin1 = _linear(mlp.lin1, "cag", cfg)
    mlp.lin2 = _linear(mlp.lin2, "hluq", cfg)


def _wrap_decoder(decoder: nn.Module, cfg: QuantConfig) -> None:
    for mod in list(decoder.transformer.modules()):
        if type(mod) is transformer.Attention:
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(mod, name, _linear(getattr(mod, name), "cag", cfg))
            mod.out_proj = _linear(mod.out_proj, "plain", cfg)
            mod.add_quantizers(*_matmul_points(cfg))
        elif isinstance(mod, MLPBlock):
            _wrap_mlp(mod, cfg)


def _wrap_vit(encoder: vit.ViTImageEncoder, cfg: QuantConfig) -> None:
    for blk in encoder.blocks:
        attn = blk.attn
        attn.qkv = _linear(attn.qkv, "cag", cfg)
        attn.proj = _linear(attn.proj, "plain", cfg)
        attn.add_quantizers(*_matmul_points(cfg))
        _wrap_mlp(blk.mlp, cfg)
    encoder.neck[0] = _conv(encoder.neck[0], "plain", cfg)
    encoder.neck[2] = _conv(encoder.neck[2], "plain", cfg)


def _wrap_local(block: nn.Module, cfg: QuantConfig) -> None:
    """MBConv / FusedMBConv / ResBlock: the first conv sees the block input (CAG role), every
    later conv a GELU output (HLUQ role)."""
    names = {
        efficientvit.MBConv: ("inverted_conv", "depth_conv", "point_conv"),
        efficientvit.FusedMBConv: ("spatial_conv", "point_conv"),
        efficientvit.ResBlock: ("conv1", "conv2"),
    }[type(block)]
    for i, name in enumerate(names):
        layer = getattr(block, name)
        layer.conv = _conv(layer.conv, "cag" if i == 0 else "hluq", cfg)


def _wrap_efficientvit(encoder: efficientvit.EfficientViTImageEncoder, cfg: QuantConfig) -> None:
    locals_ = (efficientvit.MBConv, efficientvit.FusedMBConv, efficientvit.ResBlock)
    for mod in list(encoder.modules()):
        if isinstance(mod, locals_):
            _wrap_local(mod, cfg)
        elif type(mod) is efficientvit.LiteMLA:
            mod.qkv.conv = _conv(mod.qkv.conv, "cag", cfg)
            seq = mod.aggreg[0]
            seq[0] = _conv(seq[0], "plain", cfg)
            seq[1] = _conv(seq[1], "plain", cfg)
            mod.proj.conv = _conv(mod.proj.conv, "plain", cfg)
            mod.add_quantizers(*_matmul_points(cfg, softmax=False))
    neck = encoder.neck
    for op in neck.input_ops:
        op.op_list[0].conv = _conv(op.op_list[0].conv, "cag", cfg)
    out = neck.output_ops[0].op_list[0]
    out.conv = _conv(out.conv, "plain", cfg)


def prepare(model: Sam, config: QuantConfig) -> Sam:
    """A copy of ``model`` with the quantized layers in place (quantizers not yet calibrated).
    EfficientViT's BatchNorms are folded into their convolutions first."""
    q = copy.deepcopy(model).eval()
    if isinstance(q.image_encoder, efficientvit.EfficientViTImageEncoder):
        q.image_encoder = fold_batchnorm(q.image_encoder)
        _wrap_efficientvit(q.image_encoder, config)
    else:
        _wrap_vit(q.image_encoder, config)
    _wrap_decoder(q.mask_decoder, config)
    _keep_8bit(q, config.keep_8bit)
    q.quant_config = config
    return q.eval()


def _keep_8bit(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Mixed precision: the quantized tensors named ``prefix`` or ``prefix.*`` (names as
    :func:`report` lists them) use 8 bits."""
    tensors = dict(quantized_tensors(model))
    for prefix in prefixes:
        hits = [z for n, z in tensors.items() if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            raise InputError(
                f"keep_8bit {prefix!r} names no quantized tensor (see the tensor names in the "
                "report `leansam quantize` writes)"
            )
        for z in hits:
            z.bits = max(z.bits, 8)


def quantized_tensors(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """(name, quantizer) of every quantized tensor: ``LAYER.weight`` and ``LAYER.input`` of the
    quantized layers, then ``ATTENTION.q`` / ``.k`` / ``.v`` / ``.attn`` (softmax output) /
    ``.ctx`` (LiteMLA's context) of the attentions."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            yield f"{name}.weight", mod.w_quant
            if mod.a_quant is not None:
                yield f"{name}.input", mod.a_quant
    for name, mod in model.named_modules():
        if isinstance(mod, QuantPoints) and mod.quantized:
            for attr in mod.QUANT_POINTS:
                yield f"{name}.{attr.removesuffix('_quant')}", getattr(mod, attr)


def quantizers(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    for name, mod in model.named_modules():
        if isinstance(mod, Quantizer):
            yield name, mod


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quant_config", None) is not None


def observe_activations(model: Sam, on: bool) -> None:
    """Activation quantizers observe (``on``) or stop (weight quantizers are set from the
    weights)."""
    weights = {id(m.w_quant) for m in model.modules() if isinstance(m, QuantLayer)}
    for _, q in quantizers(model):
        if id(q) not in weights:
            q.observe(on)


@torch.no_grad()
def init_weights(model: Sam) -> None:
    for mod in model.modules():
        if isinstance(mod, QuantLayer):
            mod.w_quant.init_params(mod.weight)


@torch.no_grad()
def init_activations(model: Sam) -> None:
    for mod in model.modules():
        if not isinstance(mod, QuantLayer):
            continue
        a = mod.a_quant
        if isinstance(a, HLUQ):
            sample = mod.input_sample()
            a.init_params(mod.fp, sample.to(mod.weight.device))
        elif a is not None:
            a.init_params()
        mod.release()
    for _, q in quantizers(model):
        if not bool(q.initialized):
            q.init_params()
        if hasattr(q, "release"):
            q.release()
