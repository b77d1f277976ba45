"""``leansam data``: dataset tools (COCO to SA-1B layout, synthetic and copy-paste scenes)."""

from __future__ import annotations

import argparse

from ..errors import InputError
from .parsing import default_of


def _cmd_coco_to_sa1b(args: argparse.Namespace) -> int:
    from ..data.sa1b import coco_to_sa1b

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
    from ..data.synth import write_scenes

    if args.count < 1:
        raise InputError("--count must be at least 1")
    if args.size < 64:
        raise InputError("--size must be at least 64 pixels")
    n = write_scenes(
        args.out, args.count, seed=args.seed, size=args.size, fresh=args.fresh,
        progress=not args.no_progress,
    )  # fmt: skip
    print(f"wrote {n} scenes to {args.out} ({args.count - n} already there)")
    return 0


def _cmd_paste(args: argparse.Namespace) -> int:
    from ..data.paste import write_paste_scenes

    if args.count < 1:
        raise InputError("--count must be at least 1")
    if args.size < 64:
        raise InputError("--size must be at least 64 pixels")
    n = write_paste_scenes(
        args.sources, args.out, args.count, seed=args.seed, size=args.size, fresh=args.fresh,
        progress=not args.no_progress,
    )  # fmt: skip
    print(f"wrote {n} copy-paste scenes to {args.out} ({args.count - n} already there)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..data.paste import write_paste_scenes
    from ..data.synth import write_scenes

    data = sub.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_command", required=True, metavar="TOOL"
    )
    c2s = data.add_parser("coco-to-sa1b", help="convert COCO instances to SA-1B layout")
    c2s.add_argument("--images", required=True, help="COCO image folder")
    c2s.add_argument("--annotations", required=True, help="COCO instances JSON")
    c2s.add_argument("--out", required=True, help="output folder for sa_<id>.jpg / .json")
    c2s.add_argument("--include-crowd", action="store_true", help="keep iscrowd regions")
    c2s.add_argument("--no-progress", action="store_true", help="no progress bar")
    c2s.set_defaults(func=_cmd_coco_to_sa1b)
    syn = data.add_parser(
        "synth", help="procedurally generated multi-object scenes in SA-1B layout"
    )
    syn.add_argument("--out", required=True, help="output folder for sa_<i>.jpg / .json")
    syn.add_argument("--count", type=int, default=400, help="number of scenes")
    syn.add_argument(
        "--seed",
        type=int,
        default=default_of(write_scenes, "seed"),
        help="scene i depends only on the seed, i and --size (recorded in OUT/synth.json)",
    )
    syn.add_argument(
        "--size", type=int, default=default_of(write_scenes, "size"), help="long side in pixels"
    )
    syn.add_argument(
        "--fresh",
        action="store_true",
        help="delete the scenes in --out first (a rerun with other settings is otherwise refused)",
    )
    syn.add_argument("--no-progress", action="store_true", help="no progress bar")
    syn.set_defaults(func=_cmd_synth)
    paste_help = (
        "copy-paste scenes: real objects cut out along their masks and pasted onto other "
        "images of SA-1B folders (Ghiasi et al., CVPR 2021), in SA-1B layout"
    )
    paste = data.add_parser(
        "paste",
        help=paste_help,
        description=paste_help + ". 3-10 objects per scene, each flipped with p 0.5 and scaled "
        "to a box side log-uniform in 3-60 % of the long side, over a random image of the "
        "sources whose own objects stay annotated where still visible. Scene i depends only on "
        "--seed, i, --size and the sources (recorded in OUT/paste.json); a rerun resumes.",
    )
    paste.add_argument(
        "--sources", nargs="+", required=True, help="SA-1B folders to take objects and images from"
    )
    paste.add_argument("--out", required=True, help="output folder for sa_<i>.jpg / .json")
    paste.add_argument("--count", type=int, default=1000, help="number of scenes")
    paste.add_argument(
        "--fresh",
        action="store_true",
        help="delete the scenes in --out first (a rerun with other settings is otherwise refused)",
    )
    paste.add_argument(
        "--seed",
        type=int,
        default=default_of(write_paste_scenes, "seed"),
        help="scene i depends only on the seed, i, --size and the sources",
    )
    paste.add_argument(
        "--size",
        type=int,
        default=default_of(write_paste_scenes, "size"),
        help="long side of the scenes in pixels",
    )
    paste.add_argument("--no-progress", action="store_true", help="no progress bar")
    paste.set_defaults(func=_cmd_paste)
