"""Bounded load test of `leansam serve` on loopback (BENCHMARKS.md, "Service under load").

Starts the server in a child process, uploads a few coco-mini val images, then C client threads
send box prompts (the images' annotation boxes, one box per request, single mask, COCO RLE out)
for D seconds. Reports throughput, latency percentiles, status codes (5xx must be zero) and the
server's resident memory before and after the run and after a second, identical run (flat memory:
no growth from run to run). The peer, measured in the same run on the same prompts: the same
decoder called in-process through SamPredictor.predict (no HTTP, no JSON, no RLE), one call at a
time, so the ratio is the service's overhead and queueing cost per request.

    python benchmarks/service_load.py --model leansam-efficientvit-s --clients 16 --duration 30
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "coco-mini"


def _server_process() -> type:
    """tests/service_process.py's ServerProcess, loaded by path (test infrastructure, not shipped
    in the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "service_process", ROOT / "tests" / "service_process.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ServerProcess


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run_load(url: str, prompts: list[tuple[str, list[float]]], clients: int, duration: float):
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + duration

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop:
                image_id, box = rng.choice(prompts)
                t0 = time.perf_counter()
                try:
                    code = http.post(
                        f"{url}/v1/images/{image_id}/masks",
                        json={"boxes": [box], "multimask": False},
                    ).status_code
                except httpx.HTTPError:
                    code = 0  # connection-level failure
                dt = time.perf_counter() - t0
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                    if code == 200:
                        latencies.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = statuses.get(200, 0)
    return {
        "requests": sum(statuses.values()),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors_5xx": sum(v for k, v in statuses.items() if k >= 500 or k == 0),
        "throughput_rps": ok / wall,
        "latency_ms": {
            "p50": 1000 * _percentile(latencies, 50),
            "p90": 1000 * _percentile(latencies, 90),
            "p99": 1000 * _percentile(latencies, 99),
            "max": 1000 * max(latencies, default=float("nan")),
        },
        "wall_s": wall,
    }


def in_process_peer(model_name: str, files: list[Path], boxes: dict, seconds: float) -> dict:
    """SamPredictor.predict on the same prompts, in this process, one call at a time."""
    from leansam import SamPredictor, create_model
    from leansam.io import load_image

    predictor = SamPredictor(create_model(model_name, pretrained=True))
    embedded = {}
    for f in files:
        predictor.set_image(load_image(f))
        embedded[f] = (predictor.get_image_embedding().clone(), predictor.original_size)
    rng = random.Random(0)
    times = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        f = rng.choice(files)
        predictor.set_embedding(*embedded[f])
        box = np.asarray(rng.choice(boxes[f]))
        t0 = time.perf_counter()
        predictor.predict(box=box, multimask_output=False)
        times.append(time.perf_counter() - t0)
    return {"calls": len(times), "median_ms": 1000 * statistics.median(times)}


def main() -> int:
    import httpx

    from leansam.data.coco import load_coco, xywh_to_xyxy
    from leansam.io import atomic_write_json
    from leansam.provenance import describe_environment

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="leansam-efficientvit-s")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    p.add_argument("--images", type=int, default=4, help="coco-mini val images uploaded")
    p.add_argument("--runtime", default="torch")
    p.add_argument("--out", help="write the record here (JSON)")
    args = p.parse_args()
    ServerProcess = _server_process()

    images, anns = load_coco(DATA / "annotations" / "instances_val2017.json")
    chosen = [im for im in images if anns[im["id"]]][: args.images]
    files = [DATA / "val2017" / im["file_name"] for im in chosen]
    boxes = {
        f: [xywh_to_xyxy(a["bbox"]) for a in anns[im["id"]]]
        for f, im in zip(files, chosen, strict=True)
    }
    server_args = [
        "--model", args.model, "--runtime", args.runtime, "--log-level", "warning",
        "--queue", str(args.clients), "--max-connections", str(4 * args.clients),
    ]  # fmt: skip
    record = {"config": vars(args), "environment": describe_environment()}
    with ServerProcess(server_args) as server:
        prompts = []
        for f in files:
            with open(f, "rb") as fh:
                r = httpx.post(server.url + "/v1/images", files={"file": (f.name, fh)}, timeout=120)
            r.raise_for_status()
            prompts += [(r.json()["id"], [float(v) for v in b]) for b in boxes[f]]
        run_load(server.url, prompts, min(4, args.clients), 3.0)  # warm-up
        rss = [server.rss_bytes()]
        runs = []
        for _ in range(2):
            runs.append(run_load(server.url, prompts, args.clients, args.duration))
            rss.append(server.rss_bytes())
        healthy = httpx.get(server.url + "/healthz").json()["status"] == "ok"
    peer = in_process_peer(args.model, files, boxes, min(args.duration, 15.0))
    record.update(
        runs=runs,
        rss_mb={"after_warmup": rss[0] / 2**20, "after_run_1": rss[1] / 2**20,
                "after_run_2": rss[2] / 2**20},
        healthy_after=healthy,
        peer_in_process=peer,
    )  # fmt: skip
    for i, r in enumerate(runs, 1):
        lat = r["latency_ms"]
        print(
            f"run {i}: {r['requests']} requests, {r['throughput_rps']:.1f} req/s, "
            f"p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, statuses {r['statuses']}, "
            f"5xx {r['errors_5xx']}"
        )
    print(
        f"server RSS MB: {rss[0] / 2**20:.0f} after warm-up, {rss[1] / 2**20:.0f} after run 1, "
        f"{rss[2] / 2**20:.0f} after run 2; healthy after: {healthy}"
    )
    service_ms = 1000 / runs[-1]["throughput_rps"]
    print(
        f"in-process predictor: {peer['median_ms']:.1f} ms per box; service: {service_ms:.1f} ms "
        f"per request at saturation ({service_ms / peer['median_ms']:.2f}x)"
    )
    if args.out:
        atomic_write_json(args.out, record)
    return 0 if healthy and all(r["errors_5xx"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
