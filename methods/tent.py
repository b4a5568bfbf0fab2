"""Tent (Wang et al., 2021): entropy minimisation on the normalisation layers' affine parameters.

Under the per-sample reset one step from θ0 is taken, where `--momentum` has no effect (PyTorch's
first heavy-ball step is a plain SGD step); the official Tent SGD uses Nesterov momentum 0.9,
whose first step is 1.9·lr·g. Official Tent (and SAR) normalise BatchNorm
with the test batch's statistics; here that is `norm_stats=sample` (`NormStatsMethod`: statistics
of the one input, running statistics untouched, only the BatchNorm layers in train mode), and the
default `source` keeps eval mode like every other method."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import Tensor, nn

from tta_bench.core.hparams import HParam
from tta_bench.core.method import Method, Step
from tta_bench.core.norms import norm_affine

from .focus import entropy


@contextmanager
def sample_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the current input's statistics; running stats untouched."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in layers]
    for m in layers:
        m.train()
        m.track_running_stats = False  # batch statistics, running buffers neither used nor updated
    try:
        yield
    finally:
        for m, (training, track) in zip(layers, saved, strict=True):
            m.train(training)
            m.track_running_stats = track


class NormStatsMethod(Method):
    """Base of the methods with `norm_stats=source|sample` (Tent, SAR): with `sample` the
    adaptation and prediction forwards normalise BatchNorm with the input's own statistics."""

    hparams = {
        "norm_stats": HParam("source", str, "source: eval-mode BatchNorm (the shared protocol); "
                             "sample: normalise with the input's own statistics (official code)",
                             choices=("source", "sample")),
    }

    def adaptation_mode(self, model: nn.Module):
        return sample_statistics(model) if self.hp.norm_stats == "sample" else super().adaptation_mode(model)


class Tent(NormStatsMethod):
    name = "tent"
    description = "entropy minimisation on normalisation-layer affine parameters (Wang et al. 2021)"
    default_lr = 1e-4  # the paper's Table 2 setting under this protocol

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return norm_affine(model, method="tent")

    def loss(self, step: Step) -> Tensor:
        return entropy(step.logits)
