"""Side-by-side timing of several callables on the same machine, in the same run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Stats:
    """Seconds per call over ``runs`` timed calls."""

    runs: int
    median: float
    mean: float
    min: float
    max: float
    stdev: float

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        return cls(
            runs=len(samples),
            median=statistics.median(samples),
            mean=statistics.fmean(samples),
            min=min(samples),
            max=max(samples),
            stdev=statistics.stdev(samples) if len(samples) > 1 else 0.0,
        )

    def as_dict(self) -> dict:
        return asdict(self)


def device_synchronizer() -> Callable[[], None]:
    """A function that waits for the GPU (``torch.cuda.synchronize``) whenever CUDA is in use in
    this process, checked at each call (CUDA may start during warm-up); kernels run
    asynchronously, so without it a GPU timing measures the launch, not the work."""
    import torch

    def sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    return sync


def interleaved_timings(
    fns: dict[str, Callable[[], object]],
    *,
    runs: int = 10,
    warmup: int = 2,
    after_call: Callable[[], object] | None = None,
) -> dict[str, Stats]:
    """Time each callable ``runs`` times, alternating between them every round so that drift of
    the machine (clock, other load, cache state) falls on all of them alike; on a GPU every timed
    call is bracketed by device synchronisation (:func:`device_synchronizer`). ``after_call``
    runs after every call, outside the timed region (a progress bar's update)."""
    after_call = after_call or (lambda: None)
    sync = device_synchronizer()
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            after_call()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(runs):
        # alternate the order too, so no callable always runs right after another
        order = list(fns) if i % 2 == 0 else list(reversed(fns))
        for name in order:
            sync()  # the clock starts when earlier GPU work is done ...
            t0 = time.perf_counter()
            fns[name]()
            sync()  # ... and stops when this call's kernels are
            samples[name].append(time.perf_counter() - t0)
            after_call()
    return {name: Stats.of(s) for name, s in samples.items()}
