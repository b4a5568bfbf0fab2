"""Each focus loss: adapted logits equal a hand-computed SGD step (with clipping) on a linear model."""
import math

import pytest
import torch
from torch import nn

import tta_bench


def linear_model(seed: int = 0, n_in: int = 6, n_out: int = 7) -> nn.Linear:
    torch.manual_seed(seed)
    model = nn.Linear(n_in, n_out).double()
    with torch.no_grad():
        model.weight.mul_(3)
    return model


def dlogits_by_hand(method: str, z: torch.Tensor, n_focus: int = 2, weighted: bool = True,
                    loss: str = "logits") -> torch.Tensor:
    """dL/dz written out for each loss (p̃ constant)."""
    p = torch.softmax(z, 0)
    focus = torch.argsort(p, descending=True)[:n_focus]
    in_f = torch.zeros_like(z, dtype=torch.bool)
    in_f[focus] = True
    if method == "entropy" or loss == "entropy":
        h = -(p * p.log()).sum()
        return -p * (p.log() + h)
    if method == "dofo":
        return in_f.logical_not().double() / (~in_f).sum()
    w = torch.where(in_f, p if weighted else torch.full_like(p, 1 / n_focus), torch.zeros_like(p))
    if loss == "logits":
        return -w
    return -w + p * w.sum()  # xent: d/dz_k of −Σ_c w_c log p_c


def sgd_step_by_hand(model: nn.Linear, x: torch.Tensor, gz: torch.Tensor, lr: float, clip: float | None):
    """z' for W' = W − lr·c·gz xᵀ, b' = b − lr·c·gz, c the clip_grad_norm_ coefficient."""
    gw, gb = torch.outer(gz, x), gz
    norm = math.sqrt(float((gw**2).sum() + (gb**2).sum()))
    c = 1.0 if clip is None else min(1.0, clip / (norm + 1e-6))
    w, b = model.weight.detach() - lr * c * gw, model.bias.detach() - lr * c * gb
    return w @ x + b


CASES = [
    ("ifo", {}),
    ("ifo", {"weighted": False}),
    ("ifo", {"n_focus": 3}),
    ("ifo", {"loss": "xent"}),
    ("ifo", {"loss": "xent", "weighted": False}),
    ("ifo", {"loss": "entropy"}),
    ("dofo", {}),
    ("dofo", {"n_focus": 4}),
    ("entropy", {}),
]


@pytest.mark.parametrize("clip", [1.0, None, 0.05])
@pytest.mark.parametrize("name,hp", CASES)
def test_adapted_logits_equal_hand_computed_sgd_step(name, hp, clip):
    model = linear_model()
    x = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lr = 0.3
    z = model(x).detach()
    expected = sgd_step_by_hand(model, x, dlogits_by_hand(name, z, **hp), lr, clip)
    result = tta_bench.adapt(model, x[None], tta_bench.get_method(name, **hp), threshold=None,
                             lr=lr, clip=clip)
    assert result.updated and result.uncertain
    torch.testing.assert_close(result.source_logits, z)
    torch.testing.assert_close(result.adapted_logits, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(result.adapted_logits, z)  # the step did something


def test_focus_uses_the_top_classes_and_source_weights():
    model = linear_model()
    x = torch.randn(1, 6, dtype=torch.float64)
    step = tta_bench.Step(model, x, lambda m, inp: m(inp))
    z = model(x)[0]
    p = torch.softmax(z.detach(), 0)
    top2 = torch.argsort(p, descending=True)[:2]
    loss = tta_bench.get_method("ifo").loss(step)
    torch.testing.assert_close(loss, -(p[top2] * z[top2]).sum())
    assert tta_bench.get_method("none").adapts is False
