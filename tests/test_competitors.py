"""Tent, SAR and PASLE against independent step-by-step computations on a small network with
BatchNorm, GroupNorm and LayerNorm, written functionally here (not with the methods' code)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import ToyTask, assert_bit_identical, state
from torch import nn
from tta_bench.methods.pasle import Pasle
from tta_bench.methods.sar import sar_parameters

import tta_bench
from tta_bench import Protocol, RunOptions, TTAError

NORMS = {"bn.weight", "bn.bias", "gn.weight", "gn.bias", "ln.weight", "ln.bias"}


class NormNet(nn.Module):
    def __init__(self, n_classes: int = 5, scale: float = 1.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.gn = nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4)
        self.fc1, self.ln, self.fc2 = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, n_classes)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.1, 0.1)
            self.bn.running_var.uniform_(0.5, 1.5)
            for norm in (self.bn, self.gn, self.ln):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.2, 0.2)
            self.fc2.weight.mul_(scale)
        self.eval()

    def forward(self, x):
        h = F.relu(self.bn(self.conv1(x)))
        h = F.relu(self.gn(self.conv2(h))).mean((2, 3))
        return self.fc2(F.relu(self.ln(self.fc1(h))))


def manual_forward(model: NormNet, P: dict, x: torch.Tensor, sample_stats: bool = False) -> torch.Tensor:
    """NormNet's forward written with torch.nn.functional, parameters from P."""
    h = F.conv2d(x, P["conv1.weight"], P["conv1.bias"])
    if sample_stats:
        h = F.batch_norm(h, None, None, P["bn.weight"], P["bn.bias"], training=True, eps=1e-5)
    else:
        h = F.batch_norm(h, model.bn.running_mean, model.bn.running_var, P["bn.weight"], P["bn.bias"],
                         training=False, eps=1e-5)
    h = F.conv2d(F.relu(h), P["conv2.weight"], P["conv2.bias"])
    h = F.relu(F.group_norm(h, 2, P["gn.weight"], P["gn.bias"], eps=1e-5)).mean((2, 3))
    h = F.layer_norm(F.linear(h, P["fc1.weight"], P["fc1.bias"]), (8,), P["ln.weight"], P["ln.bias"], 1e-5)
    return F.linear(F.relu(h), P["fc2.weight"], P["fc2.bias"])[0]


def entropy(z):
    return -(z.softmax(-1) * z.log_softmax(-1)).sum()


def params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def grad(model, P, names, x, loss_fn, sample_stats=False):
    theta = {n: P[n].clone().requires_grad_() for n in names}
    loss = loss_fn(manual_forward(model, {**P, **theta}, x, sample_stats))
    grads = torch.autograd.grad(loss, list(theta.values()))
    return loss.detach(), dict(zip(names, grads))


def clipped(g: dict, clip=1.0):
    norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
    return {k: v * min(1.0, clip / (norm + 1e-6)) for k, v in g.items()}


def sgd(P, g, lr):
    return {**P, **{k: P[k] - lr * v for k, v in g.items()}}


X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------- Tent

def test_tent_adapts_exactly_the_norm_affine_parameters():
    model = NormNet()
    assert set(tta_bench.get_method("tent").parameters(model)) == NORMS
    with pytest.raises(TTAError, match="tent adapts the affine weight/bias of normalisation layers"):
        tta_bench.get_method("tent").parameters(nn.Sequential(nn.Linear(3, 2)))


@pytest.mark.parametrize("norm_stats", ["source", "sample"])
def test_tent_step_equals_hand_computation(norm_stats):
    model, lr = NormNet(), 0.5
    before = state(model)
    sample = norm_stats == "sample"
    P = params(model)
    _, g = grad(model, P, sorted(NORMS), X, entropy, sample)
    expected = manual_forward(model, sgd(P, clipped(g), lr), X, sample)
    res = tta_bench.adapt(model, X, tta_bench.get_method("tent", norm_stats=norm_stats), threshold=None, lr=lr)
    torch.testing.assert_close(res.source_logits, manual_forward(model, P, X))  # the source is eval mode
    torch.testing.assert_close(res.adapted_logits, expected, atol=1e-5, rtol=1e-5)
    assert_bit_identical(model, before)  # running statistics untouched by sample statistics
    assert not model.bn.training and model.bn.track_running_stats


# ---------------------------------------------------------------- SAR

def test_sar_parameter_rules():
    names, rule = sar_parameters(NormNet())
    assert set(names) == NORMS - {"ln.weight", "ln.bias"} and "last quarter" in rule
    resnet = torchvision.models.resnet18(weights=None)
    names, rule = sar_parameters(resnet)
    assert rule.startswith("resnet") and not any(n.startswith("layer4") for n in names)
    assert "bn1.weight" in names and "layer3.1.bn2.bias" in names and len(names) == 2 * 15
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=6, num_heads=2,
                                               hidden_dim=16, mlp_dim=32)
    names, rule = sar_parameters(vit)
    assert rule.startswith("vit")
    assert {n.split(".")[2] for n in names} == {f"encoder_layer_{i}" for i in range(3)}
    assert not any(n.startswith("encoder.ln") for n in names)


def sar_expected(model, x, lr, e0, rho=0.05, sample_stats=False):
    """Filter, ε = ρ·g/‖g‖, second forward at θ+ε, filter, step at θ with the gradient at θ+ε;
    sample_stats: every forward normalises BatchNorm with x's own statistics."""
    P = params(model)
    names = sorted(NORMS - {"ln.weight", "ln.bias"})
    h, g = grad(model, P, names, x, entropy, sample_stats)
    if h >= e0:
        return None, float(h), None
    norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
    perturbed = {**P, **{k: P[k] + rho * v / norm for k, v in g.items()}}
    h2, g2 = grad(model, perturbed, names, x, entropy, sample_stats)
    if h2 >= e0:
        return None, float(h), float(h2)
    return manual_forward(model, sgd(P, clipped(g2), lr), x, sample_stats).detach(), float(h), float(h2)


@pytest.mark.parametrize("norm_stats", ["source", "sample"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])  # 0.9: the optimizer replayed per lr, same first step
def test_sar_two_pass_step_equals_hand_computation(momentum, norm_stats):
    model, lr = NormNet(scale=6.0), 0.8
    before = state(model)
    e0 = 0.4 * math.log(5)
    sample = norm_stats == "sample"
    expected, h, h2 = sar_expected(model, X, lr, e0, sample_stats=sample)
    assert expected is not None, f"the test sample must be reliable (H={h:.3f}, E0={e0:.3f})"
    other, _, _ = sar_expected(model, X, lr, e0, sample_stats=not sample)
    assert not torch.allclose(expected, other, atol=1e-3)  # the two statistics give different steps
    method = tta_bench.get_method("sar", norm_stats=norm_stats)
    res = tta_bench.adapt(model, X, method, threshold=None, lr=lr, momentum=momentum)
    assert res.updated and method.resolved["e0"] == pytest.approx(e0)
    torch.testing.assert_close(res.source_logits, manual_forward(model, params(model), X))  # the source is eval mode
    torch.testing.assert_close(res.adapted_logits, expected, atol=1e-5, rtol=1e-5)
    assert_bit_identical(model, before)  # running statistics untouched by sample statistics
    assert not model.bn.training and model.bn.track_running_stats


def test_sar_filter_rejects_a_high_entropy_sample():
    model = NormNet(scale=0.05)  # near-uniform predictions
    res = tta_bench.adapt(model, X, "sar", threshold=None, lr=1.0)
    assert not res.updated and torch.equal(res.adapted_logits, res.source_logits)


def test_sar_e0_frac_scales_the_filter_with_the_class_count():
    model = NormNet(scale=0.05)  # near-uniform: H just below ln 5, rejected at the default 0.4·ln 5
    method = tta_bench.get_method("sar", e0_frac=1.0)
    res = tta_bench.adapt(model, X, method, threshold=None, lr=1.0)
    assert res.updated and method.resolved["e0"] == pytest.approx(math.log(5))
    assert not tta_bench.adapt(model, X, tta_bench.get_method("sar", e0_frac=0.9), threshold=None, lr=1.0).updated


def test_sar_second_filter_rejects_when_the_perturbed_entropy_is_too_high():
    model = NormNet(scale=6.0)
    _, h, h2 = sar_expected(model, X, 0.8, 10.0, rho=0.5)
    assert h2 > h  # ε points up the entropy
    res = tta_bench.adapt(model, X, tta_bench.get_method("sar", e0=(h + h2) / 2, rho=0.5), threshold=None, lr=0.8)
    assert not res.updated


# ---------------------------------------------------------------- PASLE

def test_pasle_candidate_set_at_a_hand_picked_probability_vector():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert Pasle.candidates(p, 0.25).tolist() == [True, True, False, False]  # 0.55 > 0.5, 0.4 < 0.5
    assert Pasle.candidates(p, 0.6).all()
    assert Pasle.candidates(p, 0.1).tolist() == [True, False, False, False]


def logit_model(p: torch.Tensor) -> nn.Module:
    """A model whose logits are log p (plus a trainable linear term)."""
    model = nn.Linear(3, len(p))
    with torch.no_grad():
        model.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        model.bias.copy_(p.log())
    return model


def test_pasle_uncertain_step_equals_hand_computation():
    p = torch.tensor([0.42, 0.35, 0.13, 0.10])
    model, x, lr, tau, T = logit_model(p), torch.ones(1, 3), 0.7, 0.25, 0.8
    z = model(x)[0].detach()
    y = z.softmax(0) + tau > z.softmax(0).max()
    assert y.tolist() == [True, True, False, False]
    w = model.weight.detach().clone().requires_grad_()
    b = model.bias.detach().clone().requires_grad_()
    zz = (x @ w.T + b)[0] / T
    loss = -torch.log(zz.softmax(0)[y].sum())
    gw, gb = torch.autograd.grad(loss, [w, b])
    g = clipped({"w": gw, "b": gb})
    expected = x @ (w - lr * g["w"]).T + (b - lr * g["b"])
    method = tta_bench.get_method("pasle", tau=tau, temperature=T)
    res = tta_bench.adapt(model, x, method, threshold=None, lr=lr)
    torch.testing.assert_close(res.adapted_logits, expected[0].detach(), atol=1e-5, rtol=1e-5)


def test_pasle_certain_sample_uses_cross_entropy_to_the_source_prediction():
    p = torch.tensor([0.9, 0.05, 0.03, 0.02])
    model, x, lr, T = logit_model(p), torch.ones(1, 3), 0.7, 0.8
    w = model.weight.detach().clone().requires_grad_()
    b = model.bias.detach().clone().requires_grad_()
    loss = F.cross_entropy((x @ w.T + b) / T, torch.tensor([0]))
    gw, gb = torch.autograd.grad(loss, [w, b])
    g = clipped({"w": gw, "b": gb})
    expected = (x @ (w - lr * g["w"]).T + (b - lr * g["b"]))[0].detach()
    res = tta_bench.adapt(model, x, "pasle", threshold=None, lr=lr)
    torch.testing.assert_close(res.adapted_logits, expected, atol=1e-5, rtol=1e-5)


def test_pasle_never_updates_under_the_shared_gate_and_gates_itself_with_own():
    task, lrs = ToyTask(n=200), (1e-2,)
    shared = tta_bench.run(task, tta_bench.get_method("pasle"), Protocol(lrs), RunOptions(progress=False))
    unc = shared.rows[shared.rows.uncertain]
    assert len(unc) and not unc.updated.any() and (unc.pred == unc.pred_source).all()
    for tau in (0.6, 0.3):
        own = tta_bench.run(task, tta_bench.get_method("pasle", gate="own", tau=tau), Protocol(lrs),
                            RunOptions(progress=False))
        assert own.config["gate_threshold"] == tau
        with torch.no_grad():
            probs = task.model(task.x).softmax(-1)
        spread = (probs.max(-1).values - probs.min(-1).values).numpy()
        partial = (own.rows.delta <= tau) & (spread >= tau)  # neither certain nor unselected
        assert 0 < partial.sum() <= (own.rows.delta < tau).sum() - (tau == 0.6)  # a proper part at τ = 0.6
        assert (own.rows.uncertain == partial).all() and own.rows[own.rows.uncertain].updated.all()


def official_pasle_masks(probs: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """palm-ml/PASLE, `PASLE.forward`, re-derived line by line for a batch: the partial mask and
    the candidate labels (`mask_hard`, `mask_unselect`, `partial_labels`)."""
    probs_des, _ = torch.sort(probs, descending=True)
    mask_hard = probs_des[:, 0] - probs_des[:, 1] > tau
    mask_unselect = (probs_des[:, 0] - probs_des[:, -1]) < tau
    mask_partial = ~(mask_hard | mask_unselect)
    partial_labels = ((probs + tau) > probs_des[:, 0].reshape(-1, 1)).long()
    return mask_partial, partial_labels


def test_pasle_own_gate_is_the_official_partial_set():
    logits = torch.randn(4000, 10, generator=torch.Generator().manual_seed(0)) * 2.5
    probs = logits.softmax(-1)
    for tau in (0.2, 0.4, 0.6, 0.9):
        method = tta_bench.get_method("pasle", gate="own", tau=tau)
        official, labels = official_pasle_masks(probs, tau)
        ours = torch.tensor([method.uncertain(float(p.sort(descending=True).values[0] - p.sort(descending=True).values[1]),
                                              float(p.max() - p.min()), 0.16) for p in probs])
        assert torch.equal(ours, official), tau
        for p, y in zip(probs[official][:50], labels[official][:50]):  # the same candidate sets, each proper
            assert torch.equal(Pasle.candidates(p, tau), y.bool()) and not y.all()
    assert official.float().mean() < 0.05  # τ = 0.9 selects almost none


def test_pasle_adam_step_equals_the_official_loss_and_optimizer():
    """One sample of the partial set: the official cc_loss on softmax(z/T) masked by the candidate
    labels, one torch.optim.Adam step on all parameters (no clipping in the official code), in
    float64; the adapted logits agree to rounding."""
    p = torch.tensor([0.45, 0.30, 0.14, 0.11], dtype=torch.float64)  # Δ1,2 = 0.15, p(1) − p(C) = 0.34
    model, x, tau, temp, lr = logit_model(p).double(), torch.ones(1, 3, dtype=torch.float64), 0.3, 0.8, 1e-3
    with torch.no_grad():
        mask, labels = official_pasle_masks(model(x).softmax(-1), tau)
    assert mask.all() and 1 < int(labels.sum()) < 4  # a proper candidate set of two or three
    reference = copy.deepcopy(model)
    opt = torch.optim.Adam(reference.parameters(), lr=lr)
    out = reference(x)
    loss = -torch.log((F.softmax(out / temp, dim=1) * labels).sum(dim=1)).mean()  # cc_loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        expected = reference(x)[0]
    method = tta_bench.get_method("pasle", gate="own", tau=tau, temperature=temp)
    res = tta_bench.adapt(model, x, method, threshold=0.16, lr=lr, optimizer="adam", clip=None)
    assert res.uncertain and res.updated
    assert float(res.loss) == pytest.approx(float(loss), rel=1e-12)
    torch.testing.assert_close(res.adapted_logits, expected, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------- MEMO

def flips(inputs, n):
    """A deterministic stand-in for AugMix: alternately flipped and dimmed copies."""
    x = inputs[0]
    return torch.stack([(x.flip(-1) if b % 2 else x) * (1 - 0.1 * b) for b in range(n)])


def test_memo_step_equals_hand_computed_marginal_entropy():
    model, lr, B = NormNet(scale=3.0), 0.5, 4
    P = params(model)
    views = flips(X, B)

    def marginal_entropy(P_):
        probs = torch.stack([manual_forward(model, P_, v[None]) for v in views]).softmax(-1).mean(0)
        return -(probs * probs.log()).sum()

    theta = {n: P[n].clone().requires_grad_() for n in P}
    g = dict(zip(theta, torch.autograd.grad(marginal_entropy({**P, **theta}), list(theta.values()))))
    expected = manual_forward(model, sgd(P, clipped(g), lr), X)  # predict on the un-augmented input
    res = tta_bench.adapt(model, X, tta_bench.get_method("memo", views=B), threshold=None, lr=lr,
                          augment=flips)
    torch.testing.assert_close(res.adapted_logits, expected, atol=1e-5, rtol=1e-5)


def test_memo_counts_every_view_as_a_pass():
    from tta_bench.engine.adapt import Adapter

    model, B, lrs = NormNet(scale=3.0), 4, (0.1, 0.2, 0.4)
    with Adapter(model, tta_bench.get_method("memo", views=B), lambda m, x: m(x), Protocol(lrs, threshold=None),
                 augmenter=flips) as adapter:
        out = adapter.adapt(X, 0)
    assert out.updated and out.forwards == B + len(lrs) and out.backwards == B  # views, one per lr


def test_memo_needs_augmentations_and_images():
    with pytest.raises(TTAError, match="needs augmented views"):
        tta_bench.adapt(NormNet(), X, "memo", threshold=None)

    class TextTask(ToyTask):
        name = "toy-text"
        kind = "text"

    with pytest.raises(TTAError, match="memo does not support text tasks"):
        tta_bench.get_method("memo").supports(TextTask())


def test_cifar10_augmix_views_are_seeded_and_varied():
    from tta_bench.tasks.cifar10 import Cifar10

    task = Cifar10()
    x = task.collate([next(task.samples()).raw])
    make = task.augmenter()
    torch.manual_seed(3)
    a = make(x, 4)
    torch.manual_seed(3)
    b = make(x, 4)
    assert a.shape == (4, 3, 224, 224) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])
    assert a.min() >= -127 / 128 - 1e-6 and a.max() <= 1 + 1e-6


# ---------------------------------------------------------------- DeYO

def official_shuffle(x: torch.Tensor, ps: int, perm: torch.Tensor) -> torch.Tensor:
    """The official patch shuffle (`aug_type=patch`), re-derived tile by tile: tile k of the
    result (row-major) is tile perm[k] of x."""
    out = torch.empty_like(x)
    h, w = x.shape[-2] // ps, x.shape[-1] // ps
    for k, src in enumerate(perm.tolist()):
        r, c, sr, sc = k // ps, k % ps, src // ps, src % ps
        out[..., r * h:(r + 1) * h, c * w:(c + 1) * w] = x[..., sr * h:(sr + 1) * h, sc * w:(sc + 1) * w]
    return out


class ResNetLike(nn.Module):
    """A stem and a `layer4` with BatchNorm (SAR's and DeYO's official lists both skip layer4) and
    a head on the whole feature map, so that shuffling tiles moves the prediction."""

    def __init__(self, n_classes: int = 5, scale: float = 8.0):
        super().__init__()
        torch.manual_seed(3)
        self.layer1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        with torch.no_grad():
            for bn in (self.layer1[1], self.layer4[1]):
                bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
        torch.manual_seed(4)
        self.fc = nn.Linear(6 * 64, n_classes)
        with torch.no_grad():
            self.fc.weight.mul_(scale)
        self.eval()

    def forward(self, x):
        return self.fc(self.layer4(self.layer1(x)).flatten(1))


def official_deyo_step(model, x, perm, lr, deyo_margin, margin, plpd_threshold):
    """Jhyun17/DeYO `forward_and_adapt_deyo` for a batch of one, re-derived line by line (filters,
    PLPD, reweighting, SGD with momentum 0.9 on `collect_params`); returns (passed, loss, adapted logits)."""
    reference = copy.deepcopy(model)
    params = [p for n, m in reference.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))
              and "layer4" not in n for p in (m.weight, m.bias)]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    outputs = reference(x)
    entropys = -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
    if not bool(entropys[0] < deyo_margin):
        return "entropy", None, None
    with torch.no_grad():
        outputs_prime = reference(official_shuffle(x.detach(), 4, perm))
    prob, prob_prime = outputs.softmax(1), outputs_prime.softmax(1)
    cls1 = prob.argmax(dim=1)
    plpd = (torch.gather(prob, 1, cls1.reshape(-1, 1)) - torch.gather(prob_prime, 1, cls1.reshape(-1, 1))).reshape(-1)
    if not bool(plpd[0] > plpd_threshold):
        return "plpd", None, None
    coeff = 1 / torch.exp(entropys.clone().detach() - margin) + 1 / torch.exp(-1.0 * plpd.clone().detach())
    loss = entropys.mul(coeff).mean(0)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        return "both", float(loss), reference(x)[0]


def test_deyo_filters_loss_and_step_equal_the_official_code():
    model = ResNetLike().double()
    method = tta_bench.get_method("deyo")
    lr, C = 0.05, 5
    seen: list[str] = []
    for index in range(400):
        if len(set(seen)) == 3 and seen.count("both") >= 5:
            break
        x = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(index)) * 2
        perm = method.permutation(index)
        assert sorted(perm.tolist()) == list(range(16))
        passed, loss, expected = official_deyo_step(model, x, perm, lr, 0.5 * math.log(C), 0.4 * math.log(C), 0.2)
        seen.append(passed)
        with tta_bench.engine.adapt.Adapter(model, method, lambda m, inp: m(inp), Protocol((lr,), threshold=None, clip=None,
                                                                                   momentum=0.9)) as adapter:
            out = adapter.adapt(x, index)
        assert out.updated == (passed == "both"), index
        if passed == "both":
            assert out.loss == pytest.approx(loss, rel=1e-12)
            torch.testing.assert_close(out.logits[0], expected, atol=1e-12, rtol=1e-10)
    assert set(seen) == {"entropy", "plpd", "both"}  # every branch of the official code was compared


def test_deyo_patch_shuffle_is_the_official_tiling_and_seeded_per_sample():
    from tta_bench.methods.deyo import shuffle_patches
    x = torch.randn(2, 3, 12, 16)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shuffle_patches(x, 4, perm), official_shuffle(x, 4, perm))
    method = tta_bench.get_method("deyo")
    assert torch.equal(method.permutation(7), method.permutation(7))
    assert not torch.equal(method.permutation(7), method.permutation(8))
    assert not torch.equal(tta_bench.get_method("deyo", seed=1).permutation(7), method.permutation(7))
    with pytest.raises(TTAError, match="does not support text tasks"):
        method.supports(tta_bench.get_task("text"))
