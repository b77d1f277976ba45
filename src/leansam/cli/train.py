"""``leansam train <stage>``: a recipe plus overrides -> :class:`~leansam.train.config.TrainConfig`
-> one training entry point (torchrun for many processes)."""

from __future__ import annotations

import argparse
import os
import sys


def _cmd_train(args: argparse.Namespace) -> int:
    from ..train.config import TrainConfig
    from ..train.distill import distill
    from ..train.finetune import finetune
    from ..train.warmup import prompt_warmup

    cfg = TrainConfig.from_yaml(
        args.recipe,
        stage=args.train_command,
        out=args.out,
        data=args.data,
        epochs=args.epochs,
        max_steps=args.max_steps,
        seed=args.seed,
        init_checkpoint=args.init_checkpoint,
        teacher_checkpoint=args.teacher_checkpoint,
        decoder_checkpoint=getattr(args, "decoder_checkpoint", None),
    )
    run = {"distill": distill, "finetune": finetune, "prompt": prompt_warmup}[cfg.stage]
    try:
        result = run(cfg, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("leansam: interrupted; continue with the same command plus --resume", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        # a resumed run that had already finished takes no step: say so instead of a loss
        records = result["records"]
        done = result["steps"] >= result["total_steps"]
        idle = "already finished" if done else "no step before --max-steps"
        last = f"last loss {records[-1]['loss']:.5f}" if records else idle
        n = result["skipped_samples"]
        skipped = f", {n} unreadable samples skipped" if n else ""
        drawn = result.get("box_iou")
        check = ""
        if drawn:
            sides = " / ".join(str(k) for k in drawn)
            check = f", box IoU {' / '.join(f'{v:.2f}' for v in drawn.values())} at {sides} px"
        print(
            f"{cfg.stage}: step {result['steps']}/{result['total_steps']}, "
            f"{last}{check}{skipped}; weights: {cfg.out}/model.pt"
        )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    # No flag restates a TrainConfig default: each one left out (None) keeps the recipe's value.
    train = sub.add_parser(
        "train",
        help="stage-1 distillation or stage-2 end-to-end training (torchrun for many processes)",
    ).add_subparsers(dest="train_command", required=True, metavar="STAGE")
    for stage, text in (
        ("distill", "stage 1: student encoder learns the teacher's image embedding (MSE)"),
        ("finetune", "stage 2: end to end on SA-1B folders (20 x BCE + Dice)"),
        (
            "prompt",
            "warm start of a from-scratch mask decoder on a zero image embedding: synthetic boxes, "
            "or real masks from their boxes with data (MODEL_CARD.md)",
        ),
    ):
        t = train.add_parser(stage, help=text)
        t.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
        t.add_argument("--out", help="output folder (overrides the recipe)")
        t.add_argument("--data", nargs="+", help="data folders (override the recipe)")
        t.add_argument(
            "--epochs",
            type=float,
            help="epochs to train, fractions allowed (default: the recipe's)",
        )
        t.add_argument(
            "--max-steps", type=int, help="stop after this many steps (default: the recipe's)"
        )
        t.add_argument("--seed", type=int, help="random seed (default: the recipe's)")
        t.add_argument("--init-checkpoint", help="weights to start from")
        t.add_argument("--teacher-checkpoint", help="stage 1: the teacher's weights")
        if stage in ("finetune", "prompt"):
            t.add_argument(
                "--decoder-checkpoint",
                help="take the prompt encoder and mask decoder from this checkpoint (any model)",
            )
        t.add_argument("--resume", action="store_true", help="continue the run in --out")
        t.add_argument("--no-progress", action="store_true", help="no progress bar")
        t.set_defaults(func=_cmd_train)
