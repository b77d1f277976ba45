"""Model variants as data: one frozen config per architecture, one table of named variants.

Every number here comes from SPEC section 2. The prompt encoder and mask decoder are SAM's and are
the same for all published variants (embedding 256 x 64 x 64, prompts in the 1024 long-side frame);
only the image encoder and a few numerics (norm eps, pixel normalisation) differ between families.
The test-size variants also shrink the decoder's width (:data:`TINY_DECODER`; the grid stays 64 x
64 and the prompt frame 1024), so tests of every code path run in milliseconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: Prompts and output masks always live in this long-side frame, also for 512-input models.
PROMPT_FRAME = 1024
EMBED_DIM = 256
EMBED_SIZE = 64
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class BlockType(enum.Enum):
    """Local/global block kinds of an EfficientViT stage."""

    RES = "res"  # ResBlock: 3x3 conv + BN + act, 3x3 conv + BN
    FMB = "fmb"  # FusedMBConv: 3x3 conv to mid + BN + act, 1x1 conv to out + BN
    MB = "mb"  # MBConv: 1x1 expand, 3x3 depthwise, 1x1 project
    ATT = "att"  # EfficientViTBlock: LiteMLA + MBConv, each residual


@dataclass(frozen=True)
class EfficientViTConfig:
    """EfficientViT-L/XL backbone plus the SAM neck.

    Stage ``s`` has ``depths[s]`` stride-1 blocks of type ``blocks[s]``; every stage after the first
    starts with one stride-2 block (no residual, expand ``4 * expand_ratios[s]``).
    """

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    blocks: tuple[BlockType, ...]
    expand_ratios: tuple[float, ...]
    #: "fewer norm" stages use biased convs without BN except on the projection.
    fewer_norm: tuple[bool, ...]
    #: kernel of LiteMLA's multi-scale aggregation branch (5 for L, 3 for XL).
    attention_scale: int
    #: stages feeding the neck, deepest first (the order of the upstream sum).
    neck_stages: tuple[int, ...]
    neck_depth: int
    neck_expand: float
    neck_width: int = 256
    qkv_dim: int = 32
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        n = len(self.widths)
        for name in ("depths", "blocks", "expand_ratios", "fewer_norm"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"EfficientViTConfig.{name} must have {n} entries like widths")
        for b in self.blocks:
            if not isinstance(b, BlockType):
                raise TypeError(f"EfficientViTConfig.blocks holds {b!r}; use BlockType members")
        if self.blocks[0] not in (BlockType.RES, BlockType.FMB, BlockType.MB):
            raise ValueError("the first stage must use convolutional blocks")
        if any(not 0 <= s < n for s in self.neck_stages):
            raise ValueError(f"neck_stages {self.neck_stages} out of range for {n} stages")


@dataclass(frozen=True)
class ViTConfig:
    """SAM's ViT image encoder (windowed attention with decomposed relative positions)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0
    img_size: int = PROMPT_FRAME

    def __post_init__(self) -> None:
        if self.img_size // self.patch_size != EMBED_SIZE:
            raise ValueError("img_size / patch_size must give the 64 x 64 embedding")
        if self.embed_dim % self.num_heads:
            raise ValueError("num_heads must divide embed_dim")


@dataclass(frozen=True)
class DecoderConfig:
    """SAM's prompt encoder and mask decoder sizes (SPEC section 2; ``segment_anything``'s
    ``build_sam.py``): the defaults are SAM's, shared by every published variant. The image
    encoder's neck outputs ``embed_dim`` channels on the 64 x 64 grid. Smaller values exist for
    the test-size variants only (no published checkpoint has them)."""

    embed_dim: int = EMBED_DIM
    depth: int = 2
    mlp_dim: int = 2048
    num_heads: int = 8
    iou_head_hidden_dim: int = 256

    def __post_init__(self) -> None:
        if self.embed_dim % 8 or (self.embed_dim // 2) % self.num_heads:
            raise ValueError(
                "DecoderConfig.embed_dim must be a multiple of 8 with num_heads dividing half of it"
            )


#: the decoder of the test-size variants: SAM's structure at 1/8 of its width
TINY_DECODER = DecoderConfig(embed_dim=32, mlp_dim=64, num_heads=2, iou_head_hidden_dim=32)


@dataclass(frozen=True)
class SamConfig:
    """A complete SAM-family model: image encoder + SAM prompt encoder + SAM mask decoder."""

    name: str
    encoder: EfficientViTConfig | ViTConfig
    #: the image encoder's square input side R (512 for L models, 1024 otherwise)
    image_size: int
    #: eps of the decoder transformer's nn.LayerNorms (EfficientViT-SAM sets every norm to 1e-6)
    decoder_norm_eps: float
    #: normalise like torchvision's ToTensor + Normalize ((x/255 - m/255) / (s/255)), as the
    #: EfficientViT-SAM reference does, instead of SAM's (x - m) / s; equal up to float rounding,
    #: kept per family so preprocessing is bit-exact against each reference.
    unit_range_normalize: bool
    description: str = ""
    #: test-size variants are listed but marked, so users do not pick them by accident
    tiny: bool = False
    #: prompt encoder and mask decoder sizes (SAM's unless a test-size variant)
    decoder: DecoderConfig = DecoderConfig()

    @property
    def family(self) -> str:
        return "efficientvit" if isinstance(self.encoder, EfficientViTConfig) else "sam"


_R, _F, _M, _A = BlockType.RES, BlockType.FMB, BlockType.MB, BlockType.ATT


def _evit_l(depths: tuple[int, ...], neck_depth: int, **kw) -> EfficientViTConfig:
    cfg = dict(
        widths=(32, 64, 128, 256, 512),
        depths=depths,
        blocks=(_R, _F, _F, _M, _A),
        expand_ratios=(1, 4, 4, 4, 6),
        fewer_norm=(False, False, False, True, True),
        attention_scale=5,
        neck_stages=(4, 3, 2),
        neck_depth=neck_depth,
        neck_expand=1,
    )
    cfg.update(kw)
    return EfficientViTConfig(**cfg)


def _evit_xl(depths: tuple[int, ...], neck_depth: int, **kw) -> EfficientViTConfig:
    cfg = dict(
        widths=(32, 64, 128, 256, 512, 1024),
        depths=depths,
        blocks=(_R, _F, _F, _F, _A, _A),
        expand_ratios=(1, 4, 4, 4, 4, 6),
        fewer_norm=(False, False, False, False, True, True),
        attention_scale=3,
        neck_stages=(5, 4, 3),
        neck_depth=neck_depth,
        neck_expand=4,
    )
    cfg.update(kw)
    return EfficientViTConfig(**cfg)


def _evit(name: str, encoder: EfficientViTConfig, image_size: int, **kw) -> SamConfig:
    return SamConfig(
        name=name,
        encoder=encoder,
        image_size=image_size,
        decoder_norm_eps=1e-6,
        unit_range_normalize=True,
        **kw,
    )


def _sam(name: str, encoder: ViTConfig, **kw) -> SamConfig:
    return SamConfig(
        name=name,
        encoder=encoder,
        image_size=encoder.img_size,
        decoder_norm_eps=1e-5,
        unit_range_normalize=False,
        **kw,
    )


VARIANTS: dict[str, SamConfig] = {
    c.name: c
    for c in (
        _evit(
            "efficientvit-sam-l0",
            _evit_l((1, 1, 1, 4, 4), 4),
            512,
            description="EfficientViT-SAM L0",
        ),
        _evit(
            "efficientvit-sam-l1",
            _evit_l((1, 1, 1, 6, 6), 8),
            512,
            description="EfficientViT-SAM L1",
        ),
        _evit(
            "efficientvit-sam-l2",
            _evit_l((1, 2, 2, 8, 8), 12),
            512,
            description="EfficientViT-SAM L2",
        ),
        _evit(
            "efficientvit-sam-xl0",
            _evit_xl((0, 1, 1, 2, 3, 3), 6),
            1024,
            description="EfficientViT-SAM XL0",
        ),
        _evit(
            "efficientvit-sam-xl1",
            _evit_xl((1, 2, 2, 4, 6, 6), 12),
            1024,
            description="EfficientViT-SAM XL1",
        ),
        _sam("sam-vit-b", ViTConfig(768, 12, 12, (2, 5, 8, 11)), description="SAM ViT-B"),
        _sam("sam-vit-l", ViTConfig(1024, 24, 16, (5, 11, 17, 23)), description="SAM ViT-L"),
        _sam("sam-vit-h", ViTConfig(1280, 32, 16, (7, 15, 23, 31)), description="SAM ViT-H"),
        # leansam's own trained models (weights/, MODEL_CARD.md): a small SAM-ViT teacher and an
        # EfficientViT-SAM student distilled from it, both at 512 px input.
        _sam(
            "leansam-vit-s",
            ViTConfig(128, 6, 4, (), window_size=16, patch_size=8, img_size=512),
            description="leansam's small SAM-ViT teacher, trained on COCO subsets (MODEL_CARD.md)",
        ),
        _evit(
            "leansam-efficientvit-s",
            _evit_l((1, 1, 1, 2, 2), 2, widths=(8, 16, 32, 64, 128), neck_width=128, qkv_dim=16),
            512,
            description="leansam's small EfficientViT-SAM student of leansam-vit-s (MODEL_CARD.md)",
        ),
        # Tiny variants: same code paths (every block type, LiteMLA, bicubic neck resize, the
        # 1024 prompt frame at a smaller encoder input) at a size that runs in milliseconds.
        _evit(
            "efficientvit-sam-tiny-l",
            _evit_l((1, 1, 1, 1, 1), 1, widths=(8, 16, 32, 64, 64), neck_width=32, qkv_dim=16),
            256,
            description="test-size L-family model (random weights only)",
            tiny=True,
            decoder=TINY_DECODER,
        ),
        _evit(
            "efficientvit-sam-tiny-xl",
            _evit_xl(
                (1, 1, 1, 1, 1, 1), 1, widths=(8, 8, 16, 16, 32, 64), neck_width=32, qkv_dim=16
            ),
            512,
            description="test-size XL-family model (random weights only)",
            tiny=True,
            decoder=TINY_DECODER,
        ),
        _sam(
            "sam-vit-tiny",
            ViTConfig(32, 2, 2, (1,)),
            description="test-size SAM ViT (random weights only)",
            tiny=True,
            decoder=TINY_DECODER,
        ),
    )
}
