"""Run one configuration (task × method × protocol) over a task's samples."""
from __future__ import annotations

import json
import random
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from time import perf_counter
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from .engine import Adapter, Protocol
from .errors import TTAError
from .metrics import summarize
from .method import Method
from .provenance import environment
from .task import Sample, Task, select, to_device

# Measured (EfficientNet-Lite0, 224 px, 1 thread): per-sample forward 16 ms at batch 1, 29 ms at 16,
# 50 ms at 64 on this CPU; GPUs are launch-bound at batch 1.
BATCH_SIZE = {"cpu": 1, "cuda": 64}

TABLE_COLUMNS = {
    "lr": "lr", "n_total": "n_total", "n_uncertain": "n_uncertain", "frac_uncertain": "frac_unc",
    "acc_source": "acc_source", "acc_adapted": "acc_adapted", "delta_acc": "Δacc",
    "n_fixed": "fixed", "n_broken": "broken", "p_mcnemar": "p (McNemar)",
    "n_nonfinite": "nonfinite", "samples_per_s": "samples/s",
}


@dataclass
class RunResult:
    rows: pd.DataFrame  # one row per (sample, learning rate)
    summary: list[dict]  # one dict per learning rate
    config: dict
    metadata: dict
    interrupted: bool = False

    def table(self, fmt: str = "simple") -> str:
        data = [[s[k] for k in TABLE_COLUMNS] for s in self.summary]
        return tabulate(data, headers=list(TABLE_COLUMNS.values()), tablefmt=fmt,
                        floatfmt=("g", "g", "g", ".3f", ".2f", ".2f", "+.2f", "g", "g", ".3g", "g", ".2f"))

    def save(self, out: Path) -> None:
        """samples.parquet (per-sample rows), summary.csv and run.json (config + provenance)."""
        out.mkdir(parents=True, exist_ok=True)
        self.rows.to_parquet(out / "samples.parquet", index=False)
        pd.DataFrame(self.summary).to_csv(out / "summary.csv", index=False)
        record = {"config": self.config, "metadata": self.metadata, "summary": self.summary,
                  "interrupted": self.interrupted}
        (out / "run.json").write_text(json.dumps(record, indent=2, default=str))


@dataclass
class RunOptions:
    """How the samples are scanned (not part of the protocol's maths)."""

    limit: int | None = None  # first N samples of the task
    max_uncertain: int | None = None  # stop after this many uncertain samples
    batch_size: int | None = None  # of the source forward and gate; None: per device (BATCH_SIZE)
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("limit", "max_uncertain"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TTAError(f"{name} must be >= 1, got {value}")
        if self.batch_size is not None and self.batch_size < 1:
            raise TTAError(f"batch size must be >= 1, got {self.batch_size}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TTAError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TTAError(f"device {name} requested but CUDA is not available; use --device cpu")
    return device


def _chunks(items: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def run(task: Task, method: Method, protocol: Protocol, options: RunOptions | None = None) -> RunResult:
    """Apply the protocol to every sample of `task` (DESIGN §2) and summarise per learning rate.

    Ctrl-C stops the scan; the result then holds every sample finished so far (`interrupted`)."""
    options = options or RunOptions()
    method.supports(task)
    task.check()
    device = resolve_device(options.device)
    random.seed(options.seed)
    np.random.seed(options.seed)
    torch.manual_seed(options.seed)
    options = replace(options, batch_size=options.batch_size or BATCH_SIZE.get(device.type, 1))
    model = task.load_model().to(device).eval()
    adapter = Adapter(model, method, task.class_logits, protocol) if method.adapts else None
    lrs, threshold = protocol.lrs, protocol.threshold
    cols: dict[str, list] = defaultdict(list)
    n_seen = n_uncertain = 0
    total = task.num_samples()
    if options.limit is not None:
        total = min(total, options.limit) if total is not None else options.limit
    bar = tqdm(total=total, unit="sample", disable=not options.progress, dynamic_ncols=True)
    start, interrupted = perf_counter(), False
    try:
        with adapter if adapter is not None else nullcontext():
            for chunk in _chunks(islice(task.samples(), options.limit), options.batch_size):
                t0 = perf_counter()
                inputs = to_device(task.collate([s.raw for s in chunk]), device)
                with torch.no_grad():
                    probs = torch.softmax(task.class_logits(model, inputs).float(), dim=-1)
                top = probs.topk(min(2, probs.shape[-1]), dim=-1)
                deltas = (top.values[:, 0] - top.values[:, -1]).tolist()
                preds0, p0 = top.indices[:, 0].tolist(), top.values[:, 0].tolist()
                source_seconds = (perf_counter() - t0) / len(chunk)
                for i, sample in enumerate(chunk):
                    t0 = perf_counter()
                    uncertain = threshold is None or deltas[i] < threshold
                    adaptation = adapter.adapt(select(inputs, i)) if uncertain and adapter else None
                    seconds = perf_counter() - t0 + source_seconds
                    for k, lr in enumerate(lrs):
                        pred, nonfinite = preds0[i], False
                        if adaptation is not None:
                            logits = adaptation.logits[k]
                            nonfinite = adaptation.nonfinite or (logits is not None and not bool(torch.isfinite(logits).all()))
                            if nonfinite:
                                pred = -1  # counts as wrong
                            elif logits is not None:
                                pred = int(logits.argmax())
                        cols["index"].append(sample.index)
                        cols["label"].append(sample.label)
                        cols["lr"].append(lr)
                        cols["pred_source"].append(preds0[i])
                        cols["pred"].append(pred)
                        cols["delta"].append(deltas[i])
                        cols["p_source"].append(p0[i])
                        cols["uncertain"].append(uncertain)
                        cols["updated"].append(bool(adaptation and adaptation.updated))
                        cols["loss"].append(adaptation.loss if adaptation else float("nan"))
                        cols["grad_norm"].append(adaptation.grad_norm if adaptation else float("nan"))
                        cols["nonfinite"].append(nonfinite)
                        cols["forwards"].append(1 + (adaptation.forwards if adaptation else 0))
                        cols["backwards"].append(adaptation.backwards if adaptation else 0)
                        cols["seconds"].append(seconds)
                    n_seen += 1
                    n_uncertain += uncertain
                    bar.update(1)
                    bar.set_postfix(uncertain=n_uncertain, refresh=False)
                    if options.max_uncertain is not None and n_uncertain >= options.max_uncertain:
                        break
                else:
                    continue
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    wall = perf_counter() - start
    if n_seen == 0 and not interrupted:
        raise TTAError(f"task {task.name} yielded no samples; check its data options")
    rows = pd.DataFrame(cols)
    config = {
        "task": task.name, "task_options": task.config, "method": method.name,
        "hparams": method.config, "protocol": asdict(protocol), "options": asdict(options),
        "sweep": "one-gradient" if protocol.one_gradient else "per-lr",
        "adapted_parameters": sum(p.numel() for p in adapter.params) if adapter else 0,
    }
    metadata = {**environment(device), "task": task.metadata()}
    return RunResult(rows, summarize(rows, wall) if len(rows) else [], config, metadata, interrupted)
