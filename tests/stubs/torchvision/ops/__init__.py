from .boxes import batched_nms, box_area  # noqa: F401
