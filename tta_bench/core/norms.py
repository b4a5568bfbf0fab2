"""Parameter selections shared by methods (normalisation-layer affine parameters)."""
from __future__ import annotations

from torch import nn

from tta_bench.core.errors import TTAError

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """BatchNorm, LayerNorm and GroupNorm layers with affine parameters, in module order."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, NORM_LAYERS) and getattr(m, "weight", None) is not None]


def norm_affine(model: nn.Module, layers: list[tuple[str, nn.Module]] | None = None,
                method: str = "this method") -> dict[str, nn.Parameter]:
    """{'layer.weight': …, 'layer.bias': …} of the given (default: all) normalisation layers."""
    layers = norm_layers(model) if layers is None else layers
    if not layers:
        raise TTAError(f"{method} adapts the affine weight/bias of normalisation layers "
                       "(BatchNorm, LayerNorm, GroupNorm) and this model has none")
    out: dict[str, nn.Parameter] = {}
    for name, m in layers:
        for attr in ("weight", "bias"):
            p = getattr(m, attr, None)
            if isinstance(p, nn.Parameter):
                out[f"{name}.{attr}" if name else attr] = p
    return out
