"""AugMix views of a preprocessed image (for MEMO), made in pixel space and preprocessed back."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torchvision.transforms import v2


def augmix_views(scale: Tensor, shift: Tensor) -> Callable[[Tensor, int], Tensor]:
    """Views for inputs that were preprocessed as (pixel − shift) / scale, pixel in 0..255
    (scale, shift per channel). Uses torch's global RNG: seed it to make the views reproducible."""
    scale, shift = scale.reshape(-1, 1, 1), shift.reshape(-1, 1, 1)

    def views(inputs: Tensor, n: int) -> Tensor:
        x = inputs[0].detach().cpu()
        pixels = (x * scale + shift).round().clamp(0, 255).to(torch.uint8)
        augmix = v2.AugMix()
        out = torch.stack([augmix(pixels) for _ in range(n)]).float()
        return ((out - shift) / scale).to(inputs.device, inputs.dtype)

    return views
