"""``leansam models``: the table (or JSON) of registered model variants."""

from __future__ import annotations

import argparse
import json


def _cmd_models(args: argparse.Namespace) -> int:
    from ..registry import list_models, model_info

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


def add_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("models", help="list model variants with input size and parameters")
    m.add_argument("--all", action="store_true", help="include test-size variants")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=_cmd_models)
