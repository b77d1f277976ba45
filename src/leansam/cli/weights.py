"""``leansam weights publish``: store trained weights as leansam's shipped ones
(:func:`leansam.pretrained.publish`)."""

from __future__ import annotations

import argparse


def _cmd_weights_publish(args: argparse.Namespace) -> int:
    from ..pretrained import publish

    path = publish(args.model, args.checkpoint, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, float16) and its manifest entry")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("weights", help="leansam's own trained weights").add_subparsers(
        dest="weights_command", required=True, metavar="TOOL"
    )
    wp = w.add_parser("publish", help="store a trained model.pt as weights/<model>.safetensors")
    wp.add_argument("--model", required=True, help="leansam-vit-s or leansam-efficientvit-s")
    wp.add_argument("--checkpoint", required=True, help="model.pt written by `leansam train`")
    wp.add_argument("--out", help="weights folder (default: the repository's weights/)")
    wp.set_defaults(func=_cmd_weights_publish)
