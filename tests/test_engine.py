"""The protocol engine: reset, gating, learning-rate sweeps, non-finite losses."""
import copy

import pandas as pd
import pytest
import torch
from conftest import ToyTask, assert_bit_identical, small_cnn, state

import tta_bench
from tta_bench import Method, Protocol, RunOptions, run
from tta_bench.core.task import select
from tta_bench.engine.adapt import Adapter, Snapshot

LRS = (0.01, 0.2, 1.5)


def toy_run(method="ifo", lrs=LRS, batch_size=8, **protocol):
    task = ToyTask()
    protocol.setdefault("threshold", 0.5)
    return run(task, tta_bench.get_method(method) if isinstance(method, str) else method,
               Protocol(lrs=lrs, **protocol), RunOptions(batch_size=batch_size, progress=False))


def naive_adapt(model, x, method, lr, steps=1, clip=1.0, momentum=0.0):
    """The reference loop: deepcopy + fresh optimizer per sample, per learning rate."""
    clone = copy.deepcopy(model)
    opt = torch.optim.SGD(clone.parameters(), lr=lr, momentum=momentum)
    source = None
    for _ in range(steps):
        opt.zero_grad()
        step = tta_bench.Step(clone, x, lambda m, inp: m(inp), source)
        loss = method.loss(step)
        source = step.source
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clone.parameters(), clip)
        opt.step()
    with torch.no_grad():
        return clone(x)[0]


@pytest.mark.parametrize("protocol", [dict(), dict(steps=3), dict(momentum=0.9), dict(optimizer="adam")])
def test_reset_is_bit_identical(protocol):
    model = small_cnn()
    before = state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randn(4, 3, 8, 8)
    with Adapter(model, tta_bench.get_method("ifo"), lambda m, inp: m(inp), Protocol(LRS, **protocol)) as a:
        for i in range(4):
            out = a.adapt(select(x, i))
            assert out.updated and all(z is not None for z in out.logits)
            assert_bit_identical(model, before)
    assert_bit_identical(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_the_adapter_keeps_one_copy_of_theta0():
    """θ0 (the adapted parameters and every buffer) is held once: for an LLM a second copy is
    another model's worth of memory."""
    model = small_cnn()
    adapter = Adapter(model, tta_bench.get_method("ifo"), lambda m, inp: m(inp), Protocol(LRS))
    copies = [t for v in vars(adapter).values() if isinstance(v, Snapshot) for t in v.saved]
    expected = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    assert sum(t.numel() for t in copies) == expected


class Exploding(Method):
    name = "exploding"

    def loss(self, step):
        step.logits.sum().backward()  # leaves gradients behind, then fails mid-adaptation
        raise RuntimeError("boom")


def test_reset_after_a_failing_method():
    model = small_cnn()
    before = state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with Adapter(model, Exploding(), lambda m, inp: m(inp), Protocol((0.1,))) as a:
            a.adapt(torch.randn(1, 3, 8, 8))
    assert_bit_identical(model, before)


def test_batched_gate_equals_one_sample_at_a_time():
    batched, single = toy_run(batch_size=16), toy_run(batch_size=1)
    a, b = batched.rows, single.rows
    for col in ("index", "pred_source", "uncertain", "pred", "updated"):
        assert a[col].tolist() == b[col].tolist(), col
    torch.testing.assert_close(torch.tensor(a["delta"].values), torch.tensor(b["delta"].values),
                               atol=1e-5, rtol=0)  # batched convolutions round differently
    n = a[a.lr == LRS[0]]
    assert 0 < n.uncertain.sum() < len(n), "the toy task must have both certain and uncertain samples"


def test_one_gradient_sweep_equals_separate_runs():
    sweep = toy_run()
    assert sweep.config["sweep"] == "one-gradient"
    for lr in LRS:
        alone = toy_run(lrs=(lr,)).rows
        part = sweep.rows[sweep.rows.lr == lr].reset_index(drop=True)
        cost = ["seconds", "forwards"]  # the sweep shares one gradient forward across lrs
        pd.testing.assert_frame_equal(part.drop(columns=cost), alone.drop(columns=cost))


@pytest.mark.parametrize("optimizer,momentum,weight_decay", [("sgd", 0.9, 0.0), ("sgd", 0.9, 0.05), ("adam", 0.0, 0.0),
                                                               ("adam", 0.0, 0.05)])
@pytest.mark.parametrize("method", ["ifo", "sar"])
def test_one_gradient_replays_any_first_step_bitwise(optimizer, momentum, weight_decay, method):
    """With one step, momentum, Adam and weight decay are swept from one gradient too: each lr
    replays a fresh optimizer's first step from θ0; bitwise what a full adaptation per lr gives."""
    model, x = small_cnn(), ToyTask().x[:8]
    protocol = Protocol(LRS, threshold=None, optimizer=optimizer, momentum=momentum, weight_decay=weight_decay)
    assert protocol.one_gradient and not protocol.plain_sgd
    with Adapter(model, tta_bench.get_method(method, **({"e0_frac": 1.0} if method == "sar" else {})),
                 lambda m, inp: m(inp), protocol) as a:
        assert a.one_gradient
        updated = 0
        for i in range(len(x)):
            swept, alone = a.adapt(select(x, i), i), a._per_lr(select(x, i), i)
            a.snapshot.restore()
            assert swept.updated == alone.updated
            if swept.updated:  # one gradient for every lr, not one per lr
                assert swept.backwards * len(LRS) == alone.backwards
            updated += swept.updated
            for k in range(len(LRS)):
                if swept.logits[k] is not None:
                    assert torch.equal(swept.logits[k], alone.logits[k]), (i, k)
        assert updated >= 4
    assert Protocol(LRS, steps=2).one_gradient is False


@pytest.mark.parametrize("steps,momentum", [(1, 0.0), (2, 0.0), (1, 0.9), (2, 0.9)])
def test_engine_equals_naive_reference_loop(steps, momentum):
    model, method = small_cnn(), tta_bench.get_method("ifo")
    x = ToyTask().x[:6]
    with Adapter(model, method, lambda m, inp: m(inp), Protocol(LRS, steps=steps, momentum=momentum)) as a:
        for i in range(len(x)):
            out = a.adapt(select(x, i))
            for k, lr in enumerate(LRS):
                ref = naive_adapt(model, select(x, i), method, lr, steps=steps, momentum=momentum)
                torch.testing.assert_close(out.logits[k], ref, atol=1e-6, rtol=1e-6)
                assert out.logits[k].argmax() == ref.argmax()


def test_per_sample_rows_and_summary():
    result = toy_run()
    rows = result.rows
    assert len(rows) == 40 * len(LRS)
    certain = rows[~rows.uncertain]
    assert (certain.pred == certain.pred_source).all() and not certain.updated.any()
    assert (certain.backwards == 0).all()
    unc = rows[rows.uncertain]
    assert unc.updated.all() and (unc.backwards == 1).all()
    assert (unc.forwards == 2 + len(LRS)).all()  # source, forward for the gradient, one per lr
    s = {x["lr"]: x for x in result.summary}[LRS[-1]]
    assert s["n_uncertain"] == len(unc) // len(LRS)
    right0 = unc[unc.lr == LRS[-1]].pred_source == unc[unc.lr == LRS[-1]].label
    right = unc[unc.lr == LRS[-1]].pred == unc[unc.lr == LRS[-1]].label
    assert s["acc_source"] == pytest.approx(100 * right0.mean())
    assert s["delta_acc"] == pytest.approx(100 * (right.mean() - right0.mean()))
    assert s["n_fixed"] == int((~right0 & right).sum()) and s["n_broken"] == int((right0 & ~right).sum())


def test_gate_none_adapts_and_scores_every_sample():
    result = toy_run(threshold=None)
    assert result.rows.uncertain.all() and result.summary[0]["frac_uncertain"] == 1.0


def test_none_method_is_the_source_model():
    result = toy_run("none")
    assert (result.rows.pred == result.rows.pred_source).all()
    assert all(s["delta_acc"] == 0 for s in result.summary)


class NaNLoss(Method):
    name = "nan-loss"

    def loss(self, step):
        z = step.logits
        return z[0] * float("nan") if step.source.pred % 2 else -z[step.source.pred]


def test_nonfinite_loss_is_recorded_and_the_run_continues():
    result = toy_run(NaNLoss())
    unc = result.rows[result.rows.uncertain]
    bad = unc[unc.pred_source % 2 == 1]
    assert len(bad) and bad.nonfinite.all() and (bad.pred == -1).all() and not bad.updated.any()
    good = unc[unc.pred_source % 2 == 0]
    assert len(good) and not good.nonfinite.any() and good.updated.all()
    assert result.summary[0]["n_nonfinite"] == len(bad) // len(LRS)


def test_huge_learning_rate_gives_nonfinite_logits_not_a_crash():
    result = toy_run(lrs=(1e38,), clip=None)
    unc = result.rows[result.rows.uncertain]
    assert unc.nonfinite.any() and (unc[unc.nonfinite].pred == -1).all()


def test_adapt_api_gate_and_model_unchanged():
    model = small_cnn()
    before = state(model)
    model.train()
    x = torch.randn(1, 3, 8, 8)
    gated = tta_bench.adapt(model, x, "ifo", threshold=1e-9, lr=0.5)
    assert not gated.uncertain and not gated.updated
    assert torch.equal(gated.adapted_logits, gated.source_logits)
    res = tta_bench.adapt(model, x, "ifo", threshold=None, lr=0.5)
    assert res.uncertain and res.updated and res.adapted_logits.shape == (5,)
    assert not torch.equal(res.adapted_logits, res.source_logits)
    assert model.training  # mode restored
    assert_bit_identical(model, before)


def test_adapt_api_rejects_wrong_output_shape():
    with pytest.raises(tta_bench.TTAError, match=r"\[1, C\]"):
        tta_bench.adapt(small_cnn(), torch.randn(2, 3, 8, 8), "ifo")


@pytest.mark.parametrize("kwargs,match", [
    (dict(lrs=()), "no learning rate"), (dict(lrs=(-1.0,)), "> 0"), (dict(lrs=(0.1, 0.1)), "repeat"),
    (dict(lrs=(0.1,), threshold=1.5), "threshold"), (dict(lrs=(0.1,), steps=0), "steps"),
    (dict(lrs=(0.1,), clip=0), "clip"), (dict(lrs=(0.1,), optimizer="lbfgs"), "optimizer"),
])
def test_protocol_rejects_bad_values(kwargs, match):
    with pytest.raises(tta_bench.TTAError, match=match):
        Protocol(**kwargs)


def test_runs_in_full_fp32_and_restores_the_flags(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    result = toy_run()
    assert result.metadata["numerics"]["cudnn_allow_tf32"] is False
    assert torch.backends.cudnn.allow_tf32 is True


class DivergesLater(Method):
    """Finite at θ0; from the second step on the loss is NaN once the weights moved far."""
    name = "diverges-later"

    def loss(self, step):
        z = step.logits
        return -z[step.source.pred] * (1.0 if z.abs().max() < 50 else float("nan"))


def test_per_lr_divergence_marks_only_that_learning_rate():
    result = toy_run(DivergesLater(), lrs=(1e-3, 1e3), steps=2, clip=None)
    unc = result.rows[result.rows.uncertain]
    small, big = unc[unc.lr == 1e-3], unc[unc.lr == 1e3]
    assert not small.nonfinite.any() and small.updated.all()
    assert big.nonfinite.all() and (big.pred == -1).all()
