"""``SamPredictor``: embed an image once, decode many prompts (SAM's API, plus batching)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import InputError
from .modeling.sam import Sam
from .runtime import check_runtime, make_decoder, make_encoder
from .transforms import ResizeLongestSide, get_preprocess_shape


def check_image(image: object) -> np.ndarray:
    """Validate an H x W x 3 uint8 image array and return it C-contiguous and writable: any view
    (negative strides such as ``cv2.imread(p)[:, :, ::-1]``, crops, transposes, read-only arrays)
    becomes its contiguous copy, so every layout gives the embedding of that copy. Raises a
    one-line :class:`InputError` naming what is wrong and how to fix it."""
    if not isinstance(image, np.ndarray):
        raise InputError(
            f"image must be a numpy array (H x W x 3 uint8), got {type(image).__name__}: "
            "load files with leansam.io.load_image"
        )
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 4)):
        raise InputError(
            f"image must be H x W x 3 (RGB), got shape {tuple(image.shape)}: repeat a grey "
            "channel (np.dstack([g, g, g])) or drop alpha (image[..., :3]) first"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"image must be H x W x 3, got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        hint = " (16-bit: (image >> 8).astype(np.uint8))" if image.dtype == np.uint16 else ""
        raise InputError(f"image must be uint8 (0..255), got {image.dtype}{hint}")
    if min(image.shape[:2]) < 1:
        raise InputError(f"image is empty: shape {tuple(image.shape)}")
    return np.require(image, requirements=("C", "W"))


#: prompt sets whose masks are up-sampled together (see SamPredictor.predict_torch)
POSTPROCESS_CHUNK = 4


def resize_image(
    image: np.ndarray, image_size: int, image_format: str = "RGB", model_format: str = "RGB"
) -> np.ndarray:
    """The encoder's resized input of an H x W x 3 uint8 image: h x w x 3 uint8 with long side
    ``image_size`` (SAM's ``ResizeLongestSide.apply_image``), channels in ``model_format``.
    What :meth:`SamPredictor.set_image` does before normalising and padding, as a plain function
    (no model) so that a data-loading worker can run it. Raises InputError for a bad image, an
    unknown ``image_format`` or an image too elongated to resize."""
    if image_format not in ("RGB", "BGR"):
        raise InputError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    image = check_image(image)
    h, w = image.shape[:2]
    if min(get_preprocess_shape(h, w, image_size)) < 1:
        raise InputError(
            f"image of {w} x {h} is too elongated: resized to a long side of {image_size} its "
            f"short side would be 0 pixels (the sides may differ by at most {2 * image_size}:1); "
            "crop or pad it first"
        )
    if image_format != model_format:
        image = np.ascontiguousarray(image[..., ::-1])
    return ResizeLongestSide(image_size).apply_image(image)


class SamPredictor:
    """Drop-in for ``segment_anything.SamPredictor`` that also serves EfficientViT-SAM.

    ``transform`` maps prompts into the 1024 long-side frame the prompt encoder uses (as in SAM);
    ``image_transform`` resizes images to the encoder input R (512 for the L models, else 1024).

    Beyond SAM: :meth:`predict` takes N x 4 boxes (or N x K x 2 points) and decodes them in one
    batched call, :meth:`set_images` embeds several images in one encoder batch, and ``runtime``
    picks how the image encoder runs (:mod:`leansam.runtime`: ``torch``, ``torch-bf16``,
    ``torch-opt``, ``onnx``, ``onnx-int8``, ``openvino``, ``openvino-bf16``, ``openvino-int8``).
    The INT8 runtimes take ``calibration_images`` (a few H x W x 3 uint8 images): ``onnx-int8``
    always, ``openvino-int8`` unless the model is a W8A8 quantized one. A quantized model runs
    on ``torch`` (fake quantization) or an INT8 runtime. Prompt decoding runs in PyTorch (compiled
    for ``torch-opt``), except for the ``openvino`` runtimes, where the decoder's transformer runs
    on OpenVINO in f32 too (a float model; exact to ~1e-5).
    """

    def __init__(
        self,
        sam_model: Sam,
        runtime: str = "torch",
        *,
        calibration_images: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.model = sam_model
        self.runtime = check_runtime(runtime)
        self.transform = ResizeLongestSide(sam_model.prompt_frame)
        self.image_transform = ResizeLongestSide(sam_model.image_size)
        calibration = None
        if calibration_images is not None:
            calibration = [self.encoder_input(im) for im in calibration_images]
        self._encode = make_encoder(sam_model, runtime, calibration=calibration)
        #: the decoder's inference pass (None: eager PyTorch): compiled for torch-opt, OpenVINO f32
        #: for the openvino runtimes (:func:`leansam.runtime.make_decoder`)
        self.decode_impl = make_decoder(sam_model, runtime)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def copy(self) -> SamPredictor:
        """A predictor of the same model and runtime that shares this one's encoder and decoder
        (runtime sessions, converted graphs: nothing is built again) and has its own image
        state, for another thread. The ONNX Runtime sessions and OpenVINO compiled models
        behind the runtimes may be called from several threads at once (each call makes its
        own inference request); ``torch.compile``'s functions (``torch-opt``) are shared too,
        so warm them up (one call per input shape) before threads use them."""
        import copy

        twin = copy.copy(self)
        twin.reset_image()
        return twin

    def reset_image(self) -> None:
        """Forget the current image(s) and their embeddings."""
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self.original_sizes: list[tuple[int, int]] = []
        self.input_sizes: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ images
    def _prepare(self, image: np.ndarray, image_format: str) -> torch.Tensor:
        resized = resize_image(image, self.model.image_size, image_format, self.model.image_format)
        return torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()

    def encoder_input(self, image: np.ndarray, image_format: str = "RGB") -> torch.Tensor:
        """The image encoder's input for an H x W x 3 uint8 image: resized to long side R,
        normalised and zero-padded, 1 x 3 x R x R (what :meth:`set_image` encodes)."""
        return self.model.preprocess(self._prepare(image, image_format)[None])

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Embed an H x W x 3 uint8 image (RGB, or BGR with ``image_format="BGR"``)."""
        x = self._prepare(image, image_format)[None]
        self.set_torch_image(x, image.shape[:2])

    @torch.inference_mode()
    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        """Embed a 1 x 3 x h x w image already resized with ``image_transform`` (long side R),
        pixel values 0..255; ``original_image_size`` is the (H, W) before resizing."""
        if transformed_image.ndim != 4 or transformed_image.shape[0] != 1:
            shape = tuple(transformed_image.shape)
            raise InputError(
                f"set_torch_image takes one image, 1 x 3 x h x w; got {shape} "
                "(set_images embeds several)"
            )
        self.set_torch_images([transformed_image[0]], [tuple(original_image_size)])

    def set_images(self, images: Sequence[np.ndarray], image_format: str = "RGB") -> None:
        """Embed several images in one encoder batch; pick one with ``image_index=`` later."""
        if len(images) == 0:
            raise InputError("set_images needs at least one image")
        tensors = [self._prepare(im, image_format) for im in images]
        self.set_torch_images(tensors, [im.shape[:2] for im in images])

    @torch.inference_mode()
    def set_torch_images(
        self, images: Sequence[torch.Tensor], original_sizes: Sequence[tuple[int, ...]]
    ) -> None:
        """Embed several images already resized (3 x h x w, long side R, pixel values 0..255,
        e.g. from :func:`resize_image`) in one encoder batch; ``original_sizes`` are their (H, W)
        before resizing. Raises InputError when a shape does not match its original size."""
        r = self.model.image_size
        batch = []
        for x, size in zip(images, original_sizes, strict=True):
            if x.ndim != 3 or x.shape[0] != 3 or max(x.shape[1:]) != r:
                raise InputError(
                    f"transformed image must be 3 x h x w with long side {r} "
                    f"(use predictor.image_transform), got {tuple(x.shape)}"
                )
            expected = get_preprocess_shape(size[0], size[1], r)
            if tuple(x.shape[1:]) != expected:
                raise InputError(
                    f"transformed image {tuple(x.shape[1:])} does not match original size "
                    f"{tuple(size)} (expected {expected})"
                )
            batch.append(self.model.preprocess(x[None].to(self.device)))
        self.reset_image()
        self._set_state(self._encode(torch.cat(batch).to(self.model.dtype)), original_sizes)

    def _set_state(self, features: torch.Tensor, original_sizes) -> None:
        """Per-image state that prompts decode against: embeddings, (H, W) before resizing."""
        frame = self.model.prompt_frame
        self.features = features
        self.original_sizes = [(int(s[0]), int(s[1])) for s in original_sizes]
        self.input_sizes = [get_preprocess_shape(h, w, frame) for h, w in self.original_sizes]
        self.original_size, self.input_size = self.original_sizes[0], self.input_sizes[0]
        self.is_image_set = True

    def set_embedding(self, features: torch.Tensor, original_size: tuple[int, int]) -> None:
        """Restore an image's state from its embedding (1 x 256 x 64 x 64, from
        :meth:`get_image_embedding`) and its original (H, W): decode prompts on an image embedded
        earlier without running the encoder again (a service's embedding cache)."""
        if features.ndim != 4 or features.shape[0] != 1:
            raise InputError(f"features must be 1 x C x h x w, got {tuple(features.shape)}")
        self.reset_image()
        self._set_state(features.to(self.device), [original_size])

    def get_image_embedding(self) -> torch.Tensor:
        """The image embedding(s): B x 256 x 64 x 64 (B = number of images set)."""
        if not self.is_image_set:
            raise RuntimeError(
                "An image must be set with .set_image(...) to generate an embedding."
            )
        return self.features

    # ----------------------------------------------------------------- prompts
    def _index(self, image_index: int | None) -> int:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        n = len(self.original_sizes)
        if image_index is None:
            if n > 1:
                raise InputError(f"{n} images are set: pass image_index= (0..{n - 1})")
            return 0
        if not 0 <= image_index < n:
            raise InputError(f"image_index {image_index} out of range for {n} images")
        return image_index

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        image_index: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for prompts on the set image; coordinates in original image pixels.

        Arguments:
          point_coords: N x 2 (x, y) points, or P x N x 2 for P prompt sets.
          point_labels: N (or P x N) labels: 1 foreground, 0 background.
          box: 4 (XYXY), or P x 4 for P boxes decoded in one batched call.
          mask_input: 1 x 256 x 256 low-res logits from an earlier call (P x 1 x 256 x 256 batched).
          multimask_output: return 3 masks per prompt set instead of 1.
          return_logits: return logits instead of boolean masks.
          image_index: which image of :meth:`set_images` to use.

        Returns (masks, iou_predictions, low_res_logits): C x H x W, C, C x 256 x 256 for one prompt
        set (SAM's shapes), with a leading P axis when P > 1 prompt sets were given.
        """
        idx = self._index(image_index)
        size = self.original_sizes[idx]
        if point_coords is not None and point_labels is None:
            raise InputError("point_labels must be supplied if point_coords is supplied.")
        coords = labels = boxes = masks = None
        n_sets = []
        if point_coords is not None:
            coords = np.asarray(point_coords, dtype=float)
            labels = np.asarray(point_labels)
            if coords.shape[-1:] != (2,) or coords.ndim not in (2, 3):
                raise InputError(f"point_coords must be N x 2 or P x N x 2, got {coords.shape}")
            if labels.shape != coords.shape[:-1]:
                raise InputError(
                    f"point_labels shape {labels.shape} does not match point_coords {coords.shape}"
                )
            coords = self.transform.apply_coords(coords, size)
            if coords.ndim == 2:
                coords, labels = coords[None], labels[None]
            n_sets.append(coords.shape[0])
        if box is not None:
            boxes = np.asarray(box, dtype=float)
            if boxes.shape[-1:] != (4,) or boxes.ndim > 2:
                raise InputError(f"box must be 4 or P x 4 (XYXY), got shape {boxes.shape}")
            boxes = self.transform.apply_boxes(boxes.reshape(-1, 4), size)
            n_sets.append(boxes.shape[0])
        if mask_input is not None:
            masks = np.asarray(mask_input, dtype=np.float32)
            if masks.ndim == 3:
                masks = masks[None]
            if masks.ndim != 4 or masks.shape[1:] != (1, 256, 256):
                raise InputError(
                    f"mask_input must be 1 x 256 x 256 or P x 1 x 256 x 256, got {masks.shape}"
                )
            n_sets.append(masks.shape[0])
        p = max(n_sets, default=1)
        if any(n not in (1, p) for n in n_sets):
            raise InputError(f"prompt sets disagree in number: {n_sets}")

        dev = self.device

        def batch(a: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
            if a is None:
                return None
            t = torch.as_tensor(a, dtype=dtype, device=dev)
            return t.expand(p, *t.shape[1:]) if t.shape[0] == 1 and p > 1 else t

        out = self.predict_torch(
            batch(coords, torch.float),
            batch(labels, torch.int),
            batch(boxes, torch.float),
            batch(masks, torch.float),
            multimask_output,
            return_logits=return_logits,
            image_index=idx,
        )
        out = tuple(
            o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in out
        )
        if p == 1:
            out = tuple(o[0] for o in out)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        image_index: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prompts already in the 1024 frame (``predictor.transform``).

        Arguments:
          point_coords: B x N x 2; point_labels: B x N; boxes: B x 4; mask_input: B x 1 x 256 x 256.

        Returns masks B x C x H x W (bool, or logits), iou_predictions B x C and low-res logits
        B x C x 256 x 256.
        """
        idx = self._index(image_index)
        if mask_input is not None:
            mask_input = mask_input.to(self.model.dtype)
        low_res, iou = self.model.decode(
            self.features[idx : idx + 1],
            point_coords,
            point_labels,
            boxes,
            mask_input,
            multimask_output,
            impl=self.decode_impl,
        )
        # Up-sample a few prompt sets at a time: the 1024 x 1024 intermediate of 64 prompt sets
        # x 3 masks would be 800 MB of floats; chunks stay in cache and only the thresholded
        # masks of the full batch are kept.
        size, orig = self.input_sizes[idx], self.original_sizes[idx]
        if return_logits:
            masks = torch.cat(
                [
                    self.model.postprocess_masks(low_res[i : i + POSTPROCESS_CHUNK], size, orig)
                    for i in range(0, low_res.shape[0], POSTPROCESS_CHUNK)
                ]
            )
            return masks, iou, low_res
        masks = torch.empty(*low_res.shape[:2], *orig, dtype=torch.bool, device=low_res.device)
        for i in range(0, low_res.shape[0], POSTPROCESS_CHUNK):
            logits = self.model.postprocess_masks(low_res[i : i + POSTPROCESS_CHUNK], size, orig)
            torch.gt(logits, self.model.mask_threshold, out=masks[i : i + POSTPROCESS_CHUNK])
        return masks, iou, low_res
