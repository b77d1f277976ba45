"""``leansam <subcommand>``: each subcommand parses its arguments and calls one library function.

User mistakes (a missing image, a bad box, an unknown model, a wrong checkpoint) print one line,
``leansam: error: ...``, and exit with status 2; no traceback.

One module per subcommand (or group) holds its parser and its handler; :mod:`.parsing` holds
the pieces they share. Handlers import the library modules they run inside their functions;
building the parser imports the light modules whose dataclasses and signatures hold the flag
defaults (``quant``, ``eval``, ``service``, ``bench``, ``demo``, ``data.synth``,
``data.paste``), never
FastAPI, ONNX or the training stages.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import LeansamError, RandomWeightsWarning
from . import (
    bench,
    data,
    demo,
    everything,
    export,
    models,
    quantize,
    segment,
    serve,
    train,
    weights,
)
from . import eval as eval_
from .parsing import Parser, apply_threads, join_negative_values

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="leansam", description="Fast, exact Segment Anything.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (
        models,
        segment,
        eval_,
        data,
        train,
        weights,
        everything,
        bench,
        export,
        quantize,
        serve,
        demo,
    ):  # the order of `leansam --help`
        command.add_parser(sub)
    return p


def _version() -> str:
    from ..version import __version__

    return f"leansam {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(join_negative_values(argv))
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
        apply_threads(args)
        return args.func(args)
    except LeansamError as e:
        print(f"leansam: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leansam: interrupted", file=sys.stderr)
        return 130
