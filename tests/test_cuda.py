"""The CUDA paths, run where a GPU is (skipped elsewhere): blocks by default with a block size
measured from memory, TF32 off unless asked, bf16 autocast, and the predictions of one sample at
a time."""
import pytest
import torch

import tta_bench
from tta_bench import Protocol, RunOptions
from tta_bench.core.protocol import LR_GRIDS
from tta_bench.engine.blocks import MAX_BLOCK, PROBE_BLOCK

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LRS = (1e-2, 1e-1, 1.0)
COLS = ["index", "lr", "pred_source", "pred", "uncertain", "updated", "nonfinite"]


def on(device: str = "cuda", **kw) -> RunOptions:
    return RunOptions(progress=False, track=False, device=device, **kw)


def test_blocks_are_the_cuda_default_sized_from_measured_memory(toy_task):
    method, protocol = tta_bench.get_method("ifo"), Protocol(LRS, threshold=None)  # all 40 adapted
    blocks = tta_bench.run(toy_task, method, protocol, on())
    one = tta_bench.run(toy_task, method, protocol, on(adapt_block=1))
    cpu = tta_bench.run(toy_task, method, protocol, on("cpu"))
    assert blocks.config["adaptation"].startswith(f"blocks of {MAX_BLOCK} (torch.func.vmap; sized from a first "
                                                  f"block of {PROBE_BLOCK}: ")
    memory = blocks.config["block_memory"]
    assert 0 < memory["bytes_per_sample"] < 64 * 2**20 and memory["block"] == MAX_BLOCK  # a tiny CNN
    assert 0 < memory["budget_bytes"] <= torch.cuda.get_device_properties(0).total_memory
    assert one.config["adaptation"] == "one sample at a time" and one.config["block_memory"] is None
    assert blocks.rows[COLS].equals(one.rows[COLS])
    assert (cpu.rows["pred"] == one.rows["pred"]).mean() >= 0.95  # across devices: float rounding only


def _recording(method, seen: list):
    loss = method.loss

    def recorded(step):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     torch.is_autocast_enabled("cuda")))
        return loss(step)

    method.loss = recorded
    return method


def test_tf32_is_off_unless_asked_and_restored_after(toy_task):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # a user's global setting
    try:
        for tf32 in (False, True):
            seen = []
            tta_bench.run(toy_task, _recording(tta_bench.get_method("entropy"), seen), Protocol(LRS, threshold=None),
                          on(adapt_block=1, tf32=tf32))
            assert seen and set(seen) == {(tf32, tf32, False)}
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("block", [None, 1])
def test_bf16_autocast_runs_every_forward_under_autocast(toy_task, block):
    seen = []
    method, protocol = _recording(tta_bench.get_method("ifo"), seen), Protocol(LRS, threshold=None)
    bf16 = tta_bench.run(toy_task, method, protocol, on(autocast="bf16", adapt_block=block))
    fp32 = tta_bench.run(toy_task, tta_bench.get_method("ifo"), protocol, on(adapt_block=block))
    other = tta_bench.run(toy_task, tta_bench.get_method("ifo"), protocol, on(autocast="bf16", adapt_block=2 if block == 1 else 1))
    assert seen and all(autocast for *_, autocast in seen)
    assert bf16.config["options"]["autocast"] == "bf16"
    assert not bf16.rows["nonfinite"].any() and (bf16.rows["pred"] == fp32.rows["pred"]).mean() >= 0.8
    big = bf16.rows["lr"] == 1.0  # adapted predictions, not the source ones (autocast's weight cache is off)
    changed = [(r.rows["pred"][big] != r.rows["pred_source"][big]).sum() for r in (bf16, fp32)]
    assert changed[1] > 0 and abs(changed[0] - changed[1]) <= 2 + changed[1] // 10  # bf16 rounding flips a few
    assert (bf16.rows["pred"] == other.rows["pred"]).mean() >= 0.9  # in blocks and one at a time alike


@pytest.mark.slow
def test_real_model_blocks_predict_as_one_at_a_time_within_the_memory_budget():
    """EfficientNet-Lite0 on CIFAR-10, 19 learning rates: the sized blocks stay inside the budget
    (the memory estimate never under-counts) and predict as one sample at a time."""
    task, method = tta_bench.get_task("cifar10"), tta_bench.get_method("ifo")
    protocol, budget = Protocol(LR_GRIDS["paper"]), 2 * 2**30
    torch.cuda.empty_cache()
    blocks = tta_bench.run(task, method, protocol, on(limit=400, max_memory=budget))
    peak = torch.cuda.max_memory_allocated()  # since the probe (the sizer resets the peak there)
    one = tta_bench.run(task, method, protocol, on(limit=400, adapt_block=1))
    memory = blocks.config["block_memory"]
    assert memory["budget_bytes"] == budget and 1 < memory["block"] < MAX_BLOCK
    assert memory["block"] * memory["bytes_per_sample"] > budget - memory["bytes_per_sample"]  # uses the budget
    assert peak - memory["base_bytes"] <= budget
    assert blocks.summary[0]["n_uncertain"] > memory["block"]  # more than one sized block ran
    assert blocks.rows["uncertain"].equals(one.rows["uncertain"])
    assert (blocks.rows["pred"] == one.rows["pred"]).mean() >= 0.99
