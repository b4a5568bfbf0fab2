"""EATA against mr-eggplant/EATA `eata.py` re-derived line by line (`forward_and_adapt_eata`,
`update_model_probs`, `collect_params`, `configure_model`; the Fisher of `main.py`), and the
engine-owned memory m: stream order, lr-independence, checkpoint and resume."""
import copy
import json
import math

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import ToyTask
from test_competitors import ResNetLike
from test_sweep import CrashingToy, _same_results
from torch import nn
from tta_bench.methods.eata import EATA

import tta_bench
from tta_bench import Protocol, RunOptions, TTAError
from tta_bench.core.task import Sample
from tta_bench.engine.adapt import Adapter


def configured(model: nn.Module) -> nn.Module:
    """Official `configure_model`: train mode, BatchNorm with the batch's statistics."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    return model


def official_eata_sample(model, x, m, lr, e_margin, d_margin, fishers=None, fisher_alpha=0.0):
    """`forward_and_adapt_eata` on a batch of one from a fresh copy of θ0 (the per-sample reset;
    the official `reset()` keeps m), SGD momentum 0.9 on `collect_params`; then the prediction at
    the adapted weights. Returns (branch, loss, adapted logits, new m)."""
    reference = configured(copy.deepcopy(model))
    params = [p for mod in reference.modules() if isinstance(mod, nn.BatchNorm2d) for p in (mod.weight, mod.bias)]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    outputs = reference(x)
    entropys = -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
    ids1 = torch.where(entropys < e_margin)
    ids2 = torch.where(ids1[0] > -0.1)
    entropys = entropys[ids1]
    if m is not None:
        cos = F.cosine_similarity(m.unsqueeze(dim=0), outputs[ids1].softmax(1), dim=1)
        ids2 = torch.where(torch.abs(cos) < d_margin)
        entropys = entropys[ids2]
        new = outputs[ids1][ids2].softmax(1)
        updated = m if new.size(0) == 0 else (0.9 * m + (1 - 0.9) * new.mean(0)).detach()
    else:
        new = outputs[ids1].softmax(1)
        updated = None if new.size(0) == 0 else new.mean(0).detach()
    coeff = 1 / (torch.exp(entropys.clone().detach() - e_margin))
    loss = entropys.mul(coeff).mean(0)
    if fishers is not None:
        for name, param in reference.named_parameters():
            if name in fishers:
                loss = loss + fisher_alpha * (fishers[name][0] * (param - fishers[name][1]) ** 2).sum()
    if x[ids1][ids2].size(0) == 0:
        branch = "entropy" if ids1[0].numel() == 0 else "redundant"
        return branch, None, None, updated
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        return "both", float(loss), reference(x)[0], updated


def stream(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=g) * 2 for _ in range(n)]


def test_eata_stream_equals_the_official_code_sample_by_sample():
    """Every branch (unreliable, redundant, both passed), the loss, the adapted prediction and the
    moving average m after each sample, over a stream: equal to the official code in float64."""
    model, C, lr = ResNetLike().double(), 5, 0.05
    method = tta_bench.get_method("eata", norm_stats="sample")
    e_margin, d_margin = 0.4 * math.log(C), 0.05 * math.sqrt(1000) / math.sqrt(C)
    m, seen, worst = None, [], 0.0
    protocol = Protocol((lr,), threshold=None, clip=None, momentum=0.9)
    with Adapter(model, method, lambda mod, inp: mod(inp), protocol) as adapter:
        for index, x in enumerate(stream(120)):
            branch, loss, expected, m = official_eata_sample(model, x, m, lr, e_margin, d_margin)
            seen.append(branch)
            out = adapter.adapt(x, index)
            assert out.updated == (branch == "both"), index
            if branch == "both":
                assert out.loss == pytest.approx(loss, rel=1e-12)
                torch.testing.assert_close(out.logits[0], expected, atol=1e-12, rtol=1e-10)
                worst = max(worst, float(((out.logits[0] - expected).abs() / expected.abs()).max()))
            if m is None:
                assert adapter.memory is None
            else:
                torch.testing.assert_close(adapter.memory, m, atol=0, rtol=1e-13)
    assert set(seen) == {"entropy", "redundant", "both"}, seen  # every branch was compared
    assert method.resolved["d_margin"] == pytest.approx(d_margin) and worst < 1e-10
    assert "BatchNorm" in method.resolved["parameter_rule"]
    assert set(adapter.param_names) == {"layer1.1.weight", "layer1.1.bias", "layer4.1.weight", "layer4.1.bias"}


class PerLr(EATA):
    sweepable = False  # a full adaptation per lr


def test_memory_is_the_same_for_every_learning_rate_and_off_with_memory_none():
    """m comes from the θ0 prediction: the one-gradient sweep over 3 lrs and the per-lr path of
    each lr alone pass the same samples and leave the same m; memory=none never sets it and lets
    through every reliable sample."""
    model, lrs = ResNetLike().double(), (0.01, 0.05, 0.2)
    xs = stream(120)

    def scan(method, protocol):
        with Adapter(model, method, lambda mod, inp: mod(inp), protocol) as adapter:
            outs = [adapter.adapt(x, i) for i, x in enumerate(xs)]
            return outs, adapter.memory
    swept, m = scan(tta_bench.get_method("eata", norm_stats="sample"), Protocol(lrs, threshold=None))
    assert m is not None
    for k, lr in enumerate(lrs):
        alone, m_alone = scan(PerLr(norm_stats="sample"), Protocol((lr,), threshold=None))
        assert [a.updated for a in alone] == [s.updated for s in swept]
        torch.testing.assert_close(m_alone, m, atol=0, rtol=0)
        for a, s in zip(alone, swept):
            if s.updated:
                torch.testing.assert_close(a.logits[0], s.logits[k], atol=1e-12, rtol=1e-10)
    free, m_free = scan(tta_bench.get_method("eata", memory="none", norm_stats="sample"), Protocol(lrs, threshold=None))
    assert m_free is None
    assert sum(a.updated for a in free) > sum(s.updated for s in swept)  # the redundancy filter acted


class ToyWithReference(ToyTask):
    """The toy task with reference images of its own (clean, never scored)."""

    def reference_samples(self):
        g = torch.Generator().manual_seed(99)
        for i in range(10_000):
            yield Sample(i, torch.randn(3, 8, 8, generator=g), -1)


def test_the_fisher_is_the_official_estimate_and_penalises_the_second_step():
    """T = 2 with memory=none: F = mean over batches of the squared gradient of the batch's
    cross-entropy against its argmax (main.py), and the second SGD step's gradient includes
    2β·F·(θ1 − θ0); at T = 1 no Fisher is computed."""
    task = ToyWithReference()
    model = task.load_model().double()
    method = tta_bench.get_method("eata", memory="none", fisher_size=100, fisher_alpha=50.0, e0_frac=1.0)
    protocol = Protocol((0.5,), threshold=None, clip=None, steps=2)
    with Adapter(model, method, lambda mod, inp: mod(inp), protocol) as adapter:
        named = dict(zip(adapter.param_names, adapter.params))
        refs = [s.raw for s in task.reference_samples()][:100]
        batches = lambda n, b: (torch.stack(refs[i:i + b]).double() for i in range(0, n, b))
        method.prepare(model, lambda inp: model(inp), named, protocol, batches)
        expected = {}
        for i in range(0, 100, 64):  # the official loop, on a copy
            ref = copy.deepcopy(model)
            out = ref(torch.stack(refs[i:i + 64]).double())
            F.cross_entropy(out, out.max(1)[1]).backward()
            for name in named:
                g2 = dict(ref.named_parameters())[name].grad ** 2
                expected[name] = expected.get(name, 0) + g2
        fishers = {n: (expected[n] / 2, p.detach().clone()) for n, p in named.items()}
        for (theta, fisher, theta0), name in zip(method.fisher, named):
            torch.testing.assert_close(fisher, fishers[name][0], rtol=1e-12, atol=1e-15)
        assert "2 batches" in method.resolved["fisher"]
        x = task.x[:1].double()
        out = adapter.adapt(x)
    assert out.updated and out.backwards == 2

    def by_hand(beta):  # two SGD steps on E·exp(E0 − E) + β·Σ F·(θ − θ0)² (0 at the first step)
        ref = copy.deepcopy(model)
        params = [dict(ref.named_parameters())[n] for n in named]
        for _ in range(2):
            z = ref(x)
            e = -(z.softmax(1) * z.log_softmax(1)).sum()
            loss = e * torch.exp(math.log(5) - e.detach())
            for p, n in zip(params, named):
                loss = loss + beta * (fishers[n][0] * (p - fishers[n][1]) ** 2).sum()
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= 0.5 * g
        with torch.no_grad():
            return ref(x)[0]
    torch.testing.assert_close(out.logits[0], by_hand(50.0), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out.logits[0], by_hand(0.0), rtol=1e-6, atol=0)  # the penalty acted
    one = tta_bench.get_method("eata")
    one.prepare(model, lambda inp: model(inp), named, Protocol((0.1,)), batches)
    assert one.fisher == [] and "gradient is 0" in one.resolved["fisher"]


def test_runs_record_the_fisher_and_refuse_a_task_without_reference_images():
    run = lambda task, steps: tta_bench.run(task, tta_bench.get_method("eata", fisher_size=20),
                                            Protocol((0.1,), threshold=None, steps=steps),
                                            RunOptions(limit=6, progress=False, track=False))
    result = run(ToyWithReference(), 2)
    assert "1 batches" in result.config["resolved"]["fisher"] and result.config["sweep"] == "per-lr"
    with pytest.raises(TTAError, match="task toy has no reference samples.*fisher_alpha=0"):
        run(ToyTask(), 2)
    assert "gradient is 0" in run(ToyTask(), 1).config["resolved"]["fisher"]


def test_the_memory_is_checkpointed_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    method, protocol = tta_bench.get_method("eata"), Protocol((0.5, 2.0), threshold=None)
    full = tta_bench.run(ToyTask(), method, protocol, RunOptions(progress=False, track=False))
    free = tta_bench.run(ToyTask(), tta_bench.get_method("eata", memory="none"), protocol,
                         RunOptions(progress=False, track=False))
    assert (full.rows["updated"] != free.rows["updated"]).any()  # m decides on this stream
    ck = tmp_path / "checkpoint.parquet"
    options = RunOptions(progress=False, track=False, checkpoint=ck, checkpoint_every=5)
    with pytest.raises(RuntimeError, match="worker died"):
        tta_bench.run(CrashingToy(), method, protocol, options)
    meta = json.loads(pq.read_table(ck).schema.metadata[b"tta_bench"])
    assert meta["memory"] is not None and len(meta["memory"]) == 5
    resumed = tta_bench.run(ToyTask(), method, protocol, options)
    assert resumed.metadata["resumed_from_sample"] > 0
    _same_results(full, resumed)


def test_eata_is_for_images_and_never_adapts_in_blocks():
    method = tta_bench.get_method("eata")
    with pytest.raises(TTAError, match="does not support text tasks"):
        method.supports(tta_bench.get_task("text"))
    from tta_bench.engine.blocks import supports_blocks
    assert "memory" in supports_blocks(method, Protocol((0.1,)))
    assert supports_blocks(tta_bench.get_method("eata", memory="none"), Protocol((0.1,))) is not None
    with pytest.raises(TTAError, match="memory"):
        tta_bench.run(ToyTask(), method, Protocol((0.1,)), RunOptions(adapt_block=4, progress=False, track=False))
