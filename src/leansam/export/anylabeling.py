"""X-AnyLabeling's ``efficientvit_sam`` files: an image encoder graph that takes a raw uint8 image
(SAM's preprocessing inside), SAM's decoder graph and the YAML that names them."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.onnx.operators
from torch import nn

from ..io import atomic_write_bytes, ensure_dir
from ..modeling.sam import Sam
from .onnx import export_decoder, export_module, write_graph


def resize_weights(n_in: torch.Tensor, n_out: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` x ``n_in`` matrix of PIL's antialiased bilinear resize from ``n_in`` to ``n_out``
    samples (triangle filter widened by the shrink factor, normalised per output sample), with
    zero rows from ``n_out`` on: multiplying pads to ``rows``. Sizes are 0-d tensors so that an
    exported graph keeps them dynamic."""
    n_in, n_out = n_in.float(), n_out.float()
    scale = n_in / n_out
    support = torch.clamp(scale, min=1.0)
    i = torch.arange(rows, dtype=torch.float32)[:, None]
    j = torch.arange(n_in.long(), dtype=torch.float32)[None, :]
    centre = (i + 0.5) * scale
    w = torch.clamp(1.0 - torch.abs(j + 0.5 - centre) / support, min=0.0)
    w = w / torch.clamp(w.sum(1, keepdim=True), min=1e-12)
    return torch.where(i < n_out, w, torch.zeros_like(w))


class SamOnnxImageEncoder(nn.Module):
    """The image encoder with SAM's preprocessing inside: ``image`` H x W x 3 uint8 RGB of any
    size -> ``image_embeddings`` 1 x 256 x 64 x 64. Resizes the long side to R (new side
    ``floor(old * R / long + 0.5)``) with PIL's antialiased bilinear filter as two matrix
    products, rounding to 0..255 after each pass as PIL does, then normalises and zero-pads: what
    :class:`SamPredictor` does, up to PIL's fixed-point filter weights (a pixel here and there
    off by one level). The input X-AnyLabeling's ``efficientvit_sam`` model type feeds its
    encoder.

    The resize is two dense products, O(H x W x R): about 1 GFLOP for a 640 x 480 photo, 40 for a
    12 MP one."""

    def __init__(self, model: Sam) -> None:
        super().__init__()
        self.model = model
        self.size = model.image_size
        # in 0..255 units for both families (EfficientViT-SAM's are in [0, 1] units)
        unit = 255.0 if model.config.unit_range_normalize else 1.0
        self.register_buffer("mean", model.pixel_mean.reshape(3, 1, 1).float() * unit)
        self.register_buffer("std", model.pixel_std.reshape(3, 1, 1).float() * unit)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        shape = torch.onnx.operators.shape_as_tensor(image)
        h, w = shape[0].float(), shape[1].float()
        scale = self.size / torch.maximum(h, w)
        new_h, new_w = torch.floor(h * scale + 0.5), torch.floor(w * scale + 0.5)
        rows = resize_weights(shape[0], new_h, self.size)  # R x H, zero rows past new_h
        cols = resize_weights(shape[1], new_w, self.size)  # R x W
        # PIL's order and rounding: the horizontal pass, to uint8, then the vertical one
        x = image.permute(2, 0, 1).float()
        x = torch.clamp(torch.round(torch.matmul(x, cols.transpose(0, 1))), 0.0, 255.0)
        x = torch.clamp(torch.round(torch.matmul(rows, x)), 0.0, 255.0)
        inside = (rows.sum(1) > 0)[:, None] & (cols.sum(1) > 0)[None, :]
        x = torch.where(inside, (x - self.mean) / self.std, torch.zeros_like(x))  # SAM's padding
        return self.model.image_encoder(x[None])


def export_anylabeling(
    model: Sam, name: str, out_dir: str | os.PathLike, *, display_name: str | None = None
) -> dict[str, Path]:
    """The files X-AnyLabeling's ``efficientvit_sam`` model type loads: ``<name>.encoder.onnx``
    (:class:`SamOnnxImageEncoder`), ``<name>.decoder.onnx`` (SAM's decoder contract, prompts in
    the 1024 frame) and ``<name>.yaml`` (``target_size: 1024``, paths relative to the YAML).
    Written atomically; returns the three paths."""
    import json

    out = ensure_dir(out_dir)
    model = model.float().eval()
    encoder = out / f"{name}.encoder.onnx"
    decoder = out / f"{name}.decoder.onnx"
    config = out / f"{name}.yaml"
    example = torch.zeros(480, 640, 3, dtype=torch.uint8)

    def write_encoder(f):
        export_module(
            SamOnnxImageEncoder(model).eval(),
            (example,),
            f,
            input_names=["image"],
            output_names=["image_embeddings"],
            dynamic_axes={"image": {0: "height", 1: "width"}},
        )

    write_graph(encoder, write_encoder)
    write_graph(decoder, lambda f: export_decoder(model, f))
    # YAML by hand (every value a plain string or number; JSON strings are valid YAML scalars)
    fields = {
        "type": "efficientvit_sam",
        "name": f"{name}-leansam",
        "display_name": display_name or f"{name} (leansam)",
        "provider": "leansam",
        "encoder_model_path": encoder.name,
        "decoder_model_path": decoder.name,
        "target_size": model.prompt_frame,
    }
    atomic_write_bytes(
        config, "".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()).encode()
    )
    return {"encoder": encoder, "decoder": decoder, "config": config}
