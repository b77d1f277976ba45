"""Deployed INT8 (issue 22): a W8A8 quantized model's image encoder as QDQ graphs that ONNX Runtime
and OpenVINO run on integer kernels, the onnx-int8 / openvino-int8 runtimes, `export int8`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import COCO_MINI, mask_agreement, randomize_

from leansam import SamPredictor, create_model
from leansam.errors import InputError, MissingDependencyError
from leansam.io import load_image
from leansam.quant import QuantConfig, calibration_samples, quantize, save
from leansam.quant.deploy import (
    ActivationQDQ,
    WeightQDQ,
    calibrate_encoder,
    check_int8,
    integer_encoder,
)
from leansam.quant.modules import QuantConv2d, QuantLayer, QuantLinear
from leansam.runtime import (
    calibration_images,
    int8_encoder_graph,
    int8_weight_format,
    make_encoder,
    openvino_core,
)

TRAIN = (COCO_MINI / "train2017", COCO_MINI / "annotations" / "instances_train2017.json")

pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def setup():
    """efficientvit-sam-tiny-l with random weights, quantized W8A8 two ways, and real images."""
    model = randomize_(create_model("efficientvit-sam-tiny-l", seed=0), seed=1).eval()
    samples = calibration_samples(model, *TRAIN, count=2, max_boxes=3)
    minmax = quantize(model, QuantConfig.from_bits("minmax", "w8a8"), samples, progress=False)
    ahcptq = quantize(
        model, QuantConfig.from_bits("ahcptq", "w8a8", iters=4), samples, progress=False
    )
    pred = SamPredictor(model)
    calib = [pred.encoder_input(im) for im in calibration_images(TRAIN[0], count=2)]
    image = load_image(sorted((COCO_MINI / "val2017").glob("*.jpg"))[0])
    x = pred.encoder_input(image)
    return SimpleNamespace(model=model, minmax=minmax, ahcptq=ahcptq, calib=calib, x=x, image=image)


def test_deployed_encoder_carries_the_quantized_models_codes_and_scales(setup):
    model = setup.model
    minmax = setup.minmax
    ahcptq = setup.ahcptq
    x = setup.x
    enc, rep = integer_encoder(minmax)
    layers = [m for m in minmax.image_encoder.modules() if isinstance(m, QuantLayer)]
    deployed = [m for m in enc.modules() if isinstance(m, QuantLayer)]
    assert len(deployed) == len(layers) > 10
    for q, d in zip(layers, deployed, strict=True):
        assert isinstance(d.w_quant, WeightQDQ) and isinstance(d.a_quant, ActivationQDQ)
        torch.testing.assert_close(d.w_quant(d.weight), q.w_quant(q.weight), rtol=0, atol=1e-7)
    # MinMax W8A8: every quantizer is plain uniform, so every one is mapped exactly
    assert rep["approximated"] == [] and rep["exact"] > 2 * len(layers)
    with torch.no_grad():
        want, got = minmax.image_encoder(x), enc(x)
    # same codes, same scales; torch's fake-quant op multiplies by 1/s where leansam divides
    # by s, which moves the odd value across a rounding boundary: ~1e-3 after 20 layers
    assert _rel(got, want) < 0.01
    # AHCPTQ's CAG and HLUQ inputs have no exact uint8 per-tensor form: named, and close
    enc, rep = integer_encoder(ahcptq)
    assert rep["approximated"] and all(n.endswith(".input") for n in rep["approximated"])
    with torch.no_grad():
        fp, fake, got = model.image_encoder(x), ahcptq.image_encoder(x), enc(x)
    assert _rel(got, fake) < 0.1 and _rel(got, fp) < 0.1


def test_weight_formats_store_the_same_codes_or_say_they_do_not(setup):
    minmax = setup.minmax
    x = setup.x
    with torch.no_grad():
        s8 = integer_encoder(minmax, weights="s8")[0](x)
        u8 = integer_encoder(minmax, weights="u8")[0](x)
        s7_enc, s7_rep = integer_encoder(minmax, weights="s7")
        s7 = s7_enc(x)
    torch.testing.assert_close(u8, s8, rtol=0, atol=0)  # uint8 codes + 128: the same values
    assert all(n.endswith(".weight") for n in s7_rep["approximated"])
    assert 0 < _rel(s7, s8) < 0.2
    with pytest.raises(InputError, match="weights must be one of s8, u8, s7"):
        integer_encoder(minmax, weights="s4")


def test_onnx_runtime_graph_runs_integer_convolutions(setup, tmp_path):
    import onnx
    import onnxruntime as ort

    minmax = setup.minmax
    calib = setup.calib
    x = setup.x
    graph, rep = int8_encoder_graph(minmax, calib, requantize_outputs=True, weights="u8")
    convs = sum(isinstance(m, QuantConv2d) for m in minmax.image_encoder.modules())
    assert rep["output_requantized"] == convs
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    # every quantized convolution became an integer one; the stem (kept float) stays Conv
    assert ops["QLinearConv"] == convs
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        want = minmax.image_encoder(x)
    assert _rel(got, want) < 0.1  # + 8-bit outputs ONNX Runtime needs


def test_openvino_compiles_the_quantized_convolutions_to_int8(setup, tmp_path):
    minmax, x = setup.minmax, setup.x
    graph, _ = int8_encoder_graph(minmax, None, requantize_outputs=False, weights="s8")
    (tmp_path / "encoder.onnx").write_bytes(graph)
    core = openvino_core()  # one per process: leansam.runtime.openvino_core says why
    compiled = core.compile_model(core.read_model(str(tmp_path / "encoder.onnx")), "CPU")
    precisions = Counter(
        op.get_rt_info()["runtimePrecision"].astype(str)
        for op in compiled.get_runtime_model().get_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution"
    )
    convs = sum(isinstance(m, QuantConv2d) for m in minmax.image_encoder.modules())
    assert precisions["u8"] + precisions["i8"] == convs, precisions
    # on this CPU's weight format (7-bit codes without VNNI: int8 would saturate there)
    graph, _ = int8_encoder_graph(minmax, None, False, weights=int8_weight_format("openvino"))
    (tmp_path / "auto.onnx").write_bytes(graph)
    compiled = core.compile_model(core.read_model(str(tmp_path / "auto.onnx")), "CPU")
    got = torch.from_numpy(compiled.create_infer_request().infer({0: x.numpy()})[0].copy())
    with torch.no_grad():
        want = minmax.image_encoder(x)
    assert _rel(got, want) < 0.1


@pytest.mark.parametrize("runtime", ["openvino-int8", "onnx-int8"])
def test_int8_runtimes_take_the_quantized_model_and_match_its_masks(setup, runtime):
    minmax = setup.minmax
    image = setup.image
    boxes = np.array([[40, 60, 300, 280], [200, 100, 420, 330]], np.float32)
    fake = SamPredictor(minmax)
    fake.set_image(image)
    want = fake.predict(box=boxes, multimask_output=False)[0]
    images = calibration_images(TRAIN[0], count=2)
    kw = {"calibration_images": images} if runtime == "onnx-int8" else {}
    pred = SamPredictor(minmax, runtime, **kw)  # openvino-int8 needs no images for a W8A8 file
    pred.set_image(image)
    got = pred.predict(box=boxes, multimask_output=False)[0]
    assert mask_agreement(got, want) > 0.9


def test_float_model_is_calibrated_by_leansam_for_the_int8_runtimes(setup):
    model = setup.model
    calib = setup.calib
    x = setup.x
    q = calibrate_encoder(model, calib)
    assert check_int8(q).method == "percentile"
    assert not any(isinstance(m, QuantLayer) for m in q.mask_decoder.modules())  # float decoder
    with torch.no_grad():
        fp = model.image_encoder(x)
    for runtime in ("openvino-int8", "onnx-int8"):
        got = make_encoder(model, runtime, calibration=calib)(x)
        assert 0 < _rel(got, fp) < 0.2


def test_int8_errors_are_one_line(setup, tmp_path):
    model = setup.model
    minmax = setup.minmax
    with pytest.raises(InputError, match=r"^onnx-int8 needs calibration images"):
        make_encoder(minmax, "onnx-int8")
    with pytest.raises(InputError, match=r"^openvino-int8 needs calibration images to quantize"):
        make_encoder(model, "openvino-int8")
    with pytest.raises(InputError, match=r"^not a quantized model"):
        integer_encoder(model)
    w4 = quantize(
        model,
        QuantConfig.from_bits("minmax", "w4a4"),
        calibration_samples(model, *TRAIN, count=1, max_boxes=1),
        progress=False,
    )
    with pytest.raises(InputError, match=r"^INT8 kernels need a W8A8 model, this one is W4A4"):
        make_encoder(w4, "openvino-int8")
    with pytest.raises(InputError, match=r"^INT8 kernels need a W8A8 model"):
        make_encoder(w4, "onnx-int8")  # before it asks for calibration images
    with pytest.raises(InputError, match=r"runtime \(fake quantization\) or on .* not 'onnx'"):
        make_encoder(minmax, "onnx")


def test_missing_extra_is_one_line(setup, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_openvino(name, *a):
        if name.startswith("openvino"):
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(importlib, "import_module", no_openvino)
    minmax = setup.minmax
    with pytest.raises(MissingDependencyError, match=r"pip install 'leansam\[openvino\]'$"):
        make_encoder(minmax, "openvino-int8")


def test_cli_export_int8(setup, tmp_path):
    minmax = setup.minmax
    q = save(minmax, tmp_path / "q.pt")
    cmd = [sys.executable, "-m", "leansam.cli", "export", "int8", "--model"]
    cmd += ["efficientvit-sam-tiny-l", "--checkpoint", str(q)]
    for fmt, extra, files in [
        ("onnx", ["--calib-images", str(TRAIN[0])], ["encoder_int8.onnx"]),
        ("openvino", [], ["encoder_int8.xml", "encoder_int8.bin"]),
    ]:
        out = tmp_path / fmt
        r = subprocess.run(
            [*cmd, "--format", fmt, "--out", str(out), *extra], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        assert all((out / f).stat().st_size > 10_000 for f in files)
        info = json.loads((out / "int8.json").read_text())
        assert info["format"] == fmt and info["bits"] == "w8a8" and info["exact"] > 0
        # an integer graph, never a float one
        text = (out / files[0]).read_bytes()
        assert (b"FakeQuantize" if fmt == "openvino" else b"QuantizeLinear") in text
    r = subprocess.run([*cmd, "--format", "onnx", "--out", str(tmp_path / "x")], **_text())
    assert r.returncode == 2 and r.stderr.startswith("leansam: error: --format onnx needs")
    float_cmd = [sys.executable, "-m", "leansam.cli", "export", "int8", "--model"]
    float_cmd += ["leansam-efficientvit-s", "--format", "openvino", "--out", str(tmp_path / "y")]
    r = subprocess.run(float_cmd, **_text())
    assert r.returncode == 2 and "not a quantized model" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _text() -> dict:
    return {"capture_output": True, "text": True}


def test_vit_encoder_linears_run_on_integer_kernels(tmp_path):
    """SAM-ViT: every quantized linear runs integer matrix products in ONNX Runtime
    (MatMulIntegerToFloat) and OpenVINO (u8 FullyConnected); the log2-quantized softmax output
    stays float, and the report says so."""
    import onnx
    import onnxruntime as ort

    model = randomize_(create_model("sam-vit-tiny", seed=0), seed=1).eval()
    samples = calibration_samples(model, *TRAIN, count=1, max_boxes=2)
    q = quantize(model, QuantConfig.from_bits("minmax", "w8a8"), samples, progress=False)
    calib = [SamPredictor(model).encoder_input(im) for im in calibration_images(TRAIN[0], 1)]
    linears = sum(isinstance(m, QuantLinear) for m in q.image_encoder.modules())
    graph, rep = int8_encoder_graph(q, calib, requantize_outputs=True, weights="u8")
    assert rep["approximated"] == [f"blocks.{i}.attn.attn (float)" for i in range(2)]
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] == linears
    graph, _ = int8_encoder_graph(q, None, requantize_outputs=False, weights="s7")
    (tmp_path / "encoder.onnx").write_bytes(graph)
    core = openvino_core()  # one per process: leansam.runtime.openvino_core says why
    compiled = core.compile_model(core.read_model(str(tmp_path / "encoder.onnx")), "CPU")
    info = [op.get_rt_info() for op in compiled.get_runtime_model().get_ops()]
    fc = [
        i["runtimePrecision"].astype(str)
        for i in info
        if i["layerType"].astype(str) == "FullyConnected"
    ]
    assert fc.count("u8") == linears


def test_cli_commands_run_a_quantized_file_on_the_int8_runtimes(setup, tmp_path):
    """The forms users type: --checkpoint q.pt --runtime openvino-int8 (no calibration images
    for a W8A8 file) or onnx-int8 --calib-images DIR, for segment, everything and eval."""
    q = save(setup.minmax, tmp_path / "q.pt")
    img = sorted((COCO_MINI / "val2017").glob("*.jpg"))[0]
    base = [sys.executable, "-m", "leansam.cli"]
    model = ["--model", "efficientvit-sam-tiny-l", "--checkpoint", str(q)]
    runs = {
        "segment": ["segment", str(img), *model, "--box", "10,20,200,220"],
        "everything": ["everything", str(img), *model, "--points-per-side", "4"],
        "eval": ["eval", *model, "--images", str(img.parent), "--protocol", "box", "--limit", "1",
                 "--annotations", str(COCO_MINI / "annotations" / "instances_val2017.json")],
    }  # fmt: skip
    for name, args in runs.items():
        for runtime, extra in (
            ("openvino-int8", []),
            ("onnx-int8", ["--calib-images", str(TRAIN[0])]),
        ):
            out = tmp_path / f"{name}-{runtime}"
            cmd = [*base, *args, "--runtime", runtime, *extra, "--out", str(out)]
            r = subprocess.run(cmd, **_text())
            assert r.returncode == 0, (name, runtime, r.stderr)
            record = out / {"segment": "result.json", "everything": "masks.json"}.get(
                name, "run.json"
            )
            config = json.loads(record.read_text())
            config = config.get("config", config)  # segment nests it
            calib = os.path.realpath(TRAIN[0]) if extra else None
            assert (config["runtime"], config.get("calib_images")) == (runtime, calib), name
    r = subprocess.run([*base, *runs["everything"], "--runtime", "onnx-int8", "--out",
                        str(tmp_path / "no-calib")], **_text())  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("leansam: error: onnx-int8 needs calibration")


def test_exported_onnx_stores_integer_weights_and_computes_the_same(setup):
    import onnx
    import onnxruntime as ort

    from leansam.export.int8 import fold_weight_quantization

    graph, _ = int8_encoder_graph(setup.minmax, setup.calib, requantize_outputs=True, weights="u8")
    folded = fold_weight_quantization(graph)
    model = onnx.load_from_string(folded)
    codes = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    convs = sum(isinstance(m, QuantConv2d) for m in setup.minmax.image_encoder.modules())
    assert len([i for i in codes if len(i.dims) == 4]) == convs  # one uint8 weight per conv
    assert len(folded) < 0.5 * len(graph)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    x = {"images": setup.x.numpy()}
    runs = [
        ort.InferenceSession(g, opts, providers=["CPUExecutionProvider"]) for g in (graph, folded)
    ]
    np.testing.assert_array_equal(runs[0].run(None, x)[0], runs[1].run(None, x)[0])
