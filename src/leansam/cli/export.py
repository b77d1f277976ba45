"""``leansam export``: ONNX graphs, X-AnyLabeling models and TensorRT engines
(:mod:`leansam.export`)."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError, require
from .parsing import model_args


def _cmd_export_int8(args: argparse.Namespace) -> int:
    from ..export.int8 import export_int8
    from ..loading import load_model
    from ..predictor import SamPredictor
    from ..quant.deploy import check_int8
    from ..runtime import calibration_images

    if args.format == "onnx" and args.calib_images is None:
        raise InputError(
            "--format onnx needs --calib-images DIR: ONNX Runtime's integer convolutions "
            "requantize their outputs, whose ranges are measured on those images"
        )
    if args.format == "openvino" and args.calib_images is not None:
        print(
            "note: --calib-images is not used for --format openvino: OpenVINO's INT8 "
            "convolutions need no output ranges",
            file=sys.stderr,
        )
    calib = calibration_images(args.calib_images) if args.format == "onnx" else None
    model = load_model(args.model, args.checkpoint)
    check_int8(model)
    calibration = None
    if calib is not None:
        predictor = SamPredictor(model)
        calibration = [predictor.encoder_input(im) for im in calib]
    vnni = {"auto": None, "vnni": True, "avx2": False}[args.cpu]
    written = export_int8(model, args.out, args.format, calibration=calibration, vnni=vnni)
    for name, path in written.items():
        print(f"{name:<12} {path}")
    return 0


def _export_model(args: argparse.Namespace):
    """The model of an export command (--model / --checkpoint), warning on random weights."""
    from ..io import ensure_dir
    from ..loading import load_model

    require("onnx", "export")
    ensure_dir(args.out)
    model = load_model(args.model, args.checkpoint)
    if getattr(model, "quant_config", None) is not None:
        raise InputError(
            f"{model.checkpoint_path} is a quantized model (fake quantization in float): its "
            "graph would be a float graph larger than the fp32 one, so leansam does not write "
            "it; export a W8A8 one with `leansam export int8`, or the full-precision weights "
            "(README: Deploy on CPU)"
        )
    return model


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from ..export import export_onnx

    model = _export_model(args)
    written = export_onnx(model, args.out, return_single_mask=args.return_single_mask)
    for name, path in written.items():
        print(f"{name:<16} {path}")
    return 0


def _cmd_export_anylabeling(args: argparse.Namespace) -> int:
    from ..export import export_anylabeling

    written = export_anylabeling(_export_model(args), args.name or args.model, args.out)
    for name, path in written.items():
        print(f"{name:<8} {path}")
    print(f"load {written['config']} in X-AnyLabeling (Auto Labeling > Load custom model)")
    return 0


def _cmd_export_tensorrt(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..export import build_tensorrt_engine

    src = Path(args.onnx)
    graphs = sorted(src.glob("*.onnx")) if src.is_dir() else [src]
    if not graphs or not all(g.is_file() for g in graphs):
        raise InputError(f"no ONNX graphs at {src}: run `leansam export onnx` first")
    require("tensorrt", "tensorrt")
    out = Path(args.out)
    for g in graphs:
        path = build_tensorrt_engine(
            g, out / f"{g.stem}.engine", fp16=not args.fp32, max_batch=args.max_batch
        )
        print(f"{g.name:<22} -> {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("export", help="deployment graphs").add_subparsers(
        dest="export_command", required=True, metavar="FORMAT"
    )
    xo = x.add_parser(
        "onnx",
        help="encoder.onnx, decoder.onnx (SAM's ONNX contract) and decoder_batched.onnx",
    )
    model_args(xo)
    xo.add_argument("--out", required=True, help="output folder")
    xo.add_argument(
        "--return-single-mask",
        action="store_true",
        help="decoders return one mask per prompt set, as SAM's export option",
    )
    xo.set_defaults(func=_cmd_export_onnx)
    xi = x.add_parser(
        "int8",
        help="the image encoder of a W8A8 `leansam quantize` file as an integer graph for ONNX "
        "Runtime or OpenVINO (encoder_int8.onnx or .xml/.bin, and int8.json)",
        description="QDQ graph carrying the quantized model's own scales, zero points and "
        "rounded weights; README: Deploy on CPU.",
    )
    model_args(xi)
    xi.add_argument("--format", choices=("onnx", "openvino"), default="onnx")
    xi.add_argument("--out", required=True, help="output folder")
    xi.add_argument(
        "--calib-images",
        metavar="DIR",
        help="--format onnx: measure the output ranges ONNX Runtime requantizes on the first 8 "
        "images of DIR (required there)",
    )
    xi.add_argument(
        "--cpu",
        choices=("auto", "vnni", "avx2"),
        default="auto",
        help="target CPU: vnni (AVX512-VNNI / AMX: int8 weights), avx2 (no VNNI: uint8 weights "
        "for ONNX Runtime, 7-bit for OpenVINO, against 16-bit saturation); auto: this CPU",
    )
    xi.set_defaults(func=_cmd_export_int8)
    xa = x.add_parser(
        "anylabeling",
        help="encoder (uint8 H x W x 3 in, preprocessing inside) + decoder ONNX and the YAML "
        "of X-AnyLabeling's efficientvit_sam model type",
    )
    model_args(xa)
    xa.add_argument("--out", required=True, help="output folder")
    xa.add_argument("--name", help="file and model name (default: --model)")
    xa.set_defaults(func=_cmd_export_anylabeling)
    xt = x.add_parser(
        "tensorrt",
        help="TensorRT engines from the ONNX graphs (GPU machine with the tensorrt package)",
        description="fp16 engines keep LayerNorm, LiteMLA and the bicubic resize in fp32.",
    )
    xt.add_argument("--onnx", required=True, help="folder of `leansam export onnx` (or one graph)")
    xt.add_argument("--out", required=True, help="output folder for <graph>.engine")
    xt.add_argument("--fp32", action="store_true", help="fp32 engines (default fp16)")
    # restates build_tensorrt_engine's default: importing leansam.export here would import
    # torch.onnx (~0.2 s) for every `leansam --help`
    xt.add_argument("--max-batch", type=int, default=8, help="largest encoder batch")
    xt.set_defaults(func=_cmd_export_tensorrt)
