"""COCO-format evaluation data: images, objects (annotations with area >= 1), detections."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..data.coco import load_coco
from ..errors import InputError
from ..io import read_json


@dataclass(frozen=True)
class EvalDataset:
    """Images of a COCO instances JSON, sorted by id, with their annotations."""

    images_dir: Path
    annotations: Path
    images: tuple[dict, ...]
    anns: dict  # image id -> list of annotations
    is_lvis: bool
    #: ids of every image in the JSON, also those beyond ``limit``
    all_image_ids: frozenset

    @classmethod
    def load(
        cls,
        images_dir: str | os.PathLike,
        annotations: str | os.PathLike,
        *,
        limit: int | None = None,
    ) -> EvalDataset:
        """Read the JSON, keep the first ``limit`` images by id, check that their files exist."""
        images_dir, annotations = Path(images_dir), Path(annotations)
        if not images_dir.is_dir():
            raise InputError(f"image folder not found: {images_dir}")
        images, anns = load_coco(annotations)
        all_ids = frozenset(im["id"] for im in images)
        if limit is not None:
            if limit < 1:
                raise InputError(f"--limit must be at least 1, got {limit}")
            images = images[:limit]
        if not images:
            raise InputError(f"{annotations} lists no images: nothing to evaluate")
        missing = [im["file_name"] for im in images if not _image_path(images_dir, im).is_file()]
        if missing:
            raise InputError(
                f"{len(missing)} of {len(images)} images listed in {annotations.name} are missing "
                f"from {images_dir}, e.g. {missing[0]}"
            )
        return cls(
            images_dir, annotations, tuple(images), anns, _looks_like_lvis(annotations), all_ids
        )

    def path(self, image: dict) -> Path:
        return _image_path(self.images_dir, image)

    def objects(self, image_id: int) -> list[dict]:
        """The annotations evaluated with GT prompts: every one with area >= 1 (crowd included,
        as in the published protocol), in annotation-id order."""
        return sorted(
            (a for a in self.anns.get(image_id, []) if a.get("area", 0) >= 1), key=lambda a: a["id"]
        )

    def num_objects(self) -> int:
        return sum(len(self.objects(im["id"])) for im in self.images)


def _image_path(images_dir: Path, image: dict) -> Path:
    """COCO names a file by ``file_name``; LVIS by the last part of ``coco_url``."""
    name = image.get("file_name") or image.get("coco_url", "").rsplit("/", 1)[-1]
    return images_dir / name


def _looks_like_lvis(annotations: Path) -> bool:
    """LVIS JSONs mark categories with a frequency and images with not-exhaustive categories."""
    head = annotations.read_text()[:200_000]
    return '"not_exhaustive_category_ids"' in head or '"frequency"' in head


RESULT_KEYS = frozenset({"image_id", "category_id", "bbox", "score"})


def is_results_list(data: object) -> bool:
    """Whether ``data`` (parsed JSON) has the form of a COCO results file: a list of records with
    ``image_id``, ``category_id``, ``bbox`` and ``score``."""
    return isinstance(data, list) and all(
        isinstance(d, dict) and d.keys() >= RESULT_KEYS for d in data
    )


def load_detections(path: str | os.PathLike, dataset: EvalDataset) -> dict[int, list[dict]]:
    """A COCO results file (list of ``{image_id, category_id, bbox XYWH, score}``), grouped by image
    and restricted to the dataset's images. ``"gt"`` makes oracle detections from the non-crowd
    ground-truth boxes with score 1."""
    ids = {im["id"] for im in dataset.images}
    if os.fspath(path) == "gt":
        return {
            i: [
                {"image_id": i, "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                for a in dataset.objects(i)
                if not a.get("iscrowd", 0)
            ]
            for i in sorted(ids)
        }
    path = Path(path)
    dets = read_json(path, "detections file")
    if not is_results_list(dets):
        raise InputError(
            f"{path} is not a COCO results file: expected a list of "
            "{image_id, category_id, bbox, score}"
        )
    unknown = sorted({d["image_id"] for d in dets} - dataset.all_image_ids, key=str)
    if unknown:
        raise InputError(
            f"{path}: {len(unknown)} image ids are not in {dataset.annotations.name}, "
            f"e.g. {unknown[0]} (detections for another dataset?)"
        )
    out: dict[int, list[dict]] = {i: [] for i in sorted(ids)}
    for d in dets:
        if d["image_id"] in ids:
            out[d["image_id"]].append(d)
    if not any(out.values()):
        raise InputError(f"{path} has no detections for the evaluated images")
    return out
