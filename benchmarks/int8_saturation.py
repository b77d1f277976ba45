"""16-bit saturation of u8 x s8 kernels on CPUs without VNNI (issue 22, QUANTIZATION.md "Deployed
INT8"): the shipped student's encoder, W8A8 by leansam's own calibration (``calibrate_encoder``, 8
coco-mini train2017 images), as the same QDQ graph with each weight format (``s8`` int8 codes,
``u8`` the same codes + 128, ``s7`` halved codes), run by OpenVINO and ONNX Runtime on one
coco-mini val image (ONNX Runtime: with the output requantization its QLinearConv needs), against
that graph's own PyTorch evaluation (float arithmetic on the same codes). Where the kernels are
exact the error is float rounding amplified by a few re-rounded codes (~1 %); saturation shows
as several times that.

    .venv/bin/python benchmarks/int8_saturation.py --out benchmarks/results/int8_saturation.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco-mini"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import onnxruntime as ort

    from leansam import SamPredictor, create_model
    from leansam.export.onnx import export_module
    from leansam.io import atomic_write_json
    from leansam.provenance import describe_environment
    from leansam.quant.deploy import calibrate_encoder, cpu_has_vnni, integer_encoder
    from leansam.runtime import calibration_images, openvino_core

    model = create_model("leansam-efficientvit-s", pretrained=True).float().eval()
    pred = SamPredictor(model)

    def images(folder: str, n: int) -> list[torch.Tensor]:
        return [pred.encoder_input(im) for im in calibration_images(COCO / folder, n)]

    calibration = images("train2017", 8)
    q = calibrate_encoder(model, calibration)
    x = images("val2017", 1)[0]
    rows = {}
    for weights in ("s8", "u8", "s7"):
        enc, _ = integer_encoder(q, weights=weights)
        with torch.no_grad():
            want = enc(x)
        buf = io.BytesIO()
        export_module(enc, (x,), buf, input_names=["images"], output_names=["out"])
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "encoder.onnx"
            path.write_bytes(buf.getvalue())
            core = openvino_core()
            compiled = core.compile_model(core.read_model(str(path)), "CPU")
            got_ov = compiled.create_infer_request().infer({0: x.numpy()})[0].copy()
            conv = [
                op.get_rt_info()["runtimePrecision"].astype(str)
                for op in compiled.get_runtime_model().get_ops()
                if op.get_rt_info()["layerType"].astype(str) == "Convolution"
            ]
        # no output requantization here: ONNX Runtime runs these convolutions in float (a
        # reference for the float path), OpenVINO on integer kernels
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        got_ort = session.run(None, {"images": x.numpy()})[0]

        def rel(got, want=want) -> float:
            return float((torch.from_numpy(got) - want).norm() / want.norm())

        # with the output requantization ONNX Runtime needs for QLinearConv: integer kernels
        enc_rq, _ = integer_encoder(q, calibration, weights=weights)
        with torch.no_grad():
            want_rq = enc_rq(x)
        buf = io.BytesIO()
        export_module(enc_rq, (x,), buf, input_names=["images"], output_names=["out"])
        session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        got_rq = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        rows[weights] = {
            "onnxruntime_int8_rel_error": float((got_rq - want_rq).norm() / want_rq.norm()),
            "openvino_rel_error": rel(got_ov),
            "openvino_int8_convolutions": sum(p in ("u8", "i8") for p in conv),
            "convolutions": len(conv),
            "onnxruntime_float_rel_error": rel(got_ort),
        }
        print(weights, rows[weights], file=sys.stderr)
    record = {"vnni": cpu_has_vnni(), "rows": rows, "environment": describe_environment()}
    if args.out:
        atomic_write_json(args.out, record)
    print(json.dumps(record["rows"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
