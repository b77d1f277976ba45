"""SAM's mask decoder: two-way transformer, upscaling, hypernetwork masks and IoU head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, LayerNorm2d

#: prompt sets per decoder pass at inference (see MaskDecoder.predict_masks)
PROMPT_CHUNK = 16
#: image pixels per tile of the inference up-scaling (see MaskDecoder._upscale)
UPSCALE_TILE = 512


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        d = transformer_dim
        self.transformer_dim = d
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, d, **kw)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, d, **kw)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(d, d // 4, kernel_size=2, stride=2, **kw),
            LayerNorm2d(d // 4, **kw),
            nn.GELU(),
            nn.ConvTranspose2d(d // 4, d // 8, kernel_size=2, stride=2, **kw),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(d, d, d // 8, 3, **kw) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            d, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth, **kw
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        *,
        impl: Callable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks.

        Arguments:
          image_embeddings: 1 x D x 64 x 64 (shared by all prompts) or B x D x 64 x 64 (one
            per prompt set).
          image_pe: 1 x D x 64 x 64 dense positional encoding (D = ``transformer_dim``, 256 in
            SAM).
          sparse_prompt_embeddings: B x N x D.
          dense_prompt_embeddings: B x D x 64 x 64.
          multimask_output: return the 3 disambiguating masks instead of the single one.
          impl: a replacement for the per-chunk inference pass up to the up-scaling
            (:meth:`decode_tokens`), e.g. a compiled one (``leansam.runtime.compile_decoder``); used
            only without autograd.

        Returns:
          masks: B x C x 256 x 256 logits (C = 3 or 1); iou_pred: B x C.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            impl=impl,
        )
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        *,
        impl: Callable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All 1 + 3 masks and IoU predictions, see :meth:`forward`."""
        b = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, b):
            raise ValueError(
                f"image_embeddings has batch {image_embeddings.shape[0]}; expected 1 or {b} "
                "(one per prompt set)"
            )
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [output_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], 1
        )
        # Broadcasting a 1-image embedding over the prompts gives the same numbers as upstream's
        # repeat_interleave without materialising B copies (and keeps the graph TensorRT-friendly).
        # Without a mask prompt every prompt set gets the same dense embedding (expanded, stride
        # 0): keep a batch of 1 so that the first layer's image side is computed once.
        if (
            image_embeddings.shape[0] == 1
            and dense_prompt_embeddings.shape[0] > 1
            and dense_prompt_embeddings.stride(0) == 0
        ):
            dense_prompt_embeddings = dense_prompt_embeddings[:1]
        src = image_embeddings + dense_prompt_embeddings
        if torch.is_grad_enabled():
            return self._predict(src, image_pe, tokens)
        impl = impl or self.decode_tokens
        if b > PROMPT_CHUNK:
            # Inference on many prompt sets: chunks keep the per-prompt image-sized tensors in
            # cache (64 prompts at once run ~30 % slower per prompt than 16 on a CPU); each
            # chunk writes its masks into place.
            _, _, h, w = src.shape
            masks = src.new_empty(b, self.num_mask_tokens, 4 * h, 4 * w)
            ious = [
                self._infer(
                    src if src.shape[0] == 1 else src[i : i + PROMPT_CHUNK],
                    image_pe,
                    tokens[i : i + PROMPT_CHUNK],
                    impl,
                    out=masks[i : i + PROMPT_CHUNK],
                )[1]
                for i in range(0, b, PROMPT_CHUNK)
            ]
            return masks, torch.cat(ious)
        return self._infer(src, image_pe, tokens, impl)

    def _predict(
        self, src: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training (autograd) pass: the transformer's fused attentions and the loop-free
        channels-last up-scaling, SAM's decoder up to float rounding in outputs and gradients
        (``tests/test_parity.py``, against segment-anything's own decoder). Upstream's
        up-scaling of the transposed image tokens keeps them channels-last while the
        hypernetwork product's gradient comes back contiguous, and CPU kernels that mix the two
        layouts are slow (GELU's backward on the 32 x 256 x 256 activations dominated a
        training step: BENCHMARKS.md, "Training step")."""
        _, _, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        hyper_in, iou_pred = self._heads(hs)
        return self._upscale_channels_last(src, hyper_in, h, w), iou_pred

    def _infer(
        self,
        src: torch.Tensor,
        image_pe: torch.Tensor,
        tokens: torch.Tensor,
        impl: Callable,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The inference pass: ``impl`` (:meth:`decode_tokens` or a compiled one), then the tiled
        up-scaling (into ``out`` if given)."""
        _, _, h, w = src.shape
        src, hyper_in, iou_pred = impl(src, image_pe, tokens)
        return self._upscale(src, hyper_in, h, w, out=out), iou_pred

    def _heads(self, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hypernetwork inputs (B x masks x C/8) and IoU predictions from the output tokens."""
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        return hyper_in, self.iou_prediction_head(hs[:, 0, :])

    def decode_tokens(
        self, src: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inference pass up to the up-scaling: image tokens (B x hw x C), hypernetwork inputs
        and IoU predictions. What ``impl`` replaces (``leansam.runtime.compile_decoder``)."""
        hs, src = self.transformer(src, image_pe, tokens)
        return (src, *self._heads(hs))

    def _upscale(
        self,
        src: torch.Tensor,
        hyper_in: torch.Tensor,
        h: int,
        w: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``output_upscaling`` and the hypernetwork product for inference, on B x hw x C image
        tokens: B x masks x 4h x 4w logits. Both transposed convolutions have kernel = stride = 2,
        so each input pixel maps to its own 4 x 4 output block: the whole up-scaling is a
        per-pixel function, computed here in tiles of :data:`UPSCALE_TILE` pixels as two matrix
        products (LayerNorm and GELU between them) followed by the product with the
        hypernetwork outputs, so the 32-channel 4h x 4w intermediate (8 MB per prompt set)
        never leaves the cache; each tile's masks are written into place. The same
        function as upstream's ``output_upscaling(...)`` then ``hyper_in @ upscaled``, up to
        float rounding (timings: BENCHMARKS.md, "Decoder").
        Traced graphs (ONNX export) and GPUs (where the loop would launch thousands of small
        kernels) take the loop-free :meth:`_upscale_channels_last`."""
        if src.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling():
            masks = self._upscale_channels_last(src, hyper_in, h, w)
            return masks if out is None else out.copy_(masks)
        up1, norm, _, up2, _ = self.output_upscaling
        b, _, c = src.shape
        c1, c2 = up1.out_channels, up2.out_channels
        w1 = up1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)  # in x (di, dj, out)
        w2 = up2.weight.permute(2, 0, 3, 1).reshape(2, c1, 2 * c2)  # ei x in x (ej, out)
        b1, b2 = up1.bias.repeat(4), up2.bias.repeat(2)
        m = hyper_in.shape[1]
        rows = max(1, UPSCALE_TILE // w)  # whole image rows per tile
        if out is None:
            out = src.new_empty(b, m, 4 * h, 4 * w)
        for i in range(b):
            for y in range(0, h, rows):
                r = min(rows, h - y)
                x = torch.addmm(b1, src[i, y * w : (y + r) * w], w1)
                # rows (y, x) x columns (di, dj, out) -> rows (y, di, x, dj): output row
                # 4y + 2di + ei, column 4x + 2dj + ej
                x = x.view(r, w, 2, 2 * c1).transpose(1, 2).reshape(-1, c1)
                x = F.gelu(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
                block = out[i, :, 4 * y : 4 * (y + r)].view(m, r, 2, 2, 4 * w)
                for ei in range(2):  # rows (y, di, x, dj, ej): whole output rows per ei
                    z = F.gelu(torch.addmm(b2, x, w2[ei])).view(-1, c2)
                    block[:, :, :, ei] = (hyper_in[i] @ z.T).view(m, r, 2, 4 * w)
        return out

    def _upscale_channels_last(
        self, src: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int
    ) -> torch.Tensor:
        """``output_upscaling`` and the hypernetwork product on B x hw x C image tokens kept in
        channels-last layout, without loops (traced graphs, GPUs and the autograd pass
        :meth:`_predict`): no transpose copy in, LayerNorm as one fused pass over the channel
        axis, masks read out as (HW x C') @ (C' x masks), every tensor in one layout. The same
        function as upstream's up-scaling and hypernetwork product up to float rounding."""
        up1, norm, act1, up2, act2 = self.output_upscaling
        b, _, c = src.shape
        x = up1(src.view(b, h, w, c).permute(0, 3, 1, 2))  # channels-last in and out
        x = F.layer_norm(
            x.permute(0, 2, 3, 1), (up1.out_channels,), norm.weight, norm.bias, norm.eps
        )
        x = act2(up2(act1(x.permute(0, 3, 1, 2))))
        b2, c2, h2, w2 = x.shape
        flat = x.permute(0, 2, 3, 1).reshape(b2, h2 * w2, c2)  # a view when channels-last
        return (flat @ hyper_in.transpose(1, 2)).transpose(1, 2).reshape(b2, -1, h2, w2)
