"""Inputs from the wild (issue 19): every image, array and client call SAM users send either works
-- with the value asserted -- or gets one clear line (CLI exit 2, service 4xx), never a traceback
or a 500. Each failing input of the issue is kept as a test, then a property test sweeps image
shapes, Pillow modes and numpy layouts through the Python API, the CLI and the service."""

from __future__ import annotations

import io
import itertools
import json
import socket
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import COCO_MINI, mask_agreement, randomize_, require_extra
from PIL import Image

from leansam import SamAutomaticMaskGenerator, SamPredictor, create_model
from leansam.cli import main
from leansam.errors import CheckpointError, InputError
from leansam.io import (
    MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    decode_image,
    draw_overlay,
    image_to_rgb,
    load_image,
)

TINY = "efficientvit-sam-tiny-l"  # encoder input 256
VAL = COCO_MINI / "val2017"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """``--threads`` applies to the whole process: restore the count after each test."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return create_model(TINY, seed=0)


def _png(image: Image.Image | np.ndarray, fmt: str = "PNG") -> bytes:
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _one_error_line(err: str) -> str:
    """The CLI's stderr for a user mistake: exactly one line, ``leansam: error: ...``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("leansam: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def client(tiny):
    """The service in-process (FastAPI's TestClient) on the tiny model: 2 MP image limit."""
    require_extra("fastapi")
    from fastapi.testclient import TestClient

    from leansam.service import Engine, Limits, create_app

    engine = Engine(tiny, name=TINY)
    limits = Limits(max_upload_bytes=1 << 20, max_pixels=2_000_000, max_queue=4)
    with TestClient(create_app(engine, limits)) as c:
        yield c


def _upload(client, data: bytes):
    return client.post("/v1/images", files={"file": ("x", data)})


# --------------------------------------------------------------------- 2. 16-bit greyscale
def _ramp16() -> np.ndarray:
    """64 x 48 uint16 ramp over the full range 0..65535 (the issue's input)."""
    return np.linspace(0, 65535, 48 * 64).round().astype(np.uint16).reshape(48, 64)


def test_16bit_greyscale_is_scaled_as_opencv_does(tmp_path):
    ramp = _ramp16()
    want = np.repeat((ramp >> 8).astype(np.uint8)[..., None], 3, axis=2)
    for fmt in ("PNG", "TIFF"):
        path = tmp_path / f"ramp.{fmt.lower()}"
        path.write_bytes(_png(ramp, fmt))
        assert Image.open(path).mode.startswith("I;16") or Image.open(path).mode == "I"
        got = load_image(path)
        assert got.dtype == np.uint8 and got.shape == (48, 64, 3)
        np.testing.assert_array_equal(got, want)  # cv2.imread: >> 8
        assert (got == 255).mean() < 0.01  # Pillow's own convert("RGB") made 99.6 % white
        np.testing.assert_array_equal(decode_image(path.read_bytes()), want)
    # older Pillow opens 16-bit PNGs as mode I: PNG has at most 16 bits, so the same scaling
    im = Image.fromarray(ramp.astype(np.int32))
    im.format = "PNG"
    np.testing.assert_array_equal(image_to_rgb(im), want)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32bit_and_float_images_are_refused_with_one_line(tmp_path, capsys, mode):
    arr = (_ramp16().astype(np.float32) / 65535) if mode == "F" else _ramp16().astype(np.int32)
    path = tmp_path / "wide.tif"
    Image.fromarray(arr, mode=mode).save(path)
    with pytest.raises(InputError, match=r"no standard 0\.\.255 scale: convert it to 8 or 16 bits"):
        load_image(path)
    rc, _, err = _cli(capsys, "segment", path, "--model", TINY, "--box", "1,1,20,20",
                      "--out", tmp_path / "o")  # fmt: skip
    assert rc == 2 and "no standard 0..255 scale" in _one_error_line(err)


def test_16bit_png_through_cli_and_service(tmp_path, capsys, client, tiny):
    path = tmp_path / "ramp.png"
    path.write_bytes(_png(_ramp16()))
    rc, out, _ = _cli(capsys, "segment", path, "--model", TINY, "--box", "5,5,40,30",
                      "--out", tmp_path / "seg", "--threads", "1")  # fmt: skip
    assert rc == 0, out
    record = json.loads((tmp_path / "seg" / "result.json").read_text())
    assert record["environment"]["torch_threads"] == 1  # --threads took effect
    r = _upload(client, path.read_bytes())
    assert r.status_code == 200, r.text
    item = client.app.state.cache.get(r.json()["id"])
    pred = SamPredictor(tiny)
    pred.set_image(np.repeat((_ramp16() >> 8).astype(np.uint8)[..., None], 3, axis=2))
    # float rounding only (the service's worker thread may run another thread count)
    assert (item.features - pred.get_image_embedding()).abs().max() < 1e-4
    ev = client.post(f"/v1/images/{r.json()['id']}/everything", json={"points_per_side": 2})
    assert ev.status_code == 200, ev.text


# --------------------------------------------------------------------- 3. array layouts
LAYOUTS = {
    "bgr->rgb view (negative stride)": lambda a: a[:, :, ::-1],
    "flipped rows": lambda a: a[::-1],
    "fortran order": np.asfortranarray,
    "transposed twice": lambda a: a.transpose(1, 0, 2).transpose(1, 0, 2)[:, ::-1],
    "read-only": lambda a: _read_only(a),
    "read-only negative stride": lambda a: _read_only(a[:, :, ::-1]),
}


def _read_only(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


@pytest.mark.parametrize("name", ["sam-vit-tiny", TINY])
def test_any_array_layout_gives_the_embedding_of_its_contiguous_copy(name):
    """segment_anything accepts ``cv2.imread(p)[:, :, ::-1]``; the fault showed where no resize
    happens (long side already R), so the image has exactly that long side."""
    model = create_model(name, seed=0)
    r = model.image_size
    base = np.random.default_rng(0).integers(0, 256, (r * 3 // 4, r, 3), dtype=np.uint8)
    pred = SamPredictor(model)
    gen = SamAutomaticMaskGenerator(model, points_per_side=2, pred_iou_thresh=0,
                                    stability_score_thresh=0, predictor=pred)  # fmt: skip
    for label, layout in LAYOUTS.items():
        view = layout(base)
        copy = np.ascontiguousarray(view)
        pred.set_image(copy)
        want = pred.get_image_embedding().clone()
        pred.set_image(view)
        assert torch.equal(pred.get_image_embedding(), want), label
        pred.set_images([view, copy])  # one batch: the view's row equals the copy's
        batched = pred.get_image_embedding()
        assert torch.equal(batched[0], batched[1]), label
    masks_view = gen.generate(LAYOUTS["bgr->rgb view (negative stride)"](base))
    masks_copy = gen.generate(np.ascontiguousarray(base[:, :, ::-1]))
    assert len(masks_view) == len(masks_copy) > 0
    for a, b in zip(masks_view, masks_copy, strict=True):
        assert np.array_equal(a["segmentation"], b["segmentation"])


def test_negative_stride_on_the_onnx_runtime(tiny):
    require_extra("onnxruntime")
    base = np.random.default_rng(1).integers(0, 256, (192, 256, 3), dtype=np.uint8)
    pred = SamPredictor(tiny, runtime="onnx")
    pred.set_image(np.ascontiguousarray(base[:, :, ::-1]))
    want = pred.get_image_embedding().clone()
    pred.set_image(base[:, :, ::-1])
    assert torch.equal(pred.get_image_embedding(), want)


# --------------------------------------------------------------------- 4. decompression bombs
def _png_header_only(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header declares ``width`` x ``height`` RGB pixels (a bomb's shape:
    the pixel data is a few compressed bytes and would take GBs once decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))  # fmt: skip


@pytest.mark.parametrize("side", [20000, 10000])  # beyond Pillow's own bomb error, and below it
def test_huge_images_are_refused_from_the_header(tmp_path, capsys, client, side):
    data = _png_header_only(side, side)
    assert len(data) < 120
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    size = f"{side} x {side} = {side * side / 1e6:.1f} MP"
    # the file holds almost no pixel data: any decoding would fail as truncated instead
    with pytest.raises(ImageTooLargeError, match=f"is {size}; the limit is 89.5 MP"):
        load_image(path)
    assert MAX_IMAGE_PIXELS == 89_478_485
    rc, _, err = _cli(capsys, "segment", path, "--model", TINY, "--box", "1,1,9,9",
                      "--out", tmp_path / "o")  # fmt: skip
    line = _one_error_line(err)
    assert rc == 2 and size in line and "downscale it first" in line
    r = _upload(client, data)
    assert r.status_code == 413, r.text
    assert r.json()["error"] == f"image is {size}; the limit is 2.0 MP: downscale it first"


def test_a_limit_above_pillows_own_is_honoured(tmp_path):
    """Pillow refuses images above twice its own limit (179 MP) inside Image.open; a caller's
    larger limit (the service's --max-megapixels) still lets such a header through, and the
    (absent) pixel data then fails as truncated, not as too large."""
    data = _png_header_only(15000, 15000)  # 225 MP
    with pytest.raises(ImageTooLargeError, match=r"225\.0 MP; the limit is 200\.0 MP"):
        decode_image(data, max_pixels=200_000_000)
    with pytest.raises(InputError, match="truncated or corrupt") as e:
        decode_image(data, max_pixels=300_000_000)
    assert not isinstance(e.value, ImageTooLargeError)
    assert Image.MAX_IMAGE_PIXELS == MAX_IMAGE_PIXELS  # Pillow's own limit is back in place


# --------------------------------------------------------------------- 5. SAM's batched forward
def _batched_input(images, transform, frame_transform, rng, with_points):
    batch = []
    for im in images:
        h, w = im.shape[:2]
        boxes = np.array(
            [[w * 0.1, h * 0.1, w * 0.6, h * 0.7], [w * 0.3, h * 0.2, w * 0.9, h * 0.9]]
        )
        rec = {
            "image": torch.as_tensor(transform.apply_image(im)).permute(2, 0, 1).contiguous(),
            "original_size": (h, w),
            "boxes": torch.as_tensor(frame_transform.apply_boxes(boxes, (h, w)), dtype=torch.float),
        }
        if with_points:
            pts = rng.uniform(0, [w, h], size=(2, 3, 2))
            rec["point_coords"] = torch.as_tensor(
                frame_transform.apply_coords(pts, (h, w)), dtype=torch.float
            )
            rec["point_labels"] = torch.tensor([[1, 0, 1], [1, 1, 0]])
        batch.append(rec)
    return batch


def test_sam_batched_forward_matches_segment_anything(tmp_path):
    from reference import build_reference

    from leansam.transforms import ResizeLongestSide

    ref = randomize_(build_reference("sam-vit-tiny"), seed=1)
    torch.save(ref.state_dict(), tmp_path / "r.pt")
    ours = create_model("sam-vit-tiny", checkpoint=tmp_path / "r.pt")
    images = [load_image(p) for p in sorted(VAL.iterdir())[:2]]
    t = ResizeLongestSide(1024)
    for multimask, points in ((False, False), (True, True)):
        batch = _batched_input(images, t, t, np.random.default_rng(0), points)
        with torch.no_grad():
            want = ref(batched_input=batch, multimask_output=multimask)
        got = ours(batched_input=batch, multimask_output=multimask)
        assert len(got) == len(want) == 2
        for g, w in zip(got, want, strict=True):
            assert set(g) == set(w) == {"masks", "iou_predictions", "low_res_logits"}
            assert g["masks"].dtype == torch.bool and g["masks"].shape == w["masks"].shape
            assert mask_agreement(g["masks"].numpy(), w["masks"].numpy()) >= 0.9999
            assert (g["low_res_logits"] - w["low_res_logits"]).abs().max() < 1e-3
            assert (g["iou_predictions"] - w["iou_predictions"]).abs().max() < 1e-4


def test_batched_forward_of_a_512px_family_equals_the_predictor(tiny):
    """EfficientViT-SAM's L models: images resized to long side R, prompts in the 1024 frame."""
    from leansam.transforms import ResizeLongestSide

    images = [load_image(p) for p in sorted(VAL.iterdir())[:2]]
    pred = SamPredictor(tiny)
    batch = _batched_input(images, pred.image_transform, pred.transform,
                           np.random.default_rng(0), False)  # fmt: skip
    assert isinstance(pred.image_transform, ResizeLongestSide)
    out = tiny(batch, multimask_output=True)
    for im, rec, o in zip(images, batch, out, strict=True):
        pred.set_image(im)
        masks, _, low = pred.predict_torch(None, None, rec["boxes"], multimask_output=True)
        # the encoder ran on a batch of 2 here, of 1 in the predictor: float rounding only
        assert mask_agreement(o["masks"].numpy(), masks.numpy()) >= 0.9999
        assert (o["low_res_logits"] - low).abs().max() < 1e-3


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ("not a list", "batched_input must be a non-empty list"),
        ([], "batched_input must be a non-empty list"),
        ([{"image": torch.zeros(3, 256, 200)}], "has no 'original_size'"),
        ([{"image": torch.zeros(256, 200, 3), "original_size": (256, 200)}], "3 x h x w tensor"),
        ([{"image": torch.zeros(3, 100, 80), "original_size": (100, 80)}], "resize it to long"),
        ([{"image": torch.zeros(3, 256, 200), "original_size": (256, 200), "box": 1}],
         "unknown keys ['box']"),
        ([{"image": torch.zeros(3, 256, 200), "original_size": (256, 200),
           "point_coords": torch.zeros(1, 1, 2)}], "point_coords and point_labels go together"),
    ],
)  # fmt: skip
def test_batched_forward_bad_records_fail_with_one_line(tiny, batch, message):
    with pytest.raises(InputError) as e:
        tiny(batch, multimask_output=False)
    assert message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------- 6. negative CLI values
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--box", "-4,10,50,60", "box (-4.0, 10.0, 50.0, 60.0) lies outside the 640x426 image"),
        ("--point", "-3,5", "point (-3.0, 5.0) lies outside the 640x426 image"),
        ("--point", "-.5,5,0", "point (-0.5, 5.0) lies outside the 640x426 image"),
    ],
)
def test_negative_numbers_on_the_command_line_are_parsed_then_judged(
    tmp_path, capsys, flag, value, message
):
    image = VAL / "000000000139.jpg"
    rc, _, err = _cli(capsys, "segment", image, "--model", TINY, flag, value, "--out", tmp_path)
    assert rc == 2 and _one_error_line(err) == f"leansam: error: {message}"


# --------------------------------------------------------------------- also: checkpoints, demo
def test_dataparallel_and_compiled_prefixes_are_stripped(tmp_path):
    ref = randomize_(create_model(TINY, seed=0), seed=2).state_dict()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        torch.save({prefix + k: v for k, v in ref.items()}, tmp_path / "p.pt")
        got = create_model(TINY, checkpoint=tmp_path / "p.pt").state_dict()
        assert all(torch.equal(got[k], v) for k, v in ref.items()), prefix
    # a prefix on only some keys is not a wrapper's: the strict check names the keys
    partial = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(ref.items())}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys such as module\."):
        create_model(TINY, checkpoint=tmp_path / "partial.pt")


def test_demo_takes_its_model_from_the_checkpoint(tmp_path, capsys):
    torch.save(randomize_(create_model(TINY, seed=0), seed=2).state_dict(), tmp_path / "c.pt")
    rc, _, err = _cli(capsys, "demo", "--checkpoint", tmp_path / "c.pt", "--images", "1",
                        "--data", COCO_MINI, "--out", tmp_path / "demo")  # fmt: skip
    assert rc == 0, err
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["model"] == TINY
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    rc, _, err = _cli(capsys, "demo", "--checkpoint", tmp_path / "foreign.pt",
                      "--data", COCO_MINI, "--out", tmp_path / "d2")  # fmt: skip
    assert rc == 2 and "matches no registered model: pass --model" in _one_error_line(err)


# --------------------------------------------------------------------- also: CLI behaviour
def test_progress_bars_go_to_stderr_and_no_progress_silences_them(tmp_path, capsys):
    image = VAL / "000000000139.jpg"
    args = ["everything", image, "--model", TINY, "--points-per-side", "4", "--threads", "1"]
    rc, _, err = _cli(capsys, *args, "--out", tmp_path / "a")
    assert rc == 0 and "segment everything" in err and "1/1" in err and "batch" in err
    rc, _, err = _cli(capsys, *args, "--out", tmp_path / "b", "--no-progress")
    assert rc == 0 and "segment everything" not in err
    rc, _, err = _cli(capsys, "bench", "--model", TINY, "--runtime", "torch", "--runs", "1",
                        "--boxes", "1", "--threads", "1")  # fmt: skip
    assert rc == 0 and "bench" in err and "call" in err


def test_everything_says_when_no_mask_passes_and_writes_strict_json(tmp_path, capsys):
    image = VAL / "000000000139.jpg"
    args = ["everything", image, "--model", TINY, "--points-per-side", "4", "--no-progress"]
    rc, out, err = _cli(capsys, *args, "--out", tmp_path / "a")  # SAM's thresholds, random weights
    assert rc == 0 and out.startswith("wrote 0 mask(s)") and "<i>.png" not in out
    assert "note: no mask passed --pred-iou-thresh 0.88 and --stability-score-thresh 0.95" in err
    rc, out, _ = _cli(capsys, *args, "--out", tmp_path / "b", "--pred-iou-thresh", "0",
                      "--stability-score-thresh", "0")  # fmt: skip
    assert rc == 0 and not out.startswith("wrote 0 ")

    def no_constants(name):
        raise AssertionError(f"masks.json holds {name}, which strict JSON parsers reject")

    record = json.loads((tmp_path / "b" / "masks.json").read_text(), parse_constant=no_constants)
    assert record["config"]["points_per_side"] == 4 and record["masks"]


def test_threads_option_and_environment(capsys, monkeypatch):
    rc, _, err = _cli(capsys, "models", "--threads", "0")
    assert rc == 2 and "--threads must be at least 1" in _one_error_line(err)
    monkeypatch.setenv("LEANSAM_THREADS", "two")
    rc, _, err = _cli(capsys, "models")
    assert rc == 2 and "LEANSAM_THREADS='two'" in _one_error_line(err)
    monkeypatch.setenv("LEANSAM_THREADS", "1")
    assert _cli(capsys, "models")[0] == 0 and torch.get_num_threads() == 1


def test_help_shows_defaults(capsys):
    for args, option, default in (
        (["everything", "--help"], "--points-per-side", "default: 32"),
        (["everything", "--help"], "--pred-iou-thresh", "default: 0.88"),
        (["quantize", "--help"], "--bits", "(default: w4a4)"),
    ):
        with pytest.raises(SystemExit):
            main(args)
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        entry = text.split("options:", 1)[1].split(f" {option} ", 1)[1][:150]
        assert default in entry, (option, entry)


def test_segment_says_when_a_mask_is_empty(tmp_path, capsys):
    model = randomize_(create_model(TINY, seed=0), seed=2)
    with torch.no_grad():  # the hypernetworks output zeros: every mask logit is 0, no pixel > 0
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()
    torch.save(model.state_dict(), tmp_path / "blank.pt")
    rc, _, err = _cli(capsys, "segment", VAL / "000000000139.jpg", "--model", TINY,
                        "--checkpoint", tmp_path / "blank.pt", "--point", "300,200",
                        "--out", tmp_path / "o")  # fmt: skip
    assert rc == 0
    assert "note: 1 of 1 masks are empty (mask_000.png)" in err


def test_points_only_prompts_get_their_score_drawn():
    image = np.zeros((60, 80, 3), np.uint8)
    mask = np.zeros((60, 80), bool)
    plain = np.array(draw_overlay(image, [mask], boxes=[None], points=[(20, 30, 1)]))
    scored = np.array(draw_overlay(image, [mask], boxes=[None], points=[(20, 30, 1)],
                                   labels=["0: 0.93"], label_points=[(20, 30)]))  # fmt: skip
    changed = np.argwhere((plain != scored).any(2))
    assert len(changed) > 20 and changed[:, 1].min() >= 26  # text right of the click


def test_quantized_rows_are_labelled_as_such():
    from types import SimpleNamespace

    from leansam.eval.predictors import model_label

    q = SimpleNamespace(quant_config=SimpleNamespace(method="ahcptq", w_bits=8, a_bits=8,
                                                     keep_8bit=()))  # fmt: skip
    assert model_label(q, "leansam-efficientvit-s") == "leansam-efficientvit-s ahcptq W8A8"
    assert model_label(SimpleNamespace(), "sam-vit-b") == "sam-vit-b"


def test_busy_port_is_one_line(capsys):
    require_extra("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, _, err = _cli(capsys, "serve", "--model", TINY, "--port", port)
    assert rc == 2
    assert _one_error_line(err) == (
        f"leansam: error: port {port} on 127.0.0.1 is already in use (another server?): "
        "pick another with --port"
    )


def test_docs_page_works_offline(client):
    r = client.get("/docs")
    assert r.status_code == 200
    page = r.text
    assert "<script" not in page and "cdn" not in page.lower()  # nothing fetched from elsewhere
    assert "/openapi.json" in page and "POST /v1/images" in page
    assert client.get("/openapi.json").status_code == 200


# --------------------------------------------------------------------- property test
#: Pillow modes and the formats that store each (every combination Pillow can write)
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA",
         "RGBX", "I;16", "I;16B"]  # fmt: skip
FORMATS = ["PNG", "JPEG", "TIFF", "WEBP", "BMP", "GIF"]
SHAPES = [(1, 1), (1, 2), (2, 1), (1, 512), (512, 1), (1, 513), (3, 1536), (1536, 3),
          (7, 7), (17, 4000), (4000, 17), (48, 64), (480, 640)]  # fmt: skip


def _mode_files() -> list[tuple[str, str, bytes]]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    out = []
    for mode, fmt in itertools.product(MODES, FORMATS):
        try:
            if mode in ("I;16", "I;16B"):
                im = Image.fromarray(_ramp16()[:24, :32]).convert(mode)
            elif mode in ("I", "F"):
                im = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.int32)).convert(mode)
            else:
                im = rgb.convert(mode) if mode not in ("LAB", "HSV") else Image.new(mode, (32, 24))
            data = _png(im, fmt)
        except (OSError, ValueError, KeyError):
            continue  # Pillow cannot write this mode in this format
        out.append((mode, fmt, data))
    return out


MODE_FILES = _mode_files()


def test_every_pillow_mode_loads_or_is_refused_with_one_line(tmp_path, capsys, client, tiny):
    assert len(MODE_FILES) >= 40
    pred = SamPredictor(tiny)
    decoded = refused = 0
    for mode, fmt, data in MODE_FILES:
        what = f"{mode} as {fmt}"
        path = tmp_path / f"im.{fmt.lower()}"
        path.write_bytes(data)
        try:
            image = load_image(path)
        except InputError as e:
            assert "\n" not in str(e) and "no standard 0..255 scale" in str(e), what
            refused += 1
            expect_status = {400} if fmt in ("JPEG", "PNG", "WEBP", "BMP") else {415}
        else:
            assert image.dtype == np.uint8 and image.shape == (24, 32, 3), what
            pred.set_image(image)
            masks, _, _ = pred.predict(point_coords=np.array([[5, 5]]), point_labels=np.array([1]))
            assert masks.shape == (3, 24, 32), what
            decoded += 1
            expect_status = {200} if fmt in ("JPEG", "PNG", "WEBP", "BMP") else {415}
        r = _upload(client, data)
        assert r.status_code in expect_status, (what, r.status_code, r.text)
        if r.status_code == 200:  # the service decodes exactly as load_image does
            item = client.app.state.cache.get(r.json()["id"])
            pred.set_image(image)
            diff = (item.features - pred.get_image_embedding()).abs().max()
            assert diff < 1e-4, what  # float rounding only (worker thread's own thread count)
    assert decoded > 30 and refused >= 2
    # the CLI on a sample of them (each call loads the model): exit 0, or 2 with one line
    for mode, fmt, data in MODE_FILES[::5]:
        path = tmp_path / f"cli.{fmt.lower()}"
        path.write_bytes(data)
        rc, _, err = _cli(capsys, "segment", path, "--model", TINY, "--box", "2,2,20,20",
                          "--out", tmp_path / "o")  # fmt: skip
        assert rc in (0, 2), (mode, fmt)
        if rc == 2:
            _one_error_line(err)


def test_every_shape_and_layout_segments_or_gives_one_line(tiny, client, tmp_path, capsys):
    pred = SamPredictor(tiny)
    rng = np.random.default_rng(0)
    for h, w in SHAPES:
        base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        results = set()
        for label, layout in LAYOUTS.items():
            try:
                pred.set_image(layout(base))
            except InputError as e:
                assert "too elongated" in str(e) and "\n" not in str(e), (h, w, label)
                results.add("refused")
                continue
            masks, scores, _ = pred.predict(box=np.array([0, 0, w, h]), multimask_output=False)
            assert masks.shape == (1, h, w) and np.isfinite(scores).all(), (h, w, label)
            results.add("segmented")
        assert len(results) == 1, (h, w)  # the layout never changes the outcome
        # long / short <= 2R (R = 256 here) segments; beyond, one line
        assert results == ({"segmented"} if max(h, w) <= 2 * 256 * min(h, w) else {"refused"})
        r = _upload(client, _png(base))
        assert r.status_code == (200 if "segmented" in results else 400), (h, w, r.text)
        if max(h, w) < 1000:
            path = tmp_path / "s.png"
            path.write_bytes(_png(base))
            rc, _, err = _cli(capsys, "segment", path, "--model", TINY, "--box", f"0,0,{w},{h}",
                              "--out", tmp_path / "o")  # fmt: skip
            assert rc == (0 if "segmented" in results else 2), (h, w, err)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([[0, 0, 0]], "must be a numpy array"),
        (np.zeros((8, 8), np.uint8), "repeat a grey channel"),
        (np.zeros((8, 8, 4), np.uint8), "drop alpha"),
        (np.zeros((8, 8, 1), np.uint8), "repeat a grey channel"),
        (np.zeros((8, 8, 3), np.uint16), "(16-bit: (image >> 8).astype(np.uint8))"),
        (np.zeros((8, 8, 3), np.float32), "must be uint8 (0..255), got float32"),
        (np.zeros((8, 8, 3), bool), "must be uint8 (0..255), got bool"),
        (np.zeros((0, 8, 3), np.uint8), "image is empty"),
        (np.zeros((2, 8, 8, 3), np.uint8), "must be H x W x 3"),
    ],
)
def test_bad_arrays_fail_with_one_line(tiny, value, message):
    pred = SamPredictor(tiny)
    for call in (pred.set_image, lambda v: pred.set_images([v]),
                 SamAutomaticMaskGenerator(tiny, predictor=pred).generate):  # fmt: skip
        with pytest.raises(InputError) as e:
            call(value)
        assert message in str(e.value) and "\n" not in str(e.value)
