"""How many of the gated samples EATA's filters pass (issue 27), on the embedded task:
EfficientNet-Lite0, the first 500 CIFAR-10 test images, shared gate d = 0.16, one lr (the filters
decide at θ0, so the lr does not matter). memory=none leaves only the reliable-entropy filter;
memory=stream (official) adds the redundancy filter against m.
    python -m benchmarks.eata_filters"""
from __future__ import annotations

import torch

from tta_bench import Protocol, RunOptions, get_method, get_task, run

torch.set_num_threads(1)
for corruption in ("none", "gaussian_noise"):
    for e0_frac in (0.4, 1.0):  # the official E0, and the reliable filter switched off
        passed = {}
        for memory in ("none", "stream"):
            method = get_method("eata", memory=memory, e0_frac=e0_frac)
            result = run(get_task("cifar10", corruption=corruption, severity=5), method,
                         Protocol((1e-3,), threshold=0.16), RunOptions(limit=500, track=False, progress=False))
            gated = result.rows[result.rows["uncertain"]]
            passed[memory] = (int(gated["updated"].sum()), len(gated))
        (n1, n), (n2, _) = passed["none"], passed["stream"]
        print(f"{corruption}, e0_frac={e0_frac}: gated {n} of 500; reliable (E < {e0_frac} ln 10) {n1} "
              f"({100 * n1 / n:.1f} %); also non-redundant (|cos(m, p)| < 0.5) {n2} ({100 * n2 / n:.1f} %)",
              flush=True)
