"""Typed training configuration, loadable from YAML recipes (``recipes/*.yaml``)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

from ..errors import InputError, require

#: the training stages (``leansam train <stage>``)
STAGES = ("distill", "finetune", "prompt")


@dataclass
class TrainConfig:
    """One training run. ``stage`` is ``distill`` (stage 1), ``finetune`` (stage 2) or ``prompt``
    (a warm start of the prompt encoder and mask decoder on synthetic geometry, for decoders
    trained from scratch; see ``leansam.train.warmup.prompt_warmup``)."""

    stage: str
    model: str  # the model trained (the student in stage 1)
    data: list[str]  # stage 1: image folders; stage 2: SA-1B folders; prompt: none
    out: str
    #: stage 2: how many times each ``data`` folder is listed per epoch (default once each)
    data_repeat: list[int] | None = None
    #: stage 2 and ``shape_data``: leave out generated masks (``leansam everything`` over a
    #: dataset) whose predicted IoU / stability score is below these (0: keep all; masks without
    #: the score then kept too)
    min_predicted_iou: float = 0.0
    min_stability_score: float = 0.0
    teacher: str | None = None  # stage 1
    teacher_checkpoint: str | None = None
    #: weights to start from (a checkpoint of ``model``); in stage 1 the prompt encoder and mask
    #: decoder are always taken from the teacher
    init_checkpoint: str | None = None
    #: stage 2: take the prompt encoder and mask decoder from this checkpoint of any variant
    #: (e.g. a teacher), after ``init_checkpoint``; the image encoder keeps its weights
    decoder_checkpoint: str | None = None
    epochs: float = 2.0
    batch_size: int = 4  # images per process
    masks_per_image: int = 64  # stage 2: resampled with replacement when an image has fewer
    #: learning rate per process; the run uses lr x world size (SPEC: 8e-7 for L, 4e-7 for XL)
    lr: float = 8e-7
    #: the prompt encoder's and mask decoder's learning rate as a multiple of ``lr`` (issue 21: a
    #: warm-started decoder keeps its box prior while an encoder learns from scratch)
    decoder_lr_scale: float = 1.0
    #: start the image encoder's last LayerNorm at weight and bias 0 (an encoder trained from
    #: scratch): the image embedding is then zero at step 0, so training starts from exactly the
    #: warm-started decoder's content-free box prior instead of random features that scramble it
    #: (issue 21), and the encoder's contribution grows from nothing (ControlNet's zero
    #: convolution; the architecture is unchanged)
    embedding_zero_init: bool = False
    #: stage ``finetune`` with ``decoder_checkpoint``: weight of a loss that keeps the starting
    #: prompt encoder and decoder's box prior while they learn to read the image (Learning
    #: without Forgetting, Li & Hoiem 2016): on a zero image embedding, the trained decoder's
    #: low-res logits, single-mask and multimask outputs alike, are fitted to the frozen starting
    #: decoder's probabilities for the same box prompts (``losses.prior_distill_loss``: a
    #: class-balanced KL; point prompts, which a box prior does not know, are left out). 0: off.
    #: Costs two decoder passes per boxed mask and no encoder pass. Experimental: MODEL_CARD.md
    #: (issue 21) has its measured runs
    prior_distill_weight: float = 0.0
    weight_decay: float = 0.1
    #: linear warm-up over the first steps before the cosine decay (0: none, as in the paper's
    #: stage 2 that starts from trained weights; useful when training from scratch)
    warmup_steps: int = 0
    grad_clip: float = 2.0  # by value
    num_points: int = 112 * 112
    #: prompt simulation (SPEC: a box with p 0.5, else 1-10 points; multimask with p 0.5)
    box_prob: float = 0.5
    multimask_prob: float = 0.5
    #: stage 2, point prompts: SAM's interactive training (Kirillov et al. 2023, appendix A,
    #: "Training algorithm") instead of 1-10 positive points. One positive point is drawn from
    #: each mask, then 0 to ``click_rounds`` more (uniform per image): each round the model
    #: predicts from the clicks so far, without gradient (the output with the highest predicted
    #: IoU, as the click protocol of SPEC section 6 takes), and a click is drawn uniformly from
    #: that prediction's error region, positive on a missed pixel and negative on a spurious one.
    #: The loss is on the prediction from all the clicks. SAM also feeds the previous low-res
    #: logits back as a mask prompt; leansam does not, as its click protocol does not. 0: off
    #: (SPEC section 5's points)
    click_rounds: int = 0
    focal: bool = False
    #: weight of the BCE (or focal) term next to Dice; SPEC: 20 (fine-tuning a trained SAM). From
    #: scratch, 20 drives every mask to background for hundreds of steps: leansam's own models use 1
    bce_weight: float = 20.0
    #: class-balanced BCE: the mean over each mask's object pixels and the mean over its
    #: background, averaged; plain BCE averages over every pixel, where a small object's pixels
    #: hardly count and an empty mask is nearly free (issue 21's diagnosis)
    bce_balanced: bool = False
    #: weight of SAM's IoU-head loss (MSE to the masks' actual IoU): 0 in the paper's stage 2,
    #: which starts from SAM's trained head; needed when training a decoder from scratch, or the
    #: best-predicted-IoU choice among multimask outputs is random
    iou_loss_weight: float = 0.0
    flip_prob: float = 0.5
    #: random rescale of the image before the long-side resize, e.g. [0.5, 1.0]: more variety for
    #: small datasets (the object masks follow)
    scale_jitter: list[float] | None = None
    seed: int = 0
    #: none | bf16 | fp16 (autocast on GPU; bf16 also on CPU) | auto (bf16 on a GPU or on a CPU
    #: with native bf16, AVX-512 BF16 or AMX; else none: emulated bf16 is several times slower)
    amp: str = "none"
    save_every: int = 50  # steps between checkpoints (and at the end)
    cache_fp16: bool = True  # stage 1: store teacher embeddings in fp16
    #: stage 1: also train on every image mirrored (with the teacher's embedding of the mirror,
    #: cached too): twice the data and cache for small datasets
    distill_flips: bool = False
    max_steps: int | None = None  # stop early (the schedule still spans ``epochs``)
    #: BatchNorm in eval mode (running statistics, affine still trained). Default: frozen in stage
    #: 2, where a few images per process give noisy batch statistics and would make the result
    #: depend on how the batch is split; trained in stage 1 (SyncBatchNorm across GPUs; CPU
    #: processes then each normalise over their own images).
    freeze_bn: bool | None = None
    #: stage ``prompt``: side of the content-free image-embedding grid the decoder is trained on
    #: (the positional encodings are resolution-free, so 16 x 16 transfers to SAM's 64 x 64 at a
    #: 16th of the cost) and the synthetic boxes that make one epoch (batch_size boxes per step)
    grid: int = 16
    items_per_epoch: int = 4096
    #: stage ``prompt``, synthetic boxes: train instead on a ``grid_window`` x ``grid_window``
    #: window of the model's full-resolution grid (cells of 16 px of the 1024 frame at SAM's
    #: 64 x 64), placed at random each step, with all of that step's boxes inside it: small boxes
    #: at their real resolution for the cost of a ``grid_window`` grid (``grid`` is then unused
    #: unless ``grid_window_share`` < 1).
    #: 0: off. ``grid_window_share``: the share of steps on the window (chosen per step); the
    #: others run on ``grid`` with boxes at least the window's size (before clipping to the
    #: frame), so that both stay learned.
    grid_window: int = 0
    grid_window_share: float = 1.0
    #: stage ``prompt``, synthetic boxes: SA-1B folders whose masks give the targets' shapes.
    #: Each box then gets a real object's mask (cropped to its bounding box, drawn at random),
    #: stretched over the box, whose aspect ratio is the object's: the decoder learns the shape
    #: an object in a box of that size and aspect has (the best content-free answer; COCO's
    #: inscribed ellipses already beat filling the box) instead of the box itself. Only the
    #: masks are read, never the images. Empty: the box itself.
    shape_data: list[str] = dataclasses.field(default_factory=list)
    #: stage ``prompt``: width and height of the synthetic boxes, as fractions of the frame, drawn
    #: uniformly (or log-uniformly with ``box_size_log``)
    box_sizes: list[float] = dataclasses.field(default_factory=lambda: [0.03, 0.6])
    box_size_log: bool = False
    #: stage ``prompt``, synthetic boxes: a size curriculum. The sizes start at
    #: ``box_sizes_start`` ([min, max], fractions of the frame) and move linearly to ``box_sizes``
    #: over the first ``box_size_ramp`` steps. Large boxes first leave no all-background answer
    #: (a decoder from scratch can otherwise stay there, on some seeds for good; MODEL_CARD.md).
    #: None / 0: ``box_sizes`` from the first step.
    box_sizes_start: list[float] | None = None
    box_size_ramp: int = 0
    #: stage ``prompt``: after the last step, the content-free decoder must draw boxes of about
    #: 128 and 256 px of the 1024 frame (``leansam.eval.diagnose.box_drawing``, 32 boxes each) at
    #: a mean IoU of at least this, or the stage fails (``TrainingError``) without writing
    #: ``model.pt``: a warm start that stayed on the all-background plateau (or paints the whole
    #: frame) would otherwise be passed on to stage 2 silently. 0: no check.
    min_box_iou: float = 0.0
    #: standard deviation of the prompt encoder's random Fourier frequencies for a decoder trained
    #: from scratch (SAM: 1.0, whose shortest wavelength is ~160 px of the 1024 frame: boxes
    #: smaller than that come out as blobs). A list splits the frequencies into equal groups, one
    #: per scale (e.g. [1, 4]: low ones to find the box, high ones to draw small ones). Drawn once
    #: with ``seed``; stored in the checkpoint. None keeps the model's own. In stage ``prompt``
    #: with ``decoder_checkpoint`` it replaces the checkpoint's frequencies, to go on training a
    #: warm start with other ones (a group drawn with the warm start's own seed and scale is
    #: unchanged: [1, 4] on a scale-1 warm start keeps its first half).
    pe_scale: float | list[float] | None = None
    #: learning curve: every ``eval_every`` steps (and before the first), rank 0 runs the box
    #: diagnosis (``leansam.eval.diagnose``) of the model on the first ``eval_limit`` images of
    #: the COCO dataset ``eval_images`` / ``eval_annotations`` and appends it to ``curve.jsonl``
    #: (0: off). Monitoring only: nothing is trained or selected on it.
    eval_every: int = 0
    eval_images: str | None = None
    eval_annotations: str | None = None
    eval_limit: int = 16

    def __post_init__(self) -> None:
        self._check_numbers()
        _check_stage(self.stage)
        if self.stage == "distill" and not self.teacher:
            raise InputError("stage 1 (distill) needs a teacher model")
        if self.amp not in ("none", "bf16", "fp16", "auto"):
            raise InputError(f"amp must be none, bf16, fp16 or auto, got {self.amp!r}")
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data and self.stage != "prompt":
            raise InputError("no training data given")
        positive = ("grid", "items_per_epoch", "batch_size", "masks_per_image", "epochs", "lr")
        for name in (*positive, "save_every"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "weight_decay", "grad_clip", "bce_weight", "iou_loss_weight", "prior_distill_weight",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be 0 or positive, got {getattr(self, name)}")
        if self.decoder_lr_scale < 0:
            raise InputError(
                f"decoder_lr_scale must be 0 (frozen) or positive, got {self.decoder_lr_scale}"
            )
        for name in ("box_sizes", "box_sizes_start"):
            pair = getattr(self, name)
            if pair is not None and not _size_range(pair):
                raise InputError(f"{name} must be [min, max] with 0 < min <= max <= 1, got {pair}")
        if self.box_size_ramp < 0:
            raise InputError(
                f"box_size_ramp must be 0 (off) or a number of steps, got {self.box_size_ramp}"
            )
        if (self.box_sizes_start is None) != (self.box_size_ramp == 0):
            raise InputError(
                "box_sizes_start and box_size_ramp make a size curriculum: set both "
                "(box_size_ramp > 0 steps) or neither"
            )
        if self.data_repeat is not None and (
            len(self.data_repeat) != len(self.data) or min(self.data_repeat) < 0
        ):
            raise InputError("data_repeat needs one count >= 0 per data folder")
        if self.freeze_bn is None:
            self.freeze_bn = self.stage == "finetune"
        if not (0 <= self.box_prob <= 1 and 0 <= self.multimask_prob <= 1):
            raise InputError("box_prob and multimask_prob must lie in [0, 1]")
        if self.warmup_steps < 0:
            raise InputError("warmup_steps must be 0 or positive")
        if self.click_rounds < 0:
            raise InputError(f"click_rounds must be 0 (off) or positive, got {self.click_rounds}")
        if self.click_rounds and (self.stage != "finetune" or self.box_prob == 1):
            raise InputError(
                "click_rounds simulates corrective clicks on point prompts: stage finetune with "
                "box_prob below 1"
            )
        if self.pe_scale is not None:
            values = self.pe_scale if isinstance(self.pe_scale, list) else [self.pe_scale]
            if not values or min(values) <= 0:  # numbers already (_check_numbers)
                raise InputError(
                    f"pe_scale must be a number > 0 or a list of them (SAM's: 1.0), got "
                    f"{self.pe_scale}"
                )
            if (
                self.stage == "distill"
                or self.init_checkpoint
                or (self.decoder_checkpoint and self.stage != "prompt")
            ):
                raise InputError(
                    "pe_scale draws the positional encoding of a prompt encoder trained from "
                    "scratch: not in stage distill, nor with "
                    "init_checkpoint, nor with decoder_checkpoint outside stage prompt"
                )
        if self.embedding_zero_init and (self.stage != "finetune" or self.init_checkpoint):
            raise InputError(
                "embedding_zero_init starts an image encoder trained from scratch at zero: stage "
                "finetune only, without init_checkpoint"
            )
        if self.prior_distill_weight and (self.stage != "finetune" or not self.decoder_checkpoint):
            raise InputError(
                "prior_distill_weight keeps the box prior of a decoder_checkpoint: stage finetune "
                "with decoder_checkpoint only"
            )
        if self.prior_distill_weight and not (self.box_prob and self.decoder_lr_scale):
            raise InputError(
                "prior_distill_weight acts on box prompts of a decoder that trains: set box_prob "
                "and decoder_lr_scale above 0, or prior_distill_weight to 0"
            )
        share = self.grid_window_share
        if not 0 < share <= 1 or (share != 1 and not self.grid_window):
            raise InputError(
                "grid_window_share must lie in (0, 1], and below 1 only with grid_window"
            )
        if self.grid_window < 0:
            raise InputError("grid_window must be 0 (off) or a number of cells")
        synthetic_only = {
            "grid_window": "a window of the full grid for synthetic boxes",
            "shape_data": "object shapes for synthetic boxes",
            "box_sizes_start": "a size curriculum for synthetic boxes",
        }
        for name, what in synthetic_only.items():
            if getattr(self, name) and (self.stage != "prompt" or self.data):
                raise InputError(f"{name} ({what}) is for stage prompt without data; remove it")
        if self.stage == "prompt" and self.data and self.box_prob != 1:
            raise InputError(
                "stage prompt with data trains the box prior: set box_prob: 1.0 (point prompts "
                "are not part of it)"
            )
        if not 0 <= self.min_box_iou < 1:
            raise InputError(f"min_box_iou must lie in [0, 1), got {self.min_box_iou}")
        if self.min_box_iou and self.stage != "prompt":
            raise InputError(f"min_box_iou is for stage prompt only, not {self.stage}: remove it")
        if self.eval_every < 0 or self.eval_limit < 1:
            raise InputError("eval_every must be 0 or positive and eval_limit at least 1")
        if self.eval_every and not (self.eval_images and self.eval_annotations):
            raise InputError("eval_every needs eval_images and eval_annotations (a COCO dataset)")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> TrainConfig:
        yaml = require("yaml", "train")
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise InputError(f"recipe not found: {path}") from None
        except OSError as e:
            raise InputError(f"recipe {path} cannot be read: {e.strerror}") from None
        except yaml.YAMLError as e:
            where = " ".join(str(e).split())  # one line: the problem and its line and column
            raise InputError(f"recipe {path} is not valid YAML: {where}") from None
        if not isinstance(raw, dict):
            raise InputError(f"recipe {path} must be a mapping of keys (stage: ..., model: ...)")
        if "stage" in raw:
            _check_stage(raw["stage"], f"recipe {path}: ")
        stage = overrides.get("stage")
        if stage and raw.get("stage", stage) != stage:
            raise InputError(
                f"recipe {path} is for stage {raw['stage']}: run leansam train {raw['stage']}"
            )
        raw.update({k: v for k, v in overrides.items() if v is not None})
        if raw.get("stage") == "prompt":
            raw.setdefault("data", [])  # synthetic: no data folders
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            import difflib

            hints = [difflib.get_close_matches(k, names, n=1) for k in unknown]
            named = [
                f"{k} (did you mean {h[0]}?)" if h else k
                for k, h in zip(unknown, hints, strict=True)
            ]
            raise InputError(f"recipe {path}: unknown keys {', '.join(named)}")
        defaults = cls.defaults()
        required = [f.name for f in dataclasses.fields(cls) if f.name not in defaults]
        missing = [k for k in required if k not in raw]
        if missing == ["data"]:
            raise InputError(f"recipe {path}: no training data given: set data or pass --data")
        if missing:
            raise InputError(f"recipe {path}: missing required keys {', '.join(missing)}")
        if raw.get("stage") == "prompt":  # two keys that stage prompt once silently ignored
            why = {"num_points": "its loss is dense, on every logit"}
            if not raw.get("data"):
                why["masks_per_image"] = "without data each step is batch_size boxes"
            for key, reason in why.items():
                if key in raw:
                    raise InputError(
                        f"recipe {path}: stage prompt does not use {key} ({reason}): remove it"
                    )
        return cls(**raw)

    def _check_numbers(self) -> None:
        """Number fields hold finite numbers, in lists too: YAML reads ``1e-6`` (no dot) as a
        string, which is taken as the number it spells; an int takes a whole float (``2.0``);
        flags hold true or false; anything else is one clear error instead of a TypeError deep
        in training."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kinds = [k.strip() for k in f.type.split("|")]
            if value is None and "None" in kinds:
                continue
            if "bool" in kinds and not isinstance(value, bool):
                raise InputError(f"{f.name} must be true or false, got {value!r}")
            scalar = next((k for k in kinds if k in ("float", "int")), None)
            listed = next((k[5:-1] for k in kinds if k in ("list[float]", "list[int]")), None)
            if isinstance(value, list) and listed:
                setattr(self, f.name, [_number(f.name, v, listed, True) for v in value])
            elif scalar:
                setattr(self, f.name, _number(f.name, value, scalar))

    def box_sizes_at(self, step: int) -> tuple[float, float]:
        """The synthetic boxes' [min, max] size at ``step`` (0-based): ``box_sizes_start``
        moving linearly to ``box_sizes`` over ``box_size_ramp`` steps, then ``box_sizes``."""
        if self.box_sizes_start is None or step >= self.box_size_ramp:
            return float(self.box_sizes[0]), float(self.box_sizes[1])
        t = step / self.box_size_ramp
        lo, hi = (
            (1 - t) * a + t * b for a, b in zip(self.box_sizes_start, self.box_sizes, strict=True)
        )
        return lo, hi

    def pe_scales(self) -> list[float]:
        """``pe_scale`` as a list of scales (one per equal group of frequencies)."""
        scales = self.pe_scale if isinstance(self.pe_scale, list) else [self.pe_scale]
        return [float(v) for v in scales]

    @classmethod
    def defaults(cls) -> dict:
        """The default value of every field that has one."""
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_stage(stage: object, where: str = "") -> None:
    """:class:`InputError` (its message after ``where``) unless ``stage`` is one of STAGES."""
    if stage not in STAGES:
        names = f"{', '.join(STAGES[:-1])} or {STAGES[-1]}"
        raise InputError(f"{where}stage must be {names}, got {stage!r}")


def _number(name: str, value: object, kind: str, listed: bool = False) -> int | float:
    """``value`` as a finite ``kind`` ("int" or "float") for field ``name`` (an element of it with
    ``listed``): a string is read as the number it spells, an int field takes a whole float; else
    :class:`InputError`."""
    v = value
    if isinstance(v, str):
        with contextlib.suppress(ValueError):
            v = float(v)
    if isinstance(v, numbers.Real) and not isinstance(v, bool | numbers.Integral):
        v = float(v)
        if kind == "int" and v.is_integer():
            v = int(v)
    ok = numbers.Integral if kind == "int" else numbers.Real
    if isinstance(v, bool) or not isinstance(v, ok) or not math.isfinite(v):
        what = "an integer such as 4" if kind == "int" else "a finite number such as 1.0e-3"
        rule = f"must hold numbers ({what})" if listed else f"must be {what}"
        raise InputError(f"{name} {rule}, got {value!r}")
    return int(v) if kind == "int" else float(v)


def _size_range(pair: object) -> bool:
    """Whether ``pair`` is [min, max] fractions of the frame with 0 < min <= max <= 1."""
    return (
        isinstance(pair, list | tuple)
        and len(pair) == 2
        and all(isinstance(v, int | float) for v in pair)
        and 0 < pair[0] <= pair[1] <= 1
    )
