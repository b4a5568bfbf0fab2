"""CIFAR-10-C-style corruptions of 32 px uint8 images (Hendrycks & Dietterich, ICLR 2019).

Severity parameters follow CIFAR-10-C's generator; the operations are reimplemented with torch /
torchvision, so images are close to, not byte-identical with, the released CIFAR-10-C files.
Noise is seeded by the sample's index: every run sees the same corrupted image."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

SEVERITY = {  # severities 1..5
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # std on [0, 1]
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # factor towards the image mean
    "jpeg": (80, 65, 58, 50, 40),  # JPEG quality
}
CORRUPTIONS = tuple(SEVERITY)


def corrupt(image: Tensor, name: str, severity: int, seed: int) -> Tensor:
    """image: uint8 [32, 32, 3] -> corrupted uint8 [32, 32, 3]."""
    c = SEVERITY[name][severity - 1]
    if name == "jpeg":  # Pillow, as CIFAR-10-C's generator
        buffer = io.BytesIO()
        Image.fromarray(image.numpy()).save(buffer, "JPEG", quality=c)
        return torch.from_numpy(np.array(Image.open(buffer)))
    x = image.permute(2, 0, 1).float() / 255
    if name == "gaussian_noise":
        x = x + c * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    elif name == "gaussian_blur":
        x = gaussian_blur(x, kernel_size=2 * int(4 * c + 0.5) + 1, sigma=c)
    elif name == "contrast":
        mean = x.mean()
        x = (x - mean) * c + mean
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
