"""``leansam serve``: the HTTP service and web page (:mod:`leansam.service`) under uvicorn;
its limits default to those of :class:`~leansam.service.Limits`."""

from __future__ import annotations

import argparse
import sys

from ..errors import InputError, require
from .parsing import default_of, model_args

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
    from ..loading import load_model

    uvicorn = require("uvicorn", "serve")
    from ..service import Engine, Limits, create_app

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
    from ..runtime import runtime_calibration

    _check_port_free(args.host, args.port)  # before loading the model
    calib = runtime_calibration(args.runtime, args.calib_images)
    model = load_model(args.model, args.checkpoint, device=args.device)
    engine = Engine(
        model, name=args.model, runtime=args.runtime, size=args.concurrency,
        checkpoint=model.checkpoint_path, calibration_images=calib,
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


def _number(x: float) -> float:
    """``16.0`` -> ``16``: a whole default shows in ``--help`` without ``.0``."""
    return int(x) if float(x).is_integer() else x


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..runtime import RUNTIMES
    from ..service import Engine, Limits  # FastAPI-free (create_app is what needs it)

    def limit(name: str):
        return default_of(Limits, name)

    sv = sub.add_parser(
        "serve",
        help="HTTP API and web page for interactive segmentation (FastAPI + uvicorn)",
        description="Open http://HOST:PORT/ for the page, /docs for the API. Loopback only "
        "unless --host says otherwise.",
    )
    model_args(sv)
    sv.add_argument(
        "--runtime",
        default=default_of(Engine, "runtime"),
        choices=RUNTIMES,
        help="image-encoder runtime",
    )
    sv.add_argument(
        "--calib-images",
        metavar="DIR",
        help="INT8 runtimes: calibration images (needed by onnx-int8, and by openvino-int8 "
        "unless --checkpoint is a W8A8 quantized file)",
    )
    sv.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    sv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument(
        "--max-upload-mb",
        type=float,
        default=_number(limit("max_upload_bytes") / 2**20),
        help="largest upload (MiB)",
    )
    sv.add_argument(
        "--max-megapixels",
        type=float,
        default=_number(limit("max_pixels") / 1e6),
        help="largest image (MP)",
    )
    sv.add_argument(
        "--cache-images", type=int, default=limit("cache_images"), help="embeddings kept (LRU)"
    )
    sv.add_argument(
        "--concurrency",
        type=int,
        default=limit("max_concurrency"),
        help="inference jobs at once",
    )
    sv.add_argument(
        "--queue", type=int, default=limit("max_queue"), help="jobs waiting; beyond: 429"
    )
    sv.add_argument(
        "--timeout",
        type=float,
        default=_number(limit("timeout_s")),
        help="seconds per request; then 503",
    )
    sv.add_argument("--max-connections", type=int, default=64, help="open connections; then 503")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info"))
    sv.set_defaults(func=_cmd_serve)
