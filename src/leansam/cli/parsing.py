"""The parser pieces every subcommand shares: the parser class, the help formatter, common
options, ``--threads``, argument-list fix-ups and defaults read from the library."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
from typing import Any

from ..errors import InputError


def default_of(obj: Any, name: str) -> Any:
    """The default of field ``name`` of dataclass ``obj``, or of parameter ``name`` of function
    (or class) ``obj``: a flag's default taken from the library instead of restated."""
    if dataclasses.is_dataclass(obj):
        default = obj.__dataclass_fields__[name].default
        missing = dataclasses.MISSING
    else:
        default = inspect.signature(obj).parameters[name].default
        missing = inspect.Parameter.empty
    if default is missing:
        raise TypeError(f"{obj.__qualname__}: {name!r} has no default")
    return default


def int_list(text: str, flag: str, example: str) -> tuple[int, ...]:
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise InputError(f"{flag} {text!r}: expected numbers like {example}") from None


def model_args(p: argparse.ArgumentParser) -> None:
    """--model and --checkpoint as every command that runs one model takes them."""
    p.add_argument("--model", required=True, help="model name, see `leansam models`")
    p.add_argument(
        "--checkpoint",
        help="official .pt/.pth or .safetensors weights, or a quantized model from `leansam "
        "quantize` (default for leansam-* models: the shipped weights)",
    )


def runtime_args(p: argparse.ArgumentParser) -> None:
    from ..runtime import RUNTIMES

    p.add_argument(
        "--runtime",
        default="torch",
        choices=RUNTIMES,
        help="runtime of the image encoder, and of the decoder for torch-opt and the openvino "
        "runtimes (README: Runtimes); default torch (eager)",
    )
    p.add_argument(
        "--calib-images",
        metavar="DIR",
        help="INT8 runtimes: calibrate on the first 8 images of DIR (e.g. coco-mini train2017); "
        "needed by onnx-int8, and by openvino-int8 unless --checkpoint is a W8A8 quantized file",
    )


def runtime_record(args: argparse.Namespace) -> dict:
    """``--runtime`` and, for an INT8 runtime, the resolved ``--calib-images`` folder: what a
    run's record keeps (and what a resumed run must match)."""
    from ..runtime import INT8_RUNTIMES

    record = {"runtime": args.runtime}
    if args.runtime in INT8_RUNTIMES and args.calib_images:
        record["calib_images"] = os.path.realpath(args.calib_images)
    return record


class HelpFormatter(argparse.HelpFormatter):
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


class Parser(argparse.ArgumentParser):
    """Every (sub)command parser: defaults shown in ``--help``; each command (a parser given a
    ``func``) takes ``--threads``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
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


def fresh_arg(p: argparse.ArgumentParser) -> None:
    """``--fresh`` of the resumable dataset commands."""
    p.add_argument(
        "--fresh",
        action="store_true",
        help="dataset: discard the results of an earlier run into --out (else it resumes)",
    )


def dataset_args(p: argparse.ArgumentParser) -> None:
    """``--fresh``, ``--workers`` and ``--image-batch`` of the resumable dataset commands."""
    fresh_arg(p)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="dataset: processes decoding and resizing images beside the model (0: none)",
    )
    p.add_argument(
        "--image-batch",
        type=int,
        default=1,
        help="dataset: images per encoder call (default 1: no faster on a CPU; try 8 for "
        "EfficientViT on a GPU)",
    )


def dataset_only_flags(args: argparse.Namespace) -> list[str]:
    """The dataset-only flags of :func:`dataset_args` that ``args`` sets."""
    given = [("--fresh", args.fresh), ("--workers", args.workers != 1),
             ("--image-batch", args.image_batch != 1)]  # fmt: skip
    return [flag for flag, on in given if on]


def check_dataset_args(args: argparse.Namespace) -> None:
    """Raise InputError for a bad ``--workers`` or ``--image-batch`` (before a model loads)."""
    if args.workers < 0:
        raise InputError(f"--workers must be 0 or more, got {args.workers}")
    if args.image_batch < 1:
        raise InputError(f"--image-batch must be at least 1, got {args.image_batch}")


def dataset_model(args: argparse.Namespace):
    """(rank, model, configuration to record) of a sharded dataset command: starts the process
    group under torchrun, loads ``--model`` / ``--checkpoint`` on ``--device`` (default: the
    process's own GPU under torchrun, else the CPU)."""
    from ..distributed import default_device, init_from_env
    from ..loading import load_model

    rank, world = init_from_env()
    device = args.device or (default_device() if world > 1 else None)
    sam = load_model(args.model, args.checkpoint, device=device)
    config = {"model": args.model, **checkpoint_record(sam.checkpoint_path), **runtime_record(args)}
    return rank, sam, config


def checkpoint_record(path: str | os.PathLike | None) -> dict:
    """What a resumable run records of its weights: the file and its sha256 (``sha256sum``'s, the
    one ``weights/manifest.json`` holds), so that a rerun after the file changed under the same
    path (``make weights`` republishing ``weights/``, a retrained ``model.pt``) refuses the earlier
    results instead of mixing two models'. A run folder written before this was recorded is refused
    too when it has a checkpoint (its results may be another model's): ``--fresh`` once."""
    from ..io import file_sha256

    if not path:
        return {"checkpoint": None, "checkpoint_sha256": None}
    return {"checkpoint": os.fspath(path), "checkpoint_sha256": file_sha256(path)}


def print_skipped(skipped: list[dict], summary_file: str, shown: int = 5) -> None:
    """The first ``shown`` skipped inputs with their reasons on stderr, then where the rest are."""
    for s in skipped[:shown]:
        print(f"skipped {s['image']}: {s['reason']}", file=sys.stderr)
    if len(skipped) > shown:
        print(f"... {len(skipped) - shown} more in {summary_file}", file=sys.stderr)


def apply_threads(args: argparse.Namespace) -> None:
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


#: options whose values may start with a minus sign (coordinates left of / above the image)
_NUMERIC_LIST_OPTIONS = ("--box", "--point")


def join_negative_values(argv: list[str]) -> list[str]:
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
