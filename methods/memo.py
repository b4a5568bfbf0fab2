"""MEMO (Zhang et al., 2022): minimise the marginal entropy over augmented views, all parameters.

L = H(p̄) with p̄ = (1/B) Σ_b softmax(f(aug_b(x))); one step, then predict on the un-augmented x.
Views are AugMix applied to the preprocessed image in pixel space (the paper augments the raw
image), seeded by (seed, sample index): the same views for every learning rate and every run."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from tta_bench.core.hparams import SEEDS, HParam
from tta_bench.core.method import Method, Step

MAX_VIEWS = 256  # a stated cap, 4x the paper's 64: each view is a forward and a backward per sample


class Memo(Method):
    name = "memo"
    description = "marginal entropy over augmented views (Zhang et al. 2022), images only"
    default_lr = 2.5e-4
    task_kinds = frozenset({"image"})
    hparams = {
        "views": HParam(16, int, "augmented views B (the paper: 64)", interval=f"[1, {MAX_VIEWS}]"),
        "seed": HParam(0, int, "seed of the augmentations (combined with the sample index)",
                       interval=SEEDS),
    }

    def loss(self, step: Step) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.hp.seed * 1_000_003 + step.index)
            views = step.augment(self.hp.views)
        logp = torch.log_softmax(step.forward(views), dim=-1)
        marginal = torch.logsumexp(logp, dim=0) - math.log(len(logp))  # log p̄
        return -(marginal.exp() * marginal).sum()
