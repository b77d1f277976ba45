"""SAM's prompt encoder: points, boxes and low-res masks -> sparse and dense embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of (x, y) with a fixed random Gaussian frequency matrix.

    ``scale`` is the Gaussian's standard deviation (SAM's argument: None or <= 0 means 1.0, SAM's
    value). The matrix is a buffer stored in checkpoints, so a loaded model has its file's
    frequencies whatever ``scale`` it was built with; the scale matters when training from
    scratch (a larger one resolves smaller boxes: MODEL_CARD.md)."""

    def __init__(
        self, num_pos_feats: int = 64, scale: float | None = None, *, device=None, dtype=None
    ) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer(
            "positional_encoding_gaussian_matrix",
            scale * torch.randn((2, num_pos_feats), device=device, dtype=dtype),
        )

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords: ... x 2 normalised to [0, 1] -> ... x (2 * num_pos_feats)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense encoding of pixel centres of an h x w grid -> C x h x w."""
        h, w = size
        g = self.positional_encoding_gaussian_matrix
        y = ((torch.arange(h, device=g.device, dtype=torch.float32) + 0.5) / h)[:, None].expand(
            h, w
        )
        x = ((torch.arange(w, device=g.device, dtype=torch.float32) + 0.5) / w)[None, :].expand(
            h, w
        )
        return self._pe_encoding(torch.stack([x, y], dim=-1).to(g.dtype)).permute(2, 0, 1)

    def forward_with_coords(
        self, coords: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """coords: B x N x 2 pixels (x, y) in a frame of ``image_size`` (H, W) -> B x N x C."""
        x = coords[..., 0] / image_size[1]
        y = coords[..., 1] / image_size[0]
        coords = torch.stack([x, y], dim=-1).to(self.positional_encoding_gaussian_matrix.dtype)
        return self._pe_encoding(coords)


class PromptEncoder(nn.Module):
    """Encodes prompts for SAM's mask decoder.

    Point labels: 1 foreground, 0 background, -1 padding ("not a point"), and 2 / 3 for the top-left
    / bottom-right box corners (the convention of SAM's ONNX decoder; the PyTorch reference only
    embeds boxes through ``boxes``).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, **kw)
        # positive / negative point, top-left / bottom-right box corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim, **kw) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim, **kw)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        c = mask_in_chans
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, c // 4, kernel_size=2, stride=2, **kw),
            LayerNorm2d(c // 4, **kw),
            nn.GELU(),
            nn.Conv2d(c // 4, c, kernel_size=2, stride=2, **kw),
            LayerNorm2d(c, **kw),
            nn.GELU(),
            nn.Conv2d(c, embed_dim, kernel_size=1, **kw),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim, **kw)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: 1 x C x 64 x 64."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # shift to the pixel centre
        if pad:
            b = points.shape[0]
            points = torch.cat([points, points.new_zeros((b, 1, 2))], dim=1)
            labels = torch.cat([labels, -labels.new_ones((b, 1))], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        # torch.where rather than boolean-mask writes: same numbers, export-friendly graph.
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        for i, e in enumerate(self.point_embeddings):
            emb = torch.where(labels == i, emb + e.weight, emb)
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)  # shift to the pixel centre
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        return torch.stack(
            [
                emb[:, 0] + self.point_embeddings[2].weight[0],
                emb[:, 1] + self.point_embeddings[3].weight[0],
            ],
            dim=1,
        )

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Arguments:
          points: (B x N x 2 coords (x, y), B x N labels), in the 1024 long-side frame.
          boxes: B x 4 XYXY in the 1024 long-side frame.
          masks: B x 1 x 256 x 256 low-res mask logits.

        Returns:
          sparse: B x N' x 256 point and box-corner embeddings.
          dense: B x 256 x 64 x 64 mask embedding (or the learned "no mask" embedding).
        """
        if points is not None:
            bs = points[0].shape[0]
        elif boxes is not None:
            bs = boxes.shape[0]
        elif masks is not None:
            bs = masks.shape[0]
        else:
            bs = 1
        weight = self.no_mask_embed.weight
        sparse = [weight.new_empty((bs, 0, self.embed_dim))]
        if points is not None:
            sparse.append(self._embed_points(points[0], points[1], pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return torch.cat(sparse, dim=1), dense
