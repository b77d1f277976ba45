"""``leansam export int8``: the image encoder of a W8A8 leansam-quantized model as an integer graph
for ONNX Runtime (``encoder_int8.onnx``) or OpenVINO (``encoder_int8.xml`` + ``.bin``), with the
model's own scales, zero points and (AdaRound-)rounded weight codes
(:mod:`leansam.quant.deploy`), and ``int8.json``: what was mapped exactly and what was not.

Input ``images`` B x 3 x R x R (normalised and padded, :meth:`Sam.preprocess`), output
``image_embeddings`` B x 256 x 64 x 64, as ``encoder.onnx``; the prompt encoder and mask decoder
stay float (``leansam export onnx`` of the float weights gives ``decoder.onnx``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import InputError, require
from ..io import atomic_write_bytes, atomic_write_json, ensure_dir
from ..modeling.sam import Sam

FORMATS = ("onnx", "openvino")

#: ONNX operators that only a quantized graph holds
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def export_int8(
    model: Sam,
    out_dir: str | os.PathLike,
    fmt: str = "onnx",
    *,
    calibration: Sequence[torch.Tensor] | None = None,
    vnni: bool | None = None,
) -> dict[str, Path]:
    """Write the INT8 encoder of ``model`` (a W8A8 quantized model) in ``fmt`` to ``out_dir``.

    ``calibration`` (preprocessed 1 x 3 x R x R images) is required for ``onnx``: ONNX Runtime
    fuses a convolution into ``QLinearConv`` only with its output quantized, and those ranges
    are observed on it. ``vnni``: the target CPU multiplies u8 x s8 without saturation (AVX512-
    VNNI / AMX); default: this CPU (:func:`leansam.runtime.int8_weight_format`). Files are
    written atomically. Raises InputError for a float model, a model that is not W8A8, an
    unknown format, missing calibration images or a missing extra."""
    from ..quant.deploy import check_int8
    from ..runtime import int8_encoder_graph, int8_weight_format

    if fmt not in FORMATS:
        raise InputError(f"unknown INT8 format {fmt!r}: choose {' or '.join(FORMATS)}")
    check_int8(model)
    require("onnx", "export")
    if fmt == "openvino":
        ov = require("openvino", "openvino")
    weights = int8_weight_format(fmt, vnni)
    graph, report = int8_encoder_graph(
        model, calibration, requantize_outputs=fmt == "onnx", weights=weights
    )
    from .onnx import graph_ops

    if not graph_ops(graph) >= QDQ_OPS:  # never a float graph where an integer one was asked
        raise RuntimeError("the INT8 encoder graph holds no quantization operators")
    out = ensure_dir(out_dir)
    written: dict[str, Path] = {}
    if fmt == "onnx":
        written["encoder"] = atomic_write_bytes(out / "encoder_int8.onnx", graph)
    else:
        with tempfile.TemporaryDirectory(dir=out) as d:
            src = Path(d) / "encoder_int8.onnx"
            src.write_bytes(graph)
            ir = ov.convert_model(str(src))
            ov.save_model(ir, str(Path(d) / "encoder_int8.xml"), compress_to_fp16=False)
            ops = {op.get_type_name() for op in ir.get_ops()}
            if "FakeQuantize" not in ops:
                raise RuntimeError("the OpenVINO INT8 model holds no FakeQuantize operations")
            for suffix in ("bin", "xml"):  # the .xml last: a reader never finds it without .bin
                os.replace(Path(d) / f"encoder_int8.{suffix}", out / f"encoder_int8.{suffix}")
                written[f"encoder.{suffix}"] = out / f"encoder_int8.{suffix}"
    cfg = model.quant_config
    info = {
        "format": fmt,
        "checkpoint": os.fspath(path)
        if (path := getattr(model, "checkpoint_path", None))
        else None,
        "method": cfg.method,
        "bits": cfg.bits,
        "target_cpu": "vnni" if weights == "s8" else "no vnni",
        **report,
    }
    written["report"] = atomic_write_json(out / "int8.json", info)
    return written
