"""Below the eager floor? Forward-pass variants on the real EfficientNet-Lite0 (CIFAR-10 at 224 px),
timed as the engine uses them, with their numerics against eager fp32:

- source pass: batch-1 forward without gradient (the gate);
- loss pass: forward + backward of iFo's loss at θ0;
- lr pass: write θ0 − η·g into the parameters (as the engine does), then forward without gradient.

Variants: eager (the floor today), channels_last (model and inputs), a frozen TorchScript trace
(source pass only: its weights are constants), torch.compile (--compile; its compile time is
reported). Rounds interleave the variants so that a noisy machine biases none of them; the table
gives the median ms per pass, the speed-up over eager, the largest logit difference and how many of
the argmax predictions (source and adapted) equal eager's.

    python -m benchmarks.eager_floor --threads 1 --images 64 --rounds 5 [--compile]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from itertools import islice

import torch
from tabulate import tabulate

import tta_bench
from tta_bench.core.method import Step


def timed(fn, inputs) -> tuple[float, list[torch.Tensor]]:
    outs, t0 = [], time.perf_counter()
    for x in inputs:
        outs.append(fn(x))
    return (time.perf_counter() - t0) / len(inputs) * 1e3, outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2.05e-2)
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow to compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task, method = tta_bench.get_task("cifar10"), tta_bench.get_method("ifo")
    eager = task.load_model().eval()
    inputs = [task.collate([s.raw]) for s in islice(task.samples(), args.images)]
    params = list(eager.parameters())
    theta0 = [p.detach().clone() for p in params]

    def grads_of(model) -> list[torch.Tensor]:
        """iFo's clipped gradient at θ0 for the first image (the lr pass steps along it)."""
        model.zero_grad()
        method.loss(Step(model, inputs[0], task.class_logits)).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        return [p.grad.detach().clone() for p in model.parameters()]

    for p in eager.parameters():
        p.requires_grad_(True)
    g = grads_of(eager)
    cl = task.load_model().eval().to(memory_format=torch.channels_last)
    variants = {"eager": (eager, lambda x: x), "channels_last": (cl, lambda x: x.contiguous(memory_format=torch.channels_last))}
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(task.load_model().eval(), inputs[0]))
    compile_s = None
    if args.compile:
        compiled = torch.compile(task.load_model().eval())
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(inputs[0])
        compile_s = time.perf_counter() - t0
        variants["torch.compile"] = (compiled, lambda x: x)

    def source(model, prep):
        def fn(x):
            with torch.no_grad():
                return task.class_logits(model, prep(x))[0]
        return fn

    def loss_pass(model, prep):
        def fn(x):
            model.zero_grad()
            loss = method.loss(Step(model, prep(x), task.class_logits))
            loss.backward()
            return loss.detach()
        return fn

    def lr_pass(model, prep):
        live = list(model.parameters())
        def fn(x):
            with torch.no_grad():
                for p, t, gi in zip(live, theta0, g, strict=True):
                    torch.add(t, gi, alpha=-args.lr, out=p)
                logits = task.class_logits(model, prep(x))[0]
                for p, t in zip(live, theta0, strict=True):  # reset, as the engine does
                    p.copy_(t)
                return logits
        return fn

    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    outs: dict[tuple[str, str], list[torch.Tensor]] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
        for name, (model, prep) in variants.items():
            for kind, make in (("source", source), ("loss", loss_pass), ("lr", lr_pass)):
                ms, outs[name, kind] = timed(make(model, prep), inputs)
                times[name, kind] += [ms] * (round_ > 0)
        ms, outs["trace (frozen)", "source"] = timed(source(traced, lambda x: x), inputs)
        times["trace (frozen)", "source"] += [ms] * (round_ > 0)
    rows = []
    for (name, kind), ms in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0] != "eager")):
        base = statistics.median(times["eager", kind])
        ref, got = outs["eager", kind], outs[name, kind]
        diff = max(float((a - b).abs().max()) for a, b in zip(ref, got))
        same = sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(ref, got)) if kind != "loss" else "–"
        rows.append([kind, name, f"{statistics.median(ms):.1f}", f"{base / statistics.median(ms):.2f}×",
                     f"{diff:.1e}", f"{same}/{len(inputs)}" if kind != "loss" else "–"])
    print(f"EfficientNet-Lite0, CIFAR-10 at 224 px, batch 1, {args.threads} thread(s), {args.images} images × "
          f"{args.rounds} rounds; torch {torch.__version__}" + (f"; compile took {compile_s:.0f} s" if compile_s else ""))
    print(tabulate(rows, headers=["pass", "variant", "ms (median)", "vs eager", "max |Δ| vs eager",
                                  "argmax = eager"], tablefmt="github"))


if __name__ == "__main__":
    main()
