"""torchvision.transforms.functional stand-in: the PIL path that SAM's preprocessing uses."""

import numpy as np
from PIL import Image


def to_pil_image(pic):
    return Image.fromarray(np.ascontiguousarray(pic))


def resize(img, size):
    """PIL image, (h, w) -> PIL bilinear resize, as torchvision does for PIL inputs."""
    h, w = size
    return img.resize((w, h), Image.BILINEAR)
