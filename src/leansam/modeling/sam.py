"""The SAM model: any image encoder + SAM's prompt encoder and mask decoder."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import (
    EMBED_SIZE,
    PIXEL_MEAN,
    PIXEL_STD,
    PROMPT_FRAME,
    EfficientViTConfig,
    SamConfig,
)
from ..errors import InputError
from ..transforms import get_preprocess_shape
from .efficientvit import EfficientViTImageEncoder
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer
from .vit import ViTImageEncoder


def resize_matrix(n: int, frame: int, keep: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """The out x n matrix of SAM's 1-D mask resizing: linear (align_corners=False) from n to
    ``frame``, keep the first ``keep`` samples, linear to ``out``; built by resizing the identity
    with the very interpolation it stands for."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)[None]  # column j: unit impulse
    x = F.interpolate(eye, size=frame, mode="linear", align_corners=False)[..., :keep]
    return F.interpolate(x, size=out, mode="linear", align_corners=False)[0].T


#: output rows (columns) per band of the separable mask resizing (see Sam.postprocess_masks)
RESIZE_BAND = 64


@lru_cache(maxsize=64)
def _resize_bands(
    n: int, frame: int, keep: int, out: int, dtype: torch.dtype, device: str
) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """:func:`resize_matrix` cut into bands of :data:`RESIZE_BAND` outputs, each with the input
    range its nonzero weights cover: (out0, out1, in0, in1, weights out x in)."""
    like = torch.empty(0, dtype=dtype, device=device)
    mat = resize_matrix(n, frame, keep, out, like)
    bands = []
    for o0 in range(0, out, RESIZE_BAND):
        sub = mat[o0 : o0 + RESIZE_BAND]
        nz = torch.nonzero(sub.abs().sum(0)).flatten()
        i0, i1 = int(nz[0]), int(nz[-1]) + 1
        bands.append((o0, o0 + sub.shape[0], i0, i1, sub[:, i0:i1].contiguous()))
    return tuple(bands)


class Sam(nn.Module):
    """SAM-family model.

    ``image_size`` is the encoder's square input side R (512 or 1024). Prompts and masks always use
    the 1024 long-side frame (``prompt_frame``), also when R = 512.
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        config: SamConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.config = config
        self.image_size = config.image_size
        self.prompt_frame = PROMPT_FRAME
        dec = config.decoder
        if isinstance(config.encoder, EfficientViTConfig):
            self.image_encoder: nn.Module = EfficientViTImageEncoder(
                config.encoder, config.image_size, out_chans=dec.embed_dim, **kw
            )
        else:
            self.image_encoder = ViTImageEncoder(config.encoder, out_chans=dec.embed_dim, **kw)
        self.prompt_encoder = PromptEncoder(
            embed_dim=dec.embed_dim,
            image_embedding_size=(EMBED_SIZE, EMBED_SIZE),
            input_image_size=(PROMPT_FRAME, PROMPT_FRAME),
            mask_in_chans=16,
            **kw,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=dec.embed_dim,
            transformer=TwoWayTransformer(
                depth=dec.depth,
                embedding_dim=dec.embed_dim,
                mlp_dim=dec.mlp_dim,
                num_heads=dec.num_heads,
                norm_eps=config.decoder_norm_eps,
                **kw,
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=dec.iou_head_hidden_dim,
            **kw,
        )
        self.init_pixel_stats(device)

    def init_pixel_stats(self, device: torch.device | str | None = None) -> None:
        """(Re)create the normalisation constants, e.g. after building on the meta device.

        They are not in checkpoints (upstream SAM registers them non-persistent too). Dividing in
        float64 before rounding to float32 reproduces the references' Python constants.
        """
        scale = 255.0 if self.config.unit_range_normalize else 1.0
        mean = torch.tensor([m / scale for m in PIXEL_MEAN], device=device).view(-1, 1, 1)
        std = torch.tensor([s / scale for s in PIXEL_STD], device=device).view(-1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mask_decoder.iou_token.weight.dtype

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise B x 3 x h x w pixel values (0..255, long side R) and zero-pad to R x R.

        EfficientViT-SAM's reference normalises in [0, 1] units (ToTensor + Normalize), SAM's in
        0..255 units; each family reproduces its own reference's rounding.
        """
        x = x.float()
        if self.config.unit_range_normalize:
            x = x / 255
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        if max(h, w) > self.image_size:
            raise ValueError(f"image of {h}x{w} exceeds the encoder input {self.image_size}")
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """256 x 256 logits -> bilinear to 1024 -> crop to ``input_size`` (the image content in the
        1024 frame) -> bilinear to ``original_size`` (H, W). Works on B x C x 256 x 256.

        Without autograd the resizing runs separably (bilinear resizing is separable and
        linear): the three steps along the rows as one H x 256 matrix (:func:`resize_matrix`),
        then the three along the columns as one 256 x W matrix. Each output depends on a few
        neighbouring inputs, so both products run band by band (:data:`RESIZE_BAND` outputs
        times the inputs their weights cover, ~30 multiply-adds per output instead of 256)
        instead of densely. Same function up to float rounding, without the 1024 x 1024
        intermediate the crop mostly discards."""
        if torch.is_grad_enabled() or masks.shape[-2:] != (EMBED_SIZE * 4, EMBED_SIZE * 4):
            masks = F.interpolate(
                masks, (self.prompt_frame, self.prompt_frame), mode="bilinear", align_corners=False
            )
            masks = masks[..., : input_size[0], : input_size[1]]
            return F.interpolate(masks, original_size, mode="bilinear", align_corners=False)
        b, c, n, _ = masks.shape
        (h, w), key = original_size, (masks.dtype, str(masks.device))
        x = masks.reshape(b * c, n, n)
        y = masks.new_empty(b * c, h, n)
        for o0, o1, i0, i1, band in _resize_bands(n, self.prompt_frame, input_size[0], h, *key):
            y[:, o0:o1] = band @ x[:, i0:i1]
        y = y.view(b * c * h, n)
        res = masks.new_empty(b, c, h, w)
        flat = res.view(b * c * h, w)
        for o0, o1, i0, i1, band in _resize_bands(n, self.prompt_frame, input_size[1], w, *key):
            flat[:, o0:o1] = y[:, i0:i1] @ band.T
        return res

    def forward(
        self,
        batched_input: torch.Tensor | list[dict[str, Any]],
        multimask_output: bool = True,
        *,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Two forms.

        SAM's (``segment_anything.modeling.Sam.forward``): ``batched_input`` a list of records,
        one per image, with ``image`` (3 x h x w, pixel values 0..255, already resized to long
        side R with ``ResizeLongestSide(R)``; R = ``image_size``), ``original_size`` (H, W) and
        optional ``point_coords`` (B x N x 2) / ``point_labels`` (B x N), ``boxes`` (B x 4 XYXY)
        and ``mask_inputs`` (B x 1 x 256 x 256), prompts in the 1024 long-side frame. Returns one
        record per image: ``masks`` (B x C x H x W bool), ``iou_predictions`` (B x C) and
        ``low_res_logits`` (B x C x 256 x 256); no autograd, as SAM's. See :meth:`forward_batched`.

        Training: ``batched_input`` a B x 3 x R x R tensor already normalised and padded
        (:meth:`preprocess`), one prompt set per image in the keyword arguments (points B x N x 2
        / B x N, boxes B x 4, 1024 frame; mask_input B x 1 x 256 x 256). Returns low-res logits
        B x C x 256 x 256 and IoU predictions B x C, with autograd.
        """
        if not isinstance(batched_input, torch.Tensor):
            return self.forward_batched(batched_input, multimask_output)
        emb = self.image_encoder(batched_input)
        return self.decode(emb, point_coords, point_labels, boxes, mask_input, multimask_output)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        *,
        impl: Callable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts to masks on image embeddings: the prompt encoder then the mask decoder (the
        step every caller shares: predictor, segment everything, training, quantization).

        Arguments:
          image_embeddings: 1 x D x 64 x 64 (shared by every prompt set) or B x D x 64 x 64;
            D = ``config.decoder.embed_dim`` (256, SAM's; 32 for the test-size variants).
          point_coords / point_labels: B x N x 2 / B x N, 1024 long-side frame (labels as SAM's:
            1 foreground, 0 background, -1 padding, 2 / 3 box corners).
          boxes: B x 4 XYXY, 1024 frame. mask_input: B x 1 x 256 x 256 logits.
          impl: see :meth:`MaskDecoder.forward`.

        Returns low-res mask logits B x C x 256 x 256 (C = 3 with ``multimask_output``, else 1)
        and IoU predictions B x C.
        """
        points = None if point_coords is None else (point_coords, point_labels)
        sparse, dense = self.prompt_encoder(points, boxes, mask_input)
        return self.mask_decoder(
            image_embeddings,
            self.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output,
            impl=impl,
        )

    @torch.no_grad()
    def forward_batched(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """SAM's batched forward (``segment_anything/modeling/sam.py``), record for record: the
        images are encoded in one batch, each image's prompts decoded in one call. For the 512-px
        models the image is resized to long side 512 and the prompts stay in the 1024 frame.

        Raises a one-line :class:`~leansam.errors.InputError` for a record that is not SAM's."""
        records = _check_batched_input(batched_input, self.image_size)
        images = torch.cat([self.preprocess(r["image"][None].to(self.device)) for r in records])
        embeddings = self.image_encoder(images.to(self.dtype))
        outputs = []
        for record, embedding in zip(records, embeddings, strict=True):
            low_res, iou = self.decode(
                embedding[None],
                record.get("point_coords"),
                record.get("point_labels"),
                record.get("boxes"),
                record.get("mask_inputs"),
                multimask_output,
            )
            h, w = (int(v) for v in record["original_size"])
            if self.image_size == self.prompt_frame:  # SAM: the resized image's own size
                input_size = tuple(record["image"].shape[-2:])
            else:
                input_size = get_preprocess_shape(h, w, self.prompt_frame)
            masks = self.postprocess_masks(low_res, input_size, (h, w))
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs


_RECORD_KEYS = ("image", "original_size", "point_coords", "point_labels", "boxes", "mask_inputs")


def _check_batched_input(batched_input: object, image_size: int) -> list[dict[str, Any]]:
    """SAM's ``batched_input`` contract, checked record by record with one-line errors."""
    if not isinstance(batched_input, list | tuple) or not batched_input:
        raise InputError(
            "batched_input must be a non-empty list of records {'image': 3 x h x w tensor, "
            f"'original_size': (H, W), ...}}, got {type(batched_input).__name__}"
        )
    for i, r in enumerate(batched_input):
        where = f"batched_input[{i}]"
        if not isinstance(r, dict):
            raise InputError(f"{where} must be a dict, got {type(r).__name__}")
        unknown = sorted(set(r) - set(_RECORD_KEYS))
        if unknown:
            raise InputError(f"{where}: unknown keys {unknown}; SAM's keys are {_RECORD_KEYS}")
        for key in ("image", "original_size"):
            if key not in r:
                raise InputError(f"{where} has no {key!r}")
        image = r["image"]
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise InputError(
                f"{where}['image'] must be a 3 x h x w tensor (0..255, long side {image_size}), "
                f"got {shape}"
            )
        if max(image.shape[1:]) != image_size:
            raise InputError(
                f"{where}['image'] is {tuple(image.shape)}: resize it to long side {image_size} "
                f"first (ResizeLongestSide({image_size}).apply_image)"
            )
        if len(r["original_size"]) != 2:
            raise InputError(f"{where}['original_size'] must be (H, W)")
        if ("point_coords" in r) != ("point_labels" in r):
            raise InputError(f"{where}: point_coords and point_labels go together")
    return list(batched_input)
