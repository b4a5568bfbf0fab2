"""Blocks of samples adapted at once with torch.func (the accelerator path) equal the samples
adapted one at a time, per-sample clipping included; the CPU default stays one at a time."""
import pytest
import torch
from conftest import ToyTask

import tta_bench
from tta_bench import Protocol, RunOptions, TTAError
from tta_bench.engine.adapt import Adapter
from tta_bench.engine.blocks import BlockAdapter

LRS = (1e-2, 1e-1, 1.0)


@pytest.mark.parametrize("name,hp", [("ifo", {}), ("ifo", {"weighted": False, "loss": "xent"}),
                                     ("ifo", {"loss": "entropy", "n_focus": 3}), ("entropy", {})])
@pytest.mark.parametrize("clip", [1.0, None])
def test_block_equals_one_at_a_time(name, hp, clip):
    task, method = ToyTask(), tta_bench.get_method(name, **hp)
    model, protocol = task.load_model(), Protocol(LRS, clip=clip)
    x = task.x[:12]
    with Adapter(model, method, lambda m, v: m(v), protocol) as adapter:
        one = [adapter.adapt(x[i:i + 1], i) for i in range(len(x))]
        block = BlockAdapter(model, method, lambda m, v: m(v), protocol, adapter.param_names).adapt(x)
    clipped = 0
    for a, b in zip(one, block, strict=True):
        assert b.updated and not b.nonfinite and (b.forwards, b.backwards) == (a.forwards, a.backwards)
        assert b.loss == pytest.approx(a.loss, rel=1e-5) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
        clipped += clip is not None and a.grad_norm > clip
        for la, lb in zip(a.logits, b.logits, strict=True):
            torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
            assert int(la.argmax()) == int(lb.argmax())
    assert clip is None or clipped >= 3  # per-sample clipping was exercised


def test_runner_blocks_give_the_same_predictions(toy_task):
    method, protocol = tta_bench.get_method("ifo"), Protocol(LRS)
    one = tta_bench.run(toy_task, method, protocol, RunOptions(progress=False, track=False, device="cpu"))
    blocks = tta_bench.run(toy_task, method, protocol, RunOptions(progress=False, track=False, adapt_block=4))
    assert one.config["adaptation"] == "one sample at a time"  # the CPU default
    assert blocks.config["adaptation"] == "blocks of 4 (torch.func.vmap)"
    cols = ["index", "lr", "pred_source", "pred", "uncertain", "updated", "nonfinite", "forwards", "backwards"]
    assert one.rows[cols].equals(blocks.rows[cols])


def test_blocks_are_refused_where_they_would_be_wrong(toy_task):
    with pytest.raises(TTAError, match="blocks need one plain SGD step"):
        tta_bench.run(toy_task, tta_bench.get_method("ifo"), Protocol(LRS, momentum=0.9),
                      RunOptions(progress=False, track=False, adapt_block=4))
    with pytest.raises(TTAError, match="method sar is not batchable"):
        tta_bench.run(toy_task, tta_bench.get_method("sar"), Protocol(LRS),
                      RunOptions(progress=False, track=False, adapt_block=4))


@pytest.mark.slow
def test_blocks_on_the_real_model_predict_the_same():
    task, method, protocol = tta_bench.get_task("cifar10"), tta_bench.get_method("ifo"), Protocol((2.05e-2, 0.1))
    one = tta_bench.run(task, method, protocol, RunOptions(limit=60, progress=False, track=False))
    blocks = tta_bench.run(task, method, protocol, RunOptions(limit=60, progress=False, track=False, adapt_block=8))
    assert one.summary[0]["n_uncertain"] >= 5
    cols = ["index", "lr", "pred", "uncertain", "updated", "nonfinite"]
    assert one.rows[cols].equals(blocks.rows[cols])
    unc = one.rows.uncertain
    assert ((one.rows.grad_norm[unc] - blocks.rows.grad_norm[unc]).abs() / one.rows.grad_norm[unc]).max() < 1e-3


def test_a_model_vmap_cannot_batch_falls_back_to_one_at_a_time(toy_task, monkeypatch):
    def unbatchable(self, inputs):
        raise RuntimeError("vmap: It looks like you're calling .item() on a Tensor")

    monkeypatch.setattr(BlockAdapter, "adapt", unbatchable)
    method, protocol = tta_bench.get_method("ifo"), Protocol(LRS)
    with pytest.warns(UserWarning, match=r"adapting in blocks failed \(vmap: It looks like"):
        r = tta_bench.run(toy_task, method, protocol, RunOptions(progress=False, track=False, adapt_block=4))
    one = tta_bench.run(toy_task, method, protocol, RunOptions(progress=False, track=False))
    assert r.config["adaptation"].startswith("one sample at a time (blocks failed: vmap")
    assert r.rows["pred"].equals(one.rows["pred"])


def test_out_of_memory_halves_the_block_and_loses_nothing(toy_task, monkeypatch):
    """An OOM in a block (injected: blocks of more than 2 samples do not fit) retries it in halves;
    later blocks keep the size that fitted; predictions equal one sample at a time."""
    adapt, sizes = BlockAdapter.adapt, []

    def tight(self, inputs):
        sizes.append(len(inputs))
        if len(inputs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return adapt(self, inputs)

    monkeypatch.setattr(BlockAdapter, "adapt", tight)
    method, protocol = tta_bench.get_method("ifo"), Protocol(LRS, threshold=None)  # all 40 adapted
    with pytest.warns(UserWarning, match="out of memory in a block; retrying it in blocks of 4"):
        r = tta_bench.run(toy_task, method, protocol, RunOptions(progress=False, track=False, adapt_block=8))
    one = tta_bench.run(toy_task, method, protocol, RunOptions(progress=False, track=False, adapt_block=1))
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) <= 2  # halved twice, then blocks of 2 only
    assert r.config["adaptation"] == "blocks of 2 (torch.func.vmap), halved from 8 after 2 out-of-memory error(s)"
    assert r.config["out_of_memory_halvings"] == 2
    cols = ["index", "lr", "pred", "uncertain", "updated", "nonfinite"]
    assert r.rows[cols].equals(one.rows[cols])


def test_out_of_memory_at_one_sample_stops_keeping_what_finished(toy_task, monkeypatch):
    def full(self, inputs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(BlockAdapter, "adapt", full)
    with pytest.warns(UserWarning), pytest.raises(TTAError, match="out of memory adapting a single sample"):
        tta_bench.run(toy_task, tta_bench.get_method("ifo"), Protocol(LRS),
                      RunOptions(progress=False, track=False, adapt_block=2))


def test_the_block_sizer_sizes_later_blocks_from_the_probes_memory(toy_task, monkeypatch):
    """On CUDA the first block is a probe of PROBE_BLOCK samples: its peak memory rise per sample
    sets the later blocks to what fits the budget (memory faked here: 100 bytes per sample)."""
    from tta_bench.engine.blocks import MAX_BLOCK, PROBE_BLOCK, BlockSizer, adapt_in_blocks

    last = [0]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 5000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5000 + 100 * last[0])
    adapt, sizes = BlockAdapter.adapt, []

    def counted(self, inputs):
        sizes.append(len(inputs))
        last[0] = len(inputs)
        return adapt(self, inputs)

    monkeypatch.setattr(BlockAdapter, "adapt", counted)
    method, protocol = tta_bench.get_method("ifo"), Protocol(LRS, threshold=None)
    model = toy_task.load_model()
    with Adapter(model, method, lambda m, v: m(v), protocol) as adapter:
        blocks = BlockAdapter(model, method, lambda m, v: m(v), protocol, adapter.param_names)
        sizer = BlockSizer(torch.device("cpu"), budget=1250)
        results, size, halvings = adapt_in_blocks(blocks, toy_task.x, PROBE_BLOCK, sizer)
        one = [adapter.adapt(toy_task.x[i:i + 1], i) for i in range(len(toy_task.x))]
    assert sizer.per_sample == 100 and size == 12 and halvings == 0
    assert sizes == [PROBE_BLOCK, 12, 12, 8]  # 40 samples: the probe, then blocks of 1250 // 100
    assert sizer.record() == {"budget_bytes": 1250, "base_bytes": 5000, "probe_samples": PROBE_BLOCK, "bytes_per_sample": 100.0,
                              "block": 12}
    assert [int(r.logits[0].argmax()) for r in results] == [int(r.logits[0].argmax()) for r in one]
    huge, tiny = BlockSizer(torch.device("cpu"), budget=10**12), BlockSizer(torch.device("cpu"), budget=50)
    huge.per_sample = tiny.per_sample = 100.0
    assert (huge.block(), tiny.block()) == (MAX_BLOCK, 1)


def test_bf16_autocast_sees_the_weights_adapted_in_place(toy_task):
    """The engine writes θ0 − η·g into the parameters in place; autocast's weight cache would keep
    serving the bf16 copy of θ0 (every adapted prediction the source one). The runner's autocast
    has the cache off (shown here on CPU, where torch's autocast cache behaves the same)."""
    from tta_bench.running.scan import autocast

    model, method, protocol = toy_task.load_model(), tta_bench.get_method("ifo"), Protocol((1.0,), clip=None)
    x = toy_task.x[:1]
    with Adapter(model, method, lambda m, v: m(v), protocol) as adapter:
        fp32 = adapter.adapt(x, 0)
        with autocast("bf16", torch.device("cpu")):
            source = model(x).float()
            bf16 = adapter.adapt(x, 0).logits[0].float()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the cache on: stale bf16 weights
            stale = adapter.adapt(x, 0).logits[0].float()
    adapted = fp32.logits[0]
    error = (bf16 - adapted).abs().max()  # bf16 rounding only
    assert error < 0.2 * (source[0] - adapted).abs().max() and error < 0.2 * (stale - adapted).abs().max()
