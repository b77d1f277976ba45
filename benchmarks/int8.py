"""INT8 image encoders on the CPU (issue 22): leansam's deployed INT8 against OpenVINO's own
(NNCF, default settings) and ONNX Runtime's own (static MinMax QDQ), beside the float runtimes;
speed and box mIoU, one run, one machine.

    .venv/bin/python benchmarks/int8.py --quantized leansam-efficientvit-s=q_w8a8.pt \\
        --accuracy-models "" --out benchmarks/results/int8-speed.json
    make bench-int8     # quantizes both own models (AHCPTQ W8A8), then accuracy and speed

Speed (``--models``, ``--batches``): each model's image encoder on a preprocessed coco-mini val
image (batch 8: 8 val images), every row interleaved round by round with the others:

- ``torch``, ``torch-opt``, ``openvino``, ``openvino-bf16``: leansam's float runtimes;
- ``nncf-int8``: ``nncf.quantize`` (defaults) of the OpenVINO model of leansam's exported fp32
  encoder graph, calibrated on the calibration images;
- ``ort-int8``: ONNX Runtime's ``quantize_static`` of the same graph (per-channel weights, MinMax,
  the ``onnx-int8`` runtime before issue 22);
- ``nncf-int8 (model_type transformer)``: the same with NNCF's transformer preset (the defaults
  give NaN embeddings on the shipped student: BENCHMARKS.md);
- ``leansam openvino-int8`` / ``leansam onnx-int8``: leansam's INT8 graph of the float model
  with leansam's own calibration (``calibrate_encoder``), and of the model's W8A8
  ``--quantized`` file where one is given.

Models without pretrained weights (``efficientvit-sam-l0``) use random weights (seed 0): speed
only. Accuracy (``--accuracy-models``): box protocol on coco-mini val (SPEC section 6) for every
row that changes the numbers, plus the fake-quantized model on the ``torch`` runtime. Rows built
from a quantized file decode with that file's (fake-quantized) mask decoder, as
``SamPredictor(create_model(name, checkpoint=q.pt), runtime=...)`` does; the peers decode with
the float decoder. Calibration: the first ``--calib-count`` coco-mini train2017 images.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COCO = REPO.parent / "shared" / "data" / "coco-mini"


def nncf_encoder(model, calibration: list[torch.Tensor], **options):
    """OpenVINO + NNCF INT8 (default settings, or ``options`` for ``nncf.quantize``) of
    leansam's exported fp32 encoder graph."""
    import nncf

    from leansam.runtime import _encoder_graph, openvino_core

    core = openvino_core()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "encoder.onnx"
        path.write_bytes(_encoder_graph(model))
        graph = core.read_model(str(path))
    data = nncf.Dataset([x.float().numpy() for x in calibration])
    quantized = nncf.quantize(graph, data, subset_size=len(calibration), **options)
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    compiled = core.compile_model(quantized, "CPU", config)

    def run(x: torch.Tensor) -> torch.Tensor:
        out = compiled.create_infer_request().infer({0: x.float().numpy()})[compiled.output(0)]
        return torch.from_numpy(out.copy())

    return run


def ort_own_encoder(model, calibration: list[torch.Tensor]):
    """ONNX Runtime's own static INT8 (MinMax) of the same graph."""
    from leansam.runtime import _encoder_graph, _ort_session, quantize_encoder_int8

    session = _ort_session(quantize_encoder_int8(_encoder_graph(model), calibration))

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"images": x.float().numpy()})[0])

    return run


def build_rows(name: str, quantized: str | None, calibration: list[torch.Tensor]) -> dict:
    """row name -> (encoder callable, the model whose decoder goes with it)."""
    from leansam import create_model
    from leansam.runtime import make_encoder

    pretrained = name.startswith("leansam-")
    torch.manual_seed(0)
    fp = create_model(name, pretrained=pretrained, seed=0).float().eval()
    q = create_model(name, checkpoint=quantized) if quantized else None
    rows = {}
    for runtime in ("torch", "torch-opt", "openvino", "openvino-bf16"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # openvino-bf16 on a CPU without bf16 says so
            rows[runtime] = (make_encoder(fp, runtime), fp)
    import nncf

    rows["nncf-int8"] = (nncf_encoder(fp, calibration), fp)
    transformer = nncf_encoder(fp, calibration, model_type=nncf.ModelType.TRANSFORMER)
    rows["nncf-int8 (model_type transformer)"] = (transformer, fp)
    rows["ort-int8"] = (ort_own_encoder(fp, calibration), fp)
    for runtime in ("openvino-int8", "onnx-int8"):
        encoder = make_encoder(fp, runtime, calibration=calibration)
        rows[f"leansam {runtime} (own calibration)"] = (encoder, fp)
        if q is not None:
            encoder = make_encoder(q, runtime, calibration=calibration)
            rows[f"leansam {runtime} ({q.quant_config.method} W8A8 file)"] = (encoder, q)
    if q is not None:
        rows["fake-quantized (torch)"] = (make_encoder(q, "torch"), q)
    return rows


def speed(rows: dict, x: torch.Tensor, runs: int, warmup: int) -> dict:
    from leansam.bench import interleaved_timings

    timed = {k: v for k, v in rows.items() if k != "fake-quantized (torch)"}
    with torch.inference_mode():
        ref = rows["torch"][0](x)
        # NaN where a row's embedding holds NaN (float() of a NaN max is NaN, not an error)
        diffs = {k: float((enc(x).float() - ref).abs().max()) for k, (enc, _) in timed.items()}
        fns = {k: (lambda enc=enc: enc(x)) for k, (enc, _) in timed.items()}
        stats = interleaved_timings(fns, runs=runs, warmup=warmup)
    eager = stats["torch"].median
    out = {}
    for k in timed:
        out[k] = stats[k].as_dict()
        out[k].update(speedup_vs_eager=eager / stats[k].median, max_abs_diff_to_eager=diffs[k])
    return out


def accuracy(rows: dict, limit: int | None) -> dict:
    from leansam import SamPredictor
    from leansam.eval import EvalDataset, evaluate

    data = EvalDataset.load(
        COCO / "val2017", COCO / "annotations" / "instances_val2017.json", limit=limit
    )
    out = {}
    lossless = ("torch-opt", "openvino", "openvino-bf16")  # same numbers as torch (1e-5)
    for k, (enc, model) in rows.items():
        if k in lossless:
            continue
        predictor = SamPredictor(model)
        predictor._encode = enc  # the row's encoder behind the same predictor and decoder
        res = evaluate(predictor, data, "box", progress=False)
        out[k] = res["metrics"]["mIoU"]
        print(f"  {k}: {out[k]['all']:.2f} box mIoU", file=sys.stderr)
    return out


def inputs(model_name: str, count: int, folder: str) -> list[torch.Tensor]:
    """The encoder inputs of the first ``count`` images (by name) of a coco-mini folder."""
    from leansam import SamPredictor, create_model
    from leansam.runtime import calibration_images

    predictor = SamPredictor(create_model(model_name))
    return [predictor.encoder_input(im) for im in calibration_images(COCO / folder, count)]


def markdown(paths: list[str]) -> str:
    """The BENCHMARKS.md / QUANTIZATION.md tables of the given records."""
    lines = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        for name, entry in record["models"].items():
            acc = entry.get("box_mIoU")
            if acc:
                lines += [f"{name} (box mIoU x 100, coco-mini val)", ""]
                lines += ["| row | all | small | medium | large |", "|---|---:|---:|---:|---:|"]
                for row, m in acc.items():
                    cells = " | ".join(f"{m[k]:.2f}" for k in ("all", "small", "medium", "large"))
                    lines.append(f"| {row} | {cells} |")
                lines.append("")
            for batch, rows in entry.get("speed", {}).items():
                lines += [f"{name}, {batch} (s per call)", ""]
                lines += ["| row | median [min-max] | vs eager | max abs diff to eager |"]
                lines.append("|---|---:|---:|---:|")
                for row, t in rows.items():
                    lines.append(
                        f"| {row} | {t['median']:.3f} [{t['min']:.3f}-{t['max']:.3f}] | "
                        f"{t['speedup_vs_eager']:.2f}x | {t['max_abs_diff_to_eager']:.1e} |"
                    )
                lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="efficientvit-sam-l0,leansam-efficientvit-s")
    ap.add_argument("--accuracy-models", default="leansam-efficientvit-s")
    ap.add_argument("--quantized", action="append", default=[], metavar="MODEL=Q.PT")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--calib-count", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="accuracy: first N val images")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--markdown", nargs="+", metavar="RECORD", help="print the tables and exit")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return 0

    from leansam.io import atomic_write_json
    from leansam.provenance import describe_environment
    from leansam.quant.deploy import cpu_has_vnni
    from leansam.runtime import int8_weight_format

    quantized = dict(item.split("=", 1) for item in args.quantized)
    models = list(dict.fromkeys(args.models.split(",") + args.accuracy_models.split(",")))
    import hashlib
    import importlib.metadata

    versions = {}
    for package in ("onnxruntime", "openvino", "nncf", "onnx"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    files = {}
    for name, path in quantized.items():
        from leansam.quant import load

        files[name] = {
            "path": path,
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
            "quant_config": load(path).quant_config.to_dict(),
        }
    record = {
        "config": vars(args),
        "versions": versions,
        "quantized_files": files,
        "vnni": cpu_has_vnni(),
        "weights": {t: int8_weight_format(t) for t in ("onnx", "openvino")},
        "environment": describe_environment(),
        "models": {},
    }
    for name in filter(None, models):
        print(name, file=sys.stderr)
        calibration = inputs(name, args.calib_count, "train2017")
        rows = build_rows(name, quantized.get(name), calibration)
        entry = {"quantized": quantized.get(name), "speed": {}}
        if name in args.models.split(",") and not args.skip_speed:
            val = inputs(name, max(int(b) for b in args.batches.split(",")), "val2017")
            for b in (int(b) for b in args.batches.split(",")):
                timed = speed(rows, torch.cat(val[:b]), args.runs, args.warmup)
                entry["speed"][f"batch {b}"] = timed
                for k, v in timed.items():
                    print(f"  batch {b} {k}: {v['median']:.3f} s ({v['speedup_vs_eager']:.2f}x)",
                          file=sys.stderr)  # fmt: skip
        if name in args.accuracy_models.split(","):
            entry["box_mIoU"] = accuracy(rows, args.limit)
        record["models"][name] = entry
        del rows
    if args.out:
        atomic_write_json(args.out, record)
    print(json.dumps({k: v for k, v in record.items() if k != "environment"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
