"""ONNX export: the image encoder, SAM's ONNX decoder contract, and a batched multi-prompt decoder.

Three graphs (SPEC section 8):

* ``encoder.onnx``: ``images`` B x 3 x R x R (normalised and padded, :meth:`Sam.preprocess`) ->
  ``image_embeddings`` B x 256 x 64 x 64; the batch axis is dynamic.
* ``decoder.onnx``: segment_anything's ``SamOnnxModel`` contract, which SAM's web demo,
  X-AnyLabeling, anylabeling and samexporter consume: ``image_embeddings`` (1, 256, 64, 64),
  ``point_coords`` (1, N, 2) in the 1024 frame, ``point_labels`` (1, N), ``mask_input``
  (1, 1, 256, 256), ``has_mask_input`` (1), ``orig_im_size`` (2) -> ``masks``, ``iou_predictions``,
  ``low_res_masks``. A box is two points with labels 2 and 3. Without a box SAM's prompt encoder
  appends a padding point ``(0, 0)`` with label -1; SAM's graph leaves that to the caller (its web
  demo does it, X-AnyLabeling's ``efficientvit_sam`` client does not). leansam's graphs append it
  themselves when the prompt has neither a box (labels 2 / 3) nor a padding point (-1), so both
  kinds of caller get :class:`~leansam.SamPredictor`'s mask.
* ``decoder_batched.onnx``: the same inputs with a dynamic prompt axis P on ``point_coords``,
  ``point_labels`` and ``mask_input``: P boxes (or point sets) on one image in one call; the image
  embedding is broadcast, never copied P times.

The graphs avoid operators TensorRT rejects or runs badly (:data:`TENSORRT_UNFRIENDLY`); a test
checks every exported graph against that list.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.onnx.operators
from torch import nn

from .errors import require
from .io import atomic_replace, atomic_write_bytes, ensure_dir
from .modeling.sam import Sam

#: ONNX operators the graphs must not contain: TensorRT rejects them or falls back to slow plugins
#: (``repeat_interleave`` exports as a data-dependent ``Tile``/``Expand`` chain with ``NonZero``).
TENSORRT_UNFRIENDLY = frozenset({"OneHot", "NonZero", "Loop", "If", "Unique", "SequenceConstruct"})

OPSET = 17


class SamOnnxDecoder(nn.Module):
    """Prompt encoder + mask decoder + mask post-processing with SAM's ONNX input/output contract.

    Follows ``segment_anything.utils.onnx.SamOnnxModel`` operation for operation (same numbers);
    prompts live in the 1024 frame also for the 512-px EfficientViT-SAM models.

    Arguments:
      return_single_mask: return one mask per prompt set: the first (single-mask) output when the
        prompt has more than one point (a box counts as two), else the best of the three
        multimask outputs, as SAM's graph does; otherwise all 4 masks.
      multimask_only: return only the 3 multimask outputs (the batched decoder's default for boxes).
    """

    def __init__(
        self, model: Sam, *, return_single_mask: bool = False, multimask_only: bool = False
    ) -> None:
        super().__init__()
        if return_single_mask and multimask_only:
            raise ValueError("return_single_mask and multimask_only exclude each other")
        self.model = model
        self.img_size = model.prompt_frame
        self.return_single_mask = return_single_mask
        self.multimask_only = multimask_only

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        coords = (coords + 0.5) / self.img_size
        emb = pe.pe_layer._pe_encoding(coords)
        labels = labels.unsqueeze(-1).expand_as(emb)
        emb = emb * (labels != -1)
        emb = emb + pe.not_a_point_embed.weight * (labels == -1)
        for i, e in enumerate(pe.point_embeddings):
            emb = emb + e.weight * (labels == i)
        return emb

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        emb = has_mask_input * pe.mask_downscaling(mask_input)
        return emb + (1 - has_mask_input) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        masks = F.interpolate(
            masks, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
        )
        size = orig_im_size.to(torch.float32)
        prepadded = torch.floor(size * (self.img_size / torch.max(size)) + 0.5).to(torch.int64)
        # Tensor bounds (not int()): the traced graph keeps the crop dynamic in orig_im_size.
        masks = masks[..., : prepadded[0], : prepadded[1]]
        orig = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(orig[0], orig[1]), mode="bilinear", align_corners=False)

    def _select(self, masks: torch.Tensor, iou: torch.Tensor, num_points: int):
        reweight = torch.tensor(
            [[1000] + [0] * (self.model.mask_decoder.num_mask_tokens - 1)], device=iou.device
        )
        best = torch.argmax(iou + (num_points - 2.5) * reweight, dim=1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        return masks[rows, best].unsqueeze(1), iou[rows, best].unsqueeze(1)

    @staticmethod
    def _pad_points(
        coords: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append SAM's padding point ``(0, 0)`` / -1 unless some prompt already holds a box
        corner (2, 3) or a padding point (-1): ``PromptEncoder._embed_points(pad=boxes is None)``
        for callers that do not pad. One decision for the whole batch; the point count stays
        dynamic in the graph (a Slice, no ``If``)."""
        special = ((labels == -1) | (labels == 2) | (labels == 3)).any()
        n = torch.onnx.operators.shape_as_tensor(labels)[1]
        keep = n + 1 - special.to(torch.int64)
        coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
        labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        return coords[:, :keep], labels[:, :keep]

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        point_coords, point_labels = self._pad_points(point_coords, point_labels)
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        masks, iou = self.model.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        if self.return_single_mask:
            masks, iou = self._select(masks, iou, point_coords.shape[1])
        elif self.multimask_only:
            masks, iou = masks[:, 1:], iou[:, 1:]
        return self._postprocess(masks, orig_im_size), iou, masks


DECODER_INPUTS = [
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
]
DECODER_OUTPUTS = ["masks", "iou_predictions", "low_res_masks"]


def decoder_example_inputs(
    model: Sam, num_prompts: int = 1, num_points: int = 3
) -> tuple[torch.Tensor, ...]:
    """Dummy inputs of the decoder contract (also the shapes a caller must feed)."""
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 256, 64, 64, generator=g),
        torch.randint(0, model.prompt_frame, (num_prompts, num_points, 2), generator=g).float(),
        torch.randint(-1, 4, (num_prompts, num_points), generator=g).float(),
        torch.randn(num_prompts, 1, 256, 256, generator=g),
        torch.tensor([1.0]),
        torch.tensor([480.0, 640.0]),
    )


def _export(module: nn.Module, args: tuple, f, **kw) -> None:
    # The TorchScript-based exporter: SAM's own export path, whose graphs SAM's tooling expects
    # (opset 17, dynamic_axes); its deprecation and tracer warnings are about the exporter.
    # eval() first: the exporter restores the wrapper's own mode afterwards, recursively, and a
    # fresh wrapper (training by default) would leave the caller's model in training mode
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, f, dynamo=False, opset_version=OPSET, **kw)


def export_encoder(model: Sam, f: str | os.PathLike | io.BytesIO) -> None:
    """Image encoder graph with a dynamic batch axis (fp32)."""
    model = model.float().eval()
    x = torch.zeros(1, 3, model.image_size, model.image_size)
    _export(
        model.image_encoder,
        (x,),
        f,
        input_names=["images"],
        output_names=["image_embeddings"],
        dynamic_axes={"images": {0: "batch"}, "image_embeddings": {0: "batch"}},
    )


def export_decoder(
    model: Sam,
    f: str | os.PathLike | io.BytesIO,
    *,
    batched: bool = False,
    return_single_mask: bool = False,
    multimask_only: bool = False,
) -> None:
    """SAM-contract decoder; ``batched`` adds the dynamic prompt axis (``decoder_batched.onnx``)."""
    model = model.float().eval()
    module = SamOnnxDecoder(
        model, return_single_mask=return_single_mask, multimask_only=multimask_only
    )
    axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}}
    if batched:
        axes = {
            "point_coords": {0: "num_prompts", 1: "num_points"},
            "point_labels": {0: "num_prompts", 1: "num_points"},
            "mask_input": {0: "num_prompts"},
            "masks": {0: "num_prompts", 2: "height", 3: "width"},
            "iou_predictions": {0: "num_prompts"},
            "low_res_masks": {0: "num_prompts"},
        }
    else:
        axes["masks"] = {2: "height", 3: "width"}
    _export(
        module,
        decoder_example_inputs(model, 2 if batched else 1),
        f,
        input_names=DECODER_INPUTS,
        output_names=DECODER_OUTPUTS,
        dynamic_axes=axes,
    )


def export_onnx(
    model: Sam,
    out_dir: str | os.PathLike,
    *,
    return_single_mask: bool = False,
    check: bool = True,
) -> dict[str, Path]:
    """Write encoder.onnx, decoder.onnx and decoder_batched.onnx to ``out_dir``.

    Every file is written to a temporary name and renamed when complete (an interrupted export
    never leaves a truncated graph); with ``check`` each graph passes ``onnx.checker`` and contains
    none of :data:`TENSORRT_UNFRIENDLY`.
    """
    out = ensure_dir(out_dir)
    jobs = {
        "encoder": lambda f: export_encoder(model, f),
        "decoder": lambda f: export_decoder(model, f, return_single_mask=return_single_mask),
        "decoder_batched": lambda f: export_decoder(
            model, f, batched=True, return_single_mask=return_single_mask
        ),
    }
    return {name: _write_graph(out / f"{name}.onnx", job, check) for name, job in jobs.items()}


def _write_graph(path: Path, job, check: bool = True) -> Path:
    """``job(temp_path)`` exports a graph; checked (``check_graph``), then renamed into place."""

    def write(tmp):
        job(tmp)
        if check:
            check_graph(tmp)

    return atomic_replace(path, write)


# ------------------------------------------------------------------------- labeling tools
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
        _export(
            SamOnnxImageEncoder(model).eval(),
            (example,),
            f,
            input_names=["image"],
            output_names=["image_embeddings"],
            dynamic_axes={"image": {0: "height", 1: "width"}},
        )

    _write_graph(encoder, write_encoder)
    _write_graph(decoder, lambda f: export_decoder(model, f))
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


def graph_ops(path_or_bytes: str | os.PathLike | bytes) -> set[str]:
    """The operator types of an ONNX graph (including nested subgraphs)."""
    onnx = require("onnx", "export")
    m = (
        onnx.load_from_string(path_or_bytes)
        if isinstance(path_or_bytes, bytes)
        else onnx.load(os.fspath(path_or_bytes))
    )
    ops: set[str] = set()
    stack = [m.graph]
    while stack:
        g = stack.pop()
        for node in g.node:
            ops.add(node.op_type)
            stack.extend(a.g for a in node.attribute if a.g is not None and a.g.node)
    return ops


def check_graph(path: str | os.PathLike) -> None:
    """``onnx.checker`` plus the TensorRT deny list; raises ValueError naming offending ops."""
    onnx = require("onnx", "export")
    onnx.checker.check_model(os.fspath(path))
    bad = graph_ops(path) & TENSORRT_UNFRIENDLY
    if bad:
        raise ValueError(f"{path}: operators TensorRT rejects: {sorted(bad)}")


# ---------------------------------------------------------------------------- TensorRT
#: operator types TensorRT must run in fp32 in an fp16 engine: normalisation statistics overflow
#: or lose precision in fp16 (SPEC section 8), and the neck's bicubic resize overshoots
FP32_OPS = frozenset({"LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Resize"})
#: module scopes kept in fp32: EfficientViT's LiteMLA (ReLU linear attention divides by a sum
#: over all tokens, as the reference does in fp32)
FP32_SCOPES = ("/context_module/main/",)


def fp32_nodes(path_or_model) -> set[str]:
    """Names of the graph nodes an fp16 TensorRT engine keeps in fp32: every node of the
    operator types :data:`FP32_OPS`, every node of a LiteMLA, and every node of a scope that
    computes a mean (LayerNorm2d decomposes into ReduceMean / Sub / Pow / Sqrt / Div / Mul / Add
    under its module's scope)."""
    onnx = require("onnx", "export")
    m = path_or_model if hasattr(path_or_model, "graph") else onnx.load(os.fspath(path_or_model))
    nodes = list(m.graph.node)
    norm_scopes = {n.name.rsplit("/", 1)[0] + "/" for n in nodes if n.op_type == "ReduceMean"}
    return {
        n.name
        for n in nodes
        if n.op_type in FP32_OPS
        or any(s in n.name for s in FP32_SCOPES)
        or n.name.rsplit("/", 1)[0] + "/" in norm_scopes
    }


def build_tensorrt_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    fp16: bool = True,
    max_batch: int = 8,
    max_prompts: int = 64,
    workspace_gib: float = 4.0,
) -> Path:
    """Build a serialized TensorRT engine from one of the exported graphs (GPU machine with the
    ``tensorrt`` package). fp16 keeps :func:`fp32_nodes` in fp32 (OBEY_PRECISION_CONSTRAINTS);
    dynamic axes get an optimisation profile: batch 1..``max_batch`` for the encoder, prompt sets
    1..``max_prompts`` and points 1..10 for the decoders."""
    trt = require("tensorrt", "tensorrt")
    onnx = require("onnx", "export")
    onnx_path = Path(onnx_path)
    model = onnx.load(os.fspath(onnx_path))
    keep = fp32_nodes(model) if fp16 else set()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if any(layer.name == n or layer.name.startswith(n + "_") for n in keep):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        if all(d >= 0 for d in shape):
            continue
        lo, opt, hi = list(shape), list(shape), list(shape)
        for axis, d in enumerate(shape):
            if d >= 0:
                continue
            first = t.name in ("images", "point_coords", "point_labels", "mask_input") and axis == 0
            top = max_batch if t.name == "images" else (max_prompts if first else 10)
            lo[axis], opt[axis], hi[axis] = 1, max(1, top // 2), top
        profile.set_shape(t.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ValueError(f"TensorRT failed to build an engine from {onnx_path}")
    from .io import atomic_write_bytes

    return atomic_write_bytes(engine_path, bytes(engine))
