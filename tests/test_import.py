"""`import leansam` stays light: torch, numpy and pillow only (STYLE rule 8)."""

import json
import subprocess
import sys

HEAVY = [
    "onnx",
    "onnxruntime",
    "pycocotools",
    "fastapi",
    "uvicorn",
    "cv2",
    "torchvision",
    "safetensors",
    "tqdm",
    "yaml",
    "scipy",
    "segment_anything",
    "efficientsam",
    "lvis",
]


def _top_level_modules(stmt: str) -> set[str]:
    code = f"import json, sys; {stmt}; print(json.dumps(sorted(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in json.loads(res.stdout)}


def test_import_leansam_is_light():
    # torch itself may pull some of these (it imports tqdm when present): judge what leansam adds.
    baseline = _top_level_modules("import torch, numpy, PIL")
    loaded = _top_level_modules("import leansam")
    assert "torch" in loaded and "leansam" in loaded
    added = (loaded - baseline) & set(HEAVY)
    assert not added, sorted(added)
    assert not loaded & {"onnx", "pycocotools", "fastapi", "cv2", "torchvision"}


def test_public_api():
    import leansam

    assert set(leansam.__all__) >= {"create_model", "list_models", "SamPredictor"}
