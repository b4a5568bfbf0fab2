"""Markdown tables from benchmarks/gpu.py's JSON lines (the README's GPU tables).

    python -m benchmarks.gpu_report benchmarks/results/gpu-h200-2026-11-26-a.jsonl [more.jsonl …]
"""
from __future__ import annotations

import json
import sys

from tabulate import tabulate


def block_name(e: dict) -> str:
    if e["adapt_block"] == "default":
        return f"default ({e['adaptation'].split(' (')[0]})" if e["adaptation"].startswith("blocks") else "default (one at a time)"
    return "one at a time" if e["adapt_block"] == 1 else f"blocks of {e['adapt_block']}"


def timing_rows(records: list[dict]) -> list[list]:
    rows = []
    for r in records:
        what = f"{r['timing_model']} · {r['lrs']} lr{' · bf16' if r['autocast'] else ''}"
        gate = "d = 0.16" if r["threshold"] is not None else "ungated"
        if r["naive"]:
            rows.append([what, gate, "naive loop", r["naive"]["samples"], "", f"{r['naive']['samples_per_s']:.2f}", "1",
                         f"{r['floor']['samples_per_s'] / r['naive']['samples_per_s']:.2f}", "", f"{r['naive']['peak_mib'] / 1024:.1f}"])
        for e in r["engines"]:
            rows.append([what, gate, f"engine, {block_name(e)}", e["samples"], e["uncertain"], f"{e['samples_per_s']:.2f}",
                         f"{e['vs_naive']:.1f}" if "vs_naive" in e else "–", f"{e['engine_over_floor']:.2f}",
                         f"{e['agree']}/{e['compared']}" if "agree" in e else "–", f"{e['peak_mib'] / 1024:.1f}"])
        rows.append([what, gate, "compute floor", r["floor"]["samples"], "", f"{r['floor']['samples_per_s']:.2f}", "", "1", "", ""])
    return rows


def memory_rows(records: list[dict]) -> list[list]:
    return [[r["model"], f"{r['adapted_parameters'] / 1e6:.1f}M", x["block"], f"{x['measured_mib'] / 1024:.2f}",
             f"{x['probe_estimate_mib'] / 1024:.2f}", f"{x['old_estimate_mib'] / 1024:.2f}",
             f"{x['samples_per_s']:.1f}" if x["samples_per_s"] else "OOM"]
            for r in records for x in r["rows"]]


def main() -> None:
    records = [json.loads(line) for path in sys.argv[1:] for line in open(path) if line.strip()]
    ok = [r for r in records if "error" not in r]
    timings = [r for r in ok if "engines" in r]
    memory = [r for r in ok if "rows" in r]
    if timings:
        r = timings[0]
        print(f"{r['device_name']}, torch {r['torch']}, CUDA {r['cuda']}, iFo, fp32 (TF32 off) unless bf16\n")
        print(tabulate(timing_rows(timings), tablefmt="github", headers=[
            "model · lrs", "gate", "", "samples", "adapted", "samples/s", "× naive", "× floor", "identical preds",
            "peak GiB"]))
    if memory:
        print()
        print(tabulate(memory_rows(memory), tablefmt="github", headers=[
            "model", "|θ|", "block", "measured GiB", "probe estimate GiB", "old 3·|θ| estimate GiB", "samples/s"]))
    for r in records:
        if "error" in r:
            print(f"\nsection {r['section']} ({r['model']}) failed: {r['error'].strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
