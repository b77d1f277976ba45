"""Module-level tests at tiny sizes: shapes, numerics the spec pins down, sizes of full variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leansam import create_model, list_models
from leansam.configs import VARIANTS, BlockType, EfficientViTConfig, ViTConfig
from leansam.errors import InputError, UnknownModelError
from leansam.modeling.common import LayerNorm2d
from leansam.modeling.efficientvit import LiteMLA, ResizeTo
from leansam.modeling.sam import Sam
from leansam.modeling.vit import window_partition, window_unpartition
from leansam.registry import model_info

TINY = ["efficientvit-sam-tiny-l", "efficientvit-sam-tiny-xl", "sam-vit-tiny"]


@pytest.mark.parametrize(
    ("name", "millions"),
    [
        ("efficientvit-sam-l0", 34.8),
        ("efficientvit-sam-l1", 47.7),
        ("efficientvit-sam-l2", 61.3),
        ("efficientvit-sam-xl0", 117.0),
        ("efficientvit-sam-xl1", 203.3),
        ("sam-vit-b", 93.7),
        ("sam-vit-l", 312.3),
        ("sam-vit-h", 641.1),
    ],
)
def test_full_size_parameter_counts(name, millions):
    assert round(model_info(name)["params"] / 1e6, 1) == millions


def test_list_models_and_unknown_name():
    names = list_models()
    assert names[:3] == ["efficientvit-sam-l0", "efficientvit-sam-l1", "efficientvit-sam-l2"]
    assert set(TINY) <= set(names)
    assert not set(TINY) & set(list_models(include_tiny=False))
    with pytest.raises(
        UnknownModelError, match="unknown model 'sam-vit-hh': did you mean sam-vit-h"
    ):
        create_model("sam-vit-hh")
    with pytest.raises(UnknownModelError, match="`leansam models` lists"):
        create_model("yolo")


def test_config_validation():
    base = VARIANTS["efficientvit-sam-tiny-l"].encoder
    kw = {f: getattr(base, f) for f in base.__dataclass_fields__}
    with pytest.raises(TypeError, match="BlockType"):
        EfficientViTConfig(**{**kw, "blocks": ("res", "fmb", "fmb", "mb", "att")})
    with pytest.raises(ValueError, match="depths"):
        EfficientViTConfig(**{**kw, "depths": (1, 1)})
    with pytest.raises(ValueError, match="64 x 64"):
        ViTConfig(32, 2, 2, (1,), img_size=512)
    assert base.blocks[-1] is BlockType.ATT


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_forward_shapes(name):
    torch.manual_seed(0)
    model = create_model(name)
    r = model.image_size
    x = model.preprocess(torch.randint(0, 256, (2, 3, r, r * 3 // 4), dtype=torch.uint8))
    assert x.shape == (2, 3, r, r)
    assert (x[..., r * 3 // 4 :] == 0).all()  # zero padding on the right, after normalising
    with torch.inference_mode():
        emb = model.image_encoder(x)
        assert emb.shape == (2, model.config.decoder.embed_dim, 64, 64) == (2, 32, 64, 64)
        boxes = torch.tensor([[10.0, 20.0, 300.0, 400.0], [0.0, 0.0, 1023.0, 700.0]])
        low, iou = model(x, boxes=boxes, multimask_output=True)
    assert low.shape == (2, 3, 256, 256) and iou.shape == (2, 3)
    assert torch.isfinite(low).all()


def test_seeded_random_weights_are_reproducible():
    a = create_model("sam-vit-tiny", seed=5).state_dict()
    before = torch.random.get_rng_state()
    b = create_model("sam-vit-tiny", seed=5).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = create_model("sam-vit-tiny", seed=6).state_dict()
    assert not torch.equal(a["mask_decoder.iou_token.weight"], c["mask_decoder.iou_token.weight"])


def test_device_errors():
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        create_model("sam-vit-tiny", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            create_model("sam-vit-tiny", device="cuda")


def test_box_corners_as_labelled_points_equal_box_prompt():
    """Labels 2 / 3 (SAM's ONNX convention) embed box corners exactly like ``boxes``."""
    torch.manual_seed(0)
    pe = create_model("sam-vit-tiny").prompt_encoder
    box = torch.tensor([[10.0, 20.0, 300.0, 400.0]])
    corners = (box.reshape(1, 2, 2), torch.tensor([[2, 3]]))
    with torch.inference_mode():
        from_box, _ = pe(None, box, None)
        from_points, _ = pe(corners, None, None)
    assert from_points.shape == (1, 3, 32)  # plus the "not a point" padding (32: tiny decoder)
    torch.testing.assert_close(from_points[:, :2], from_box)
    torch.testing.assert_close(from_points[0, 2], pe.not_a_point_embed.weight[0])


def test_models_follow_device_and_dtype():
    model = create_model("efficientvit-sam-tiny-l", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.pixel_mean.dtype == torch.bfloat16
    meta = Sam(VARIANTS["sam-vit-tiny"], device="meta")
    assert all(p.is_meta for p in meta.parameters())


def test_lite_mla_equals_quadratic_formula():
    """out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps), per head, ReLU on q and k."""
    torch.manual_seed(0)
    mla = LiteMLA(32, dim=8, scale=3, norm_layer=torch.nn.BatchNorm2d).eval()
    qkv = torch.randn(2, 2 * 3 * 32, 5, 7)  # 4 + 4 heads of [q|k|v] x 8 channels
    out = mla.attention(qkv)
    heads = qkv.reshape(2, -1, 24, 35)
    q, k, v = heads[:, :, :8].relu(), heads[:, :, 8:16].relu(), heads[:, :, 16:]
    att = torch.einsum("bhcm,bhcn->bhmn", k.double(), q.double())  # k_m . q_n
    ref = torch.einsum("bhcm,bhmn->bhcn", v.double(), att) / (att.sum(2, keepdim=True) + 1e-15)
    assert out.shape == (2, 64, 5, 7)
    torch.testing.assert_close(out.double(), ref.reshape(2, 64, 5, 7), rtol=1e-5, atol=1e-5)


def test_lite_mla_runs_in_fp32_under_autocast():
    mla = LiteMLA(32, dim=8, scale=5, norm_layer=torch.nn.BatchNorm2d).eval()
    qkv = (torch.rand(1, 192, 4, 4) * 200).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mla.attention(qkv)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, mla.attention(qkv.float()))


def test_layernorm2d_matches_layer_norm_over_channels():
    torch.manual_seed(0)
    ln = LayerNorm2d(16, eps=1e-6)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 16, 5, 6) * 3 + 1
    ref = F.layer_norm(x.permute(0, 2, 3, 1), (16,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ln(x), ref, rtol=1e-5, atol=1e-5)


def test_neck_resize_is_bicubic_fp32_and_identity_at_size():
    x = torch.randn(1, 4, 16, 16, dtype=torch.bfloat16)
    y = ResizeTo(64)(x)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 4, 64, 64)
    ref = F.interpolate(x.float(), size=(64, 64), mode="bicubic").to(torch.bfloat16)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    z = torch.randn(1, 4, 64, 64)
    assert ResizeTo(64)(z) is z


@pytest.mark.parametrize(("h", "w"), [(14, 14), (20, 33), (64, 64)])
def test_window_partition_round_trip(h, w):
    x = torch.randn(2, h, w, 8)
    windows, padded = window_partition(x, 14)
    assert windows.shape[1:] == (14, 14, 8)
    assert padded == (h + (-h) % 14, w + (-w) % 14)
    torch.testing.assert_close(window_unpartition(windows, 14, padded, (h, w)), x)


def test_efficientvit_uses_tanh_gelu_and_eps_1e6():
    model = create_model("efficientvit-sam-tiny-xl")
    gelus = [m for m in model.image_encoder.modules() if isinstance(m, torch.nn.GELU)]
    assert gelus and all(g.approximate == "tanh" for g in gelus)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    lns = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, LayerNorm2d))]
    assert bns and all(m.eps == 1e-6 for m in bns + lns)
    sam = create_model("sam-vit-tiny")
    decoder_lns = [m for m in sam.mask_decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert decoder_lns and all(m.eps == 1e-5 for m in decoder_lns)  # SAM keeps the default


def test_decoder_broadcasts_one_embedding_over_prompts():
    torch.manual_seed(0)
    model = create_model("sam-vit-tiny")
    emb = torch.randn(1, 32, 64, 64)
    boxes = torch.tensor([[10.0, 10.0, 500.0, 600.0], [100.0, 50.0, 900.0, 1000.0]])
    pe = model.prompt_encoder.get_dense_pe()
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(None, boxes, None)
        low, _iou = model.mask_decoder(emb, pe, sparse, dense, multimask_output=False)
        for i in range(2):
            s, d = model.prompt_encoder(None, boxes[i : i + 1], None)
            low_i, _iou_i = model.mask_decoder(emb, pe, s, d, multimask_output=False)
            torch.testing.assert_close(low[i : i + 1], low_i, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="expected 1 or 2"):
            model.mask_decoder(emb.expand(3, -1, -1, -1), pe, sparse, dense, False)


@pytest.mark.parametrize("shared", [True, False], ids=["one-image", "image-per-prompt"])
def test_folded_attentions_equal_plain_attention_with_gradients(shared):
    """Attention.attend_* (the decoder's folded paths, in training and inference) against the
    plain forward on a tiny attention: outputs, and gradients of the inputs and weights (k_proj's
    bias excepted: the output does not depend on it, and the token->image paths give it none);
    under bf16 autocast the image->token path keeps the residual's float32, as ``r + attn``."""
    from leansam.modeling.transformer import Attention

    torch.manual_seed(0)
    att = Attention(32, 4, 2)
    n_img, b = 1 if shared else 3, 3
    img, tok, r = torch.randn(n_img, 50, 32), torch.randn(b, 5, 32), torch.randn(n_img, 50, 32)

    def grads_of(fn):
        att.zero_grad(set_to_none=True)
        x = [t.clone().requires_grad_(True) for t in (img, tok, r)]
        out = fn(*x)
        out.square().sum().backward()
        weights = {k: p.grad for k, p in att.named_parameters() if k != "k_proj.bias"}
        return out.detach(), [t.grad for t in x], weights

    folded_t2i = att.attend_to_shared_image if shared else att.attend_to_image
    pairs = [
        (lambda i, t, _r: folded_t2i(t, i, i), lambda i, t, _r: att(t, i, i)),
        (
            lambda i, t, rr: att.attend_from_image(i, t, t, residual=rr, project_q=shared),
            lambda i, t, rr: rr + att(i, t, t),
        ),
    ]
    for fused, plain in pairs:
        (out_f, in_f, w_f), (out_p, in_p, w_p) = grads_of(fused), grads_of(plain)
        torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
        for a, c in zip(in_f, in_p, strict=True):
            if c is not None:
                torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
        for k, c in w_p.items():
            torch.testing.assert_close(w_f[k], c, rtol=1e-4, atol=1e-5, msg=k)
    big = torch.randn(n_img, 4096, 32), torch.randn(b, 7, 32), torch.randn(n_img, 4096, 32)
    with torch.no_grad():
        ref = big[2] + att(*big[:1], big[1], big[1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = att.attend_from_image(big[0], big[1], big[1], residual=big[2], project_q=shared)
            plain = big[2] + att(big[0], big[1], big[1])
    assert fused.dtype == torch.float32
    err = [float((x.float() - ref).norm() / ref.norm()) for x in (fused, plain)]
    assert 0 < err[0] <= 2 * err[1], err


def test_decoder_inference_path_equals_the_training_path():
    """The inference pass (folded attentions, tiled up-scaling, prompt chunks) computes SAM's
    decoder: compared with the autograd pass (checked against segment-anything's own decoder,
    gradients included, in test_parity.py) on 20 prompt sets (two chunks) with a shared and
    with per-prompt embeddings; the loop-free up-scaling used for traced graphs agrees too."""
    torch.manual_seed(0)
    model = create_model("sam-vit-tiny")
    for p in model.mask_decoder.parameters():  # random weights of a trained model's scale
        torch.nn.init.normal_(p, std=0.05)
    dec = model.mask_decoder
    pe = model.prompt_encoder.get_dense_pe()
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g) * 800
    boxes = torch.cat([xy, xy + 20 + torch.rand(20, 2, generator=g) * 200], 1)
    d = model.config.decoder.embed_dim
    for emb in (torch.randn(1, d, 64, 64), torch.randn(20, d, 64, 64)):
        with torch.inference_mode():
            sparse, dense = model.prompt_encoder(None, boxes, None)
            fast, fast_iou = dec(emb, pe, sparse, dense, multimask_output=True)
        with torch.enable_grad():
            plain, plain_iou = dec(emb, pe, sparse, dense, multimask_output=True)
        assert fast.shape == (20, 3, 256, 256)
        torch.testing.assert_close(fast, plain.detach(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fast_iou, plain_iou.detach(), rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        src = torch.randn(3, 64 * 64, d)
        hyper = torch.randn(3, 4, d // 8)
        tiled = dec._upscale(src, hyper, 64, 64)
        loop_free = dec._upscale_channels_last(src, hyper, 64, 64)
    torch.testing.assert_close(tiled, loop_free, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("input_size", "original_size"),
    [
        ((682, 1024), (426, 640)),
        ((1024, 768), (1200, 900)),
        ((1024, 1024), (64, 64)),
        ((14, 1024), (7, 500)),
    ],
)
def test_mask_postprocessing_equals_sam_resizing(input_size, original_size):
    """The banded separable resizing (inference) is SAM's interpolate -> crop -> interpolate
    (autograd path), for landscape, portrait, up- and down-sized and extreme aspect ratios."""
    torch.manual_seed(0)
    model = create_model("sam-vit-tiny")
    masks = torch.randn(2, 3, 256, 256) * 4
    with torch.inference_mode():
        fast = model.postprocess_masks(masks, input_size, original_size)
    with torch.enable_grad():
        plain = model.postprocess_masks(masks, input_size, original_size)
    assert fast.shape == (2, 3, *original_size)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_inference_softmax_flushes_only_subnormal_weights():
    from leansam.modeling.common import softmax_ftz

    x = torch.cat([torch.zeros(1, 1), torch.linspace(-100, 0, 4095)[None]], 1) * 1.0
    ref = torch.softmax(x, -1)
    tiny = torch.finfo(torch.float32).tiny
    sub = (ref > 0) & (ref < tiny)
    assert int(sub.sum()) > 100  # exp(-88..-100) are subnormal in float32
    with torch.inference_mode():
        y = softmax_ftz(x, -1)
        half = softmax_ftz(x.half(), -1)  # float16's subnormals are not negligible: kept
    assert not bool(((y > 0) & (y < tiny)).any())
    assert bool((y[sub] == 0).all()) and torch.equal(y[~sub], ref[~sub])
    assert torch.equal(half, torch.softmax(x.half(), -1))
    with torch.enable_grad():  # under autograd a plain softmax (the flush is in place)
        assert torch.equal(softmax_ftz(x, -1), ref)
