"""PASLE (Hu et al., 2025): progressive adaptation with soft candidate labels.

Certain sample (p(1) − p(2) > τ): L = CE(z/T, ŷ0). Uncertain: candidate set
Y = {k : p_k + τ > p(1)} and L = −log Σ_{k∈Y} softmax(z/T)_k. All parameters (seed paper,
Table 3). Under the shared gate (d = 0.16 < τ = 0.6) every class is a candidate, the loss is
−log 1 = 0 and PASLE never updates: report `gate=own` (PASLE's split decides which samples are
adapted and scored, i.e. Δ1,2 < τ) beside it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tta_bench.hparams import HParam
from tta_bench.method import Method, Step


class Pasle(Method):
    name = "pasle"
    description = "soft candidate-label adaptation (Hu et al. 2025)"
    default_lr = 5e-5  # the paper's Table 2 setting under this protocol
    scoring_hparams = ("gate",)  # gate=own scores other samples than the shared gate
    hparams = {
        "tau": HParam(0.6, float, "certainty margin τ", interval="(0, 1)"),
        "temperature": HParam(0.8, float, "softmax temperature T", interval="(0, 100]"),
        "gate": HParam("shared", str, "shared: the Δ1,2 < d gate; own: PASLE's split (Δ1,2 < τ)",
                       choices=("shared", "own")),
    }

    def gate_threshold(self, threshold: float | None) -> float | None:
        return self.hp.tau if self.hp.gate == "own" else threshold

    @staticmethod
    def candidates(probs: Tensor, tau: float) -> Tensor:
        """Boolean mask of Y = {k : p_k + τ > p(1)}."""
        return probs + tau > probs.max()

    def loss(self, step: Step) -> Tensor | None:
        z = step.logits / self.hp.temperature
        p, pred = step.source.probs, step.source.pred
        if step.source.delta > self.hp.tau:
            return F.cross_entropy(z[None], torch.tensor([pred], device=z.device))
        y = self.candidates(p, self.hp.tau)
        if bool(y.all()):
            return None  # every class is a candidate: the loss is identically 0
        return -(z[y].logsumexp(0) - z.logsumexp(0))
