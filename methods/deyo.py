"""DeYO (Lee et al., ICLR 2024): entropy minimisation on the samples whose prediction is confident
and rests on the object's shape.

Filters (official code, Jhyun17/DeYO `methods/deyo.py`, `forward_and_adapt_deyo`): the entropy
E < e_frac·ln C (`deyo_margin`, 0.5·ln 1000 there), then the pseudo-label probability difference
PLPD = p_ŷ(x) − p_ŷ(x′) > `plpd` (0.2), where x′ is x cut into patches × patches tiles that are
shuffled (`aug_type=patch`, `patch_len=4`; one forward without gradient) and ŷ the prediction on x.
Loss: E·(exp(E0 − E) + exp(PLPD)), both weights detached, E0 = e0_frac·ln C (`margin_e0`,
0.4·ln 1000 there). Parameters: SAR's official norm-layer list (DeYO's `collect_params` is SAR's);
`norm_stats` as in Tent and SAR (the official code normalises BatchNorm with the batch's statistics:
`norm_stats=sample`). The official SGD has momentum 0.9, which a first step from θ0 does not feel.

Per-sample protocol: one step from θ0 per sample. The official thresholds are tied to 1000
classes; here they scale with the task's C (state: e_frac and e0_frac). The tile permutation is
drawn from a generator seeded by (seed, sample index) instead of the global RNG, so every learning
rate and every rerun sees the same x′ and the one-gradient lr sweep stays exact. An image whose
side is not a multiple of `patches` is resized to the nearest lower multiple and back (bilinear,
antialiased: torchvision's `Resize` on tensors, as the official code does)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_bench.core.hparams import SEEDS, HParam
from tta_bench.core.method import Step

from .focus import entropy
from .sar import sar_parameters
from .tent import NormStatsMethod


def shuffle_patches(x: Tensor, patches: int, order: Tensor) -> Tensor:
    """x [B, C, H, W] cut into patches × patches tiles, tile k of the result being tile order[k]
    (row-major), as the official `rearrange('b c (ps1 h) (ps2 w) -> b (ps1 ps2) c h w')`."""
    size = x.shape[-2:]
    side = tuple((s // patches) * patches for s in size)
    if side != tuple(size):
        x = F.interpolate(x, size=side, mode="bilinear", antialias=True, align_corners=False)
    b, c, h, w = x.shape
    tiles = x.reshape(b, c, patches, h // patches, patches, w // patches).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(b, patches * patches, c, h // patches, w // patches)[:, order]
    out = tiles.reshape(b, patches, patches, c, h // patches, w // patches).permute(0, 3, 1, 4, 2, 5)
    out = out.reshape(b, c, h, w)
    if side != tuple(size):
        out = F.interpolate(out, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return out


def probabilities(logits: Tensor) -> Tensor:
    """softmax in at least float32 (bf16 autocast logits), in float64 for a float64 model."""
    return torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


class DeYO(NormStatsMethod):
    name = "deyo"
    description = "entropy and PLPD filtered, reweighted entropy minimisation (Lee et al. 2024), images only"
    default_lr = 2.5e-4  # the official ImageNet setting (SGD, batch 64)
    task_kinds = frozenset({"image"})
    hparams = {
        "e_frac": HParam(0.5, float, "entropy filter E < e_frac·ln C (official 0.5)", interval="(0, 1]"),
        "e0_frac": HParam(0.4, float, "E0 = e0_frac·ln C of the weight exp(E0 − E) (official 0.4)",
                          interval="(0, 1]"),
        "plpd": HParam(0.2, float, "PLPD filter: update if PLPD > plpd (official 0.2)", interval="[-1, 1)"),
        "patches": HParam(4, int, "tiles per side of the shuffled image x′ (official 4)", interval="[2, 32]"),
        "seed": HParam(0, int, "seed of the tile permutation (combined with the sample index)", interval=SEEDS),
        **NormStatsMethod.hparams,
    }

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params, rule = sar_parameters(model)
        self.resolved["parameter_rule"] = rule
        return params

    def permutation(self, index: int) -> Tensor:
        """The tile order of sample `index` (a uniform permutation, seeded)."""
        g = torch.Generator().manual_seed(self.hp.seed * 1_000_003 + index)
        return torch.randperm(self.hp.patches ** 2, generator=g)

    def filters(self, step: Step) -> tuple[Tensor, float] | None:
        """(E with gradient, PLPD) if the sample passes both filters, else None."""
        logits = step.logits
        log_c = math.log(logits.shape[-1])
        e = entropy(logits)
        if not float(e.detach()) < self.hp.e_frac * log_c:
            return None
        shuffled = shuffle_patches(step.inputs, self.hp.patches, self.permutation(step.index).to(step.inputs.device))
        with torch.no_grad():
            p_shuffled = probabilities(step.forward(shuffled)[0])
        p = probabilities(logits.detach())
        y = int(p.argmax())
        plpd = float(p[y] - p_shuffled[y])
        return (e, plpd) if plpd > self.hp.plpd else None

    def loss(self, step: Step) -> Tensor | None:
        passed = self.filters(step)
        if passed is None:
            return None
        e, plpd = passed
        e0 = self.hp.e0_frac * math.log(step.logits.shape[-1])
        return e * (math.exp(e0 - float(e.detach())) + math.exp(plpd))
