"""SAM's mask decoder: two-way transformer, upscaling, hypernetwork masks and IoU head."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, LayerNorm2d

#: prompt sets per decoder pass at inference (see MaskDecoder.predict_masks)
PROMPT_CHUNK = 16


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
          image_embeddings: 1 x 256 x 64 x 64 (shared by all prompts) or B x 256 x 64 x 64 (one
            per prompt set).
          image_pe: 1 x 256 x 64 x 64 dense positional encoding.
          sparse_prompt_embeddings: B x N x 256.
          dense_prompt_embeddings: B x 256 x 64 x 64.
          multimask_output: return the 3 disambiguating masks instead of the single one.
          impl: a replacement for the per-chunk inference pass (``_predict``), e.g. a compiled
            one (``leansam.runtime.compile_decoder``); used only without autograd.

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
        predict = impl or self._predict
        if b > PROMPT_CHUNK:
            # Inference on many prompt sets: chunks keep the per-prompt image-sized tensors in
            # cache (64 prompts at once run ~30 % slower per prompt than 16 on a CPU).
            outs = [
                predict(
                    src if src.shape[0] == 1 else src[i : i + PROMPT_CHUNK],
                    image_pe,
                    tokens[i : i + PROMPT_CHUNK],
                )
                for i in range(0, b, PROMPT_CHUNK)
            ]
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        return predict(src, image_pe, tokens)

    def _predict(
        self, src: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, c, h, w = src.shape
        hs, src = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        if torch.is_grad_enabled():
            upscaled = self.output_upscaling(src.transpose(1, 2).reshape(-1, c, h, w))
            b2, c2, h2, w2 = upscaled.shape
            masks = (hyper_in @ upscaled.view(b2, c2, h2 * w2)).view(b2, -1, h2, w2)
        else:
            masks = self._upscale_channels_last(src, hyper_in, h, w)
        return masks, self.iou_prediction_head(iou_token_out)

    def _upscale_channels_last(
        self, src: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int
    ) -> torch.Tensor:
        """``output_upscaling`` and the hypernetwork product on B x hw x C image tokens kept in
        channels-last layout: no transpose copy in, LayerNorm as one fused pass over the channel
        axis, masks read out as (HW x C') @ (C' x masks). The same function as the plain path
        up to float rounding; for inference."""
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
