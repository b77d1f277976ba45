"""``leansam <subcommand>``: each subcommand parses its arguments and calls one library function.

User mistakes (a missing image, a bad box, an unknown model, a wrong checkpoint) print one line,
``leansam: error: ...``, and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from .errors import InputError, LeansamError, RandomWeightsWarning, require


def _int_list(text: str, flag: str, example: str) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected numbers like {example}") from None


def _cmd_models(args: argparse.Namespace) -> int:
    from .registry import list_models, model_info

    rows = [model_info(n) for n in list_models(include_tiny=args.all)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<26} {'family':<13} {'input':>5} {'params':>8}  description")
    for r in rows:
        print(
            f"{r['name']:<26} {r['family']:<13} {r['image_size']:>5} "
            f"{r['params'] / 1e6:>7.1f}M  {r['description']}"
        )
    if not args.all:
        print("(test-size variants hidden; --all lists them)")
    return 0


def _cmd_segment(args: argparse.Namespace) -> int:
    from .segment import parse_box, parse_point, segment

    record = segment(
        args.image,
        model=args.model,
        checkpoint=args.checkpoint,
        boxes=[parse_box(b) for b in args.box],
        points=[parse_point(p) for p in args.point],
        separate_points=args.separate_points,
        multimask=args.multimask,
        out_dir=args.out,
        device=args.device,
        runtime=args.runtime,
        calib_images=args.calib_images,
    )
    n = len(record["results"])
    empty = [i for i, r in enumerate(record["results"]) if r["masks"][r["best"]]["area"] == 0]
    print(f"wrote {n} mask(s), overlay.png and result.json to {args.out}")
    if empty:
        which = ", ".join(f"mask_{i:03d}.png" for i in empty)
        print(
            f"note: {len(empty)} of {n} masks are empty ({which}): the model found no object at "
            "that prompt; try a box or more points"
            + ("" if args.multimask else ", or --multimask"),
            file=sys.stderr,
        )
    return 0


def _cmd_everything(args: argparse.Namespace) -> int:
    from .amg import everything

    record = everything(
        args.image,
        model=args.model,
        checkpoint=args.checkpoint,
        out_dir=args.out,
        device=args.device,
        runtime=args.runtime,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        box_nms_thresh=args.box_nms_thresh,
        crop_n_layers=args.crop_n_layers,
        min_mask_region_area=args.min_mask_region_area,
        progress=not args.no_progress,
    )
    n = len(record["masks"])
    files = "<i>.png, " if n else ""
    print(
        f"wrote {n} mask(s) in {record['seconds']:.1f} s: {files}metadata.csv, masks.json and "
        f"overlay.png in {args.out}"
    )
    if n == 0:
        print(
            f"note: no mask passed --pred-iou-thresh {args.pred_iou_thresh} and "
            f"--stability-score-thresh {args.stability_score_thresh} (SAM's defaults assume "
            "SAM's confidence; a weaker model, such as leansam's shipped ones, MODEL_CARD.md, may "
            "need lower thresholds)",
            file=sys.stderr,
        )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.quick import format_bench, quick_bench
    from .io import atomic_write_json, load_image

    boxes = _int_list(args.boxes, "--boxes", "1,16,64")
    result = quick_bench(
        args.model,
        checkpoint=args.checkpoint,
        runtimes=tuple(args.runtime or ("torch", "torch-opt")),
        batch=args.batch,
        boxes=boxes,
        runs=args.runs,
        calib_images=args.calib_images,
        image=load_image(args.image) if args.image else None,
        progress=not args.no_progress,
    )
    print(format_bench(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _check_port_free(host: str, port: int) -> None:
    """One line (exit 2) for a port that is taken or a host that cannot be listened on, instead
    of uvicorn's multi-line log and exit 3. Binds the way uvicorn does (SO_REUSEADDR)."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # uvicorn's rule
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror:
            raise InputError(f"--host {host!r}: unknown host name or address") from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise InputError(
                    f"port {port} on {host} is already in use (another server?): pick another "
                    "with --port"
                ) from None
            raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    from .loading import load_model

    uvicorn = require("uvicorn", "serve")
    from .service import Engine, Limits, create_app

    for name in ("max_upload_mb", "max_megapixels", "cache_images", "concurrency", "timeout"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if args.queue < 0:
        raise InputError("--queue must be 0 or more")
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be 1..65535, got {args.port}")
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=int(args.max_megapixels * 1e6),
        cache_images=args.cache_images,
        max_concurrency=args.concurrency,
        max_queue=args.queue,
        timeout_s=args.timeout,
    )
    _check_port_free(args.host, args.port)  # before loading the model
    model = load_model(args.model, args.checkpoint, device=args.device)
    engine = Engine(
        model, name=args.model, runtime=args.runtime, size=args.concurrency,
        checkpoint=model.checkpoint_path,
    )  # fmt: skip
    if args.host not in LOOPBACK_HOSTS:
        print(
            f"warning: listening on {args.host}: anyone who can reach this machine can use the "
            "service (there is no authentication)",
            file=sys.stderr,
        )
    print(f"leansam serve: {args.model} ({args.runtime}) on http://{args.host}:{args.port}/")
    uvicorn.run(
        create_app(engine, limits),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_keep_alive=5,
        # connections beyond this get 503 from uvicorn before any work is done
        limit_concurrency=args.max_connections,
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        data=args.data,
        out_dir=args.out,
        model=args.model,
        checkpoint=args.checkpoint,
        num_images=args.images,
        device=args.device,
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .distributed import default_device
    from .eval import EvalDataset, evaluate, make_mask_source, markdown

    clicks = _int_list(args.clicks, "--clicks", "1,3,5")
    dataset = EvalDataset.load(args.images, args.annotations, limit=args.limit)
    source = make_mask_source(
        args.model,
        checkpoint=args.checkpoint,
        device=args.device or default_device(),
        batch_size=args.batch_size,
        runtime=args.runtime,
        calib_images=args.calib_images,
    )
    try:
        result = evaluate(
            source,
            dataset,
            args.protocol,
            clicks=clicks,
            detections=args.detections,
            score=args.score,
            out_dir=args.out,
            fresh=args.fresh,
            save_per_object=args.save_per_object,
            plot=args.plot,
            progress=not args.no_progress,
            config={
                "checkpoint": getattr(source, "checkpoint", None),
                "limit": args.limit,
                "runtime": args.runtime,
            },
        )
    except KeyboardInterrupt:
        print(
            f"leansam: interrupted; rerun the same command to resume ({args.out})", file=sys.stderr
        )
        return 130

    if int(os.environ.get("RANK", "0")) == 0:  # one report under torchrun
        print(markdown(result), end="")
        print(f"results: {args.out}/results.json")
    return 0


def _cmd_coco_to_sa1b(args: argparse.Namespace) -> int:
    from .data.sa1b import coco_to_sa1b

    counts = coco_to_sa1b(
        args.images,
        args.annotations,
        args.out,
        include_crowd=args.include_crowd,
        progress=not args.no_progress,
    )
    print(
        f"wrote {counts['images']} images with {counts['masks']} masks to {args.out} "
        f"({counts['existing']} already there, {counts['skipped_images']} unreadable skipped)"
    )
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import write_scenes

    if args.count < 1:
        raise InputError("--count must be at least 1")
    n = write_scenes(args.out, args.count, seed=args.seed, size=args.size)
    print(f"wrote {n} scenes to {args.out} ({args.count - n} already there)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig
    from .train.trainer import distill, finetune, prompt_warmup

    cfg = TrainConfig.from_yaml(
        args.recipe,
        stage=args.train_command,
        out=args.out,
        data=args.data,
        epochs=args.epochs,
        max_steps=args.max_steps,
        init_checkpoint=args.init_checkpoint,
        teacher_checkpoint=args.teacher_checkpoint,
        decoder_checkpoint=getattr(args, "decoder_checkpoint", None),
    )
    run = {"distill": distill, "finetune": finetune, "prompt": prompt_warmup}[cfg.stage]
    try:
        result = run(cfg, resume=args.resume)
    except KeyboardInterrupt:
        print("leansam: interrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        last = result["records"][-1]["loss"] if result["records"] else float("nan")
        print(
            f"{cfg.stage}: step {result['steps']}/{result['total_steps']}, last loss {last:.5f}, "
            f"{result['skipped_samples']} unreadable samples skipped; weights: {cfg.out}/model.pt"
        )
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .io import atomic_write_json, ensure_dir
    from .loading import load_model
    from .quant import QuantConfig, calibration_samples, check_active, quantize, report, save

    require("sklearn", "quant")
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
    out = Path(args.out)
    ensure_dir(out.parent)
    model = load_model(args.model, args.checkpoint, device=args.device)
    checkpoint = model.checkpoint_path
    if getattr(model, "quant_config", None) is not None:
        raise InputError(f"{checkpoint} is already quantized: pass the full-precision weights")
    samples = calibration_samples(
        model,
        args.calib_images,
        args.calib_annotations,
        count=args.calib_count,
        seed=args.seed,
        progress=not args.no_progress,
    )
    q = quantize(model, config, samples, progress=not args.no_progress)
    active = check_active(q, samples[:1])  # raises unless every quantizer changes real data
    save(q, out)
    rep = {**report(q), "info": q.quant_info, "model": args.model, "checkpoint": checkpoint}
    rep_path = Path(args.report) if args.report else out.with_name(out.name + ".report.json")
    atomic_write_json(rep_path, rep)
    regs = rep["cag_registers"]
    print(
        f"{args.model} {config.method} {config.bits}: {len(rep['tensors'])} quantized tensors, "
        f"all {len(active)} quantizers active on a calibration image; "
        f"{len(samples)} calibration images, {q.quant_info['total_s']:.0f} s"
    )
    if regs["per_channel_pairs"]:
        print(
            f"CAG: {regs['cag_pairs']} activation (scale, zero point) pairs instead of "
            f"{regs['per_channel_pairs']} per channel ({100 * regs['reduction']:.1f} % fewer)"
        )
    print(f"wrote {out} (load: leansam.quant.load, or --checkpoint {out}) and {rep_path}")
    return 0


def _export_model(args: argparse.Namespace):
    """The model of an export command (--model / --checkpoint), warning on random weights."""
    from .io import ensure_dir
    from .loading import load_model

    require("onnx", "export")
    ensure_dir(args.out)
    model = load_model(args.model, args.checkpoint)
    if getattr(model, "quant_config", None) is not None:
        raise InputError(
            f"{model.checkpoint_path} is a quantized model (fake quantization in float): its "
            "graph would be a float graph larger than the fp32 one, so leansam does not write "
            "it; export the full-precision weights (integer export does not exist yet, README: "
            "Quantization)"
        )
    return model


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from .export import export_onnx

    model = _export_model(args)
    written = export_onnx(model, args.out, return_single_mask=args.return_single_mask)
    for name, path in written.items():
        print(f"{name:<16} {path}")
    return 0


def _cmd_export_anylabeling(args: argparse.Namespace) -> int:
    from .export import export_anylabeling

    written = export_anylabeling(_export_model(args), args.name or args.model, args.out)
    for name, path in written.items():
        print(f"{name:<8} {path}")
    print(f"load {written['config']} in X-AnyLabeling (Auto Labeling > Load custom model)")
    return 0


def _cmd_export_tensorrt(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .export import build_tensorrt_engine

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


def _cmd_weights_publish(args: argparse.Namespace) -> int:
    from .pretrained import publish

    path = publish(args.model, args.checkpoint, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, float16) and its manifest entry")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    """--model and --checkpoint as every command that runs one model takes them."""
    p.add_argument("--model", required=True, help="model name, see `leansam models`")
    p.add_argument(
        "--checkpoint",
        help="official .pt/.pth or .safetensors weights, or a quantized model from `leansam "
        "quantize` (default for leansam-* models: the shipped weights)",
    )


def _runtime_args(p: argparse.ArgumentParser) -> None:
    from .runtime import RUNTIMES

    p.add_argument(
        "--runtime",
        default="torch",
        choices=RUNTIMES,
        help="image-encoder runtime (README: Runtimes); default torch (eager)",
    )
    p.add_argument(
        "--calib-images",
        metavar="DIR",
        help="--runtime onnx-int8: calibrate on the first 8 images of DIR (e.g. coco-mini "
        "train2017)",
    )


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default in ``--help`` unless its help text already speaks of it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and "default" not in text
            and not (default is None or default is False or default == [])
            and default is not argparse.SUPPRESS
        ):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """Every (sub)command parser: defaults shown in ``--help``; each command (a parser given a
    ``func``) takes ``--threads``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        default = kwargs.get("default")
        if kwargs.get("help") is None and not (
            default is None or default is False or default == []
        ):
            kwargs["help"] = "default: %(default)s"  # shown in --help like every other default
        return super().add_argument(*args, **kwargs)

    def set_defaults(self, **kwargs) -> None:
        if "func" in kwargs:
            self.add_argument(
                "--threads",
                type=int,
                help="CPU threads for PyTorch and ONNX Runtime (default: $LEANSAM_THREADS, else "
                "one per core); on a shared or small machine fewer can be much faster",
            )
        super().set_defaults(**kwargs)


#: environment variable with the default of --threads
THREADS_ENV = "LEANSAM_THREADS"


def _apply_threads(args: argparse.Namespace) -> None:
    """``--threads`` / ``$LEANSAM_THREADS`` -> ``torch.set_num_threads`` (ONNX Runtime sessions
    take the same count)."""
    value, source = getattr(args, "threads", None), "--threads"
    if value is None and os.environ.get(THREADS_ENV):
        raw, source = os.environ[THREADS_ENV], THREADS_ENV
        try:
            value = int(raw)
        except ValueError:
            raise InputError(f"{THREADS_ENV}={raw!r}: expected a whole number of threads") from None
    if value is None:
        return
    if value < 1:
        raise InputError(f"{source} must be at least 1, got {value}")
    import torch

    torch.set_num_threads(value)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="leansam", description="Fast, exact Segment Anything.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("models", help="list model variants with input size and parameters")
    m.add_argument("--all", action="store_true", help="include test-size variants")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=_cmd_models)

    s = sub.add_parser("segment", help="segment an image from box / point prompts")
    s.add_argument("image", help="image file (JPEG, PNG, ...)")
    _model_args(s)
    s.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="x0,y0,x1,y1",
        help="box prompt in image pixels; repeat for several objects (decoded in one batch)",
    )
    s.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="x,y[,label]",
        help="point prompt, label 1 (default) foreground or 0 background; points form one "
        "prompt together unless --separate-points",
    )
    s.add_argument("--separate-points", action="store_true", help="one prompt per point")
    s.add_argument("--multimask", action="store_true", help="3 candidate masks per prompt")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--device", default=None, help="cpu (default) or cuda")
    _runtime_args(s)
    s.set_defaults(func=_cmd_segment)

    e = sub.add_parser(
        "eval",
        help="zero-shot evaluation on COCO-format data (box / click / detector protocols)",
        description="Run under torchrun to shard images over processes: "
        "torchrun --nproc_per_node N -m leansam.cli eval ...",
    )
    e.add_argument("--images", required=True, help="image folder")
    e.add_argument("--annotations", required=True, help="COCO (or LVIS) instances JSON")
    e.add_argument("--model", required=True, help="model name, or a baseline: box-fill, grabcut")
    e.add_argument(
        "--checkpoint",
        help="weights for --model (default: leansam's own weights for leansam-* models, "
        "else random weights, seed 0)",
    )
    e.add_argument("--protocol", required=True, choices=["box", "click", "detector"])
    e.add_argument("--clicks", default="1,3,5", help="click counts for --protocol click")
    e.add_argument("--detections", help="COCO results JSON of a detector, or 'gt' for oracle boxes")
    e.add_argument(
        "--score",
        default="detector",
        choices=["detector", "detector*iou"],
        help="mask score for the detector protocol",
    )
    e.add_argument("--limit", type=int, help="evaluate the first N images (by id)")
    e.add_argument("--out", required=True, help="output folder (per-image results: resumable)")
    e.add_argument("--fresh", action="store_true", help="discard earlier results in --out")
    e.add_argument("--save-per-object", action="store_true", help="write per_object.jsonl")
    e.add_argument("--plot", action="store_true", help="write iou_by_size.png (box, click)")
    e.add_argument("--batch-size", type=int, default=16, help="prompts per decoder call")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    _runtime_args(e)
    e.set_defaults(func=_cmd_eval)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_command", required=True, metavar="TOOL"
    )
    c2s = data.add_parser("coco-to-sa1b", help="convert COCO instances to SA-1B layout")
    c2s.add_argument("--images", required=True, help="COCO image folder")
    c2s.add_argument("--annotations", required=True, help="COCO instances JSON")
    c2s.add_argument("--out", required=True, help="output folder for sa_<id>.jpg / .json")
    c2s.add_argument("--include-crowd", action="store_true", help="keep iscrowd regions")
    c2s.add_argument("--no-progress", action="store_true")
    c2s.set_defaults(func=_cmd_coco_to_sa1b)
    syn = data.add_parser(
        "synth", help="procedurally generated multi-object scenes in SA-1B layout"
    )
    syn.add_argument("--out", required=True, help="output folder for sa_<i>.jpg / .json")
    syn.add_argument("--count", type=int, default=400, help="number of scenes")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--size", type=int, default=512, help="long side in pixels")
    syn.set_defaults(func=_cmd_synth)

    train = sub.add_parser(
        "train",
        help="stage-1 distillation or stage-2 end-to-end training (torchrun for many processes)",
    ).add_subparsers(dest="train_command", required=True, metavar="STAGE")
    for stage, text in (
        ("distill", "stage 1: student encoder learns the teacher's image embedding (MSE)"),
        ("finetune", "stage 2: end to end on SA-1B folders (20 x BCE + Dice)"),
        (
            "prompt",
            "warm start of a from-scratch mask decoder: synthetic boxes, no data (MODEL_CARD.md)",
        ),
    ):
        t = train.add_parser(stage, help=text)
        t.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
        t.add_argument("--out", help="output folder (overrides the recipe)")
        t.add_argument("--data", nargs="+", help="data folders (override the recipe)")
        t.add_argument("--epochs", type=float)
        t.add_argument("--max-steps", type=int)
        t.add_argument("--init-checkpoint", help="weights to start from")
        t.add_argument("--teacher-checkpoint", help="stage 1: the teacher's weights")
        if stage in ("finetune", "prompt"):
            t.add_argument(
                "--decoder-checkpoint",
                help="take the prompt encoder and mask decoder from this checkpoint (any model)",
            )
        t.add_argument("--resume", action="store_true", help="continue the run in --out")
        t.set_defaults(func=_cmd_train)

    w = sub.add_parser("weights", help="leansam's own trained weights").add_subparsers(
        dest="weights_command", required=True, metavar="TOOL"
    )
    wp = w.add_parser("publish", help="store a trained model.pt as weights/<model>.safetensors")
    wp.add_argument("--model", required=True, help="leansam-vit-s or leansam-efficientvit-s")
    wp.add_argument("--checkpoint", required=True, help="model.pt written by `leansam train`")
    wp.add_argument("--out", help="weights folder (default: the repository's weights/)")
    wp.set_defaults(func=_cmd_weights_publish)

    ev = sub.add_parser(
        "everything",
        help="segment everything in an image (SAM's automatic mask generator)",
        description="A grid of point prompts, filtered by predicted IoU and stability, box NMS; "
        "writes <i>.png per mask (by decreasing area), metadata.csv, masks.json (COCO RLE) and "
        "overlay.png.",
    )
    ev.add_argument("image", help="image file (JPEG, PNG, ...)")
    _model_args(ev)
    ev.add_argument("--out", required=True, help="output folder")
    ev.add_argument("--points-per-side", type=int, default=32)
    ev.add_argument(
        "--points-per-batch", type=int, default=64, help="prompts per decoder call (memory)"
    )
    ev.add_argument("--pred-iou-thresh", type=float, default=0.88)
    ev.add_argument("--stability-score-thresh", type=float, default=0.95)
    ev.add_argument("--box-nms-thresh", type=float, default=0.7)
    ev.add_argument(
        "--crop-n-layers", type=int, default=0, help="also segment 4^i crops in layer i"
    )
    ev.add_argument(
        "--min-mask-region-area",
        type=int,
        default=0,
        help="fill holes / drop islands below this many pixels",
    )
    ev.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    _runtime_args(ev)
    ev.set_defaults(func=_cmd_everything)

    from .runtime import RUNTIMES

    b = sub.add_parser(
        "bench",
        help="time a model on this machine: encoder per runtime, decoder per box",
        description="For leansam against the reference implementations see benchmarks/speed.py.",
    )
    _model_args(b)
    b.add_argument(
        "--runtime",
        action="append",
        choices=RUNTIMES,
        help="encoder runtime to time; repeat for several (default: torch and torch-opt)",
    )
    b.add_argument("--batch", type=int, default=1, help="images per encoder call")
    b.add_argument("--boxes", default="1,16,64", help="boxes per decoder call to time")
    b.add_argument("--runs", type=int, default=5, help="timed rounds (median reported)")
    b.add_argument("--image", help="image to use (default: random pixels, 640 x 480)")
    b.add_argument("--calib-images", metavar="DIR", help="calibration folder for onnx-int8")
    b.add_argument("--json", metavar="FILE", help="also write the full record here")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_bench)

    x = sub.add_parser("export", help="deployment graphs").add_subparsers(
        dest="export_command", required=True, metavar="FORMAT"
    )
    xo = x.add_parser(
        "onnx",
        help="encoder.onnx, decoder.onnx (SAM's ONNX contract) and decoder_batched.onnx",
    )
    _model_args(xo)
    xo.add_argument("--out", required=True, help="output folder")
    xo.add_argument(
        "--return-single-mask",
        action="store_true",
        help="decoders return one mask per prompt set, as SAM's export option",
    )
    xo.set_defaults(func=_cmd_export_onnx)
    xa = x.add_parser(
        "anylabeling",
        help="encoder (uint8 H x W x 3 in, preprocessing inside) + decoder ONNX and the YAML "
        "of X-AnyLabeling's efficientvit_sam model type",
    )
    _model_args(xa)
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
    xt.add_argument("--max-batch", type=int, default=8, help="largest encoder batch")
    xt.set_defaults(func=_cmd_export_tensorrt)

    qz = sub.add_parser(
        "quantize",
        help="post-training quantization (AHCPTQ and baselines) to a q.pt file",
        description="Calibrate on COCO-format images with their box prompts, quantize, check "
        "that every quantizer is active, save. The file loads with leansam.quant.load and as "
        "--checkpoint of segment, eval, everything and serve. See QUANTIZATION.md.",
    )
    _model_args(qz)
    from .quant.config import BIT_SETTINGS, METHODS

    qz.add_argument("--method", default="ahcptq", choices=list(METHODS), help="default ahcptq")
    qz.add_argument("--bits", default="w4a4", help=f"WnAm, e.g. {', '.join(BIT_SETTINGS)}")
    qz.add_argument("--calib-images", required=True, metavar="DIR", help="calibration images")
    qz.add_argument(
        "--calib-annotations", required=True, metavar="JSON", help="their COCO instances file"
    )
    qz.add_argument("--calib-count", type=int, default=32, help="calibration images (default 32)")
    qz.add_argument(
        "--iters",
        type=int,
        default=200,
        help="reconstruction iterations per block (paper: 20000; default 200 fits a CPU)",
    )
    qz.add_argument(
        "--kernel-bug",
        action="store_true",
        help="HLUQ as the published kernel computes it (only to reproduce published numbers)",
    )
    qz.add_argument("--no-sign-fold", action="store_true", help="skip the decoder key sign fold")
    qz.add_argument(
        "--cag-merge",
        default="range",
        choices=("range", "mean"),
        help="how CAG merges a group's channels: range (default, no channel clipped) or mean "
        "(the KMeans centroid); see QUANTIZATION.md",
    )
    qz.add_argument(
        "--softmax",
        default="agq",
        choices=("agq", "log2"),
        help="softmax-output quantizer: agq (log2 with calibrated granularity, default) or "
        "plain log2",
    )
    qz.add_argument(
        "--keep-8bit",
        action="append",
        default=[],
        metavar="TENSOR",
        help="keep this quantized tensor (or every tensor under this module name, as the report "
        "lists them) at 8 bits; repeatable. See QUANTIZATION.md for the two that matter at W4A4",
    )
    qz.add_argument("--seed", type=int, default=0)
    qz.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    qz.add_argument("--out", required=True, help="the quantized model file, e.g. q.pt")
    qz.add_argument("--report", help="per-tensor report JSON (default: OUT.report.json)")
    qz.add_argument("--no-progress", action="store_true")
    qz.set_defaults(func=_cmd_quantize)

    sv = sub.add_parser(
        "serve",
        help="HTTP API and web page for interactive segmentation (FastAPI + uvicorn)",
        description="Open http://HOST:PORT/ for the page, /docs for the API. Loopback only "
        "unless --host says otherwise.",
    )
    _model_args(sv)
    sv.add_argument("--runtime", default="torch", choices=RUNTIMES, help="image-encoder runtime")
    sv.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    sv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-upload-mb", type=float, default=16, help="largest upload (MiB)")
    sv.add_argument("--max-megapixels", type=float, default=36, help="largest image (MP)")
    sv.add_argument("--cache-images", type=int, default=8, help="embeddings kept (LRU)")
    sv.add_argument("--concurrency", type=int, default=1, help="inference jobs at once")
    sv.add_argument("--queue", type=int, default=8, help="jobs waiting; beyond: 429")
    sv.add_argument("--timeout", type=float, default=60, help="seconds per request; then 503")
    sv.add_argument("--max-connections", type=int, default=64, help="open connections; then 503")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info"))
    sv.set_defaults(func=_cmd_serve)

    d = sub.add_parser("demo", help="segment coco-mini images from their annotation boxes")
    d.add_argument("--data", default="../shared/data/coco-mini", help="coco-mini folder")
    d.add_argument("--out", default="out/demo", help="output folder")
    d.add_argument(
        "--model",
        help="model name (default: the model --checkpoint is for, else leansam's own trained "
        "student leansam-efficientvit-s)",
    )
    d.add_argument(
        "--checkpoint",
        help="weights for --model (default: the shipped ones for leansam-* models, "
        "else random weights)",
    )
    d.add_argument("--images", type=int, default=4, help="number of val images")
    d.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    d.set_defaults(func=_cmd_demo)
    return p


def _version() -> str:
    from .version import __version__

    return f"leansam {__version__}"


#: options whose values may start with a minus sign (coordinates left of / above the image)
_NUMERIC_LIST_OPTIONS = ("--box", "--point")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--box -4,10,50,60`` -> ``--box=-4,10,50,60``: argparse takes a value that starts with
    ``-`` (other than a plain negative number) for an option and fails with "expected one
    argument"; the joined form parses, and the value is judged afterwards (here: outside the
    image)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if (
            token in _NUMERIC_LIST_OPTIONS
            and len(nxt) > 1
            and nxt[0] == "-"
            and nxt[1] in "0123456789."
        ):
            out.append(f"{token}={nxt}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(_join_negative_values(argv))
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, *rest, **kw):
            if issubclass(category, RandomWeightsWarning):  # one plain line, no source line
                print(f"warning: {message}", file=sys.stderr)
            else:
                shown(message, category, *rest, **kw)

        warnings.showwarning = show
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        _apply_threads(args)
        return args.func(args)
    except LeansamError as e:
        print(f"leansam: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leansam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
