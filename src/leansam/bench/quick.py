"""``leansam bench``: how fast a model runs on this machine, per encoder runtime and per prompt.

The comparison against the reference implementations (test-only packages) lives in
``benchmarks/speed.py``; this command needs only leansam and measures what a user deciding on a
runtime and a batch size wants to know, on their own machine and threads.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import InputError
from .timing import interleaved_timings


def quick_bench(
    model_name: str,
    *,
    checkpoint: str | None = None,
    runtimes: tuple[str, ...] = ("torch", "torch-opt"),
    batch: int = 1,
    boxes: tuple[int, ...] = (1, 16, 64),
    runs: int = 5,
    calib_images: str | None = None,
    image: np.ndarray | None = None,
    progress: bool = False,
) -> dict:
    """Median seconds per image of the image encoder on each runtime (interleaved, same input),
    each runtime's max abs difference from eager, the set-up time (compilation, export,
    calibration), and the decoder's milliseconds per box for the given boxes-per-call counts:
    eager, and on each runtime with its own decoder pass (``make_decoder``: torch-opt, openvino*).
    ``progress``: a bar on stderr over set-ups and timed calls."""
    from ..loading import load_model
    from ..predictor import SamPredictor
    from ..progress import progress_bar
    from ..provenance import describe_environment
    from ..runtime import (
        INT8_RUNTIMES,
        check_runtime,
        make_decoder,
        make_encoder,
        runtime_calibration,
    )

    for r in runtimes:
        check_runtime(r)
    if batch < 1 or runs < 1 or any(n < 1 for n in boxes):
        raise InputError("--batch, --runs and --boxes must be positive")
    # one set of calibration images serves every INT8 runtime asked for
    int8 = [r for r in runtimes if r in INT8_RUNTIMES]
    calib = runtime_calibration(int8[0], calib_images) if int8 else None
    model = load_model(model_name, checkpoint)
    checkpoint = model.checkpoint_path
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pred = SamPredictor(model)
    x = pred.encoder_input(image).expand(batch, -1, -1, -1)
    prepared = None
    if calib is not None:
        prepared = [pred.encoder_input(im) for im in calib]
    encoders, setup = {}, {}
    # the decoder eagerly, and on every asked-for runtime that has its own decoder pass
    impls = {"torch": None}
    for r in runtimes:
        impl = make_decoder(model, r)
        if impl is not None:
            impls[r] = impl
    calls = len(runtimes) * (1 + (runs + 1)) + len(impls) * len(boxes) * (runs + 1)
    bar = progress_bar(total=calls, desc="bench", enabled=progress, unit="call")
    with torch.inference_mode():
        want = model.image_encoder(x)
        for r in runtimes:
            t0 = time.perf_counter()
            encoders[r] = make_encoder(model, r, calibration=prepared)
            encoders[r](x)  # compile / first run
            setup[r] = time.perf_counter() - t0
            bar.update(1)
        diffs = {r: (e(x) - want).abs().max().item() for r, e in encoders.items()}
        enc_stats = interleaved_timings(
            {r: (lambda e=e: e(x)) for r, e in encoders.items()},
            runs=runs,
            warmup=1,
            after_call=bar.update,
        )
        pred.set_image(image)
        h, w = image.shape[:2]
        g = np.random.default_rng(1)
        n_max = max(boxes)
        xy = g.uniform(0, [w * 0.8, h * 0.8], size=(n_max, 2))
        box_arr = np.concatenate([xy, xy + g.uniform(8, [w * 0.2, h * 0.2], size=(n_max, 2))], 1)

        def decode(impl, n):
            pred.decode_impl = impl
            return pred.predict(box=box_arr[:n], multimask_output=True)

        dec_stats = interleaved_timings(
            {(r, n): (lambda i=i, n=n: decode(i, n)) for r, i in impls.items() for n in boxes},
            runs=runs,
            warmup=1,
            after_call=bar.update,
        )
    bar.close()
    per_box = {r: {} for r in impls}
    for (r, n), st in dec_stats.items():
        per_box[r][str(n)] = 1000 * st.median / n
    return {
        "model": model_name,
        "checkpoint": checkpoint,
        "batch": batch,
        "encoder": {
            r: {
                "seconds_per_image": s.median / batch,
                "min": s.min / batch,
                "max": s.max / batch,
                "setup_s": setup[r],
                "max_abs_diff_vs_eager": diffs[r],
            }
            for r, s in enc_stats.items()
        },
        "decoder_ms_per_box": per_box["torch"],
        # runtimes with their own decoder pass (torch-opt, openvino*): README "Runtimes"
        "decoder_ms_per_box_by_runtime": {r: v for r, v in per_box.items() if r != "torch"},
        "environment": describe_environment(),
    }


def format_bench(result: dict) -> str:
    lines = [
        f"{result['model']}, encoder batch {result['batch']}, "
        f"{result['environment']['torch_threads']} threads",
        f"{'runtime':<12} {'s/image':>9} {'min-max':>15} {'set-up s':>9} {'max diff':>9}",
    ]
    for r, e in result["encoder"].items():
        lines.append(
            f"{r:<12} {e['seconds_per_image']:>9.3f} {e['min']:>7.3f}-{e['max']:<7.3f} "
            f"{e['setup_s']:>9.1f} {e['max_abs_diff_vs_eager']:>9.1e}"
        )
    decoders = {"torch": result["decoder_ms_per_box"], **result["decoder_ms_per_box_by_runtime"]}
    for r, ms in decoders.items():
        per_box = ", ".join(f"{v:.1f} ms/box at {n} per call" for n, v in ms.items())
        lines.append(f"decoder on {r} (multimask, masks at full size): {per_box}")
    return "\n".join(lines)
