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


def fold_weight_quantization(graph: bytes) -> bytes:
    """The graph with every ``QuantizeLinear`` of a constant (the weights) replaced by its
    integer result as an initializer, so the file stores int8 / uint8 codes, not float weights
    (a quarter of the size); outputs unchanged (the same codes reach the same
    ``DequantizeLinear``)."""
    import numpy as np

    onnx = require("onnx", "export")
    from onnx import numpy_helper

    model = onnx.load_from_string(graph)
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:  # constants, and copies / casts of constants
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:  # shared initializers
            values[node.output[0]] = values[node.input[0]]
        elif node.op_type == "Cast" and node.input[0] in values:
            to = next(a.i for a in node.attribute if a.name == "to")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(to)
            values[node.output[0]] = values[node.input[0]].astype(dtype)
    keep = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or not all(n in values for n in node.input):
            keep.append(node)
            continue
        w, scale, zero = (values[n] for n in node.input)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1:  # per channel along ``axis``
            shape = [1] * w.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        info = np.iinfo(zero.dtype)
        codes = np.clip(np.rint(w / scale) + zero.astype(np.int32), info.min, info.max)
        model.graph.initializer.append(
            numpy_helper.from_array(codes.astype(zero.dtype), node.output[0])
        )
    del model.graph.node[:]
    model.graph.node.extend(keep)
    while True:  # drop the constants and casts nothing reads any more
        used = {n for node in model.graph.node for n in node.input}
        dead = [
            n
            for n in model.graph.node
            if n.op_type in ("Constant", "Cast", "Identity")
            and n.output[0] not in used
            and n.output[0] in values
        ]
        if not dead:
            break
        for n in dead:
            model.graph.node.remove(n)
    used = {n for node in model.graph.node for n in node.input}
    live = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)
    return model.SerializeToString()


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

    graph = fold_weight_quantization(graph)
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
