"""A stage-2 training step of leansam against the same step in the reference code, side by side.

    .venv/bin/python benchmarks/train_step.py --out benchmarks/results/train_step.json

For each model (``--models``; default leansam's own two), one forward and backward pass of the
stage-2 loss on the same batch: ``--batch-size`` coco-mini train2017 images prepared as
``leansam train finetune`` prepares them (flip, scale jitter, box prompts), ``--masks-per-image``
boxes each, multimask output for about half of them (SPEC), the dense mask loss plus the
IoU-head loss, under the autocast ``amp: auto`` picks on this machine (bf16 on a CPU with native
bf16, else float32).

- ``leansam``: :class:`leansam.train.finetune.FinetuneStep`, as training runs it (channels-last
  encoder, the decoder's fused training pass);
- ``reference``: the reference code with the same weights: the image encoder of efficientsam
  (EfficientViT) or segment-anything (ViT), and segment-anything's prompt encoder and mask decoder
  (``tests/reference.py`` builds them), called per image as FinetuneStep calls leansam's.

Both compute the same function: the script reports their losses and the relative difference
between their gradients, |g_leansam - g_reference| / |g_reference| over the encoder's and the
decoder's weights (float32 pass). Timings alternate between the two round by
round (``leansam.bench.interleaved_timings``); optimizer steps are left out (the same for both).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # reference.py: the reference models, same weights
COCO = REPO.parent / "shared" / "data" / "coco-mini"

from leansam.bench import interleaved_timings  # noqa: E402
from leansam.data.sa1b import SA1BDataset, coco_to_sa1b  # noqa: E402
from leansam.io import atomic_write_json  # noqa: E402
from leansam.provenance import describe_environment  # noqa: E402
from leansam.registry import create_model  # noqa: E402
from leansam.train.config import TrainConfig  # noqa: E402
from leansam.train.finetune import FinetuneStep, prepare_sample  # noqa: E402
from leansam.train.loop import channels_last, train_autocast  # noqa: E402
from leansam.train.losses import iou_loss, mask_loss  # noqa: E402


def reference_step(ref, x: torch.Tensor, samples: list[dict]):
    """FinetuneStep's loss, computed with the reference modules on the same encoder input."""
    emb = ref.image_encoder(x)
    losses = []
    pe = ref.prompt_encoder.get_dense_pe()
    for i, s in enumerate(samples):
        sparse, dense = ref.prompt_encoder(points=None, boxes=s["boxes"], masks=None)
        low, iou = ref.mask_decoder(emb[i : i + 1], pe, sparse, dense, s["multimask"])
        loss = mask_loss(low.float(), s["gt"], num_points=0, bce_weight=1.0)
        losses.append(loss + iou_loss(low.float(), s["gt"], iou))
    return torch.cat(losses).mean()


def build_pair(name: str, cfg: TrainConfig):
    from reference import build_reference

    torch.manual_seed(0)
    ours = create_model(name, seed=0).train()
    ref = build_reference(name).train()
    ref.load_state_dict(ours.state_dict())
    channels_last(ours.image_encoder)  # as leansam.train.finetune does
    return FinetuneStep(ours, cfg), ref


def grads(module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def measure(name: str, cfg: TrainConfig, dataset, runs: int) -> dict:
    """One model's row: fp32 losses and gradient difference, then interleaved step timings."""
    ours, ref = build_pair(name, cfg)
    samples = [
        prepare_sample(dataset[i], ours.model.image_size, cfg, np.random.default_rng([0, i]), "cpu")
        for i in range(cfg.batch_size)
    ]
    seeds = list(range(len(samples)))
    x = torch.cat([ours.model.preprocess(s["image"][None]) for s in samples])

    def step(c: TrainConfig, reference: bool) -> torch.Tensor:
        module = ref if reference else ours
        module.zero_grad()
        with train_autocast(c, torch.device("cpu")):
            loss = reference_step(ref, x, samples) if reference else ours(samples, seeds)
        loss.backward()
        return loss

    # the same function: losses and gradients in float32
    fp32 = dataclasses.replace(cfg, amp="none")
    loss_ours, g_ours = step(fp32, False).item(), grads(ours.model)
    loss_ref, g_ref = step(fp32, True).item(), grads(ref)
    rel = {  # |g_leansam - g_reference| / |g_reference| over all weights of each part
        part: float(
            torch.cat([(g_ours.get(k, torch.zeros_like(g)) - g).flatten() for k, g in sel]).norm()
            / torch.cat([g.flatten() for _, g in sel]).norm()
        )
        for part, prefix in (("encoder", "image_encoder."), ("decoder", "mask_decoder."))
        for sel in [[(k, g) for k, g in g_ref.items() if k.startswith(prefix)]]
    }
    stats = interleaved_timings(
        {"reference": lambda: step(cfg, True), "leansam": lambda: step(cfg, False)}, runs=runs
    )
    return {
        "loss_fp32": {"leansam": loss_ours, "reference": loss_ref},
        "grad_rel_diff_fp32": rel,
        "seconds": {k: v.as_dict() for k, v in stats.items()},
        "speedup": stats["reference"].median / stats["leansam"].median,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="leansam-efficientvit-s,leansam-vit-s")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--masks-per-image", type=int, default=4)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/train_step.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        stage="finetune", model=args.models.split(",")[0], data=["unused"], out="unused",
        batch_size=args.batch_size, masks_per_image=args.masks_per_image, num_points=0,
        bce_weight=1.0, iou_loss_weight=1.0, box_prob=1.0, scale_jitter=[0.6, 1.4],
    )  # fmt: skip
    record = {"config": vars(args), "environment": describe_environment(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sa1b = Path(tmp) / "sa1b"
        coco_to_sa1b(
            COCO / "train2017", COCO / "annotations/instances_train2017.json", sa1b, progress=False
        )
        dataset = SA1BDataset(sa1b)
        for name in args.models.split(","):
            record["models"][name] = row = measure(name, cfg, dataset, args.runs)
            secs, rel = row["seconds"], row["grad_rel_diff_fp32"]
            print(
                f"{name}: reference {secs['reference']['median']:.3f} s, leansam "
                f"{secs['leansam']['median']:.3f} s per step ({row['speedup']:.2f}x); fp32 loss "
                f"{row['loss_fp32']['leansam']:.6f} vs {row['loss_fp32']['reference']:.6f}, "
                f"gradients' relative difference: encoder {rel['encoder']:.1e}, "
                f"decoder {rel['decoder']:.1e}",
                file=sys.stderr,
            )
    atomic_write_json(Path(args.out), record)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
