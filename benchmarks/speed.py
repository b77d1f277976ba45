"""Speed of leansam against the reference code, measured side by side in one run (issue 6).

    .venv/bin/python benchmarks/speed.py --out benchmarks/results/speed.json

Sections (``--sections``, default all):

runtimes  EfficientViT-SAM-L0 image encoder, batch 1 and 8: the reference code (efficientsam, eager)
          and leansam on every runtime (torch, torch-bf16, torch-opt, onnx, onnx-int8), same
          random weights, interleaved round by round; max abs diff of each embedding against the
          reference's.
encoders  Image-encoder latency (batch 1, eager fp32, and leansam's torch-opt) of leansam L0..XL1
          against SAM-ViT-B/H (segment_anything) and MobileSAM (mobile_sam), each model in a fresh
          process: latency, peak resident memory, GFLOP per image (torch's FLOP counter) and the
          achieved GFLOP/s against this machine's measured fp32 matmul peak.
decoder   Prompt decoding through the predictors (prompt encoder, decoder, masks at full
          resolution, multimask): the reference SamPredictor with 1 and 16 boxes per call vs
          leansam with 1, 16 and 64 boxes per call; milliseconds per box.
amg       Segment everything, 32 x 32 grid, no crops, on a coco-mini image with leansam's shipped
          student: the reference generator (efficientsam's copy of segment_anything's
          SamAutomaticMaskGenerator) vs leansam's, SAM's default thresholds and with the filters
          relaxed (every candidate goes through up-sampling: the worst case for leansam's early
          filtering); mask agreement (share of masks with a partner of IoU >= 0.95, both ways).

Every timing is a median over ``--runs`` rounds after warm-up (see leansam.bench).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / "tests" / "stubs"
IMAGE = REPO.parent / "shared/data/coco-mini/val2017/000000000139.jpg"
CALIB = REPO.parent / "shared/data/coco-mini/train2017"

from leansam import SamPredictor, create_model  # noqa: E402
from leansam.bench import Stats, interleaved_timings  # noqa: E402
from leansam.io import atomic_write_json, load_image  # noqa: E402
from leansam.provenance import describe_environment  # noqa: E402


def _stubs() -> None:
    """The reference packages import torchvision / timm at module level; where they are absent
    the test suite's stand-ins (tests/stubs) satisfy the imports."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None or importlib.util.find_spec("timm") is None:
        sys.path.insert(0, str(STUBS))


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stats(s) -> dict:
    return s.as_dict()


# ---------------------------------------------------------------------------- runtimes
def _evit_reference(name: str):
    _stubs()
    from efficientsam.sam_model_zoo import create_efficientvit_sam_model

    return create_efficientvit_sam_model(name, pretrained=False).eval()


def _leansam_from(ref) -> torch.nn.Module:
    name = "efficientvit-sam-l0"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "w.pt"
        torch.save(ref.state_dict(), path)
        return create_model(name, checkpoint=path)


def bench_runtimes(runs: int) -> dict:
    from leansam.runtime import calibration_images, make_encoder

    torch.manual_seed(0)
    ref = _evit_reference("efficientvit-sam-l0")
    ours = _leansam_from(ref)
    image = load_image(IMAGE)
    pred = SamPredictor(ours)
    x1 = pred.encoder_input(image)
    calib = [pred.encoder_input(im) for im in calibration_images(CALIB)]
    t0 = time.perf_counter()
    encoders = {
        "torch": make_encoder(ours, "torch"),
        "torch-bf16": make_encoder(ours, "torch-bf16"),
        "torch-opt": make_encoder(ours, "torch-opt"),
        "onnx": make_encoder(ours, "onnx"),
        "onnx-int8": make_encoder(ours, "onnx-int8", calibration=calib),
    }
    out = {"setup_s": time.perf_counter() - t0, "batches": {}}
    for batch in (1, 8):
        x = x1.expand(batch, -1, -1, -1).contiguous()
        with torch.inference_mode():
            want = ref.image_encoder(x)
            diffs = {k: (e(x) - want).abs().max().item() for k, e in encoders.items()}
            fns = {"reference": lambda x=x: ref.image_encoder(x)}
            fns.update({k: (lambda e=e, x=x: e(x)) for k, e in encoders.items()})
            stats = interleaved_timings(fns, runs=max(3, runs // (2 if batch > 1 else 1)))
        ref_med = stats["reference"].median
        out["batches"][batch] = {
            k: {
                **_stats(s),
                "per_image_s": s.median / batch,
                "speedup_vs_reference": ref_med / s.median,
                "max_abs_diff": diffs.get(k, 0.0),
            }
            for k, s in stats.items()
        }
        print(
            f"runtimes batch {batch}: "
            + ", ".join(f"{k} {s.median:.3f}s" for k, s in stats.items()),
            file=sys.stderr,
        )
    return out


# ---------------------------------------------------------------------------- encoders
def _matmul_peak_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    t = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        t.append(time.perf_counter() - t0)
    return 2 * 2048**3 / min(t) / 1e9


def _build_encoder(name: str):
    """(encoder module, input tensor) with random weights for a leansam or reference model."""
    _stubs()
    if name.startswith("leansam:"):
        model = create_model(name.split(":", 1)[1]).eval()
        r = model.image_size
        return model.image_encoder, torch.randn(1, 3, r, r), model
    if name in ("sam-vit-b", "sam-vit-h"):
        from segment_anything import sam_model_registry

        model = sam_model_registry["vit_" + name[-1]]().eval()
    elif name == "mobilesam":
        from mobile_sam import sam_model_registry

        model = sam_model_registry["vit_t"]().eval()
    else:
        raise ValueError(name)
    return model.image_encoder, torch.randn(1, 3, 1024, 1024), None


def encoder_child(name: str, runs: int, threads: int) -> dict:
    """Runs in a fresh process: one encoder's latency, FLOPs and peak memory."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    enc, x, model = _build_encoder(name)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            enc(x)
        flops = counter.get_total_flops()
        rows = {"eager": lambda: enc(x)}
        if model is not None:
            from leansam.runtime import make_encoder

            opt = make_encoder(model, "torch-opt")
            t0 = time.perf_counter()
            opt(x)
            rows["torch-opt"] = lambda: opt(x)
            compile_s = time.perf_counter() - t0
        stats = interleaved_timings(rows, runs=runs, warmup=1)
    out = {
        "model": name,
        "input": list(x.shape),
        "gflop": flops / 1e9,
        "peak_rss_mib": _peak_rss_mib(),
        **{k: _stats(s) for k, s in stats.items()},
    }
    if model is not None:
        out["compile_s"] = compile_s
    return out


def bench_encoders(runs: int, threads: int, models: list[str]) -> dict:
    peak = _matmul_peak_gflops()
    rows = []
    for name in models:
        n = 3 if name in ("sam-vit-h", "sam-vit-b") else runs
        cmd = [
            sys.executable,
            __file__,
            "--encoder-child",
            name,
            "--runs",
            str(n),
            "--threads",
            str(threads),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        for k in ("eager", "torch-opt"):
            if k in row:
                row[k]["gflops_per_s"] = row["gflop"] / row[k]["median"]
                row[k]["share_of_peak"] = row[k]["gflops_per_s"] / peak
        rows.append(row)
        print(f"encoder {name}: eager {row['eager']['median']:.3f}s", file=sys.stderr)
    return {"matmul_peak_gflops": peak, "rows": rows}


# ---------------------------------------------------------------------------- decoder
def bench_decoder(runs: int) -> dict:
    _stubs()
    from efficientsam.models.efficientvit.sam import EfficientViTSamPredictor

    torch.manual_seed(0)
    ref = _evit_reference("efficientvit-sam-l0")
    ours = _leansam_from(ref)
    image = load_image(IMAGE)
    rp, op = EfficientViTSamPredictor(ref), SamPredictor(ours)
    opt = SamPredictor(ours, "torch-opt")  # compiled decoder
    ovp = SamPredictor(ours, "openvino")  # the decoder's transformer on OpenVINO f32
    for p in (rp, op, opt, ovp):
        p.set_image(image)
    g = np.random.default_rng(0)
    h, w = image.shape[:2]
    xy = g.uniform(0, [w * 0.8, h * 0.8], size=(64, 2))
    boxes = np.concatenate([xy, xy + g.uniform(20, [w * 0.2, h * 0.2], size=(64, 2))], 1)

    def ref_batch(n):
        t = rp.apply_boxes_torch(torch.as_tensor(boxes[:n], dtype=torch.float))
        return rp.predict_torch(None, None, boxes=t, multimask_output=True)

    fns = {
        "reference x1": lambda: rp.predict(box=boxes[0], multimask_output=True),
        "reference x16": lambda: ref_batch(16),
        "leansam x1": lambda: op.predict(box=boxes[0], multimask_output=True),
        "leansam x16": lambda: op.predict(box=boxes[:16], multimask_output=True),
        "leansam x64": lambda: op.predict(box=boxes, multimask_output=True),
        "leansam torch-opt x64": lambda: opt.predict(box=boxes, multimask_output=True),
        "leansam openvino x64": lambda: ovp.predict(box=boxes, multimask_output=True),
    }
    with torch.inference_mode():
        a = rp.predict(box=boxes[0], multimask_output=True)
        b = op.predict(box=boxes[0], multimask_output=True)
        agreement = float((a[0] == b[0]).mean())
        c = opt.predict(box=boxes, multimask_output=True)  # compiles the decoder
        eager = op.predict(box=boxes, multimask_output=True)[0]
        agreement_opt = float((eager == c[0]).mean())
        agreement_ov = float((eager == ovp.predict(box=boxes, multimask_output=True)[0]).mean())
        stats = interleaved_timings(fns, runs=runs)
    per_box = {k: s.median / int(k.split("x")[1]) for k, s in stats.items()}
    return {
        "mask_agreement_single_box": agreement,
        "mask_agreement_torch_opt_x64": agreement_opt,
        "mask_agreement_openvino_x64": agreement_ov,
        "ms_per_box": {k: 1000 * v for k, v in per_box.items()},
        "stats": {k: _stats(s) for k, s in stats.items()},
        "speedup_x64_vs_reference_x1": per_box["reference x1"] / per_box["leansam x64"],
        "speedup_torch_opt_x64_vs_reference_x1": per_box["reference x1"]
        / per_box["leansam torch-opt x64"],
        "speedup_openvino_x64_vs_reference_x1": per_box["reference x1"]
        / per_box["leansam openvino x64"],
    }


# ---------------------------------------------------------------------------- amg
def _match(a: list[dict], b: list[dict]) -> float:
    if not a:
        return 1.0
    if not b:
        return 0.0
    bs = np.stack([r["segmentation"] for r in b])
    hits = 0
    for r in a:
        m = r["segmentation"]
        iou = (bs & m).sum((1, 2)) / np.maximum((bs | m).sum((1, 2)), 1)
        hits += bool((iou >= 0.95).any())
    return hits / len(a)


AMG_SETTINGS = {
    "sam-defaults": {},
    "relaxed (iou 0, stability 0.3)": dict(pred_iou_thresh=0.0, stability_score_thresh=0.3),
}


def bench_amg(runs: int, settings: list[str] | None = None, openvino: bool = True) -> dict:
    _stubs()
    sys.path.insert(0, str(REPO / "tests"))
    from efficientsam.models.efficientvit.sam import EfficientViTSamAutomaticMaskGenerator
    from reference import build_reference

    from leansam.amg import SamAutomaticMaskGenerator

    ours = create_model("leansam-efficientvit-s", pretrained=True).float().eval()
    ref = build_reference("leansam-efficientvit-s")
    ref.load_state_dict(ours.state_dict())
    image = load_image(IMAGE)
    out = {}
    for setting, kw in AMG_SETTINGS.items():
        if settings and setting.split()[0] not in settings:
            continue
        gens = {
            "reference": EfficientViTSamAutomaticMaskGenerator(ref, points_per_side=32, **kw),
            "leansam": SamAutomaticMaskGenerator(ours, points_per_side=32, **kw),
        }
        if openvino:  # encoder and decoder transformer on OpenVINO f32
            gens["leansam openvino"] = SamAutomaticMaskGenerator(
                ours, points_per_side=32, runtime="openvino", **kw
            )
        # Each run is a full generate() (minutes when the filters are relaxed): no warm-up
        # round; the order alternates between runs.
        results, samples = {}, {k: [] for k in gens}
        for i in range(runs):
            for k in list(gens) if i % 2 == 0 else list(reversed(gens)):
                t0 = time.perf_counter()
                results[k] = gens[k].generate(image)
                samples[k].append(time.perf_counter() - t0)
        stats = {k: Stats.of(v) for k, v in samples.items()}
        out[setting] = {
            "masks": {k: len(v) for k, v in results.items()},
            "reference_matched": _match(results["reference"], results["leansam"]),
            "leansam_matched": _match(results["leansam"], results["reference"]),
            "stats": {k: _stats(s) for k, s in stats.items()},
            "speedup": stats["reference"].median / stats["leansam"].median,
        }
        if openvino:
            ov = results["leansam openvino"]
            out[setting]["openvino"] = {
                "torch_matched": _match(results["leansam"], ov),
                "openvino_matched": _match(ov, results["leansam"]),
                "speedup_vs_leansam": stats["leansam"].median / stats["leansam openvino"].median,
                "speedup_vs_reference": stats["reference"].median
                / stats["leansam openvino"].median,
            }
        out[setting]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        out[setting]["environment"] = describe_environment()
        print(f"amg {setting}: speedup {out[setting]['speedup']:.2f}", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------- report
def markdown(record: dict) -> str:
    lines = []
    res = record["results"]
    if "runtimes" in res:
        lines += [
            "### EfficientViT-SAM-L0 image encoder by runtime",
            "",
            "| runtime | batch | median s/image (min-max) | speed-up vs reference "
            "| max abs diff vs reference |",
            "|---|---:|---|---:|---:|",
        ]
        for batch, rows in res["runtimes"]["batches"].items():
            for k, r in rows.items():
                lines.append(
                    f"| {k} | {batch} | {r['per_image_s']:.3f} ({r['min'] / int(batch):.3f}-"
                    f"{r['max'] / int(batch):.3f}) "
                    f"| {r['speedup_vs_reference']:.2f}x | {r['max_abs_diff']:.1e} |"
                )
        lines.append("")
    if "encoders" in res:
        e = res["encoders"]
        lines += [
            "### Image encoders (batch 1, fp32)",
            "",
            "| model | input | GFLOP | eager median s (min-max) | torch-opt median s | "
            "eager nominal GFLOP/s (vs matmul peak) | peak RSS MiB |",
            "|---|---:|---:|---|---:|---:|---:|",
        ]
        for r in e["rows"]:
            opt = f"{r['torch-opt']['median']:.3f}" if "torch-opt" in r else "-"
            ea = r["eager"]
            lines.append(
                f"| {r['model']} | {r['input'][-1]} | {r['gflop']:.1f} | {ea['median']:.3f} "
                f"({ea['min']:.3f}-{ea['max']:.3f}) | {opt} | {ea['gflops_per_s']:.0f} "
                f"({100 * ea['share_of_peak']:.0f} %) | {r['peak_rss_mib']:.0f} |"
            )
        lines += ["", f"Measured fp32 matmul peak: {e['matmul_peak_gflops']:.0f} GFLOP/s.", ""]
    if "decoder" in res:
        d = res["decoder"]
        lines += [
            "### Prompt decoding (boxes, multimask, masks at full resolution)",
            "",
            "| call | median ms per box (min-max) |",
            "|---|---:|",
        ]
        for k, v in d["ms_per_box"].items():
            st, n = d["stats"][k], int(k.split("x")[-1])
            lines.append(
                f"| {k} | {v:.1f} ({1000 * st['min'] / n:.1f}-{1000 * st['max'] / n:.1f}) |"
            )
        lines += [
            "",
            f"Cost per box, 64 per call vs the reference's single box: leansam eager "
            f"{d['speedup_x64_vs_reference_x1']:.2f}x lower, torch-opt "
            f"{d.get('speedup_torch_opt_x64_vs_reference_x1', float('nan')):.2f}x lower"
            + (
                f", openvino {d['speedup_openvino_x64_vs_reference_x1']:.2f}x lower (mask "
                f"pixels identical to eager's: {100 * d['mask_agreement_openvino_x64']:.5f} %)."
                if "speedup_openvino_x64_vs_reference_x1" in d
                else "."
            ),
            "",
        ]
    if "amg" in res:
        lines += [
            "### Segment everything (32 x 32 grid, no crops)",
            "",
            "| thresholds | reference median s (min-max) | leansam median s (min-max) | speed-up "
            "| masks (ref / leansam) | matched (ref->ours / ours->ref) |",
            "|---|---:|---:|---:|---|---|",
        ]
        for k, r in res["amg"].items():
            if not isinstance(r, dict) or "stats" not in r:  # "measured_at", "environment"
                continue
            s = r["stats"]
            span = {g: f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})" for g, v in s.items()}
            lines.append(
                f"| {k} | {span['reference']} | {span['leansam']} | "
                f"{r['speedup']:.2f}x | {r['masks']['reference']} / {r['masks']['leansam']} | "
                f"{100 * r['reference_matched']:.0f} % / {100 * r['leansam_matched']:.0f} % |"
            )
        lines.append("")
        ov_rows = {k: r for k, r in res["amg"].items() if isinstance(r, dict) and "openvino" in r}
        if ov_rows:
            lines += [
                "leansam on runtime `openvino` (the encoder and the decoder's transformer on "
                "OpenVINO f32, the same run):",
                "",
                "| thresholds | leansam openvino median s (min-max) | vs leansam torch "
                "| vs reference | masks | matched (torch->openvino / openvino->torch) |",
                "|---|---:|---:|---:|---:|---|",
            ]
            for k, r in ov_rows.items():
                o = r["openvino"]
                ov = r["stats"]["leansam openvino"]
                lines.append(
                    f"| {k} | {ov['median']:.2f} ({ov['min']:.2f}-{ov['max']:.2f}) | "
                    f"{o['speedup_vs_leansam']:.2f}x | {o['speedup_vs_reference']:.2f}x | "
                    f"{r['masks']['leansam openvino']} | {100 * o['torch_matched']:.0f} % / "
                    f"{100 * o['openvino_matched']:.0f} % |"
                )
            lines.append("")
    return "\n".join(lines)


ENCODER_MODELS = [
    "leansam:efficientvit-sam-l0",
    "leansam:efficientvit-sam-l1",
    "leansam:efficientvit-sam-l2",
    "leansam:efficientvit-sam-xl0",
    "leansam:efficientvit-sam-xl1",
    "mobilesam",
    "sam-vit-b",
    "sam-vit-h",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default="runtimes,encoders,decoder,amg")
    ap.add_argument("--encoders", default=",".join(ENCODER_MODELS))
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/speed.json"))
    ap.add_argument(
        "--amg-settings",
        default="sam-defaults,relaxed",
        help="segment-everything threshold settings to measure (a setting measured earlier "
        "stays in --out)",
    )
    ap.add_argument("--encoder-child", help=argparse.SUPPRESS)
    ap.add_argument(
        "--report", action="store_true", help="print the tables of --out, measure nothing"
    )
    args = ap.parse_args(argv)
    if args.report:
        print(markdown(json.loads(Path(args.out).read_text())))
        return 0
    if args.encoder_child:
        print(json.dumps(encoder_child(args.encoder_child, args.runs, args.threads)))
        return 0
    known = {name.split()[0] for name in AMG_SETTINGS}
    unknown = set(args.amg_settings.split(",")) - known
    if unknown:
        ap.error(f"--amg-settings: unknown {', '.join(sorted(unknown))}; choose from {known}")
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    results = {}
    if "runtimes" in sections:
        results["runtimes"] = bench_runtimes(args.runs)
    if "encoders" in sections:
        results["encoders"] = bench_encoders(args.runs, args.threads, args.encoders.split(","))
    if "decoder" in sections:
        results["decoder"] = bench_decoder(args.runs)
    if "amg" in sections:
        results["amg"] = bench_amg(max(1, args.runs // 3), args.amg_settings.split(","))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    env = describe_environment()
    for r in results.values():
        r["measured_at"] = stamp
        r["environment"] = env  # sections from earlier runs keep their own
    record = {
        "benchmark": "speed",
        "config": vars(args),
        "environment": env,
        "results": results,
    }
    if os.path.exists(args.out):  # keep sections measured by an earlier run with other flags
        old = json.loads(Path(args.out).read_text())
        kept = old.get("results", {})
        if "amg" in results and "amg" in kept:  # settings not measured now keep their record,
            # with the machine and time of the run that measured them
            for setting in kept["amg"].values():
                if isinstance(setting, dict) and "stats" in setting:
                    setting.setdefault("environment", kept["amg"].get("environment"))
                    setting.setdefault("measured_at", kept["amg"].get("measured_at"))
            results["amg"] = {**kept["amg"], **results["amg"]}
        record["results"] = {**kept, **results}
    atomic_write_json(args.out, record)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
