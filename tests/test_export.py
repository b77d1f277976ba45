"""ONNX export: graphs run in ONNX Runtime and match PyTorch and segment_anything's ONNX model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import COCO_MINI, mask_agreement, randomize_, require_extra

from leansam import SamPredictor, create_model
from leansam.data.coco import xywh_to_xyxy
from leansam.export import (
    DECODER_INPUTS,
    TENSORRT_UNFRIENDLY,
    SamOnnxDecoder,
    check_graph,
    export_onnx,
    graph_ops,
)

ort = require_extra("onnxruntime")
onnx = require_extra("onnx")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def sam_tiny(tmp_path_factory):
    """(reference segment_anything Sam, leansam Sam with its weights, exported graph folder)."""
    from reference import build_reference

    ref = randomize_(build_reference("sam-vit-tiny"), seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(ref.state_dict(), path)
    ours = create_model("sam-vit-tiny", checkpoint=path)
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(ours, out)
    return ref, ours, out


def _decoder_feeds(image_embeddings, coords, labels, orig_hw, mask=None):
    p = coords.shape[0]
    return {
        "image_embeddings": image_embeddings.numpy(),
        "point_coords": coords.astype(np.float32),
        "point_labels": labels.astype(np.float32),
        "mask_input": np.zeros((p, 1, 256, 256), np.float32) if mask is None else mask,
        "has_mask_input": np.array([0.0 if mask is None else 1.0], np.float32),
        "orig_im_size": np.array(orig_hw, np.float32),
    }


def _anylabeling_client_run(dec, embedding, orig_hw, coords, labels, low_res=False):
    """X-AnyLabeling's ``efficientvit_sam`` client, call for call (its ``SamDecoder.run`` and
    ``predict_shapes``): clicks and box corners (labels 2 / 3) in image pixels scaled to the
    1024 frame, float32 labels, **no padding point**, no mask input; it shows ``masks[0][0]``,
    the first of the returned masks."""
    h, w = orig_hw
    s = 1024 / max(h, w)
    new_h, new_w = int(h * s + 0.5), int(w * s + 0.5)
    c = np.array(coords, dtype=float)
    c[..., 0] *= new_w / w
    c[..., 1] *= new_h / h
    feeds = {
        "image_embeddings": embedding,
        "point_coords": c.astype(np.float32)[None],
        "point_labels": np.array(labels, dtype=np.float32)[None],
        "mask_input": np.zeros((1, 1, 256, 256), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(orig_hw, dtype=np.float32),
    }
    masks, _, low = dec.run(None, feeds)
    return low[0][0] if low_res else masks[0][0]


def test_exported_files_and_io_names(sam_tiny):
    _, _, out = sam_tiny
    assert sorted(p.name for p in out.iterdir()) == [
        "decoder.onnx",
        "decoder_batched.onnx",
        "encoder.onnx",
    ]
    dec = _session(out / "decoder.onnx")
    assert [i.name for i in dec.get_inputs()] == DECODER_INPUTS
    assert [o.name for o in dec.get_outputs()] == ["masks", "iou_predictions", "low_res_masks"]
    assert [i.name for i in _session(out / "encoder.onnx").get_inputs()] == ["images"]


def test_no_tensorrt_unfriendly_ops(sam_tiny):
    _, _, out = sam_tiny
    for f in out.iterdir():
        ops = graph_ops(f)
        assert "MatMul" in ops
        assert not ops & TENSORRT_UNFRIENDLY, f.name


def test_check_graph_rejects_unfriendly_op(tmp_path):
    h = onnx.helper
    node = h.make_node("OneHot", ["i", "d", "v"], ["y"])
    graph = h.make_graph(
        [node],
        "g",
        [
            h.make_tensor_value_info("i", onnx.TensorProto.INT64, [2]),
            h.make_tensor_value_info("d", onnx.TensorProto.INT64, [1]),
            h.make_tensor_value_info("v", onnx.TensorProto.FLOAT, [2]),
        ],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), path)
    with pytest.raises(ValueError, match="OneHot"):
        check_graph(path)


@pytest.mark.parametrize("orig_hw", [(480, 640), (427, 300)])
@pytest.mark.parametrize("num_points", [1, 3])
def test_decoder_matches_segment_anything_onnx_model(sam_tiny, orig_hw, num_points):
    """Same weights, same inputs: leansam's graph in ONNX Runtime vs SAM's SamOnnxModel. Clicks
    go to SAM's graph with the padding point its demo appends, to leansam's both with it and
    without it (leansam's graph appends it itself)."""
    from segment_anything.utils.onnx import SamOnnxModel

    ref, ours, out = sam_tiny
    g = torch.Generator().manual_seed(num_points)
    emb = torch.randn(1, ours.config.decoder.embed_dim, 64, 64, generator=g)
    coords = (torch.rand(1, num_points, 2, generator=g) * 1000).numpy()
    labels = np.array([[1, 0, 1][:num_points]], np.float32)
    padded = _decoder_feeds(emb, np.concatenate([coords, np.zeros((1, 1, 2))], 1),
                            np.concatenate([labels, [[-1.0]]], 1), orig_hw)  # fmt: skip
    ref_out = SamOnnxModel(ref, return_single_mask=False)(
        *(torch.from_numpy(padded[k]) for k in DECODER_INPUTS)
    )
    for feeds in (padded, _decoder_feeds(emb, coords, labels, orig_hw)):
        got = _session(out / "decoder.onnx").run(None, feeds)
        torch_out = SamOnnxDecoder(ours)(*(torch.from_numpy(feeds[k]) for k in DECODER_INPUTS))
        assert got[0].shape == (1, 4, *orig_hw)
        for r, o, t in zip(ref_out, got, torch_out, strict=True):
            assert np.abs(t.numpy() - r.numpy()).max() <= 1e-4
            assert np.abs(o - r.numpy()).max() <= 1e-3
        assert mask_agreement(got[0] > 0, ref_out[0].numpy() > 0) >= 0.999


def test_decoder_with_mask_input_and_single_mask(sam_tiny, tmp_path):
    from segment_anything.utils.onnx import SamOnnxModel

    from leansam.export import export_decoder

    ref, ours, _ = sam_tiny
    export_decoder(ours, tmp_path / "single.onnx", return_single_mask=True)
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(1, ours.config.decoder.embed_dim, 64, 64, generator=g)
    mask = torch.randn(1, 1, 256, 256, generator=g).numpy()
    for coords in (np.array([[[100.0, 200.0], [0, 0]]]), np.array([[[10.0, 20], [300, 400]]])):
        labels = np.array([[1, -1]] if coords[0, 1, 0] == 0 else [[2, 3]], np.float32)
        feeds = _decoder_feeds(emb, coords, labels, (300, 500), mask)
        ref_out = SamOnnxModel(ref, return_single_mask=True)(
            *(torch.from_numpy(feeds[k]) for k in DECODER_INPUTS)
        )
        got = _session(tmp_path / "single.onnx").run(None, feeds)
        assert got[0].shape == (1, 1, 300, 500)
        np.testing.assert_allclose(got[1], ref_out[1].numpy(), atol=1e-4)
        assert mask_agreement(got[0] > 0, ref_out[0].numpy() > 0) >= 0.999


def test_batched_decoder_matches_predictor(sam_tiny, coco_image):
    """P boxes in one ONNX call == SamPredictor.predict(box=P x 4) on the same embedding."""
    _, ours, out = sam_tiny
    image, anns = coco_image
    h, w = image.shape[:2]
    pred = SamPredictor(ours)
    pred.set_image(image)
    boxes = np.array([xywh_to_xyxy(a["bbox"]) for a in anns[:5]])
    masks, iou, low = pred.predict(box=boxes, multimask_output=True)
    corners = pred.transform.apply_boxes(boxes, (h, w)).reshape(-1, 2, 2)
    labels = np.tile(np.array([[2, 3]], np.float32), (len(boxes), 1))
    feeds = _decoder_feeds(pred.get_image_embedding(), corners, labels, (h, w))
    got = _session(out / "decoder_batched.onnx").run(None, feeds)
    assert got[0].shape == (len(boxes), 4, h, w)
    np.testing.assert_allclose(got[1][:, 1:], iou, atol=1e-4)
    np.testing.assert_allclose(got[2][:, 1:], low, atol=1e-3)
    assert mask_agreement(got[0][:, 1:] > 0, masks) >= 0.999


def test_batched_decoder_pads_point_sets_like_the_predictor(sam_tiny, coco_image):
    """P click sets (2 clicks each) without padding points in one call of the batched graph ==
    SamPredictor.predict(point_coords=P x 2 x 2), which pads every set as SAM does."""
    _, ours, out = sam_tiny
    image, _ = coco_image
    h, w = image.shape[:2]
    pred = SamPredictor(ours)
    pred.set_image(image)
    g = np.random.default_rng(0)
    points = g.uniform(0, [w, h], size=(4, 2, 2))
    labels = np.array([[1, 0], [1, 1], [0, 1], [1, 0]])
    _, iou, low = pred.predict(points, labels, multimask_output=True)
    coords = pred.transform.apply_coords(points, (h, w))
    feeds = _decoder_feeds(pred.get_image_embedding(), coords, labels, (h, w))
    got = _session(out / "decoder_batched.onnx").run(None, feeds)
    np.testing.assert_allclose(got[1][:, 1:], iou, atol=1e-4)
    np.testing.assert_allclose(got[2][:, 1:], low, atol=1e-3)


@pytest.mark.parametrize("name", ["efficientvit-sam-tiny-l", "efficientvit-sam-l0"])
def test_encoder_matches_pytorch(name, tmp_path):
    """Dynamic batch; embedding max abs diff <= 1e-3 (issue 6), full-size L0 included."""
    from leansam.export import export_encoder

    torch.manual_seed(0)
    model = randomize_(create_model(name), seed=2).eval()
    export_encoder(model, tmp_path / "enc.onnx")
    check_graph(tmp_path / "enc.onnx")
    x = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        want = model.image_encoder(x).numpy()
    got = _session(tmp_path / "enc.onnx").run(None, {"images": x.numpy()})[0]
    assert got.shape == (2, model.config.decoder.embed_dim, 64, 64)
    assert np.abs(got - want).max() <= 1e-3


def test_cli_export_onnx(tmp_path):
    out = tmp_path / "onnx"
    cmd = [sys.executable, "-m", "leansam.cli", "export", "onnx"]
    r = subprocess.run(
        [*cmd, "--model", "efficientvit-sam-tiny-l", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "decoder_batched.onnx" in r.stdout
    assert {p.name for p in out.iterdir()} == {
        "encoder.onnx",
        "decoder.onnx",
        "decoder_batched.onnx",
    }
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = subprocess.run(
        [*cmd, "--model", "efficientvit-sam-tiny-l", "--out", str(blocker / "sub")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.startswith("leansam: error: cannot create output folder")
    assert "Traceback" not in r.stderr


def test_tensorrt_fp32_nodes_cover_norms_and_litemla(tmp_path):
    """The fp16 engine's fp32 set: every LiteMLA node, every LayerNorm (decomposed or not), the
    bicubic resize; and not the convolutions."""
    from leansam.export import export_decoder, export_encoder, fp32_nodes

    model = create_model("efficientvit-sam-tiny-l")
    export_encoder(model, tmp_path / "enc.onnx")
    export_decoder(model, tmp_path / "dec.onnx")
    for f in ("enc.onnx", "dec.onnx"):
        nodes = list(onnx.load(tmp_path / f).graph.node)
        keep = fp32_nodes(tmp_path / f)

        def by_op(op, nodes=nodes):
            return {n.name for n in nodes if n.op_type == op}

        assert by_op("ReduceMean") | by_op("Sqrt") | by_op("LayerNormalization") <= keep
        convs = by_op("Conv") | by_op("ConvTranspose")
        assert not {c for c in convs if "/context_module/" not in c} & keep  # fp16 convs
        if f == "enc.onnx":
            lite = {n.name for n in nodes if "/context_module/main/" in n.name}
            assert lite and {n for n in lite if "MatMul" in n or "Div" in n} <= keep
            assert by_op("Resize") and by_op("Resize") <= keep
        else:
            assert by_op("LayerNormalization")


def test_cli_export_tensorrt_without_tensorrt(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed")
    cmd = [sys.executable, "-m", "leansam.cli", "export", "tensorrt"]
    r = subprocess.run(
        [*cmd, "--onnx", str(tmp_path), "--out", str(tmp_path / "e")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "no ONNX graphs" in r.stderr and "leansam export onnx" in r.stderr
    (tmp_path / "encoder.onnx").write_bytes(b"x")
    r = subprocess.run(
        [*cmd, "--onnx", str(tmp_path), "--out", str(tmp_path / "e")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "leansam: error: this needs the `tensorrt` package: pip install 'leansam[tensorrt]'"
    )


def test_export_leaves_the_model_in_eval_mode(sam_tiny, tmp_path):
    """Regression: the exporter restored a fresh wrapper's training mode onto the user's model."""
    from leansam.export import export_decoder

    _, ours, _ = sam_tiny
    export_decoder(ours, tmp_path / "d.onnx")
    assert not any(m.training for m in ours.modules())


@pytest.mark.parametrize(
    "name", [pytest.param("leansam-efficientvit-s", marks=pytest.mark.slow), "leansam-vit-s"]
)
def test_anylabeling_pair_reproduces_pytorch_masks(name, coco_val, tmp_path):
    """`leansam export anylabeling`: X-AnyLabeling's efficientvit_sam files. The encoder takes the
    raw uint8 H x W x 3 image (any size, preprocessing inside); fed as X-AnyLabeling feeds them,
    the pair gives SamPredictor's masks (>= 99.9 % of pixels) on real images, both families, for
    boxes, one click and several clicks (the client sends no padding point; the graph adds it)."""
    import yaml

    from leansam.io import load_image

    r = subprocess.run(
        [sys.executable, "-m", "leansam.cli", "export", "anylabeling", "--model", name,
         "--out", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
    assert cfg["type"] == "efficientvit_sam" and cfg["target_size"] == 1024
    for key in ("name", "display_name", "encoder_model_path", "decoder_model_path"):
        assert cfg[key]
    enc = _session(tmp_path / cfg["encoder_model_path"])
    dec = _session(tmp_path / cfg["decoder_model_path"])
    (inp,) = enc.get_inputs()
    assert inp.type == "tensor(uint8)" and inp.shape == ["height", "width", 3]
    predictor = SamPredictor(create_model(name, pretrained=True))
    images, _ = coco_val
    for info in images[:2]:
        image = load_image(COCO_MINI / "val2017" / info["file_name"])
        for img in (image, np.ascontiguousarray(image.transpose(1, 0, 2))):  # both orientations
            h, w = img.shape[:2]
            emb = enc.run(None, {"image": img})[0]
            predictor.set_image(img)
            assert np.abs(emb - predictor.get_image_embedding().numpy()).max() < 0.05
            box = np.array([w * 0.2, h * 0.25, w * 0.7, h * 0.8])
            point = np.array([[w * 0.45, h * 0.5]])
            two = np.array([[w * 0.45, h * 0.5], [w * 0.7, h * 0.3]])
            for coords, labels, kw in (
                (box.reshape(2, 2), [2, 3], {"box": box}),
                (point, [1], {"point_coords": point, "point_labels": np.array([1])}),
                (two, [1, 0], {"point_coords": two, "point_labels": np.array([1, 0])}),
                # SAM's web demo (and X-AnyLabeling's segment_anything type) pad themselves
                (np.concatenate([point, [[0, 0]]]), [1, -1],
                 {"point_coords": point, "point_labels": np.array([1])}),
            ):  # fmt: skip
                got = _anylabeling_client_run(dec, emb, (h, w), coords, labels)
                want, _, _ = predictor.predict(multimask_output=False, **kw)
                assert mask_agreement(got > 0, want[0]) >= 0.999, (name, labels)
                # the decoder alone, on leansam's own embedding: the same logits
                exact = _anylabeling_client_run(dec, predictor.features.numpy(), (h, w), coords,
                                                labels, low_res=True)  # fmt: skip
                _, _, logits = predictor.predict(multimask_output=False, **kw)
                assert np.abs(exact - logits[0]).max() < 1e-3, (name, labels)
