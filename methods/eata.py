"""EATA (Niu et al., ICML 2022): entropy minimisation on reliable, non-redundant samples, with an
anti-forgetting Fisher penalty.

Official code, mr-eggplant/EATA `eata.py` (`forward_and_adapt_eata`, `update_model_probs`,
`collect_params`, `configure_model`) and `main.py` (defaults, Fisher):
- reliable: the entropy E < E0, E0 = e0_frac·ln C (`e_margin`, 0.4·ln 1000 there);
- non-redundant: |cos(m, p)| < ε, m the moving average of the predictions p of earlier samples
  that passed both filters (m = p of the first reliable sample, then m ← 0.9·m + 0.1·p); no
  redundancy filter while m is unset;
- loss: E·exp(E0 − E) (the weight detached) + β·Σ F·(θ − θ0)², β = `fisher_alpha` (2000), F the
  mean over batches of 64 clean images of the squared gradient of the batch's cross-entropy
  against its own argmax, in the adaptation mode, at θ0 (`fisher_size` 2000 images);
- parameters: every BatchNorm's affine weight and bias (models without BatchNorm: every
  normalisation layer's, as the ViT ports do); SGD with momentum 0.9, whose first step from θ0 is
  a plain SGD step; `configure_model` normalises with the batch's statistics (`norm_stats=sample`).

Under the single-sample reset:
- with one step (T = 1) the Fisher term and its gradient are 0 at θ0: EATA is ETA, and the Fisher
  is not computed. For T > 1 it is, from the task's reference images (cifar10: clean images of the
  validation half, never scored; see `Task.reference_samples`).
- m is the first state a method carries from one sample to the next (`memory=stream`, as the
  official `reset()` keeps it): the engine owns it (`Method.remembers`), in stream order over the
  samples the gate passes to the method, read and updated once per sample from its θ0 prediction,
  so every learning rate sees the same m (the official code, over T steps, updates m at each
  step's weights). `memory=none` forgets it after each sample, which disables the redundancy filter.
- ε is tied to 1000 classes, where a one-hot p against a uniform m has cos 1/√C = 0.032: here
  ε = d_frac/√C with d_frac = 0.05·√1000, so ε = 0.05 at C = 1000 and 0.5 at C = 10 (EATA-derived
  CIFAR-10 code uses 0.4), unless `d_margin` is given."""
from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tta_bench.core.errors import TTAError
from tta_bench.core.hparams import HParam
from tta_bench.core.method import Step
from tta_bench.core.norms import norm_affine, norm_layers
from tta_bench.core.protocol import Protocol

from .deyo import probabilities
from .focus import entropy
from .tent import NormStatsMethod

MOMENTUM_OF_M = 0.9  # update_model_probs
FISHER_BATCH = 64  # the official loader's batch


def eata_parameters(model: nn.Module) -> tuple[dict[str, nn.Parameter], str]:
    """BatchNorm affine parameters (official `collect_params`), else every norm layer's."""
    layers = norm_layers(model)
    batch_norms = [(n, m) for n, m in layers if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batch_norms:
        return norm_affine(model, batch_norms, "eata"), "every BatchNorm layer (official collect_params)"
    return norm_affine(model, layers, "eata"), "no BatchNorm: every normalisation layer"


class EATA(NormStatsMethod):
    name = "eata"
    description = "reliable and non-redundant entropy minimisation with a Fisher penalty (Niu et al. 2022), images"
    default_lr = 2.5e-4  # the official ImageNet setting (SGD, batch 64)
    task_kinds = frozenset({"image"})
    hparams = {
        "e0_frac": HParam(0.4, float, "reliable filter E < E0 = e0_frac·ln C, also the weight exp(E0 − E) "
                          "(official 0.4)", interval="(0, 1]"),
        "d_frac": HParam(0.05 * math.sqrt(1000), float, "redundancy filter |cos(m, p)| < ε = d_frac/√C "
                         "(0.05 at C = 1000, official)", interval="(0, 1000]"),
        "d_margin": HParam(None, float, "ε itself; none: d_frac/√C", nullable=True, interval="(0, 1000]"),
        "memory": HParam("stream", str, "stream: m kept across samples in stream order (official); none: "
                         "forgotten after each sample (no redundancy filter)", choices=("stream", "none")),
        "fisher_alpha": HParam(2000.0, float, "β of the Fisher penalty (official 2000); acts only with --steps > 1",
                               interval="[0, 1e12]"),
        "fisher_size": HParam(2000, int, "reference images for the Fisher (official 2000)", interval="[1, 1000000]"),
        **NormStatsMethod.hparams,
    }

    def __init__(self, **hparams: Any):
        super().__init__(**hparams)
        self.fisher: list[tuple[nn.Parameter, Tensor, Tensor]] = []  # (θ, F, θ0), only for T > 1

    @property
    def remembers(self) -> bool:
        return self.hp.memory == "stream"

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params, rule = eata_parameters(model)
        self.resolved["parameter_rule"] = rule
        return params

    def prepare(self, model: nn.Module, forward: Callable[[Any], Tensor], params: dict[str, nn.Parameter],
                protocol: Protocol, reference: Callable[[int, int], Iterable[Any]]) -> None:
        self.fisher = []
        if protocol.steps == 1 or self.hp.fisher_alpha == 0:
            self.resolved["fisher"] = ("not used: its gradient is 0 at θ0, where one step is taken (ETA)"
                                       if protocol.steps == 1 else "not used: fisher_alpha = 0")
            return
        live = dict(params)
        squares = {name: torch.zeros_like(p) for name, p in live.items()}
        batches = 0
        try:
            first = iter(reference(self.hp.fisher_size, FISHER_BATCH))
            batches_in = itertools.chain([next(first)], first)
        except TTAError as err:
            raise TTAError(f"{err}: eata's Fisher penalty (--steps > 1) needs them; pass -H fisher_alpha=0 "
                           f"(ETA) or --steps 1") from None
        with torch.enable_grad(), self.adaptation_mode(model):
            for inputs in batches_in:
                logits = forward(inputs)
                loss = F.cross_entropy(logits, logits.argmax(dim=1))
                grads = torch.autograd.grad(loss, list(live.values()), allow_unused=True)
                for (name, _), g in zip(live.items(), grads, strict=True):
                    if g is not None:
                        squares[name] += g.detach() ** 2
                batches += 1
        self.fisher = [(p, squares[name] / batches, p.detach().clone()) for name, p in live.items()]
        self.resolved["fisher"] = (f"mean squared gradient over {batches} batches of up to {FISHER_BATCH} of the "
                                   f"task's first {self.hp.fisher_size} reference images")

    def epsilon(self, n_classes: int) -> float:
        return self.hp.d_margin if self.hp.d_margin is not None else self.hp.d_frac / math.sqrt(n_classes)

    def loss(self, step: Step) -> Tensor | None:
        n_classes = step.logits.shape[-1]
        e0, eps = self.hp.e0_frac * math.log(n_classes), self.epsilon(n_classes)
        self.resolved |= {"e0": e0, "d_margin": eps}
        e = entropy(step.logits)
        if not float(e.detach()) < e0:
            return None
        p = probabilities(step.logits.detach())
        m = step.memory
        if m is not None:
            if not float(F.cosine_similarity(m[None], p[None], dim=1).abs()) < eps:
                return None
            step.remember(MOMENTUM_OF_M * m + (1 - MOMENTUM_OF_M) * p)
        else:
            step.remember(p)
        loss = e * math.exp(e0 - float(e.detach()))
        for theta, fisher, theta0 in self.fisher:
            loss = loss + self.hp.fisher_alpha * (fisher * (theta - theta0) ** 2).sum()
        return loss
