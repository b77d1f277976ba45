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

from ..errors import require
from ..io import atomic_replace, ensure_dir
from ..modeling.sam import Sam

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
        self.prompt_frame = model.prompt_frame
        self.return_single_mask = return_single_mask
        self.multimask_only = multimask_only

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        coords = (coords + 0.5) / self.prompt_frame
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
            masks, size=(self.prompt_frame, self.prompt_frame), mode="bilinear", align_corners=False
        )
        size = orig_im_size.to(torch.float32)
        prepadded = torch.floor(size * (self.prompt_frame / torch.max(size)) + 0.5).to(torch.int64)
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
        torch.randn(1, model.config.decoder.embed_dim, 64, 64, generator=g),
        torch.randint(0, model.prompt_frame, (num_prompts, num_points, 2), generator=g).float(),
        torch.randint(-1, 4, (num_prompts, num_points), generator=g).float(),
        torch.randn(num_prompts, 1, 256, 256, generator=g),
        torch.tensor([1.0]),
        torch.tensor([480.0, 640.0]),
    )


def export_module(module: nn.Module, args: tuple, f, **kw) -> None:
    """``torch.onnx.export`` of ``module`` in eval mode, at :data:`OPSET`, without warnings."""
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
    export_module(
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
    export_module(
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
    return {name: write_graph(out / f"{name}.onnx", job, check) for name, job in jobs.items()}


def write_graph(path: Path, job, check: bool = True) -> Path:
    """``job(temp_path)`` exports a graph; checked (``check_graph``), then renamed into place."""

    def write(tmp):
        job(tmp)
        if check:
            check_graph(tmp)

    return atomic_replace(path, write)


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
