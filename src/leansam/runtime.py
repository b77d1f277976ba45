"""Image-encoder runtimes behind one callable: B x 3 x R x R (preprocessed) -> B x 256 x 64 x 64.

========== ======================================================================================
runtime    what runs
========== ======================================================================================
torch      PyTorch eager, the model's dtype (the reference numerics)
torch-bf16 PyTorch eager under bf16 autocast (CPU with AVX512-BF16/AMX, or CUDA); fp32 islands
           (LayerNorm, LiteMLA's division, the neck's bicubic resize) stay fp32
torch-opt  BatchNorm folded into the preceding convolutions, channels-last, ``torch.compile`` with
           inductor freezing (constant folding of the weights: later changes to the model's
           weights are not seen); falls back to folded eager where no compiler is available.
           fp32, matches eager to ~1e-5. The first call compiles (10-40 s on 2 cores); later
           calls with the same input shape are fast. SamPredictor also compiles the decoder
           (:func:`compile_decoder`) for this runtime
onnx       ONNX Runtime (CPU provider) on the exported fp32 encoder graph
onnx-int8  ONNX Runtime on an INT8 encoder graph (QDQ pairs fused into QLinearConv /
           QLinearMatMul): a W8A8 leansam-quantized model's own scales, zero points and
           (AdaRound-)rounded weights (:mod:`leansam.quant.deploy`), or for a float model
           leansam's own W8A8 calibration of the encoder on ``calibration``; the layer outputs
           ONNX Runtime's kernels requantize are calibrated on ``calibration`` too (required)
openvino   OpenVINO (CPU plugin) on the exported fp32 encoder graph, inference precision f32:
           exact to ~1e-5. SamPredictor also runs the decoder's transformer on OpenVINO f32
           (:func:`openvino_decoder`) for this runtime and the two below
openvino-  OpenVINO with inference precision bf16 (CPUs with AVX512-BF16 or AMX; elsewhere
bf16       OpenVINO keeps f32, and leansam warns that the runtime is then plain ``openvino``)
========== ======================================================================================

BENCHMARKS.md records the speed of each and EVALUATION.md the mIoU cost of the lossy ones.
"""

from __future__ import annotations

import copy
import io
import os
import threading
import warnings
from collections.abc import Callable, Sequence

import torch

from .errors import InputError, require
from .modeling.common import flush_subnormals_in_traces
from .modeling.efficientvit import fold_batchnorm
from .modeling.sam import Sam

RUNTIMES = (
    "torch",
    "torch-bf16",
    "torch-opt",
    "onnx",
    "onnx-int8",
    "openvino",
    "openvino-bf16",
    "openvino-int8",
)

#: the runtimes on integer kernels: the only ones a quantized model runs on besides ``torch``
INT8_RUNTIMES = ("onnx-int8", "openvino-int8")

Encoder = Callable[[torch.Tensor], torch.Tensor]

_OV_CORE = None
_OV_CORE_LOCK = threading.Lock()


def openvino_core():
    """The process's one ``openvino.Core``, created on first use and kept until exit; use it
    for every OpenVINO compilation in a process that also runs other code.

    Why one: each ``Core`` loads its own CPU plugin, and the plugin replaces the creating
    thread's alternate signal stack, giving the previous one back when it is destroyed
    (OpenVINO 2026.4, ``intel_cpu`` ``SigAltStackSetup``). Cores destroyed in the order they
    were created leave the thread on an unmapped signal stack, and the next signal with a
    Python handler (SIGCHLD, SIGINT, ...) kills the process with SIGSEGV and no traceback.
    Raises :class:`InputError` without the ``openvino`` extra."""
    global _OV_CORE
    ov = require("openvino", "openvino")  # also once the Core exists: the same error without it
    with _OV_CORE_LOCK:  # service slots may build runtimes from several threads
        if _OV_CORE is None:
            _OV_CORE = ov.Core()
        return _OV_CORE


def read_onnx_openvino(onnx_graph: bytes):
    """An ONNX graph (bytes) as an ``openvino.Model``, read by :func:`openvino_core` (through a
    temporary file, as OpenVINO reads ONNX from a path)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "graph.onnx"
        path.write_bytes(onnx_graph)
        return openvino_core().read_model(str(path))


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    return runtime


def compiled_or_eager(fn: Callable, what: str, **compile_args) -> Callable:
    """``torch.compile(fn)``, falling back to ``fn`` itself (with one warning) where compilation
    fails: no C++ compiler, an unsupported platform. Compilation happens on the first call."""
    state = {"fn": torch.compile(fn, **compile_args)}

    def run(*args):
        try:
            return state["fn"](*args)
        except Exception as e:
            if state["fn"] is fn:
                raise
            warnings.warn(
                f"torch.compile failed ({type(e).__name__}); {what} runs eager", stacklevel=2
            )
            state["fn"] = fn
            return fn(*args)

    return run


def _torch_opt(model: Sam) -> Encoder:
    enc = fold_batchnorm(model.image_encoder).to(memory_format=torch.channels_last)
    compiled = compiled_or_eager(
        enc, "the folded encoder", dynamic=False, options={"freezing": True}
    )

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # freezing needs it
            return compiled(x.contiguous(memory_format=torch.channels_last)).contiguous()

    return run


def compile_decoder(model: Sam) -> Callable:
    """``torch.compile`` of the mask decoder's inference pass up to the up-scaling (dynamic
    shapes: any number of prompt sets and points without recompiling), for
    ``MaskDecoder.forward(impl=...)``: the elementwise work around the attentions fuses. The
    up-scaling stays eager (``MaskDecoder._upscale``: tiled matrix products, faster than the
    compiled convolutions). Compiles on the first call (~40 s on 2 cores); falls back to eager
    where compilation fails."""
    return compiled_or_eager(model.mask_decoder.decode_tokens, "the decoder", dynamic=True)


def openvino_decoder(model: Sam) -> Callable:
    """The mask decoder's inference pass up to the up-scaling (:meth:`MaskDecoder.decode_tokens`:
    the two-way transformer and the heads) on OpenVINO's CPU plugin at inference precision f32,
    for ``MaskDecoder.forward(impl=...)``.

    The returned ``run(src, image_pe, tokens)`` takes ``src`` 1 x C x 64 x 64 (one image
    embedding shared by every prompt set) or B x C x 64 x 64 (one per prompt set: mask inputs),
    ``image_pe`` 1 x C x 64 x 64 and ``tokens`` B x N x C (the output and prompt tokens; any B
    and N without recompiling), and returns the image tokens B x 4096 x C, the hypernetwork
    inputs B x M x C/8 and the IoU predictions B x M (M mask tokens), in ``src``'s dtype and
    device. Two graphs, as the eager code has two paths: shared embedding (its image side
    computed once) and per-prompt embedding (built on first use, under a lock: the runtime is
    shared by a service's predictors, :meth:`SamPredictor.copy`). A single prompt set runs
    eagerly (leansam's folded single-prompt path is faster there). Subnormal attention weights are
    flushed in the graph, as in eager inference. The up-scaling stays leansam's
    tiled one. Exact to ~1e-5 (float summation order; tests: logits within 1e-4); speed:
    BENCHMARKS.md, "Prompt decoding" and "Segment everything". Exported to ONNX from a CPU fp32
    copy of the model's decoder (a few seconds): later changes to the model's weights are not seen.
    ``run.openvino_calls`` lists the prompt-set count of every call that OpenVINO ran.

    Raises :class:`InputError` without the ``openvino`` extra."""

    core = openvino_core()
    eager = model.mask_decoder.decode_tokens
    # a CPU fp32 copy: the caller's model is left as it is
    dec = copy.deepcopy(model.mask_decoder).float().cpu().eval()
    c = dec.transformer_dim
    g = max(model.prompt_encoder.image_embedding_size)
    n = 1 + dec.num_mask_tokens + 2  # the output tokens and 2 prompt tokens
    config = {
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    }

    class DecodeTokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = dec

        def forward(self, src, image_pe, tokens):
            return self.decoder.decode_tokens(src, image_pe, tokens)

    def build(shared: bool):
        # exported to ONNX with 2 prompt sets (src: 1 shared or 2) and read by OpenVINO, as the
        # encoder is (not openvino.convert_model of the module, whose TorchScript objects stay
        # tied to the converted model), dynamic on the prompt-set and token axes
        from .export.onnx import export_module

        example = (torch.zeros(1 if shared else 2, c, g, g), torch.zeros(1, c, g, g))
        example += (torch.zeros(2, n, c),)
        axes = {"tokens": {0: "prompts", 1: "tokens"}, "image_tokens": {0: "prompts"}}
        axes.update({"hyper_in": {0: "prompts"}, "iou_predictions": {0: "prompts"}})
        if not shared:
            axes["src"] = {0: "prompts"}
        buf = io.BytesIO()
        # the graph flushes subnormal attention weights as eager inference does (BENCHMARKS.md,
        # "Subnormal attention weights")
        with torch.no_grad(), flush_subnormals_in_traces():
            export_module(
                DecodeTokens(),
                example,
                buf,
                input_names=["src", "image_pe", "tokens"],
                output_names=["image_tokens", "hyper_in", "iou_predictions"],
                dynamic_axes=axes,
            )
        return core.compile_model(read_onnx_openvino(buf.getvalue()), "CPU", config)

    graphs = {True: build(True)}
    lock = threading.Lock()
    calls: list[int] = []

    def run(src: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        if tokens.shape[0] == 1:
            return eager(src, image_pe, tokens)
        dtype, device = src.dtype, src.device
        shared = src.shape[0] == 1
        if shared not in graphs:
            with lock:
                if shared not in graphs:
                    graphs[shared] = build(shared)
        compiled = graphs[shared]
        calls.append(tokens.shape[0])
        arrays = [t.detach().float().cpu().contiguous().numpy() for t in (src, image_pe, tokens)]
        result = compiled.create_infer_request().infer(dict(enumerate(arrays)))
        # copies: the request's output buffers are not ours to keep
        return tuple(
            torch.from_numpy(result[compiled.output(i)].copy()).to(device, dtype) for i in range(3)
        )

    run.openvino_calls = calls
    return run


def make_decoder(model: Sam, runtime: str) -> Callable | None:
    """The decoder pass that goes with the encoder ``runtime`` (``impl`` of
    ``MaskDecoder.forward``): compiled for ``torch-opt``, OpenVINO f32 for the ``openvino``
    runtimes (the float decoder of a float model, exact; a quantized model keeps its
    fake-quantized decoder in PyTorch), None (eager PyTorch) otherwise."""
    check_runtime(runtime)
    if runtime == "torch-opt":
        return compile_decoder(model)
    if runtime.startswith("openvino") and getattr(model, "quant_config", None) is None:
        return openvino_decoder(model)
    return None


def _torch_bf16(model: Sam) -> Encoder:
    dev = model.device.type
    dtype = torch.bfloat16 if dev == "cpu" else torch.float16

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(dev, dtype=dtype):
            return model.image_encoder(x).float()

    return run


def _ort_session(graph: bytes):
    ort = require("onnxruntime", "export")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])


def _encoder_graph(model: Sam) -> bytes:
    from .export import export_encoder

    buf = io.BytesIO()
    export_encoder(copy.deepcopy(model).float().cpu(), buf)
    return buf.getvalue()


def int8_weight_format(target: str, vnni: bool | None = None) -> str:
    """How the INT8 graph for ``target`` (``onnx`` or ``openvino``) stores its weight codes on a
    CPU with or without VNNI (default: this CPU): int8 where VNNI / AMX kernels multiply u8 x s8
    exactly; without VNNI, uint8 for ONNX Runtime (exact) and 7-bit codes for OpenVINO (NNCF's
    overflow fix), whose u8 x s8 kernels saturate there (:func:`~leansam.quant.deploy.
    integer_encoder`)."""
    from .quant.deploy import cpu_has_vnni

    if vnni if vnni is not None else cpu_has_vnni():
        return "s8"
    return "u8" if target == "onnx" else "s7"


def int8_encoder_graph(
    model: Sam,
    calibration: Sequence[torch.Tensor] | None,
    requantize_outputs: bool,
    weights: str = "s8",
) -> tuple[bytes, dict]:
    """The QDQ INT8 encoder graph of ``model`` and its deployment report: a W8A8
    leansam-quantized model as it is, a float model after
    :func:`leansam.quant.deploy.calibrate_encoder` on ``calibration``. ``requantize_outputs``
    (ONNX Runtime) also quantizes each layer's output, ranges observed on ``calibration``;
    ``weights``: see :func:`leansam.quant.deploy.integer_encoder`. Raises InputError when
    calibration images are needed and missing, or the quantized model is not W8A8."""
    from .export.onnx import export_module
    from .quant.deploy import calibrate_encoder, check_int8, integer_encoder
    from .quant.wrap import is_quantized

    if is_quantized(model):
        check_int8(model)  # a W4A4 file is refused before anything else is asked for
    if not calibration and requantize_outputs:
        raise InputError(
            "onnx-int8 needs calibration images (ONNX Runtime's integer convolutions requantize "
            "their outputs, whose ranges are measured on them): pass --calib-images DIR (or "
            "calibration_images=[...])"
        )
    if not calibration and not is_quantized(model):
        raise InputError(
            "openvino-int8 needs calibration images to quantize a float model (or a W8A8 file "
            "from `leansam quantize` as --checkpoint): pass --calib-images DIR (or "
            "calibration_images=[...])"
        )
    model = copy.deepcopy(model).float().cpu().eval()
    report = {"calibrated_by": "leansam.quant" if is_quantized(model) else "calibrate_encoder"}
    if not is_quantized(model):
        model = calibrate_encoder(model, calibration)
    enc, deployed = integer_encoder(
        model, calibration if requantize_outputs else None, weights=weights
    )
    report.update(deployed)
    buf = io.BytesIO()
    x = torch.zeros(1, 3, model.image_size, model.image_size)
    export_module(
        enc,
        (x,),
        buf,
        input_names=["images"],
        output_names=["image_embeddings"],
        dynamic_axes={"images": {0: "batch"}, "image_embeddings": {0: "batch"}},
    )
    return buf.getvalue(), report


def quantize_encoder_int8(graph: bytes, calibration: Sequence[torch.Tensor]) -> bytes:
    """ONNX Runtime's own static INT8 quantization (QDQ, per-channel symmetric weights, uint8
    activations with MinMax calibration over ``calibration``: preprocessed 1 x 3 x R x R images)
    of an encoder graph: the peer ``benchmarks/int8.py`` compares leansam's INT8 with (the
    ``onnx-int8`` runtime before issue 22)."""
    require("onnx", "export")
    ortq = require("onnxruntime.quantization", "export")
    import tempfile
    from pathlib import Path

    if not calibration:
        raise InputError("onnx-int8 needs calibration images (calibration=[...])")

    class Reader(ortq.CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": x.float().cpu().numpy()} for x in calibration])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        src.write_bytes(graph)
        ortq.quant_pre_process(str(src), str(src), skip_symbolic_shape=True)
        ortq.quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=ortq.QuantFormat.QDQ,
            per_channel=True,
            activation_type=ortq.QuantType.QUInt8,
            weight_type=ortq.QuantType.QInt8,
            calibrate_method=ortq.CalibrationMethod.MinMax,
        )
        return dst.read_bytes()


def _onnx(model: Sam, calibration: Sequence[torch.Tensor] | None, int8: bool) -> Encoder:
    if int8:
        graph, _ = int8_encoder_graph(
            model, calibration, requantize_outputs=True, weights=int8_weight_format("onnx")
        )
    else:
        graph = _encoder_graph(model)
    session = _ort_session(graph)
    device, dtype = model.device, model.dtype

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {"images": x.float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(device=device, dtype=dtype)

    return run


def _openvino(
    model: Sam, bf16: bool, int8: bool = False, calibration: Sequence[torch.Tensor] | None = None
) -> Encoder:

    core = openvino_core()
    if int8:
        onnx_graph, _ = int8_encoder_graph(
            model, calibration, requantize_outputs=False, weights=int8_weight_format("openvino")
        )
    else:
        onnx_graph = _encoder_graph(model)
    graph = read_onnx_openvino(onnx_graph)
    precision = "bf16" if bf16 else "f32"
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = core.compile_model(graph, "CPU", config)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: f32, bf16, ...
    actual = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    if bf16 and "bf16" not in actual:
        warnings.warn(
            "openvino-bf16: this CPU has no bf16 units (AVX512-BF16 / AMX), OpenVINO runs the "
            f"encoder in {actual}: the same as runtime openvino",
            stacklevel=3,
        )
    device, dtype = model.device, model.dtype

    def run(x: torch.Tensor) -> torch.Tensor:
        request = compiled.create_infer_request()
        out = request.infer({0: x.float().cpu().numpy()})[compiled.output(0)]
        return torch.from_numpy(out.copy()).to(device=device, dtype=dtype)

    return run


def calibration_images(folder: str | os.PathLike, count: int = 8) -> list:
    """The first ``count`` images (by name) of ``folder`` as H x W x 3 uint8 arrays: calibration
    data for the INT8 runtimes. Raises a one-line :class:`InputError` for a missing or empty
    folder."""
    from pathlib import Path

    from .io import IMAGE_SUFFIXES, load_image

    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"calibration folder not found: {root}")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise InputError(f"no images in calibration folder {root}")
    return [load_image(p) for p in files]


def runtime_calibration(runtime: str, folder: str | os.PathLike | None) -> list | None:
    """The calibration images of ``folder`` when ``runtime`` is an INT8 runtime and a folder is
    given, else None (:func:`make_encoder` says when they are required)."""
    check_runtime(runtime)
    if runtime not in INT8_RUNTIMES or folder is None:
        return None
    return calibration_images(folder)


def make_encoder(
    model: Sam, runtime: str = "torch", *, calibration: Sequence[torch.Tensor] | None = None
) -> Encoder:
    """The image encoder of ``model`` on ``runtime`` (see the module table). A leansam-quantized
    model runs on ``torch`` (fake quantization) or an INT8 runtime (W8A8 only). Raises
    InputError for other combinations and for missing calibration images."""
    check_runtime(runtime)
    quantized = getattr(model, "quant_config", None) is not None
    if quantized and runtime not in ("torch", *INT8_RUNTIMES):
        raise InputError(
            "a quantized model runs on the 'torch' runtime (fake quantization) or on "
            f"{' / '.join(INT8_RUNTIMES)} (W8A8), not {runtime!r}"
        )
    if runtime == "torch":
        return model.image_encoder
    if runtime == "torch-bf16":
        return _torch_bf16(model)
    if runtime == "torch-opt":
        return _torch_opt(model)
    if model.device.type != "cpu":
        raise InputError(f"runtime {runtime} runs on the CPU; use torch or torch-opt on a GPU")
    if runtime.startswith("openvino"):
        return _openvino(
            model,
            bf16=runtime == "openvino-bf16",
            int8=runtime == "openvino-int8",
            calibration=calibration,
        )
    return _onnx(model, calibration, int8=runtime == "onnx-int8")
