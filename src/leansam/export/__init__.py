"""Export: ONNX graphs of the encoder and SAM's decoder contract (``onnx``), X-AnyLabeling's model
files (``anylabeling``) and TensorRT engines (``tensorrt``)."""

from __future__ import annotations

from .anylabeling import SamOnnxImageEncoder, export_anylabeling, resize_weights
from .onnx import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    OPSET,
    TENSORRT_UNFRIENDLY,
    SamOnnxDecoder,
    check_graph,
    decoder_example_inputs,
    export_decoder,
    export_encoder,
    export_onnx,
    graph_ops,
)
from .tensorrt import FP32_OPS, FP32_SCOPES, build_tensorrt_engine, fp32_nodes

__all__ = [
    "DECODER_INPUTS",
    "DECODER_OUTPUTS",
    "FP32_OPS",
    "FP32_SCOPES",
    "OPSET",
    "TENSORRT_UNFRIENDLY",
    "SamOnnxDecoder",
    "SamOnnxImageEncoder",
    "build_tensorrt_engine",
    "check_graph",
    "decoder_example_inputs",
    "export_anylabeling",
    "export_decoder",
    "export_encoder",
    "export_onnx",
    "fp32_nodes",
    "graph_ops",
    "resize_weights",
]
