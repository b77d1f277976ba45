"""SamPredictor: SAM's API and geometry, the batched extensions, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import mask_agreement
from PIL import Image

from leansam import SamPredictor, create_model
from leansam.errors import InputError
from leansam.transforms import ResizeLongestSide, get_preprocess_shape


@pytest.fixture(scope="module")
def l_model():
    """The tiny L-family model: encoder input 256, prompts in the 1024 frame."""
    torch.manual_seed(0)
    return create_model("efficientvit-sam-tiny-l")


@pytest.fixture(scope="module")
def predictor(l_model, coco_image):
    p = SamPredictor(l_model)
    p.set_image(coco_image[0])
    return p


@pytest.mark.parametrize(
    ("h", "w", "r", "expected"),
    [
        (480, 640, 1024, (768, 1024)),
        (480, 640, 512, (384, 512)),
        (640, 427, 1024, (1024, 683)),  # 683.2 rounds down
        (333, 500, 1024, (682, 1024)),
        (1000, 300, 512, (512, 154)),  # 153.6 rounds up
        (1024, 1024, 1024, (1024, 1024)),
        (10, 3000, 1024, (3, 1024)),
    ],
)
def test_preprocess_shape(h, w, r, expected):
    assert get_preprocess_shape(h, w, r) == expected


def test_apply_image_is_pil_bilinear(coco_image):
    image = coco_image[0]
    out = ResizeLongestSide(512).apply_image(image)
    h, w = get_preprocess_shape(*image.shape[:2], 512)
    ref = np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    assert out.shape == (h, w, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref)


def test_coords_map_to_1024_frame_for_512_models(l_model):
    p = SamPredictor(l_model)
    assert p.transform.target_length == 1024 and p.image_transform.target_length == 256
    boxes = np.array([[0.0, 0.0, 640.0, 480.0], [320.0, 240.0, 480.0, 360.0]])
    np.testing.assert_allclose(
        p.transform.apply_boxes(boxes, (480, 640)),
        [[0, 0, 1024, 768], [512, 384, 768, 576]],
    )
    coords = torch.tensor([[[100.0, 50.0]]])
    torch.testing.assert_close(
        p.transform.apply_coords_torch(coords, (480, 640)), torch.tensor([[[160.0, 80.0]]])
    )


def test_set_image_sizes_and_embedding(predictor, coco_image):
    image = coco_image[0]
    h, w = image.shape[:2]
    assert predictor.original_size == (h, w)
    assert predictor.input_size == get_preprocess_shape(h, w, 1024)  # 1024 frame, not 256
    dim = predictor.model.config.decoder.embed_dim
    assert predictor.get_image_embedding().shape == (1, dim, 64, 64)


def test_bgr_input_equals_rgb(l_model, predictor, coco_image):
    p = SamPredictor(l_model)
    p.set_image(np.ascontiguousarray(coco_image[0][..., ::-1]), image_format="BGR")
    torch.testing.assert_close(p.get_image_embedding(), predictor.get_image_embedding())


@pytest.mark.parametrize(("h", "w"), [(1000, 300), (77, 913), (256, 256), (31, 17)])
def test_odd_aspect_ratios(l_model, h, w):
    rng = np.random.default_rng(0)
    p = SamPredictor(l_model)
    p.set_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    masks, iou, low = p.predict(box=np.array([0, 0, w - 1, h - 1]), multimask_output=True)
    assert masks.shape == (3, h, w) and iou.shape == (3,) and low.shape == (3, 256, 256)
    assert p.input_size == get_preprocess_shape(h, w, 1024)


def test_batched_boxes_equal_one_at_a_time(predictor, coco_image):
    anns = coco_image[1]
    boxes = np.array(
        [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns[:3]
        ]
    )
    masks, iou, low = predictor.predict(box=boxes, multimask_output=False)
    assert masks.shape == (len(boxes), 1, *coco_image[0].shape[:2])
    for i, box in enumerate(boxes):
        m, s, lr = predictor.predict(box=box, multimask_output=False)
        np.testing.assert_allclose(low[i], lr, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(iou[i], s, rtol=1e-5, atol=1e-5)
        assert mask_agreement(masks[i], m) >= 0.9999


def test_batched_point_sets_equal_one_at_a_time(predictor):
    coords = np.array([[[100.0, 120.0], [200.0, 50.0]], [[10.0, 10.0], [300.0, 200.0]]])
    labels = np.array([[1, 0], [1, 1]])
    masks, _iou, low = predictor.predict(coords, labels, multimask_output=True)
    assert masks.shape[:2] == (2, 3)
    for i in range(2):
        _, _s, lr = predictor.predict(coords[i], labels[i], multimask_output=True)
        np.testing.assert_allclose(low[i], lr, rtol=1e-5, atol=1e-4)


def test_points_broadcast_over_boxes(predictor):
    boxes = np.array([[50.0, 60.0, 300.0, 400.0], [10.0, 10.0, 200.0, 200.0]])
    pts, lab = np.array([[100.0, 100.0]]), np.array([1])
    _, _, low = predictor.predict(pts, lab, box=boxes, multimask_output=False)
    _, _, low1 = predictor.predict(pts, lab, box=boxes[1], multimask_output=False)
    np.testing.assert_allclose(low[1], low1, rtol=1e-5, atol=1e-4)


def test_mask_input_round_trip(predictor):
    box = np.array([50.0, 60.0, 300.0, 400.0])
    _, _, low = predictor.predict(box=box, multimask_output=False)
    _masks, _, low2 = predictor.predict(box=box, mask_input=low, multimask_output=False)
    assert low2.shape == (1, 256, 256) and not np.allclose(low, low2)


def test_return_logits(predictor):
    box = np.array([50.0, 60.0, 300.0, 400.0])
    logits, _, _ = predictor.predict(box=box, return_logits=True)
    masks, _, _ = predictor.predict(box=box)
    assert logits.dtype == np.float32
    np.testing.assert_array_equal(logits > 0, masks)


def test_set_images_equals_set_image(l_model, coco_val):
    from conftest import COCO_MINI

    from leansam.io import load_image

    images = [load_image(COCO_MINI / "val2017" / im["file_name"]) for im in coco_val[0][:2]]
    batched = SamPredictor(l_model)
    batched.set_images(images)
    assert batched.get_image_embedding().shape == (2, l_model.config.decoder.embed_dim, 64, 64)
    with pytest.raises(InputError, match="pass image_index"):
        batched.predict(box=np.array([1, 1, 50, 50]))
    for i, image in enumerate(images):
        single = SamPredictor(l_model)
        single.set_image(image)
        torch.testing.assert_close(
            batched.get_image_embedding()[i : i + 1],
            single.get_image_embedding(),
            rtol=1e-4,
            atol=1e-4,
        )
        box = np.array([10, 20, 200, 150])
        m1, _, l1 = batched.predict(box=box, image_index=i)
        _m2, _, l2 = single.predict(box=box)
        assert m1.shape == (3, *image.shape[:2])
        np.testing.assert_allclose(l1, l2, rtol=1e-4, atol=1e-3)


def test_set_torch_image_matches_set_image(l_model, predictor, coco_image):
    image = coco_image[0]
    p = SamPredictor(l_model)
    x = torch.as_tensor(p.image_transform.apply_image(image)).permute(2, 0, 1)[None]
    p.set_torch_image(x, image.shape[:2])
    torch.testing.assert_close(p.get_image_embedding(), predictor.get_image_embedding())
    with pytest.raises(InputError, match="long side 256"):
        p.set_torch_image(torch.zeros(1, 3, 100, 80), (100, 80))
    with pytest.raises(InputError, match="takes one image"):
        p.set_torch_image(torch.zeros(2, 3, 256, 200), (256, 200))
    torch.testing.assert_close(p.get_image_embedding(), predictor.get_image_embedding())


def test_bfloat16_model_predicts(coco_image):
    model = create_model("efficientvit-sam-tiny-l", dtype=torch.bfloat16)
    p = SamPredictor(model)
    p.set_image(coco_image[0])
    masks, _iou, low = p.predict(box=np.array([10, 20, 200, 150]))
    assert masks.shape == (3, *coco_image[0].shape[:2]) and low.dtype == np.float32
    assert np.isfinite(low).all()


def test_errors(l_model, predictor):
    fresh = SamPredictor(l_model)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(box=np.array([0, 0, 10, 10]))
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.get_image_embedding()
    with pytest.raises(InputError, match="point_labels must be supplied"):
        predictor.predict(point_coords=np.array([[1.0, 2.0]]))
    with pytest.raises(InputError, match="does not match point_coords"):
        predictor.predict(np.array([[1.0, 2.0]]), np.array([1, 1]))
    with pytest.raises(InputError, match="box must be"):
        predictor.predict(box=np.array([1, 2, 3]))
    with pytest.raises(InputError, match="mask_input must be"):
        predictor.predict(box=np.array([1, 2, 30, 40]), mask_input=np.zeros((1, 64, 64)))
    with pytest.raises(InputError, match="disagree"):
        predictor.predict(np.zeros((3, 1, 2)), np.ones((3, 1)), box=np.zeros((2, 4)))
    with pytest.raises(InputError, match="uint8"):
        fresh.set_image(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(InputError, match="H x W x 3"):
        fresh.set_image(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(InputError, match="image_format"):
        fresh.set_image(np.zeros((10, 10, 3), dtype=np.uint8), image_format="BGRA")
