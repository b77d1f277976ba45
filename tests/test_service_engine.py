"""The service's engine side without the ``serve`` extra: ``leansam.service.engine`` (and the
package, limits, errors) import and work with FastAPI, pydantic and starlette blocked, while the
app still says in one line which extra it needs. Runs whether or not FastAPI is installed."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

BLOCKED = ("fastapi", "pydantic", "starlette")

# A None entry in sys.modules makes `import name` (and any `name.sub`) raise ImportError, as if the
# package were not installed; the child then imports the engine, uses it, and reports what loaded.
CHILD = textwrap.dedent(
    """
    import io, json, sys
    from types import SimpleNamespace

    for name in {blocked!r}:
        sys.modules[name] = None

    import numpy as np
    from PIL import Image

    import leansam.service
    from leansam.service.engine import (
        CachedImage, Engine, LRUCache, decode_image, mask_png, validate_prompts,
    )
    from leansam.service.errors import ServiceError
    from leansam.service.limits import BodyLimit, Gate, Limits

    report = {{"engine_is_package_engine": leansam.service.Engine is Engine}}
    buf = io.BytesIO()
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(buf, format="PNG")
    report["decoded_shape"] = list(decode_image(buf.getvalue(), Limits()).shape)
    try:
        decode_image(b"not an image", Limits())
    except ServiceError as e:
        report["bad_upload_status"] = e.status
    item = CachedImage("a", None, height=6, width=8, data=b"")
    req = SimpleNamespace(points=[(9.0, 1.0)], labels=[1], boxes=None)
    try:
        validate_prompts(req, item, Limits())
    except ServiceError as e:
        report["outside_point_status"] = e.status
    cache = LRUCache(1)
    cache.put(item)
    cache.put(CachedImage("b", None, height=6, width=8, data=b""))
    report["evictions"] = cache.evictions
    report["mask_png"] = bool(mask_png(np.ones((2, 2), bool)))
    try:
        from leansam.service import create_app  # noqa: F401
    except ImportError as e:
        report["create_app_error"] = f"{{type(e).__name__}}: {{e}}"
    report["loaded"] = sorted(
        m for m in sys.modules
        if m.split(".")[0] in {blocked!r} and sys.modules[m] is not None
    )
    print(json.dumps(report))
    """
).format(blocked=BLOCKED)


def test_engine_imports_and_works_without_fastapi_or_pydantic():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []  # nothing of FastAPI / pydantic / starlette got in
    assert report["engine_is_package_engine"]
    assert report["decoded_shape"] == [6, 8, 3]
    assert report["bad_upload_status"] == 415
    assert report["outside_point_status"] == 422
    assert report["evictions"] == 1 and report["mask_png"]
    # the block is real: the app cannot load, and says which extra to install, in one line
    assert report["create_app_error"] == (
        "MissingDependencyError: this needs the `fastapi` package: pip install 'leansam[serve]'"
    )
