"""SAM's two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from .common import MLPBlock, QuantPoints, quant_point, softmax_ftz


class Attention(QuantPoints, nn.Module):
    """Multi-head attention whose projections may shrink the width by ``downsample_rate``;
    quantization points (:class:`~leansam.modeling.common.QuantPoints`) at the projected q, k,
    v and the softmax output. The two-way transformer calls the fused paths (``attend_*``), in
    training and inference alike; with quantizers in place they run the plain :meth:`forward`,
    which has the points."""

    QUANT_POINTS = ("q_quant", "k_quant", "v_quant", "attn_quant")

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        downsample_rate: int = 1,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim / downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim, **kw)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim, **kw)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim, **kw)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim, **kw)
        self._init_quant_points()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def _head_weights(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """A projection's weight as heads x d x C and bias as heads x d."""
        h = self.num_heads
        d = self.internal_dim // h
        return linear.weight.reshape(h, d, -1), linear.bias.reshape(h, d)

    @staticmethod
    def _per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """B x h x T x d times a per-head h x d x C -> B x h x T x C, as one batched matmul over
        the heads (broadcasting the weight over B would copy it B x T times)."""
        b, h, t, d = x.shape
        y = x.transpose(0, 1).reshape(h, b * t, d) @ w
        return y.reshape(h, b, t, -1).transpose(0, 1)

    def attend_to_shared_image(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`forward` for B x T x C queries over one image (1 x N x C keys and values)
        shared by all B prompt sets: the image side is projected once and the B x T queries of
        each head form one matrix (no per-prompt copies of the image)."""
        if self.quantized:
            return self(q, k, v)
        b, t, _ = q.shape
        h = self.num_heads
        qh = self._heads(self.q_proj(q))  # B x h x T x d
        kh = self._heads(self.k_proj(k))[0]  # h x N x d
        vh = self._heads(self.v_proj(v))[0]
        d = qh.shape[-1]
        qh = qh.transpose(0, 1).reshape(h, b * t, d)
        attn = softmax_ftz((qh @ kh.transpose(1, 2)) / math.sqrt(d), dim=-1)  # h x BT x N
        out = (attn @ vh).reshape(h, b, t, d).permute(1, 2, 0, 3)  # B x T x h x d
        return self.out_proj(out.reshape(b, t, self.internal_dim))

    def attend_to_image(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Few queries (B x T x C, the tokens) over many keys (B x N x C, one image per prompt
        set) without projecting the N keys and values: q.(Wk x + bk) = (Wk^T q).x + q.bk, where
        q.bk is constant along the softmax and drops out, and, as attention rows sum to 1,
        attn @ (Wv x + bv) = (attn @ x) Wv^T + bv. 2 x N x C x heads x T multiply-adds instead
        of 2 x N x C x internal_dim; the same function as :meth:`forward` up to float rounding,
        with the same gradients except that ``k_proj.bias``, on which the output does not
        depend, gets none (under :meth:`forward` its gradient is zero up to rounding)."""
        if self.quantized:
            return self(q, k, v)
        b, t, _ = q.shape
        h = self.num_heads
        wk, _ = self._head_weights(self.k_proj)
        wv, bv = self._head_weights(self.v_proj)
        qh = self._heads(self.q_proj(q)) / math.sqrt(wk.shape[1])  # B x h x T x d, scaled
        q_in = self._per_head(qh, wk)  # B x h x T x C: Wk_h^T q
        attn = softmax_ftz(q_in.reshape(b, h * t, -1) @ k.transpose(1, 2), dim=-1)  # B x hT x N
        ctx = (attn @ v).reshape(b, h, t, -1)  # B x h x T x C
        out = self._per_head(ctx, wv.transpose(1, 2)) + bv[:, None]
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.internal_dim))

    def attend_from_image(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        residual: torch.Tensor,
        project_q: bool,
    ) -> torch.Tensor:
        """``residual`` + attention of many queries (1 or B x N x C, the image) over few keys
        (B x T x C, the tokens), without the N x C -> N x C output projection: the output is
        sum_h attn_h @ (v_h Wo_h^T + bo / heads) (each head's weights sum to 1), one fused
        batched multiply-add. With ``project_q`` the queries are projected as usual (one image
        shared by all prompt sets: computed once); otherwise the keys are mapped into the input
        space instead, (Wq x + bq).k = x.(Wq^T k) + bq.k. Same function as ``residual +
        forward(q, k, v)`` up to float rounding, and the same gradients."""
        if self.quantized:
            return residual + self(q, k, v)
        b, t, _ = k.shape
        h = self.num_heads
        kh = self._heads(self.k_proj(k))  # B x h x T x d
        vh = self._heads(self.v_proj(v))
        d = kh.shape[-1]
        kh = kh / math.sqrt(d)
        # Scores laid out B x h x T x N: the softmax over the few tokens then runs along a
        # strided axis, ~10x faster than along a contiguous axis of length T.
        if project_q:
            qh = self._heads(self.q_proj(q))[0]  # h x N x d, shared by the B prompt sets
            attn = kh.transpose(0, 1).reshape(h, b * t, d) @ qh.transpose(1, 2)  # h x BT x N
            attn = attn.reshape(h, b, t, -1).transpose(0, 1)  # B x h x T x N
        else:
            wq, bq = self._head_weights(self.q_proj)
            k_in = self._per_head(kh, wq)  # B x h x T x C
            attn = torch.baddbmm(
                (kh * bq[:, None]).sum(-1).reshape(b, h * t, 1),  # bq . k
                k_in.reshape(b, h * t, -1),
                q.transpose(1, 2),
            )  # B x hT x N
        attn = softmax_ftz(attn.reshape(b, h, t, -1), dim=2).reshape(b, h * t, -1)
        wo = self.out_proj.weight.reshape(-1, h, d).permute(1, 2, 0)  # h x d x C
        m = self._per_head(vh, wo).reshape(b, h * t, -1) + self.out_proj.bias / h
        if torch.is_autocast_enabled(residual.device.type):
            # under autocast the fused add would round the residual stream (the image tokens) to
            # the low precision at every layer; added outside, it keeps its own, as upstream's
            # ``keys + attn`` does
            return residual + torch.bmm(attn.transpose(1, 2), m)
        return torch.baddbmm(residual.expand(b, -1, -1), attn.transpose(1, 2), m)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: B x Nq x C, k and v: B x Nk x C (a batch of 1 broadcasts) -> B x Nq x C."""
        q = quant_point(self.q_quant, self._heads(self.q_proj(q)))
        k = quant_point(self.k_quant, self._heads(self.k_proj(k)))
        v = quant_point(self.v_quant, self._heads(self.v_proj(v)))
        attn = q @ k.transpose(-1, -2)
        attn = torch.softmax(attn / math.sqrt(q.shape[-1]), dim=-1)
        out = quant_point(self.attn_quant, attn, value=v) @ v
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image attention, token MLP, image->token attention."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        skip_first_layer_pe: bool,
        attention_downsample_rate: int = 2,
        norm_eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        norm = partial(nn.LayerNorm, eps=norm_eps, **kw)
        self.self_attn = Attention(embedding_dim, num_heads, **kw)
        self.norm1 = norm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate, **kw
        )
        self.norm2 = norm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU, **kw)
        self.norm3 = norm(embedding_dim)
        self.norm4 = norm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, attention_downsample_rate, **kw
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        # With one image per prompt set, the image-side projections are folded into the few
        # token-side ones (Attention.attend_*): same function, fewer multiply-adds per prompt,
        # in inference and in training alike. One image shared by all prompt sets (the first
        # layer) keeps the image-side projections, computed once for all.
        shared = keys.shape[0] == 1 and queries.shape[0] > 1
        q = queries + query_pe
        k = keys + key_pe  # keys do not change before the image->token attention: reused there
        t2i = self.cross_attn_token_to_image
        attend = t2i.attend_to_shared_image if shared else t2i.attend_to_image
        attn = attend(q, k, keys)
        queries = self.norm2(queries + attn)
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        i2t = self.cross_attn_image_to_token
        keys = i2t.attend_from_image(k, q, queries, residual=keys, project_q=shared)
        return queries, self.norm4(keys)


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        *,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
        norm_eps: float = 1e-5,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                skip_first_layer_pe=i == 0,
                attention_downsample_rate=attention_downsample_rate,
                norm_eps=norm_eps,
                **kw,
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, attention_downsample_rate, **kw
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim, eps=norm_eps, **kw)

    def forward(
        self, image_embedding: torch.Tensor, image_pe: torch.Tensor, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embedding: B x C x h x w; image_pe: 1 or B x C x h x w; point_embedding: B x N x C.

        Returns the processed tokens (B x N x C) and image tokens (B x hw x C).
        """
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        final = self.final_attn_token_to_image
        if keys.shape[0] == 1 < queries.shape[0]:
            attn = final.attend_to_shared_image(q, k, keys)
        else:
            attn = final.attend_to_image(q, k, keys)
        queries = self.norm_final_attn(queries + attn)
        return queries, keys
