"""`leansam serve`: every endpoint and every kind of bad input, over real HTTP against a running
server (a child process), with masks checked against SamPredictor on the same weights."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from conftest import COCO_MINI, require_extra
from PIL import Image
from service_process import ServerProcess

httpx = require_extra("httpx")
require_extra("fastapi")

MODEL = "efficientvit-sam-tiny-l"  # random weights, seed 0 (as create_model(..., seed=0))
VAL = COCO_MINI / "val2017"


@pytest.fixture(scope="module")
def server():
    args = ["--model", MODEL, "--log-level", "warning", "--max-upload-mb", "1",
            "--max-megapixels", "2", "--cache-images", "2", "--concurrency", "1", "--queue", "0",
            "--timeout", "30"]  # fmt: skip
    with ServerProcess(args) as s:
        yield s


@pytest.fixture(scope="module")
def images():
    files = sorted(VAL.glob("*.jpg"))[:3]
    assert len(files) == 3
    return files


def _upload(server, path, **kw):
    with open(path, "rb") as f:
        return httpx.post(
            server.url + "/v1/images", files={"file": (path.name, f)}, timeout=60, **kw
        )


def _rle_mask(rle):
    from leansam.io import coco_rle_to_mask

    return coco_rle_to_mask(rle)


def _png_mask(b64):
    import base64

    return np.array(Image.open(io.BytesIO(base64.b64decode(b64)))) > 127


def test_health_models_schema_and_page(server):
    h = httpx.get(server.url + "/healthz").json()
    assert h["status"] == "ok" and h["model"] == MODEL
    m = httpx.get(server.url + "/v1/models").json()
    assert m["served"]["name"] == MODEL and m["served"]["runtime"] == "torch"
    assert "efficientvit-sam-l0" in m["available"] and m["limits"]["max_upload_bytes"] == 1 << 20
    schema = httpx.get(server.url + "/openapi.json").json()
    assert set(schema["paths"]) == {
        "/healthz", "/v1/models", "/v1/images", "/v1/images/{image_id}/masks",
        "/v1/images/{image_id}/everything",
    }  # fmt: skip
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="canvas"' in page.text and "/v1/images" in page.text


def test_masks_equal_the_predictor(server, images):
    """Upload, prompt (point, one box, a batch of boxes, refinement): the service's masks equal
    SamPredictor's on the same weights, as RLE and as PNG."""
    from leansam import SamPredictor, create_model
    from leansam.io import load_image

    up = _upload(server, images[0])
    assert up.status_code == 200, up.text
    info = up.json()
    image = load_image(images[0])
    assert (info["height"], info["width"]) == image.shape[:2] and not info["cached"]
    assert _upload(server, images[0]).json() == {**{k: info[k] for k in ("id", "width", "height")},
                                                 "cached": True}  # fmt: skip
    predictor = SamPredictor(create_model(MODEL, seed=0))
    predictor.set_image(image)
    url = f"{server.url}/v1/images/{info['id']}/masks"

    r = httpx.post(url, json={"points": [[200, 150]], "labels": [1], "output": ["rle", "png"]})
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    masks, scores, _ = predictor.predict(np.array([[200, 150]]), np.array([1]))
    assert [m["score"] for m in result["masks"]] == pytest.approx(sorted(scores, reverse=True))
    for rec, k in zip(result["masks"], np.argsort(-scores, kind="stable"), strict=True):
        assert np.array_equal(_rle_mask(rec["rle"]), masks[k])
        assert np.array_equal(_png_mask(rec["png"]), masks[k])
        assert rec["area"] == int(masks[k].sum())

    boxes = [[10, 20, 300, 200], [100, 100, 400, 300], [0, 0, 640, 400]]
    r = httpx.post(url, json={"boxes": boxes, "multimask": False})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    masks, _, _ = predictor.predict(box=np.array(boxes), multimask_output=False)
    assert len(results) == 3
    for res, m in zip(results, masks, strict=True):
        assert len(res["masks"]) == 1 and np.array_equal(_rle_mask(res["masks"][0]["rle"]), m[0])

    # refinement with the previous low-res mask
    prev = httpx.post(url, json={"points": [[200, 150]], "labels": [1], "multimask": False}).json()
    r = httpx.post(url, json={"points": [[200, 150], [50, 60]], "labels": [1, 0],
                              "mask_input_id": prev["results"][0]["mask_input_id"]})  # fmt: skip
    assert r.status_code == 200, r.text
    _, _, low = predictor.predict(np.array([[200, 150]]), np.array([1]), multimask_output=False)
    masks, _, _ = predictor.predict(np.array([[200, 150], [50, 60]]), np.array([1, 0]),
                                    mask_input=low)  # fmt: skip
    best = r.json()["results"][0]["masks"][0]
    assert any(np.array_equal(_rle_mask(best["rle"]), m) for m in masks)


def test_everything_uses_the_cached_embedding(server, images):
    from leansam import SamAutomaticMaskGenerator, create_model
    from leansam.io import load_image

    image_id = _upload(server, images[0]).json()["id"]
    params = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    r = httpx.post(f"{server.url}/v1/images/{image_id}/everything", json=params, timeout=120)
    assert r.status_code == 200, r.text
    got = r.json()["masks"]
    amg = SamAutomaticMaskGenerator(create_model(MODEL, seed=0), **params)
    want = amg.generate(load_image(images[0]))
    assert len(got) == len(want) > 0
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(_rle_mask(g["rle"]), w["segmentation"])
        assert g["score"] == pytest.approx(w["predicted_iou"], abs=1e-6)


def _png_bytes(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_answer_4xx_json_and_the_server_stays_healthy(server, images):
    image_id = _upload(server, images[1]).json()["id"]
    masks = f"{server.url}/v1/images/{image_id}/masks"
    jpeg = images[1].read_bytes()
    cases = [
        # (method, url, kwargs, status, words in the error)
        ("post", "/v1/images", {"content": b"hello, not an image"}, 415, "not an image"),
        ("post", "/v1/images", {"files": {"file": ("x.jpg", b"GIF89a" + b"\0" * 64)}}, 415, ""),
        ("post", "/v1/images", {"content": jpeg[: len(jpeg) // 2]}, 400, "truncated"),
        ("post", "/v1/images", {"content": b""}, 400, "empty"),
        ("post", "/v1/images", {"content": b"\xff" * (2 << 20)}, 413, "too large"),
        ("post", "/v1/images", {"content": _png_bytes(2000, 1200)}, 413, "MP"),
        ("post", "/v1/images", {"files": {"other": ("a.jpg", jpeg)}}, 400, "field 'file'"),
        ("post", "/v1/images/0123456789abcdef01234567/masks",
         {"json": {"points": [[1, 1]], "labels": [1]}}, 404, "unknown image id"),
        ("post", masks, {"json": {"points": [[1e5, 3]], "labels": [1]}}, 422, "outside"),
        ("post", masks, {"json": {"points": [[-1, 3]], "labels": [1]}}, 422, "outside"),
        ("post", masks, {"json": {"boxes": [[50, 50, 10, 10]]}}, 422, "empty or inverted"),
        ("post", masks, {"json": {"points": [[5, 5]], "labels": [2]}}, 422, "labels"),
        ("post", masks, {"json": {"points": [[5, 5]]}}, 422, "one label"),
        ("post", masks, {"json": {}}, 422, "at least one"),
        ("post", masks, {"json": {"points": [[5, 5]], "labels": ["a"]}}, 422, "labels.0"),
        ("post", masks, {"json": {"points": [[5, 5]], "labels": [1], "colour": 1}}, 422, "colour"),
        ("post", masks, {"json": {"points": [[5, 5]], "labels": [1], "mask_input_id": "x"}},
         404, "mask_input_id"),
        ("post", masks, {"json": {"boxes": [[1, 1, 5, 5]] * 65}}, 422, "at most 64"),
        ("post", masks, {"content": b'{"points": [[1, 2]', "headers":
                         {"content-type": "application/json"}}, 400, "malformed JSON"),
        ("post", masks, {"content": b"x" * (2 << 20), "headers":
                         {"content-type": "application/json"}}, 413, "too large"),
        ("post", f"{server.url}/v1/images/{image_id}/everything",
         {"json": {"points_per_side": 64}}, 422, "at most 32"),
        ("get", "/v1/nothing-here", {}, 404, "Not Found"),
        ("get", "/v1/images", {}, 405, "Method Not Allowed"),
    ]  # fmt: skip
    for method, url, kw, status, words in cases:
        url = url if url.startswith("http") else server.url + url
        r = getattr(httpx, method)(url, timeout=60, **kw)
        assert r.status_code == status, (url, kw.keys(), r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json"), r.text
        err = r.json()["error"]
        assert words in err and "\n" not in err and "Traceback" not in err, err
        assert httpx.get(server.url + "/healthz").json()["status"] == "ok"


def test_cache_evicts_least_recently_used(server, images):
    """--cache-images 2: a third image pushes out the least recently used one."""
    a, b, c = (_upload(server, p).json()["id"] for p in images)
    body = {"points": [[5, 5]], "labels": [1]}
    assert httpx.post(f"{server.url}/v1/images/{a}/masks", json=body).status_code == 404
    for image_id in (b, c):
        assert httpx.post(f"{server.url}/v1/images/{image_id}/masks", json=body).status_code == 200
    assert httpx.get(server.url + "/healthz").json()["cached_images"] == 2


def test_full_queue_answers_429_then_recovers(server, images):
    """--concurrency 1 --queue 0: while one job runs, the next request is turned away with 429
    and Retry-After, not queued without bound."""
    image_id = _upload(server, images[2]).json()["id"]
    slow = {"points_per_side": 8}  # 64 prompts: seconds, long enough to be caught running
    answers = {}

    def run_slow():
        url = f"{server.url}/v1/images/{image_id}/everything"
        answers["slow"] = httpx.post(url, json=slow, timeout=120).status_code

    t = threading.Thread(target=run_slow)
    t.start()
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/healthz").json()["in_progress"] == 0:
        assert time.monotonic() < deadline, "the slow job never started"
        time.sleep(0.01)
    r = httpx.post(f"{server.url}/v1/images/{image_id}/masks",
                   json={"points": [[5, 5]], "labels": [1]})  # fmt: skip
    t.join()
    assert answers["slow"] == 200
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/images/{image_id}/masks",
                   json={"points": [[5, 5]], "labels": [1]})  # fmt: skip
    assert r.status_code == 200


def test_timeout_answers_503():
    """A request that overruns --timeout gets 503 (the job finishes in the background, holding
    its slot), and the server keeps serving."""
    args = ["--model", MODEL, "--log-level", "warning", "--timeout", "1.5", "--queue", "4"]
    with ServerProcess(args) as s:
        image_id = _upload(s, sorted(VAL.glob("*.jpg"))[0]).json()["id"]
        # 1,024 prompts: 256 finished within 1.5 s on a 2-core Xeon with AMX
        slow = {"points_per_side": 32}
        r = httpx.post(f"{s.url}/v1/images/{image_id}/everything", json=slow, timeout=60)
        assert r.status_code == 503 and "within 1.5 s" in r.json()["error"]
        # only a bound on the wait (a 200 ends it at once): on a loaded 2-core machine a
        # 256-prompt job took over 120 s, and a shorter bound failed the test there
        deadline = time.monotonic() + 900
        while True:  # the overrunning job still holds the only slot until it ends
            r = httpx.post(f"{s.url}/v1/images/{image_id}/masks",
                           json={"points": [[5, 5]], "labels": [1]}, timeout=60)  # fmt: skip
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            assert r.status_code == 503
        assert r.status_code == 200


def test_serve_cli_errors():
    from leansam.cli import main

    assert main(["serve", "--model", MODEL, "--port", "0"]) == 2
    assert main(["serve", "--model", MODEL, "--cache-images", "0"]) == 2
    assert main(["serve", "--model", "no-such-model"]) == 2
