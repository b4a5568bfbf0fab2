"""The GPU measurements of issue 14 in one process, within a time budget (device time is short).

Sections run in order; one that would start after the deadline is skipped and says so. Each
result is appended as one JSON line to --out (read by benchmarks/gpu_report.py) and printed.

    python -m benchmarks.gpu --out gpu.jsonl --budget 300            # the GPU run (benchmarks/gpu.sh)
    python -m benchmarks.gpu --out /tmp/t.jsonl --tiny --device cpu  # a dry run of every section
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

import tta_bench
from benchmarks.naive_vs_engine import measure, print_report
from benchmarks.timing_models import timing_task
from tta_bench.core.protocol import LR_GRIDS, Protocol
from tta_bench.engine.adapt import Adapter
from tta_bench.engine.blocks import PROBE_BLOCK, BlockAdapter, BlockSizer
from tta_bench.running.scan import cuda_precision, resolve_device

PAPER, ONE = LR_GRIDS["paper"], (2.05e-2,)


def sections(tiny: bool) -> list[tuple[str, dict]]:
    """(model, measure() arguments or a special section), most wanted first; sized for ~5 minutes
    on an H100/H200 (tiny: a CPU dry run). Randomly initialised models are over-confident or
    near-uniform at random, so they run ungated (threshold None: every sample adapted, the worst
    case for time)."""
    s = (lambda n: max(2, n // 50)) if tiny else (lambda n: n)
    lite, rn, vit = "efficientnet-lite0", "tv:resnet50", "tv:vit_b_16"
    ungated = dict(threshold=None)
    return [
        (lite, dict(lrs=PAPER, limit=s(1000), slow_limit=s(200), naive_limit=s(60), blocks=(None, 16, 64, 1))),
        (rn, dict(**ungated, lrs=PAPER, limit=s(200), slow_limit=s(40), naive_limit=s(12), blocks=(None, 16, 1))),
        (lite, {"memory": (16, 64, 128, 256)}),
        (rn, {"memory": (16, 64, 128)}),
        (lite, {"profile": 64}),
        ("llama:135m", dict(**ungated, lrs=PAPER, limit=s(20), naive_limit=s(6), blocks=(None,))),
        ("llama:1b", dict(**ungated, lrs=PAPER, limit=s(20), naive_limit=s(4), blocks=(None,))),
        (lite, dict(lrs=ONE, limit=s(1000), slow_limit=s(200), naive_limit=s(200), blocks=(None, 1))),
        ("llama:135m", dict(**ungated, lrs=PAPER, limit=s(20), naive_limit=s(6), blocks=(None,), autocast="bf16")),
        ("llama:1b", dict(**ungated, lrs=PAPER, limit=s(20), naive_limit=s(4), blocks=(None,), autocast="bf16")),
        (vit, dict(**ungated, lrs=PAPER, limit=s(200), slow_limit=s(40), naive_limit=s(12), blocks=(None, 16, 1))),
        (rn, dict(**ungated, lrs=ONE, limit=s(200), slow_limit=s(60), naive_limit=s(60), blocks=(None, 1))),
        ("llama:135m", dict(**ungated, lrs=ONE, limit=s(20), blocks=(None,))),
        ("llama:1b", dict(**ungated, lrs=ONE, limit=s(20), blocks=(None,))),
        (rn, dict(**ungated, lrs=PAPER, limit=s(200), slow_limit=s(40), blocks=(None,), autocast="bf16",
                  skip_naive=True)),
        (vit, {"memory": (16, 64)}),
        (lite, dict(lrs=PAPER, limit=s(1000), slow_limit=s(200), blocks=(None,), skip_naive=True)),
    ]


def memory_model(model: str, device: torch.device, sizes: tuple[int, ...]) -> dict:
    """Measured peak memory of one block of b samples (19 lrs) against the old estimate
    (3·|θ|·4 bytes per sample) and the probe's (bytes per sample of a block of PROBE_BLOCK, × b)."""
    task, method = timing_task(model, device), tta_bench.get_method("ifo")
    net = task.load_model().to(device).eval()
    samples = [s.raw for s, _ in zip(task.samples(), range(max(sizes)))]
    inputs = task.collate(samples).to(device)
    protocol = Protocol(PAPER, threshold=None)
    rows = []
    with cuda_precision(False), Adapter(net, method, task.class_logits, protocol) as adapter:
        blocks = BlockAdapter(net, method, task.class_logits, protocol, adapter.param_names)
        theta = sum(p.numel() for p in adapter.params)
        per_sample_probe = None
        for b in (PROBE_BLOCK, *sizes):
            sizer = BlockSizer(device, budget=1)  # the engine's own measurement of a block's peak
            try:
                t0 = time.perf_counter()
                sizer.measure(blocks.adapt, inputs[:b])
                seconds, rise = time.perf_counter() - t0, sizer.per_sample * b
            except torch.OutOfMemoryError:
                seconds, rise = None, None
            torch.cuda.empty_cache()
            if b == PROBE_BLOCK and per_sample_probe is None:
                per_sample_probe = rise / b
                continue
            rows.append({"block": b, "measured_mib": rise and rise / 2**20, "old_estimate_mib": 3 * theta * 4 * b / 2**20,
                         "probe_estimate_mib": per_sample_probe * b / 2**20, "seconds": seconds,
                         "samples_per_s": seconds and b / seconds})
    return {"section": "memory", "model": model, "adapted_parameters": theta, "rows": rows,
            "free_gib": torch.cuda.mem_get_info(device)[0] / 2**30}


def profile_block(device: torch.device, block: int) -> str:
    """Where the time of one block goes (EfficientNet-Lite0, 19 lrs): the profiler's top kernels."""
    from torch.profiler import ProfilerActivity, profile

    task, method = timing_task("efficientnet-lite0", device), tta_bench.get_method("ifo")
    net = task.load_model().to(device).eval()
    inputs = task.collate([s.raw for s, _ in zip(task.samples(), range(block))]).to(device)
    protocol = Protocol(PAPER, threshold=None)
    with cuda_precision(False), Adapter(net, method, task.class_logits, protocol) as adapter:
        blocks = BlockAdapter(net, method, task.class_logits, protocol, adapter.param_names)
        blocks.adapt(inputs)  # warm
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            blocks.adapt(inputs)
            torch.cuda.synchronize(device)
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=480, help="seconds; later sections are skipped")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a dry run with a few samples per section")
    ap.add_argument("--only", help="comma-separated section numbers (0-based) to run")
    args = ap.parse_args()
    deadline = time.monotonic() + args.budget
    torch.set_num_threads(1 if args.tiny else 4)
    device = resolve_device(args.device)

    def emit(record: dict) -> None:
        line = json.dumps(record, default=str)
        with args.out.open("a") as f:
            f.write(line + "\n")
        print(line[:300], flush=True)

    todo = list(enumerate(sections(args.tiny)))
    if args.only:
        todo = [todo[int(i)] for i in args.only.split(",")]
    for k, (model, kw) in todo:
        if time.monotonic() > deadline:
            print(f"section {k} ({model}) skipped: over the time budget", flush=True)
            continue
        if ("memory" in kw or "profile" in kw) and device.type != "cuda":
            continue
        t0 = time.monotonic()
        try:
            if "memory" in kw:
                emit({**memory_model(model, device, kw["memory"]), "section": k})
            elif "profile" in kw:
                print(profile_block(device, kw["profile"]), flush=True)
            else:
                task = timing_task(model, device)
                r = measure(task, tta_bench.get_method("ifo"), device_name=args.device, warmup=2 if args.tiny else 8,
                            **kw)
                r.update(section=k, timing_model=model, section_seconds=time.monotonic() - t0)
                print_report(r)
                emit(r)
        except Exception:  # one failing section must not cost the others
            print(f"section {k} ({model}) failed:\n{traceback.format_exc()}", flush=True)
            emit({"section": k, "model": model, "error": traceback.format_exc()[-2000:]})
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"section {k} took {time.monotonic() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
