"""Whole-model quantization (SPEC section 7): mapping, calibration, reconstruction, the activity
proof, the integer view on real layers, save / load / CLI, and W8A8 SQNR on full-size graphs."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import COCO_MINI, REPO, randomize_

from leansam import SamPredictor, create_model
from leansam.errors import CheckpointError, InputError
from leansam.quant import (
    HLUQ,
    METHODS,
    AdaRoundQuantizer,
    CAGQuantizer,
    Log2Quantizer,
    QuantConfig,
    UniformQuantizer,
    calibration_samples,
    check_active,
    layer_sqnr,
    load,
    prepare,
    quantize,
    quantizers,
    report,
    run_samples,
    save,
    sqnr_db,
)
from leansam.quant.integer import IntegerLinearCAG, IntegerLinearHLUQ
from leansam.quant.io import pack_int4, pack_tensors, unpack_int4, unpack_tensors
from leansam.quant.modules import QuantConv2d, QuantLayer, QuantLinear
from leansam.quant.reconstruct import blocks, reconstruct_block, run_block

TRAIN = (COCO_MINI / "train2017", COCO_MINI / "annotations" / "instances_train2017.json")
TINY = ("sam-vit-tiny", "efficientvit-sam-tiny-l")


def _model(name: str):
    return randomize_(create_model(name, seed=0), seed=1).eval()


@pytest.fixture(scope="module", params=TINY)
def tiny(request):
    model = _model(request.param)
    return model, calibration_samples(model, *TRAIN, count=2, max_boxes=3)


def _outputs(model, samples):
    with torch.no_grad():
        s = samples[0]
        emb = model.image_encoder(s.image)
        sparse, dense = model.prompt_encoder(points=None, boxes=s.boxes, masks=None)
        low, iou = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, True)
    return emb, low, iou


def test_wrapped_model_with_quantizers_off_is_the_model(tiny):
    model, samples = tiny
    q = prepare(model, QuantConfig(method="ahcptq"))
    for _, qz in quantizers(q):
        qz.enabled = False
    for ref, got in zip(_outputs(model, samples), _outputs(q, samples), strict=True):
        # BN folding (EfficientViT) and the decoder's plain path instead of its folded fast
        # path: same function, float rounding only
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_mapping_follows_the_spec(tiny):
    model, _ = tiny
    q = prepare(model, QuantConfig(method="ahcptq"))
    # full precision: prompt encoder, output upscaling, hypernetwork MLPs, IoU head, patch
    # embedding / stem
    for part in (
        q.prompt_encoder,
        q.mask_decoder.output_upscaling,
        q.mask_decoder.output_hypernetworks_mlps,
        q.mask_decoder.iou_prediction_head,
    ):
        assert not any(isinstance(m, QuantLayer) for m in part.modules())
    enc = q.image_encoder
    stem = enc.patch_embed.proj if hasattr(enc, "patch_embed") else None
    if stem is None:
        stem = enc.backbone.stages[0].op_list[0].conv
    assert isinstance(stem, torch.nn.Conv2d)
    roles = {n: m for n, m in q.named_modules() if isinstance(m, QuantLayer)}
    for name, layer in roles.items():
        kind = type(layer.a_quant)
        expected = {"cag": CAGQuantizer, "hluq": HLUQ, "plain": UniformQuantizer}[layer.role]
        assert kind is expected, name
        assert isinstance(layer.w_quant, AdaRoundQuantizer)
    # decoder: every attention's q/k/v projections are CAG inputs, MLP lin2 is HLUQ
    layer0 = q.mask_decoder.transformer.layers[0]
    assert layer0.cross_attn_token_to_image.k_proj.role == "cag"
    assert layer0.mlp.lin2.role == "hluq"
    assert isinstance(layer0.self_attn.attn_quant, Log2Quantizer)
    if hasattr(enc, "blocks"):
        blk = enc.blocks[0]
        assert (blk.attn.qkv.role, blk.mlp.lin1.role, blk.mlp.lin2.role) == ("cag", "cag", "hluq")
        assert isinstance(enc.neck[0], QuantConv2d) and isinstance(enc.neck[2], QuantConv2d)
    else:
        mb = next(m for m in enc.modules() if type(m).__name__ == "MBConv")
        roles = [mb.inverted_conv.conv.role, mb.depth_conv.conv.role, mb.point_conv.conv.role]
        assert roles == ["cag", "hluq", "hluq"]


# AHCPTQ (all its parts) on both tiny models in the default suite; the other methods and the
# ablations: `make test-slow`
@pytest.mark.parametrize(
    "method", [m if m == "ahcptq" else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
)
def test_every_method_quantizes_and_every_quantizer_is_active(tiny, method):
    model, samples = tiny
    cfg = QuantConfig.from_bits(method, "w4a4", iters=3)
    q = quantize(model, cfg, samples, progress=False)
    active = check_active(q, samples[:1])
    names = [n for n, _ in quantizers(q)]
    assert sorted(active) == sorted(names)
    assert min(active.values()) > 0
    rep = report(q)
    assert {r["bits"] for r in rep["tensors"]} == {4}
    assert all(r["enabled"] and r["calibrated"] for r in rep["tensors"])
    # every quantized tensor in the report: weight + input per layer, matmul points
    layers = sum(isinstance(m, QuantLayer) for m in q.modules())
    assert len(rep["tensors"]) >= 2 * layers
    kinds = {type(qz) for _, qz in quantizers(q)}
    assert (CAGQuantizer in kinds) == (method in ("ahcptq", "ahcptq-no-hluq"))
    assert (HLUQ in kinds) == (method in ("ahcptq", "ahcptq-no-cag"))
    assert (AdaRoundQuantizer in kinds) == cfg.reconstruct
    for _, qz in quantizers(q):
        if isinstance(qz, CAGQuantizer):
            assert qz.num_groups <= 4  # progressive grouping ends with 4 groups
        if isinstance(qz, AdaRoundQuantizer):
            assert qz.alpha is None  # hard rounding after reconstruction
    # the quantized model is really different from the full-precision one
    assert sqnr_db(_outputs(model, samples)[0], _outputs(q, samples)[0]) < 60


def test_softmax_granularity_is_calibrated_on_the_attention_output(tiny):
    model, samples = tiny
    ref = _outputs(model, samples)
    errors = {}
    for softmax in ("log2", "agq"):
        cfg = QuantConfig(method="minmax", w_bits=8, a_bits=8, softmax=softmax)
        q = quantize(model, cfg, samples, progress=False)
        logs = [qz for _, qz in quantizers(q) if isinstance(qz, Log2Quantizer)]
        assert logs  # decoder attentions (and ViT blocks) quantize their softmax outputs
        taus = {float(qz.tau) for qz in logs}
        assert taus == {1.0} if softmax == "log2" else max(taus) > 1
        rows = [r for r in report(q)["tensors"] if r["quantizer"] == "log2"]
        assert len(rows) == len(logs) and {r["tau"] for r in rows} == taus
        out = _outputs(q, samples)
        errors[softmax] = [float((a - b).pow(2).mean()) for a, b in zip(ref, out, strict=True)]
    # the calibrated grid lowers the error of the masks and the IoU predictions at W8A8
    assert errors["agq"][1] < errors["log2"][1] and errors["agq"][2] < errors["log2"][2]


def test_a_disabled_quantizer_is_caught(tiny):
    model, samples = tiny
    q = quantize(model, QuantConfig(method="minmax", w_bits=8, a_bits=8), samples, progress=False)
    _, victim = next(iter(quantizers(q)))
    victim.enabled = False
    with pytest.raises(RuntimeError, match="disabled"):
        check_active(q, samples[:1])


def test_cag_groups_drive_the_forward(tiny):
    model, samples = tiny
    q = quantize(model, QuantConfig(method="ahcptq", iters=0), samples, progress=False)
    layer = next(m for m in q.modules() if isinstance(m, QuantLinear) and m.role == "cag")
    cag = layer.a_quant
    assert cag.num_groups == 4 and set(cag.group.tolist()) <= set(range(4))
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        cag.scale[int(cag.group[0])] *= 3  # one group's scale: every channel of the group moves
        after = layer(x)
    assert not torch.equal(before, after)
    reg = report(q)["cag_registers"]
    assert reg["cag_pairs"] < reg["per_channel_pairs"] and reg["reduction"] > 0.5


def test_reconstruction_lowers_the_block_error(tiny):
    """Reconstruction must learn: the first block's activation scales are spoiled (x 4 after
    calibration, a start that only learning can repair), so keeping the calibrated state would
    fail the margin below, and so would reconstruction doing nothing."""
    model, samples = tiny
    cfg = QuantConfig(method="qdrop", w_bits=4, a_bits=4, iters=0, lr_scale=1e-3, softmax="log2")
    q = quantize(model, cfg, samples, progress=False)
    fp = prepare(model, cfg)
    for _, qz in quantizers(fp):
        qz.enabled = False
    fp.load_state_dict(q.state_dict(), strict=False)
    name, block = blocks(q)[0]
    fp_block = dict(blocks(fp))[name]
    # inputs of the first block: the same for both models (nothing quantized before it)
    got = []
    hook = block.register_forward_hook(lambda m, a, k, o: got.append((a, k)), with_kwargs=True)
    run_samples(q, samples)
    hook.remove()
    targets = run_block(fp_block, got)

    def err():
        outs = run_block(block, got)
        return sum(float((o - t).pow(2).mean()) for o, t in zip(outs, targets, strict=True))

    layers = [m for m in block.modules() if isinstance(m, QuantLayer)]
    for m in layers:
        m.w_quant.init_params(m.weight)
        m.w_quant.finalize()
    calibrated = err()
    spoiled = [
        qz for qz in block.modules()
        if isinstance(qz, UniformQuantizer) and not isinstance(qz, AdaRoundQuantizer)
    ]  # fmt: skip
    assert spoiled
    with torch.no_grad():
        for qz in spoiled:
            qz.scale.mul_(SPOIL)
    before = err()
    assert before > 1.5 * calibrated  # the spoiled start is clearly worse
    for m in layers:
        m.w_quant.init_params(m.weight)
    for qz in block.modules():
        if hasattr(qz, "learnable"):
            for p in qz.learnable():
                p.requires_grad_(True)
    import random

    cfg = QuantConfig(method="qdrop", iters=RECON_ITERS, lr_scale=RECON_LR, drop_prob=0.0)
    _, kept = reconstruct_block(block, got, targets, cfg, random.Random(0), None)
    after = err()
    assert kept in ("learned", "nearest"), kept  # the learned scales won over the start
    assert after < RECON_MARGIN * before, (after, before, calibrated)


#: the reconstruction test's spoiled start, budget and required gain. Measured (block error):
#: tiny ViT calibrated 0.0043, spoiled 0.046, after 0.019 (0.42x); tiny EfficientViT 0.00027,
#: 0.0026, 0.00036 (0.14x); "learned" kept on both
SPOIL, RECON_ITERS, RECON_LR, RECON_MARGIN = 4.0, 60, 1e-2, 0.5


def test_integer_reference_on_layers_of_a_quantized_model(tiny):
    model, samples = tiny
    q = quantize(model, QuantConfig(method="ahcptq", iters=2), samples, progress=False)
    mlp = q.mask_decoder.transformer.layers[0].mlp
    rows = {}

    def keep(name):
        def hook(mod, args, out):  # returns None: the output stays as it is
            rows.setdefault(name, args[0])

        return hook

    hooks = [
        mlp.lin1.register_forward_hook(keep("lin1")),
        mlp.lin2.register_forward_hook(keep("lin2")),
    ]
    run_samples(q, samples[:1])
    for h in hooks:
        h.remove()
    for name, cls in (("lin1", IntegerLinearCAG), ("lin2", IntegerLinearHLUQ)):
        layer = getattr(mlp, name)
        x = rows[name].reshape(-1, layer.in_features)
        with torch.no_grad():
            ref = layer(x)
            got = cls(layer, layer.w_quant, layer.a_quant)(x)
        err = float((got - ref).abs().max()) / float(ref.abs().max())
        assert err <= 1e-5, name


def test_save_load_and_every_entry_point(tiny, tmp_path):
    model, samples = tiny
    q = quantize(model, QuantConfig(method="ahcptq", iters=2), samples, progress=False)
    path = save(q, tmp_path / "q.pt")
    back = load(path)
    for a, b in zip(_outputs(q, samples), _outputs(back, samples), strict=True):
        assert torch.equal(a, b)
    # create_model takes the file as a checkpoint; SamPredictor runs it (torch runtime only)
    again = create_model(model.config.name, checkpoint=path)
    assert getattr(again, "quant_config", None) == q.quant_config
    image = np.full((48, 64, 3), 127, np.uint8)
    pred = SamPredictor(again)
    pred.set_image(image)
    masks, _, _ = pred.predict(box=np.array([4, 4, 40, 30]))
    assert masks.shape == (3, 48, 64)
    with pytest.raises(InputError, match="torch"):
        SamPredictor(again, "torch-opt")
    other = TINY[1] if model.config.name == TINY[0] else TINY[0]
    with pytest.raises(CheckpointError, match="not"):
        load(path, model=other)
    with pytest.raises(CheckpointError, match="not a leansam quantized model"):
        load(REPO / "pyproject.toml")


def test_pack_int4_round_trips_every_code():
    codes = torch.tensor([[-8, -1, 0, 7, 3], [1, -5, 6, -8, 2]], dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == 5  # 10 codes, two per byte
    assert torch.equal(unpack_int4(packed, (2, 5)), codes)
    odd = torch.arange(-8, 7, dtype=torch.int8)  # 15 codes: one nibble of padding
    assert torch.equal(unpack_int4(pack_int4(odd), (15,)), odd)


def test_packed_tensors_round_trip_and_damage_is_one_line():
    g = torch.Generator().manual_seed(0)
    state = {
        "codes": (torch.randn(300, 400, generator=g) * 2).round().clamp(-8, 7).to(torch.int8),
        "half": torch.randn(7, 3, generator=g).half(),
        "scalar": torch.tensor(3.5),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    blob, index = pack_tensors(state)
    assert blob.dtype == torch.uint8 and blob.numel() < 0.6 * 300 * 400  # the codes compress
    back = unpack_tensors(blob, index, "f")
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with pytest.raises(CheckpointError, match="f: the packed tensors are damaged"):
        unpack_tensors(blob[:-10], index, "f")
    bad = [[k, "float64" if k == "half" else d, s, o, n] for k, d, s, o, n in index]
    with pytest.raises(CheckpointError, match="f: the packed tensors are damaged"):
        unpack_tensors(blob, bad, "f")


def test_quantized_files_hold_integer_codes(tiny, tmp_path):
    """Version 2: a quantized weight is stored as int8 codes (8 bits) or two 4-bit codes per
    byte, AdaRound's rounding is not stored, and the loaded model is the same model; a damaged
    file fails with one line, and a version-1 file (float weights) still loads."""
    model, samples = tiny
    for bits in ("w8a8", "w4a4"):
        q = quantize(model, QuantConfig.from_bits("ahcptq", bits, iters=2), samples,
                     progress=False)  # fmt: skip
        path = save(q, tmp_path / f"{bits}.pt")
        obj = torch.load(path, weights_only=True)
        state = unpack_tensors(obj["packed"], obj["index"], path)
        layers = [n for n, m in q.named_modules() if isinstance(m, QuantLayer)]
        assert layers
        for name in layers:
            weight = dict(q.named_modules())[name].weight
            assert f"{name}.weight" not in state and f"{name}.w_quant.up" not in state
            if bits == "w8a8":
                assert state[f"{name}.weight_codes"].dtype == torch.int8
                assert state[f"{name}.weight_codes"].shape == weight.shape
            else:
                assert state[f"{name}.weight_codes4"].numel() == (weight.numel() + 1) // 2
        back = load(path)
        for a, b in zip(_outputs(q, samples), _outputs(back, samples), strict=True):
            assert torch.equal(a, b)
        # the weights the layers compute with are the same (the float weight behind them is
        # rebuilt as codes x scale, and AdaRound's rounding relative to it)
        twins = zip(q.named_modules(), back.named_modules(), strict=True)
        for (n, x), (_, y) in twins:
            if isinstance(x, QuantLayer):
                assert torch.equal(x.quantized_weight(), y.quantized_weight()), n
    # a damaged file (codes of the wrong shape), a version-1 file, a newer version
    obj = torch.load(path, weights_only=True)
    state = unpack_tensors(obj["packed"], obj["index"], path)
    key = next(k for k in state if k.endswith(".weight_shape"))
    state[key] = state[key] + 1
    obj["packed"], obj["index"] = pack_tensors(state)
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="codes are"):
        load(tmp_path / "bad.pt")
    v1 = {k: v for k, v in obj.items() if k not in ("packed", "index")}
    v1.update(version=1, state_dict={k: v.detach() for k, v in q.state_dict().items()})
    torch.save(v1, tmp_path / "v1.pt")
    for a, b in zip(_outputs(q, samples), _outputs(load(tmp_path / "v1.pt"), samples),
                    strict=True):  # fmt: skip
        assert torch.equal(a, b)
    torch.save({**obj, "version": 3}, tmp_path / "v3.pt")
    with pytest.raises(CheckpointError, match="version 3; this leansam reads 1, 2"):
        load(tmp_path / "v3.pt")


def test_quantized_student_file_sizes(tmp_path):
    """The shipped student quantized per layer with MinMax at W8 and W4: its file is at most 0.3x
    and 0.17x of the float32 state dict's (issue 22), and loads back to the same outputs."""
    student = create_model("leansam-efficientvit-s", pretrained=True).float().eval()
    fp32 = tmp_path / "fp32.pt"
    torch.save(student.state_dict(), fp32)
    samples = calibration_samples(student, *TRAIN, count=1, max_boxes=2)
    for bits, limit in (("w8a8", 0.3), ("w4a4", 0.17)):
        q = quantize(student, QuantConfig.from_bits("minmax", bits), samples, progress=False)
        path = save(q, tmp_path / f"{bits}.pt")
        ratio = path.stat().st_size / fp32.stat().st_size
        assert ratio <= limit, (bits, ratio)
        back = load(path)
        for a, b in zip(_outputs(q, samples), _outputs(back, samples), strict=True):
            assert torch.equal(a, b)


def test_keep_8bit_is_mixed_precision_by_tensor_name(tiny, tmp_path):
    """QuantConfig.keep_8bit: the named tensors (a tensor, or every tensor of a module) use 8
    bits, the rest the configured width; the choice survives save / load."""
    model, samples = tiny
    att = "mask_decoder.transformer.layers.0.cross_attn_image_to_token"
    keep = (f"{att}.q", f"{att}.k", "mask_decoder.transformer.layers.0.mlp.lin1")
    cfg = QuantConfig.from_bits("ahcptq", "w4a4", iters=2, keep_8bit=keep)
    q = quantize(model, cfg, samples, progress=False)
    check_active(q, samples[:1])
    bits = {r["tensor"]: r["bits"] for r in report(q)["tensors"]}
    eight = {t for t, b in bits.items() if b == 8}
    lin1 = "mask_decoder.transformer.layers.0.mlp.lin1"
    assert eight == {f"{att}.q", f"{att}.k", f"{lin1}.weight", f"{lin1}.input"}
    assert set(bits.values()) == {4, 8}
    assert report(q)["keep_8bit"] == list(keep)
    # 8 bits really is 8 bits: 255 steps over the range the 4-bit quantizer would split in 15
    qz = dict(quantizers(q))[f"{att}.q_quant"]
    assert qz.qmax == 255
    x = torch.linspace(-1, 1, 10_001)
    levels = qz(x * qz.scale.detach() * 127).unique().numel()
    assert 200 < levels <= 256
    back = load(save(q, tmp_path / "q.pt"))
    assert back.quant_config.keep_8bit == keep
    for a, b in zip(_outputs(q, samples), _outputs(back, samples), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(InputError, match=r"'mask_decoder\.nope' names no quantized tensor"):
        prepare(model, QuantConfig(keep_8bit=("mask_decoder.nope",)))
    with pytest.raises(InputError, match="tuple of tensor or module names"):
        QuantConfig(keep_8bit="mask_decoder")


def test_bad_configurations_fail_with_one_line():
    with pytest.raises(InputError, match="unknown method"):
        QuantConfig(method="gptq")
    with pytest.raises(InputError, match="w4a4"):
        QuantConfig.from_bits("ahcptq", "int4")
    with pytest.raises(InputError, match=r"2\.\.8"):
        QuantConfig.from_bits("ahcptq", "w9a9")
    with pytest.raises(InputError, match="softmax"):
        QuantConfig(softmax="log10")


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "leansam.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_cli_quantize_then_segment_and_eval(tmp_path):
    out = tmp_path / "q.pt"
    r = _cli(
        "quantize", "--model", "sam-vit-tiny", "--method", "ahcptq", "--bits", "w6a6",
        "--calib-images", TRAIN[0], "--calib-annotations", TRAIN[1], "--calib-count", "2",
        "--iters", "2", "--no-progress", "--out", out, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "quantizers active" in r.stdout and "CAG:" in r.stdout
    rep = json.loads((tmp_path / "q.pt.report.json").read_text())
    assert rep["bits"] == "w6a6" and all(t["bits"] == 6 for t in rep["tensors"])
    assert rep["cag_registers"]["reduction"] > 0.5
    img = COCO_MINI / "val2017"
    first = sorted(img.iterdir())[0]
    seg = _cli(
        "segment", first, "--model", "sam-vit-tiny", "--checkpoint", out, "--box", "10,10,200,150",
        "--out", tmp_path / "seg", cwd=tmp_path,
    )  # fmt: skip
    assert seg.returncode == 0, seg.stderr
    ev = _cli(
        "eval", "--model", "sam-vit-tiny", "--checkpoint", out, "--images", img,
        "--annotations", COCO_MINI / "annotations" / "instances_val2017.json",
        "--protocol", "box", "--limit", "1", "--no-progress", "--out", tmp_path / "ev",
        cwd=tmp_path,
    )  # fmt: skip
    assert ev.returncode == 0, ev.stderr
    # a quantized file is never exported as a (larger) float graph
    ex = _cli("export", "onnx", "--model", "sam-vit-tiny", "--checkpoint", out,
              "--out", tmp_path / "onnx", cwd=tmp_path)  # fmt: skip
    assert ex.returncode == 2 and ex.stderr.count("\n") == 1, ex.stderr
    assert "is a quantized model" in ex.stderr and not list((tmp_path / "onnx").glob("*.onnx"))
    # user mistakes: one line, exit 2
    bad = _cli(
        "quantize", "--model", "sam-vit-tiny", "--bits", "w9a9", "--calib-images", TRAIN[0],
        "--calib-annotations", TRAIN[1], "--out", tmp_path / "x.pt", cwd=tmp_path,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "w9a9" in bad.stderr
    again = _cli(
        "quantize", "--model", "sam-vit-tiny", "--checkpoint", out, "--calib-images", TRAIN[0],
        "--calib-annotations", TRAIN[1], "--out", tmp_path / "y.pt", cwd=tmp_path,
    )  # fmt: skip
    assert again.returncode == 2 and "already quantized" in again.stderr
    typo = _cli(
        "quantize", "--model", "sam-vit-tiny", "--calib-images", TRAIN[0], "--calib-annotations",
        TRAIN[1], "--calib-count", "1", "--keep-8bit", "mask_decoder.nope", "--out",
        tmp_path / "z.pt", cwd=tmp_path,
    )  # fmt: skip
    # one error line (after the random-weights warning), no traceback
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    last = typo.stderr.strip().splitlines()[-1]
    assert last.startswith("leansam: error: keep_8bit 'mask_decoder.nope' names no quantized")


def _full_size_w8a8(name: str) -> tuple[dict, float, int]:
    model = create_model(name, seed=0)
    samples = calibration_samples(model, *TRAIN, count=1, max_boxes=2)
    q = quantize(model, QuantConfig(method="minmax", w_bits=8, a_bits=8), samples, progress=False)
    per_layer = layer_sqnr(q, samples)
    emb = sqnr_db(_outputs(model, samples)[0], _outputs(q, samples)[0])
    return per_layer, emb, sum(isinstance(m, QuantLayer) for m in q.modules())


def _check_w8a8(name: str, min_embedding_db: float) -> None:
    per_layer, emb, layers = _full_size_w8a8(name)
    assert len(per_layer) == layers  # every quantized layer ran and was measured
    worst = min(per_layer, key=per_layer.get)
    # 8-bit per-tensor activations and per-channel weights (random weights): each layer keeps
    # >= 30 dB of its own output (measured: worst 33.8 / 38.1, median 41.7 / 39.9 dB for L0 /
    # SAM-ViT-B), the embedding 34.9 / 31.0 dB. SAM-ViT-B's embedding was 15.6 dB with plain
    # log2 softmax quantizers (12 blocks accumulate their error); the calibrated granularity
    # brought it to 31.0 (QUANTIZATION.md)
    assert per_layer[worst] >= 30, (worst, per_layer[worst])
    assert float(np.median(list(per_layer.values()))) >= 38
    assert emb >= min_embedding_db


def test_quantization_benchmark_refuses_a_record_of_other_weights(tmp_path):
    """benchmarks/quantization.py resumes a record only for the weights it was measured on (their
    sha256 in ``setup.weights_sha256``): after ``make weights`` republished the files it refuses,
    in one line and before any work, instead of skipping rows of the old model as done."""
    import importlib.util

    from leansam.errors import CheckpointError
    from leansam.io import file_sha256
    from leansam.pretrained import pretrained_path

    spec = importlib.util.spec_from_file_location("qbench", REPO / "benchmarks/quantization.py")
    qbench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qbench)
    student, teacher = "leansam-efficientvit-s", "leansam-vit-s"
    sha = {n: file_sha256(pretrained_path(n)) for n in (student, teacher)}
    row = {"model": student, "method": "fp32", "bits": "-", "miou": {"all": 32.2}}
    other = {"weights_sha256": {student: "ab" * 32}}
    out = tmp_path / "record.json"
    # accepted: a new record, and one of the same weights; other models' digests are kept
    assert qbench.weights_digests({"runs": []}, [student], out) == {student: sha[student]}
    same = {"runs": [row], "setup": {"weights_sha256": {student: sha[student], "x": "1"}}}
    assert qbench.weights_digests(same, [student], out) == {student: sha[student], "x": "1"}
    # a record with runs of another model only: stamped, whatever it had for that model
    teacher_only = {"runs": [row], "setup": other}
    stamped = qbench.weights_digests(teacher_only, [teacher], out)
    assert stamped == {student: "ab" * 32, teacher: sha[teacher]}
    # refused: other weights, or none recorded, also when only the second model differs
    for setup, old in ((other, "abababababab..."), ({}, "not recorded")):
        with pytest.raises(CheckpointError) as e:
            qbench.weights_digests({"runs": [row], "setup": setup}, [teacher, student], out)
        assert str(e.value) == (
            f"{out} holds results of other {student} weights (sha256 {old}, shipped now "
            f"{sha[student][:12]}...): move it away or pass another --out"
        )
    # the script: one line, exit 1, the record left as it was
    out.write_text(json.dumps({"runs": [row], "setup": other}))
    res = subprocess.run(
        [sys.executable, str(REPO / "benchmarks/quantization.py"), "--models", student, "--out",
         str(out)], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1 and res.stderr.strip() == (
        f"{out} holds results of other {student} weights (sha256 abababababab..., shipped now "
        f"{sha[student][:12]}...): move it away or pass another --out"
    ), res.stderr
    assert json.loads(out.read_text())["runs"] == [row]


def test_w8a8_layer_sqnr_on_full_size_efficientvit_sam_l0():
    _check_w8a8("efficientvit-sam-l0", 30)


@pytest.mark.slow
def test_w8a8_layer_sqnr_on_full_size_sam_vit_b():
    _check_w8a8("sam-vit-b", 28)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientvit-sam-l0", "sam-vit-b"])
def test_full_size_ahcptq_end_to_end_fits_in_24_gib(name):
    model = create_model(name, seed=0)
    samples = calibration_samples(model, *TRAIN, count=2, max_boxes=2)
    q = quantize(model, QuantConfig(method="ahcptq", iters=2), samples, progress=False)
    check_active(q, samples[:1])
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert peak_gib < 24, peak_gib
