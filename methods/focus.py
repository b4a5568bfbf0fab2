"""Focus on the likely classes (iFo, doFo) and their loss ablations (docs/DESIGN.md §3, paper Eq. 2)."""
from __future__ import annotations

import torch
from torch import Tensor

from tta_bench.core.errors import TTAError
from tta_bench.core.hparams import HParam
from tta_bench.core.method import Method, Step
from tta_bench.core.task import Task

LOSSES = ("logits", "xent", "entropy")


def check_focus(method: Method, task: Task) -> None:
    """F must leave at least one class out of focus, or the loss says nothing about the prediction
    (iFo: every logit raised; doFo: a mean over no classes). Where samples have fewer classes
    (multiple choice), those with every class in focus are left unadapted (`all_in_focus`)."""
    n_classes = task.num_classes()
    if n_classes is not None and method.hp.n_focus >= n_classes:
        raise TTAError(f"method {method.name}: n_focus={method.hp.n_focus} puts every class of task "
                       f"{task.name} in focus ({n_classes} classes), so the loss is undefined; "
                       f"use n_focus <= {n_classes - 1}")


def all_in_focus(method: Method, step: Step) -> bool:
    """The sample's classes (those with source probability > 0: a multiple-choice question's
    choices) all fall in F."""
    return int((step.source.probs > 0).sum()) <= method.hp.n_focus


def entropy(logits: Tensor) -> Tensor:
    """H(p) = −Σ p log p of softmax(logits)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum()


class IFo(Method):
    """Increase the focus classes F (the n_focus most likely at θ0).

    loss=logits:  −Σ_{c∈F} p̃_c z_c  (weighted)  or  −(1/|F|) Σ_{c∈F} z_c
    loss=xent:    −Σ_{c∈F} p̃_c log p_c        or  −(1/|F|) Σ_{c∈F} log p_c
    loss=entropy: H(p)  (ablation; F and weighting do not apply)
    p̃ are the source probabilities, constant in backpropagation."""

    name = "ifo"
    description = "increase the logits of the likely (focus) classes"
    default_lr = 2.05e-2  # the paper's ImageNet learning rate
    batchable = True
    hparams = {
        "n_focus": HParam(2, int, "number of focus classes |F|", interval="[1, 100000]"),
        "weighted": HParam(True, bool, "weight each focus term by its source probability"),
        "loss": HParam("logits", str, "logits | xent | entropy (paper Experiments 9, 10)", choices=LOSSES),
    }

    def supports(self, task: Task) -> None:
        super().supports(task)
        if self.hp.loss != "entropy":  # the entropy ablation has no focus set
            check_focus(self, task)

    def declines(self, step: Step) -> bool:
        return self.hp.loss != "entropy" and all_in_focus(self, step)

    def loss(self, step: Step) -> Tensor:
        z = step.logits
        if self.hp.loss == "entropy":
            return entropy(z)
        focus = step.source.focus(self.hp.n_focus)
        scores = z if self.hp.loss == "logits" else torch.log_softmax(z, dim=-1)
        weights = step.source.probs[focus] if self.hp.weighted else 1.0 / len(focus)
        return -(weights * scores[focus]).sum()


class DoFo(Method):
    """Decrease the out-of-focus classes: L = (1/|C∖F|) Σ_{c∉F} z_c."""

    name = "dofo"
    description = "decrease the logits of the unlikely (out-of-focus) classes"
    default_lr = 2.05e-2
    hparams = {"n_focus": IFo.hparams["n_focus"]}

    def supports(self, task: Task) -> None:
        super().supports(task)
        check_focus(self, task)

    def declines(self, step: Step) -> bool:
        return all_in_focus(self, step)

    def loss(self, step: Step) -> Tensor:
        z = step.logits
        out = torch.ones_like(z, dtype=torch.bool)
        out[step.source.focus(self.hp.n_focus)] = False
        return z[out].mean()


class Entropy(Method):
    """Entropy minimisation on all parameters (the same loss as `ifo loss=entropy`)."""

    name = "entropy"
    description = "minimise the prediction entropy, all parameters"
    default_lr = IFo.default_lr
    batchable = True
    hparams = {}

    def loss(self, step: Step) -> Tensor:
        return entropy(step.logits)
