"""The single-sample-reset protocol's settings (docs/DESIGN.md §2): what is the same for every method and
recorded with each run."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from tta_bench.core.errors import TTAError
from tta_bench.core.settings import LR_GRIDS, OPTIMIZERS, PAPER_LR_GRID, default

__all__ = ["LR_GRIDS", "OPTIMIZERS", "PAPER_LR_GRID", "Protocol"]

if TYPE_CHECKING:
    from tta_bench.core.method import Method


@dataclass(frozen=True)
class Protocol:
    """Everything about adaptation that is the same for every method; recorded with each run."""

    lrs: tuple[float, ...]
    threshold: float | None = default("threshold")  # None: adapt and score every sample
    steps: int = default("steps")
    clip: float | None = default("clip")  # max gradient norm; None: no clipping
    optimizer: str = default("optimizer")
    momentum: float = default("momentum")
    weight_decay: float = default("weight_decay")

    def __post_init__(self) -> None:
        if not self.lrs:
            raise TTAError("no learning rate given: pass --lr 1e-3 (or a list 1e-3,2e-2, "
                           "or --lr-grid paper)")
        if any(not 0 < lr < math.inf for lr in self.lrs):
            raise TTAError(f"learning rates must be finite and > 0, got {list(self.lrs)}")
        if len(set(self.lrs)) != len(self.lrs):
            raise TTAError(f"learning rates repeat: {list(self.lrs)}; give each once")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise TTAError(f"threshold must be in (0, 1] (Δ1,2 is a difference of probabilities), got {self.threshold}")
        if self.steps < 1:
            raise TTAError(f"steps must be >= 1, got {self.steps}")
        if self.clip is not None and not 0 < self.clip < math.inf:
            raise TTAError(f"clip must be finite and > 0 (or none to disable clipping), got {self.clip}")
        if self.optimizer not in OPTIMIZERS:
            raise TTAError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        for name in ("momentum", "weight_decay"):
            if not 0 <= getattr(self, name) < math.inf:
                raise TTAError(f"{name.replace('_', ' ')} must be finite and >= 0, got {getattr(self, name)}")

    @property
    def one_gradient(self) -> bool:
        """True when one gradient serves the whole lr sweep: a single step (T = 1) from θ0, whose
        gradient does not depend on the learning rate. Each lr then replays the optimizer's first
        step with that gradient (momentum, Adam and weight decay included: their first step is a
        function of θ0, g and η alone), as a separate run would take it."""
        return self.steps == 1

    @property
    def plain_sgd(self) -> bool:
        """One step of plain SGD, θ0 − η·g: what blocks of samples adapt at once (vmap)."""
        return self.one_gradient and self.optimizer == "sgd" and self.momentum == 0 and self.weight_decay == 0

    def check(self, method: Method) -> None:
        """What this protocol cannot do with `method`, as one TTAError (checked before any model loads)."""
        if method.selects and self.steps != 1:
            raise TTAError(f"method {method.name} takes one step on each input it selects (set how many with "
                           f"its hyperparameters), so --steps must be 1, got {self.steps}")

    def make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            # fused: one pass over the weights (SmolLM2-135M on one CPU core: 0.08 s a step, not 0.48 s)
            fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
            return torch.optim.Adam(params, lr=lr, weight_decay=self.weight_decay, fused=fused or None)
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
