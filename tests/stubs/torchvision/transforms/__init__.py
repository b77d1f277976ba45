"""torchvision.transforms stand-in: Compose, ToTensor and Normalize with torchvision's maths."""

import numpy as np
import torch

from . import functional  # noqa: F401


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ToTensor:
    """H x W x C uint8 array -> C x H x W float32 in [0, 1] (torchvision.to_tensor)."""

    def __call__(self, pic):
        img = torch.from_numpy(np.ascontiguousarray(pic.transpose((2, 0, 1)))).contiguous()
        return img.to(dtype=torch.get_default_dtype()).div(255)


class Normalize:
    """(x - mean) / std per channel (torchvision.functional.normalize)."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, tensor):
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        return tensor.sub(mean).div(std)
