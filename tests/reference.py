"""Build the reference models (segment-anything, efficientsam) for parity tests.

Full-size variants come from the references' own builders; the tiny ones and leansam's own models
are assembled from the references' own classes with the config's numbers.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import partial
from pathlib import Path

import torch

STUBS = Path(__file__).resolve().parent / "stubs"
if importlib.util.find_spec("torchvision") is None:  # the references import it at module level
    sys.path.insert(0, str(STUBS))

from efficientsam.models.efficientvit import sam as evit_sam  # noqa: E402
from efficientsam.models.efficientvit.backbone import EfficientViTLargeBackbone  # noqa: E402
from efficientsam.models.nn.norm import build_norm, set_norm_eps  # noqa: E402
from efficientsam.sam_model_zoo import create_efficientvit_sam_model  # noqa: E402
from segment_anything import SamPredictor as RefSamPredictor  # noqa: E402
from segment_anything import sam_model_registry  # noqa: E402
from segment_anything.modeling import (  # noqa: E402
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from leansam.configs import VARIANTS, DecoderConfig, EfficientViTConfig  # noqa: E402

EfficientViTSamPredictor = evit_sam.EfficientViTSamPredictor


def _prompt_and_mask_decoder(dec, prompt_encoder, mask_decoder, two_way) -> dict:
    """SAM's prompt encoder and mask decoder (``build_sam.py``) at the sizes of ``dec``, built from
    a reference package's own classes."""
    return {
        "prompt_encoder": prompt_encoder(
            embed_dim=dec.embed_dim,
            image_embedding_size=(64, 64),
            input_image_size=(1024, 1024),
            mask_in_chans=16,
        ),
        "mask_decoder": mask_decoder(
            num_multimask_outputs=3,
            transformer=two_way(
                depth=dec.depth,
                embedding_dim=dec.embed_dim,
                mlp_dim=dec.mlp_dim,
                num_heads=dec.num_heads,
            ),
            transformer_dim=dec.embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=dec.iou_head_hidden_dim,
        ),
    }


def _assembled_evit(cfg) -> torch.nn.Module:
    enc: EfficientViTConfig = cfg.encoder
    att = "att" if enc.attention_scale == 5 else f"att@{enc.attention_scale}"
    blocks = [att if b.value == "att" else b.value for b in enc.blocks]
    backbone = EfficientViTLargeBackbone(
        width_list=list(enc.widths),
        depth_list=list(enc.depths),
        block_list=blocks,
        expand_list=list(enc.expand_ratios),
        fewer_norm_list=list(enc.fewer_norm),
        qkv_dim=enc.qkv_dim,
    )
    dec = cfg.decoder
    neck = evit_sam.SamNeck(
        fid_list=[f"stage{s}" for s in enc.neck_stages],
        in_channel_list=[enc.widths[s] for s in enc.neck_stages],
        head_width=enc.neck_width,
        head_depth=enc.neck_depth,
        expand_ratio=enc.neck_expand,
        middle_op="fmb",
        out_dim=dec.embed_dim,
    )
    encoder = evit_sam.EfficientViTSamImageEncoder(backbone, neck)
    if dec == DecoderConfig():  # the reference's own builder
        model = evit_sam.build_efficientvit_sam(encoder, cfg.image_size)
    else:  # build_efficientvit_sam with the config's decoder sizes
        encoder.norm = build_norm("ln2d", dec.embed_dim)
        model = evit_sam.EfficientViTSam(
            image_encoder=encoder,
            **_prompt_and_mask_decoder(
                dec, evit_sam.PromptEncoder, evit_sam.MaskDecoder, evit_sam.TwoWayTransformer
            ),
            image_size=(1024, cfg.image_size),
        )
    set_norm_eps(model, 1e-6)  # as the reference model zoo does for every variant
    return model


def _assembled_sam(cfg) -> torch.nn.Module:
    enc, dec = cfg.encoder, cfg.decoder
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=enc.depth,
            embed_dim=enc.embed_dim,
            img_size=enc.img_size,
            mlp_ratio=enc.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=enc.num_heads,
            patch_size=enc.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(enc.global_attn_indexes),
            window_size=enc.window_size,
            out_chans=dec.embed_dim,
        ),
        **_prompt_and_mask_decoder(dec, PromptEncoder, MaskDecoder, TwoWayTransformer),
    )


def build_reference(name: str) -> torch.nn.Module:
    """The reference implementation of a leansam variant, random weights, eval mode."""
    cfg = VARIANTS[name]
    if cfg.tiny or name.startswith("leansam-"):  # no reference builder: assemble its classes
        model = _assembled_evit(cfg) if cfg.family == "efficientvit" else _assembled_sam(cfg)
    elif cfg.family == "efficientvit":
        model = create_efficientvit_sam_model(name, pretrained=False)
    else:
        model = sam_model_registry["vit_" + name.rsplit("-", 1)[1]]()
    return model.eval()


def reference_predictor(name: str, model: torch.nn.Module):
    if VARIANTS[name].family == "efficientvit":
        return EfficientViTSamPredictor(model)
    return RefSamPredictor(model)
