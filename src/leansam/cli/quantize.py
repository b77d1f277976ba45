"""``leansam quantize``: post-training quantization to a q.pt file
(:func:`leansam.quant.quantize_to_file`); defaults are :class:`~leansam.quant.QuantConfig`'s."""

from __future__ import annotations

import argparse

from ..errors import require
from .parsing import default_of, model_args


def _cmd_quantize(args: argparse.Namespace) -> int:
    from ..loading import load_model
    from ..quant import QuantConfig, quantize_to_file

    require("sklearn", "quant")  # before the model loads
    config = QuantConfig.from_bits(
        args.method,
        args.bits,
        iters=args.iters,
        kernel_bug=args.kernel_bug,
        sign_fold=not args.no_sign_fold,
        cag_merge=args.cag_merge,
        softmax=args.softmax,
        seed=args.seed,
        keep_8bit=tuple(args.keep_8bit),
    )
    model = load_model(args.model, args.checkpoint, device=args.device)
    rep = quantize_to_file(
        model,
        config,
        args.calib_images,
        args.calib_annotations,
        args.out,
        calib_count=args.calib_count,
        report_path=args.report,
        progress=not args.no_progress,
    )
    regs = rep["cag_registers"]
    print(
        f"{args.model} {config.method} {config.bits}: {len(rep['tensors'])} quantized tensors, "
        f"all {rep['active_quantizers']} quantizers active on a calibration image; "
        f"{rep['info']['calibration_images']} calibration images, {rep['info']['total_s']:.0f} s"
    )
    if regs["per_channel_pairs"]:
        print(
            f"CAG: {regs['cag_pairs']} activation (scale, zero point) pairs instead of "
            f"{regs['per_channel_pairs']} per channel ({100 * regs['reduction']:.1f} % fewer)"
        )
    print(
        f"wrote {rep['path']} (load: leansam.quant.load, or --checkpoint {rep['path']}) and "
        f"{rep['report_path']}"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..quant import QuantConfig, quantize_to_file
    from ..quant.config import BIT_SETTINGS, METHODS

    def default(name: str):
        return default_of(QuantConfig, name)

    qz = sub.add_parser(
        "quantize",
        help="post-training quantization (AHCPTQ and baselines) to a q.pt file",
        description="Calibrate on COCO-format images with their box prompts, quantize, check "
        "that every quantizer is active, save. The file loads with leansam.quant.load and as "
        "--checkpoint of segment, eval, everything and serve. See QUANTIZATION.md.",
    )
    model_args(qz)
    method = default("method")
    qz.add_argument("--method", default=method, choices=list(METHODS), help=f"default {method}")
    qz.add_argument(
        "--bits",
        default=f"w{default('w_bits')}a{default('a_bits')}",
        help=f"WnAm, e.g. {', '.join(BIT_SETTINGS)}",
    )
    qz.add_argument("--calib-images", required=True, metavar="DIR", help="calibration images")
    qz.add_argument(
        "--calib-annotations", required=True, metavar="JSON", help="their COCO instances file"
    )
    calib_count = default_of(quantize_to_file, "calib_count")
    qz.add_argument(
        "--calib-count",
        type=int,
        default=calib_count,
        help=f"calibration images (default {calib_count})",
    )
    iters = default("iters")
    qz.add_argument(
        "--iters",
        type=int,
        default=iters,
        help=f"reconstruction iterations per block (paper: 20000; default {iters} fits a CPU)",
    )
    qz.add_argument(
        "--kernel-bug",
        action="store_true",
        help="HLUQ as the published kernel computes it (only to reproduce published numbers)",
    )
    qz.add_argument("--no-sign-fold", action="store_true", help="skip the decoder key sign fold")
    qz.add_argument(
        "--cag-merge",
        default=default("cag_merge"),
        choices=("range", "mean"),
        help="how CAG merges a group's channels: range (default, no channel clipped) or mean "
        "(the KMeans centroid); see QUANTIZATION.md",
    )
    qz.add_argument(
        "--softmax",
        default=default("softmax"),
        choices=("agq", "log2"),
        help="softmax-output quantizer: agq (log2 with calibrated granularity, default) or "
        "plain log2",
    )
    qz.add_argument(
        "--keep-8bit",
        action="append",
        default=list(default("keep_8bit")),
        metavar="TENSOR",
        help="keep this quantized tensor (or every tensor under this module name, as the report "
        "lists them) at 8 bits; repeatable. See QUANTIZATION.md for the two that matter at W4A4",
    )
    qz.add_argument("--seed", type=int, default=default("seed"))
    qz.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    qz.add_argument("--out", required=True, help="the quantized model file, e.g. q.pt")
    qz.add_argument("--report", help="per-tensor report JSON (default: OUT.report.json)")
    qz.add_argument("--no-progress", action="store_true", help="no progress bar")
    qz.set_defaults(func=_cmd_quantize)
