"""SAR (Niu et al., 2023): reliable, sharpness-aware entropy minimisation.

Filter: update only if H(p) < E0 (default E0 = 0.4·ln|C|, `e0_frac`; the official code hard-codes
0.4·ln 1000). H ≤ ln|C| always, so e0_frac ≥ 1 turns the filter off.
SAM step: gradient g at θ, move to θ + ρ·g/‖g‖, forward again, apply the filter again, then the
optimizer step at θ with the gradient taken at θ + ε. Parameters: normalisation-layer affine
parameters except the last stage (see `sar_parameters`). `norm_stats` as in Tent (the official
code uses the test batch's BatchNorm statistics). Model recovery (reset when an EMA of H(θ + ε)
drops below 0.2) can trigger on one sample, but it resets after the prediction, as the per-sample
reset does anyway: it changes no output and is not implemented."""
from __future__ import annotations

import math

import torch
from torch import nn

from tta_bench.core.hparams import HParam
from tta_bench.core.norms import norm_affine, norm_layers
from tta_bench.engine.adapt import Updater

from .focus import entropy
from .tent import NormStatsMethod

VIT_BLOCKS = ("blocks", "encoder.layers")  # timm / torchvision ViT block containers


def sar_parameters(model: nn.Module) -> tuple[dict[str, nn.Parameter], str]:
    """Norm-layer affine parameters without the last stage, and the rule that was applied:
    ResNet-style (a `layer4`): all but layer4; ViT-style (`blocks` or `encoder.layers`): all but
    the last three blocks and the norms after them; otherwise all but the last quarter (rounded
    up) of the normalisation layers in module order."""
    layers = norm_layers(model)
    if any(name.split(".")[0] == "layer4" for name, _ in layers):
        kept = [(n, m) for n, m in layers if n.split(".")[0] != "layer4"]
        return norm_affine(model, kept, "sar"), "resnet: all norm layers except layer4"
    modules = dict(model.named_modules())
    for container in VIT_BLOCKS:
        blocks = modules.get(container)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) >= 4:
            last = [f"{container}.{name}" for name, _ in list(blocks.named_children())[-3:]]
            order = list(modules)
            end = max(order.index(n) for n in order if n.startswith(last[-1]))
            kept = [(n, m) for n, m in layers if not any(n.startswith(b + ".") for b in last)
                    and order.index(n) < end]
            return (norm_affine(model, kept, "sar"),
                    f"vit: all norm layers except the last three {container} and the final norm")
    cut = len(layers) - math.ceil(len(layers) / 4)
    return (norm_affine(model, layers[:cut], "sar"),
            f"generic: the first {cut} of {len(layers)} norm layers (last quarter excluded)")


class SAR(NormStatsMethod):
    name = "sar"
    description = "reliable sharpness-aware entropy minimisation (Niu et al. 2023)"
    default_lr = 3.1e-6  # the paper's Table 2 setting under this protocol
    hparams = {
        "e0": HParam(None, float, "entropy filter E0; none: e0_frac·ln|C|", nullable=True,
                     interval="(0, 100]"),
        "e0_frac": HParam(0.4, float, "E0 as a fraction of ln|C| (the official 0.4), unless e0 is given",
                          interval="(0, 1]"),
        "rho": HParam(0.05, float, "SAM neighbourhood radius", interval="(0, 10]"),
        **NormStatsMethod.hparams,
    }

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params, rule = sar_parameters(model)
        self.resolved["parameter_rule"] = rule
        return params

    def reliable(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The entropy if it passes the filter H < E0, else None."""
        e0 = self.hp.e0 if self.hp.e0 is not None else self.hp.e0_frac * math.log(logits.shape[-1])
        self.resolved["e0"] = e0
        h = entropy(logits)
        return h if float(h.detach()) < e0 else None

    def update(self, u: Updater) -> bool:
        h = self.reliable(u.step().logits)
        if h is None:
            return False
        u.backward(h)
        live = [p for p in u.params if p.grad is not None]
        grads = [p.grad for p in live]
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            theta = [p.detach().clone() for p in live]
            torch._foreach_add_(live, torch._foreach_mul(grads, float(self.hp.rho / (norm + 1e-12))))
        try:
            h2 = self.reliable(u.step().logits)  # at θ + ε
            if h2 is None:
                return False
            u.backward(h2)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, theta)  # back to θ exactly
        u.apply()
        return True
