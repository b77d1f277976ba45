"""TensorRT engines from the exported ONNX graphs, fp16 with the numerically fragile nodes in
fp32."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import require
from ..io import atomic_write_bytes

#: operator types TensorRT must run in fp32 in an fp16 engine: normalisation statistics overflow
#: or lose precision in fp16 (SPEC section 8), and the neck's bicubic resize overshoots
FP32_OPS = frozenset({"LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Resize"})
#: module scopes kept in fp32: EfficientViT's LiteMLA (ReLU linear attention divides by a sum
#: over all tokens, as the reference does in fp32)
FP32_SCOPES = ("/context_module/main/",)


def fp32_nodes(path_or_model) -> set[str]:
    """Names of the graph nodes an fp16 TensorRT engine keeps in fp32: every node of the
    operator types :data:`FP32_OPS`, every node of a LiteMLA, and every node of a scope that
    computes a mean (LayerNorm2d decomposes into ReduceMean / Sub / Pow / Sqrt / Div / Mul / Add
    under its module's scope)."""
    onnx = require("onnx", "export")
    m = path_or_model if hasattr(path_or_model, "graph") else onnx.load(os.fspath(path_or_model))
    nodes = list(m.graph.node)
    norm_scopes = {n.name.rsplit("/", 1)[0] + "/" for n in nodes if n.op_type == "ReduceMean"}
    return {
        n.name
        for n in nodes
        if n.op_type in FP32_OPS
        or any(s in n.name for s in FP32_SCOPES)
        or n.name.rsplit("/", 1)[0] + "/" in norm_scopes
    }


def build_tensorrt_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    fp16: bool = True,
    max_batch: int = 8,
    max_prompts: int = 64,
    workspace_gib: float = 4.0,
) -> Path:
    """Build a serialized TensorRT engine from one of the exported graphs (GPU machine with the
    ``tensorrt`` package). fp16 keeps :func:`fp32_nodes` in fp32 (OBEY_PRECISION_CONSTRAINTS);
    dynamic axes get an optimisation profile: batch 1..``max_batch`` for the encoder, prompt sets
    1..``max_prompts`` and points 1..10 for the decoders."""
    trt = require("tensorrt", "tensorrt")
    onnx = require("onnx", "export")
    onnx_path = Path(onnx_path)
    model = onnx.load(os.fspath(onnx_path))
    keep = fp32_nodes(model) if fp16 else set()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if any(layer.name == n or layer.name.startswith(n + "_") for n in keep):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        if all(d >= 0 for d in shape):
            continue
        lo, opt, hi = list(shape), list(shape), list(shape)
        for axis, d in enumerate(shape):
            if d >= 0:
                continue
            first = t.name in ("images", "point_coords", "point_labels", "mask_input") and axis == 0
            top = max_batch if t.name == "images" else (max_prompts if first else 10)
            lo[axis], opt[axis], hi[axis] = 1, max(1, top // 2), top
        profile.set_shape(t.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ValueError(f"TensorRT failed to build an engine from {onnx_path}")
    return atomic_write_bytes(engine_path, bytes(engine))
