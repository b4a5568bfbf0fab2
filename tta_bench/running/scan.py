"""Run one configuration (task × method × protocol) over a task's samples."""
from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from itertools import islice
from pathlib import Path
from time import perf_counter
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from tabulate import tabulate
from tqdm.auto import tqdm

from tta_bench.core.errors import TTAError, first_line
from tta_bench.core.hashing import json_sha256
from tta_bench.core.method import Method
from tta_bench.core.protocol import Protocol
from tta_bench.core.settings import default
from tta_bench.core.task import Sample, Task, UnreadableSample, select, to_device
from tta_bench.engine.adapt import Adaptation, Adapter
from tta_bench.engine.blocks import BlockPolicy, why_no_blocks
from tta_bench.running.provenance import environment
from tta_bench.running.summary import summarize
from tta_bench.storage import checkpoint
from tta_bench.storage.checkpoint import write_atomically
from tta_bench.storage.tracking import DEFAULT_EXPERIMENT, Tracker, TrackingUnavailable, resolve_uri, sync_hint

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
    tracking: str | None = None  # id of its top-level MLflow run, once logged

    def table(self, fmt: str = "simple") -> str:
        columns = {**TABLE_COLUMNS, **({"bpb": "bpb", "bpb_change_pct": "Δbpb %"} if any("bpb" in s for s in self.summary) else {})}
        data = [[s[k] for k in columns] for s in self.summary]
        return tabulate(data, headers=list(columns.values()), tablefmt=fmt,
                        floatfmt=("g", "g", "g", ".3f", ".2f", ".2f", "+.2f", "g", "g", ".3g", "g", ".2f", ".4f", "+.2f"))

    def record(self) -> dict:
        return {"config": self.config, "metadata": self.metadata, "summary": self.summary,
                "interrupted": self.interrupted}

    @property
    def key(self) -> str:
        """Content hash: the same results give the same key, in memory or reloaded from disk."""
        return json_sha256(self.record())[:20]

    def save(self, out: Path) -> None:
        """samples.parquet (per-sample rows), summary.csv and run.json (config + provenance), each
        written whole or not at all, run.json last: a folder with a run.json holds a complete run,
        whichever write failed (an OSError, e.g. a full disk)."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").unlink(missing_ok=True)  # the record of a run being replaced goes first
        write_atomically(out / "samples.parquet", lambda tmp: self.rows.to_parquet(tmp, index=False))
        write_atomically(out / "summary.csv", lambda tmp: pd.DataFrame(self.summary).to_csv(tmp, index=False))
        record = json.dumps(self.record(), indent=2, default=str)
        write_atomically(out / "run.json", lambda tmp: tmp.write_text(record))

    @classmethod
    def load(cls, out: Path) -> RunResult:
        """A result saved by `save` (e.g. to upload it to MLflow later); a TTAError naming the
        folder and what is wrong if it holds none."""
        from tta_bench.storage.tracking import run_params, run_tags

        fix = "pass a folder written by tta-bench run (or re-run it)"
        path = out / "run.json"
        try:
            record = json.loads(path.read_text())
            path = out / "samples.parquet"
            rows = pd.read_parquet(path)
        except FileNotFoundError:
            raise TTAError(f"{out}: {path.name} is missing; {fix}") from None
        except (OSError, ValueError) as err:  # unreadable, not JSON, not parquet
            why = getattr(err, "strerror", None) or first_line(err)
            raise TTAError(f"{out}: {path.name} cannot be read ({why}); {fix}") from None
        fields = {"summary": list, "config": dict, "metadata": dict, "interrupted": bool}
        if wrong := [k for k, kind in fields.items()
                     if not isinstance(record, dict) or not isinstance(record.get(k), kind)]:
            raise TTAError(f"{out}: run.json is not a tta-bench run record ({', '.join(wrong)} missing or "
                           f"of the wrong type); {fix}")
        if problem := _rows_disagree(rows, record["summary"]):
            raise TTAError(f"{out}: samples.parquet does not belong to its run.json ({problem}); {fix}")
        result = cls(rows, record["summary"], record["config"], record["metadata"], record["interrupted"])
        try:  # everything logging it reads
            run_params(result.config), run_tags(result)
        except (KeyError, TypeError, AttributeError) as err:
            raise TTAError(f"{out}: run.json is incomplete or damaged ({type(err).__name__}: {err}); {fix}") from None
        return result


def _rows_disagree(rows: pd.DataFrame, summary: list) -> str | None:
    """Why the per-sample rows cannot be the ones a run record summarises (None: they can)."""
    if not {"lr", "index"} <= set(rows.columns):
        return "it has no lr or index column"
    try:
        want = {float(s["lr"]): int(s["n_total"]) for s in summary}
    except (KeyError, TypeError, ValueError):
        return "the record's summary has no lr and n_total per learning rate"
    counts = rows.groupby("lr")["index"].agg(["size", "nunique"])
    got = {float(lr): int(n) for lr, n in counts["size"].items()}
    if got != want:
        return f"it has {len(rows)} rows, the record counts {sum(want.values())} over {len(want)} learning rate(s)"
    if (counts["size"] != counts["nunique"]).any():
        return "a sample appears twice"
    return None


@dataclass
class RunOptions:
    """How the samples are scanned (not part of the protocol's maths)."""

    limit: int | None = default("limit")  # first N samples of the task
    max_uncertain: int | None = default("max_uncertain")  # stop after this many uncertain samples
    batch_size: int | None = default("batch_size")  # of the source forward and gate; None: per device (BATCH_SIZE)
    seed: int = default("seed")
    device: str = default("device")
    tf32: bool = False  # TF32 convolutions/matmuls on CUDA: faster, but ~1e-3 relative error
    progress: bool = True
    out: Path | None = None  # save the results here (also where they go if tracking fails)
    track: bool = True  # log to MLflow
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else MLflow's default ./mlflow.db
    experiment: str = DEFAULT_EXPERIMENT
    checkpoint: Path | None = None  # per-sample rows saved here as the run goes; resumed if present
    checkpoint_every: int = 200  # samples between checkpoint writes
    checkpoint_seconds: float = 60.0  # and at most this long between them (a kill loses at most this)
    adapt_block: int | None = None  # uncertain samples adapted at once (vmap); None: blocks on CUDA only
    max_memory: int | None = None  # bytes for one block; None: a share of the free device memory (BlockSizer)
    autocast: str | None = None  # "bf16": bfloat16 autocast for every forward (CUDA only)
    skip_unreadable: bool = False  # skip (and record) samples whose data cannot be read

    def __post_init__(self) -> None:
        for name in ("limit", "max_uncertain", "batch_size", "adapt_block", "checkpoint_every", "max_memory"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise TTAError(f"{name.replace('_', ' ')} must be >= 1, got {value}")
        if not 0 <= self.checkpoint_seconds < math.inf:
            raise TTAError(f"checkpoint seconds must be finite and >= 0, got {self.checkpoint_seconds}")
        if not 0 <= self.seed < 2**32:  # what numpy and torch accept
            raise TTAError(f"seed must be in 0 .. 2**32 - 1, got {self.seed}")


def parse_device(name: str) -> torch.device | None:
    """The device a name stands for (None: auto), checked by name only (a sweep is expanded on a
    machine that may lack its jobs' GPUs)."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # meta, xla, …: no real data
        raise TTAError(f"unknown or unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_device(name: str) -> torch.device:
    """The device to run on, present on this machine."""
    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TTAError(f"device {name} requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TTAError(f"device {name} does not exist: {torch.cuda.device_count()} CUDA device(s); use cuda:0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TTAError(f"device {name} requested but MPS is not available; use --device cpu")
    return device


@dataclass
class Scored:
    """One sample after the batched source forward and gate."""

    sample: Sample
    inputs: Any  # model inputs with batch dimension 1
    pred: int  # ŷ0
    delta: float  # Δ1,2
    prob: float  # p(ŷ0)
    seconds: float  # its share of the batched source forward
    spread: float = math.nan  # p(1) − p(C)
    unreadable: dict | None = None  # why its data could not be read (skipped, never scored)


def source_pass(task: Task, model: torch.nn.Module, samples: Iterable[Sample], batch_size: int,
                device: torch.device, skip_unreadable: bool = False) -> Iterator[Scored]:
    """Batched source forward (θ0 is shared by all samples), yielded one sample at a time, in
    order; a sample whose data cannot be read stops the scan, or with `skip_unreadable` is
    yielded as `unreadable` (counted as seen, never scored)."""
    it = iter(samples)
    while chunk := list(islice(it, batch_size)):
        t0 = perf_counter()
        readable, unreadable, inputs = list(chunk), {}, None
        while readable:
            try:
                inputs = to_device(task.collate([s.raw for s in readable]), device)
                break
            except UnreadableSample as err:
                if not skip_unreadable:
                    raise TTAError(f"{err}; pass --skip-unreadable to skip such samples (each one is "
                                   "recorded in run.json)") from None
                bad = readable.pop(err.position)
                unreadable[bad.index] = {"index": bad.index, "what": err.what, "reason": err.reason}
        if inputs is not None:
            with torch.no_grad():
                probs = torch.softmax(task.class_logits(model, inputs).float(), dim=-1)
            top = probs.topk(min(2, probs.shape[-1]), dim=-1)
            deltas = (top.values[:, 0] - top.values[:, -1]).tolist()
            preds, p0 = top.indices[:, 0].tolist(), top.values[:, 0].tolist()
            spreads = (top.values[:, 0] - probs.min(dim=-1).values).tolist()
        seconds = (perf_counter() - t0) / len(chunk)
        i = 0
        for sample in chunk:
            if sample.index in unreadable:
                yield Scored(sample, None, -1, math.nan, math.nan, 0.0, unreadable=unreadable[sample.index])
            else:
                yield Scored(sample, select(inputs, i), preds[i], deltas[i], p0[i], seconds, spreads[i])
                i += 1


# Columns added since a checkpoint may have been written, with their value in its rows.
OLDER_ROWS = {"select_seconds": 0.0}  # older versions chose no data to step on


class Recorder:
    """Per-sample rows (docs/DESIGN.md §2 step 6), one per learning rate, kept as columns; with the task's
    per-sample `metrics` (text: bpb), `<name>_source` at θ0 and `<name>` after adaptation."""

    def __init__(self, lrs: tuple[float, ...], metrics: tuple[str, ...] = ()):
        self.lrs, self.metrics = lrs, metrics
        self.cols: dict[str, list] = defaultdict(list)
        self.resumed: set[str] = set()  # the columns of a resumed checkpoint

    def add(self, s: Scored, uncertain: bool, a: Adaptation | None, seconds: float,
            source: dict[str, float] | None = None) -> None:
        """`source`: the task's metrics at θ0 (uncertain samples of a task with metrics; one more
        forward). Unadapted or declined: the metric after = at θ0; non-finite: NaN."""
        for k, lr in enumerate(self.lrs):
            pred, nonfinite = s.pred, False
            if a is not None:
                logits = a.logits[k]
                nonfinite = a.nonfinite or (logits is not None and not bool(torch.isfinite(logits).all()))
                if nonfinite:
                    pred = -1  # counts as wrong
                elif logits is not None:
                    pred = int(logits.argmax())
            row = {
                "index": s.sample.index, "label": s.sample.label, "lr": lr, "pred_source": s.pred,
                "pred": pred, "delta": s.delta, "p_source": s.prob, "uncertain": uncertain,
                "updated": bool(a and a.updated), "loss": a.loss if a else float("nan"),
                "grad_norm": a.grad_norm if a else float("nan"), "nonfinite": nonfinite,
                "forwards": 1 + int(source is not None) + (a.forwards if a else 0),
                "backwards": a.backwards if a else 0, "seconds": seconds,
                "select_seconds": a.select_seconds if a else 0.0,  # of `seconds`: choosing data to step on
            }
            for name in self.metrics:
                before = source.get(name, math.nan) if source else math.nan
                after = before if a is None or a.logits[k] is None else (a.metrics[k] or {}).get(name, math.nan)
                row[f"{name}_source"], row[name] = before, math.nan if nonfinite else after
            for key, value in row.items():
                self.cols[key].append(value)

    def extend(self, rows: pd.DataFrame) -> None:
        """Rows recorded earlier: a resumed run's checkpoint, before any `add`. It may come from an
        older version with fewer columns; `frame` fills them in those rows."""
        self.resumed = set(rows.columns)
        for key in rows.columns:
            self.cols[key].extend(rows[key].tolist())
        for name in self.metrics:
            self.cols.setdefault(f"{name}_source", [])
            self.cols.setdefault(name, [])

    def frame(self) -> pd.DataFrame:
        """Every column as long as the longest: a column the checkpoint lacks gets, in its rows, the
        value the older version implied (`OLDER_ROWS`) or NaN; one this version no longer records,
        NaN in the new rows."""
        n = max(map(len, self.cols.values()), default=0)

        def full(key: str, values: list) -> list:
            pad = [OLDER_ROWS.get(key, math.nan)] * (n - len(values))
            return values + pad if key in self.resumed else pad + values
        return pd.DataFrame({key: full(key, values) for key, values in self.cols.items()})


@contextmanager
def cuda_precision(allow_tf32: bool) -> Iterator[None]:
    """Full fp32 by default: with TF32, batched and single-sample kernels disagree at ~1e-3,
    enough to flip the Δ1,2 gate of samples near the threshold."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def autocast(dtype: str | None, device: torch.device) -> AbstractContextManager:
    """bf16 autocast for every forward, without autocast's weight cache: the engine writes adapted
    weights in place, and a cached bf16 copy of a parameter would hide the update (every adapted
    prediction would silently be the source one)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def run(task: Task, method: Method, protocol: Protocol, options: RunOptions | None = None) -> RunResult:
    """Apply the protocol to every sample of `task` (docs/DESIGN.md §2), summarise per learning rate,
    save to `options.out` and log to MLflow.

    Ctrl-C stops the scan; the result then holds every sample finished so far (`interrupted`).
    If MLflow cannot be reached the run goes on; its results are saved locally and a
    TrackingWarning says how to upload them later."""
    options = options or RunOptions()
    task.check()  # data and names first (before the model loads), then what they allow
    method.supports(task)
    protocol.check(method)
    device = resolve_device(options.device)
    if options.autocast not in (None, "bf16"):
        raise TTAError(f"unknown autocast {options.autocast!r}; use bf16 (or none)")
    if options.autocast and device.type != "cuda":
        raise TTAError("bf16 autocast is a CUDA option; on CPU runs are full fp32 (drop --autocast)")
    if options.adapt_block and options.adapt_block > 1 and method.adapts and (
            reason := why_no_blocks(method, protocol, task)):
        raise TTAError(f"adapt_block={options.adapt_block}: {reason}; use 1")
    tracker, out = None, options.out
    if options.track:  # the store is created before any work
        try:
            tracker = Tracker(options.tracking_uri, options.experiment)
        except TrackingUnavailable as err:
            out = out or default_out(task, method)
            _warn_untracked(str(err), out, options)
    with cuda_precision(options.tf32), autocast(options.autocast, device):
        result = _run(task, method, protocol, options, device)
    if result.interrupted and result.rows.empty:  # stopped before the first sample: nothing to keep
        return result
    unsaved = _save(result, out) if out is not None else None  # why not, if it could not be saved
    if tracker is not None:
        try:
            result.tracking = tracker.log(result)
        except TrackingUnavailable as err:
            if out is None:
                out = default_out(task, method)
                unsaved = _save(result, out)
            _warn_untracked(str(err), out, options)
    if unsaved:
        kept = [f"in {spare}"] if (spare := _save_elsewhere(result)) else []
        kept += [f"as MLflow run {result.tracking}"] if result.tracking else []
        raise TTAError(f"{unsaved}; its {result.rows['index'].nunique()} samples are kept {' and '.join(kept)}"
                       if kept else f"{unsaved}, nor anywhere else: its results are lost; free space and run again")
    if stopped_by := result.metadata["stopped_by"]:
        kept = ([f"in {out}"] * (out is not None) + [f"as MLflow run {result.tracking}"] * bool(result.tracking)
                + [f"in checkpoint {options.checkpoint}"] * bool(options.checkpoint))
        raise TTAError(f"{stopped_by} (the {result.rows['index'].nunique()} samples finished before it are "
                       f"kept {' and '.join(kept)}, marked interrupted)" if kept else stopped_by)
    return result


class TrackingWarning(UserWarning):
    pass


def _save(result: RunResult, out: Path) -> str | None:
    """Save to `out`; None, or why it could not be (one line)."""
    try:
        result.save(out)
        return None
    except OSError as err:
        return f"could not write the results to {err.filename or out} ({err.strerror or err})"


def _save_elsewhere(result: RunResult) -> Path | None:
    """A complete copy in a new temporary folder, when the chosen one cannot hold it."""
    try:
        spare = Path(tempfile.mkdtemp(prefix="tta-bench-unsaved-"))
    except OSError:
        return None
    try:
        result.save(spare)
        return spare
    except OSError:
        shutil.rmtree(spare, ignore_errors=True)
        return None


def _warn_untracked(reason: str, out: Path, options: RunOptions) -> None:
    warnings.warn(f"{reason}; the results are kept in {out}; upload them later with: "
                  f"{sync_hint(out, resolve_uri(options.tracking_uri), options.experiment)}", TrackingWarning, stacklevel=3)


def default_out(task: Task, method: Method) -> Path:
    return Path("runs") / f"{task.name}-{method.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _run(task: Task, method: Method, protocol: Protocol, options: RunOptions, device: torch.device) -> RunResult:
    return Scan(task, method, protocol, options, device).run()


class Scan:
    """One run's pass over a task's samples: the source forward and gate in batches, the uncertain
    samples adapted (one at a time or in blocks), every sample recorded, progress checkpointed.
    Its state is the run's: what was seen, recorded and saved so far, resumed from a checkpoint."""

    def __init__(self, task: Task, method: Method, protocol: Protocol, options: RunOptions, device: torch.device):
        random.seed(options.seed)
        np.random.seed(options.seed)
        torch.manual_seed(options.seed)
        self.task, self.method, self.protocol, self.device = task, method, protocol, device
        self.settings = _checkpoint_settings(task, method, protocol, options) if options.checkpoint else {}
        self.options = options = replace(options, batch_size=options.batch_size or BATCH_SIZE.get(device.type, 1))
        self.model = model = task.load_model().to(device).eval()
        self.bound = _Evaluate(task) if task.metrics else None  # the prediction forward gives the metrics too
        space = task.data_space(options.progress) if method.selects else None  # built (or loaded) once, before the scan
        self.adapter = Adapter(model, method, task.class_logits, protocol, task.augmenter(), self.bound,
                               data_space=space) if method.adapts else None
        self.blocks = BlockPolicy(self.adapter is not None, model, method, task, protocol,
                                  self.adapter.param_names if self.adapter else [], device, options.adapt_block,
                                  options.max_memory)
        self.recorder = Recorder(protocol.lrs, task.metrics)
        self.done = done = checkpoint.load(options.checkpoint, self.settings, len(protocol.lrs)) \
            if options.checkpoint else None
        if done is not None:
            self.recorder.extend(done.rows)
            if self.adapter is not None and done.memory is not None:  # float64 in JSON: float32 values exactly
                self.adapter.memory = torch.tensor(done.memory, dtype=_float_dtype(model), device=device)
        self.n_seen, self.n_uncertain = (done.n_seen, done.n_uncertain) if done else (0, 0)
        self.skipped: list[dict] = list(done.skipped) if done else []  # unreadable samples passed over
        # a resumed run's earlier attempts may have run elsewhere (another device, commit, machine)
        self.earlier, self.env, self.first_seen = (list(done.attempts) if done else []), environment(device), self.n_seen
        self.prior_wall = done.wall if done else 0.0
        self.pending: list[tuple[Scored, bool]] = []  # scanned, waiting for their block to be adapted
        self.unwritable: list[str] = []  # checkpoint writes that failed
        self.start = perf_counter()

    def run(self) -> RunResult:
        task, method, protocol, options = self.task, self.method, self.protocol, self.options
        total = task.num_samples()
        if options.limit is not None:
            total = min(total, options.limit) if total is not None else options.limit
        self.bar = tqdm(total=total, initial=self.n_seen, unit="sample", disable=not options.progress,
                        dynamic_ncols=True)
        finished = options.max_uncertain is not None and self.n_uncertain >= options.max_uncertain
        stream = islice(task.samples(), self.n_seen, options.limit) if not finished else iter(())
        scored = source_pass(task, self.model, stream, options.batch_size, self.device, options.skip_unreadable)
        self.start, interrupted, stopped_by = perf_counter(), False, None
        last_saved, saved_at = self.n_seen, perf_counter()
        try:
            with self.adapter if self.adapter is not None else nullcontext():
                if self.adapter is not None:  # at θ0, once per run (EATA's Fisher information)
                    method.prepare(self.model, lambda x: task.class_logits(self.model, x),
                                   dict(zip(self.adapter.param_names, self.adapter.params)), protocol,
                                   _reference(task, self.device))
                queued = self.n_uncertain  # uncertain samples scanned so far (recorded or pending)
                for s in scored:
                    uncertain = s.unreadable is None and method.uncertain(s.delta, s.spread, protocol.threshold)
                    self.pending.append((s, uncertain))
                    queued += uncertain
                    if queued - self.n_uncertain >= self.blocks.size:
                        self.adapt_pending()
                    if options.checkpoint and self.n_seen > last_saved and (
                            last_saved == self.first_seen  # the first block: a kill loses at most one interval
                            or self.n_seen - last_saved >= options.checkpoint_every
                            or perf_counter() - saved_at >= options.checkpoint_seconds):
                        self.save_progress()
                        last_saved, saved_at = self.n_seen, perf_counter()
                    if options.max_uncertain is not None and queued >= options.max_uncertain:
                        break
                self.adapt_pending()
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see signals.py): keep what finished
            interrupted = True
        except TTAError as err:  # the data failed mid-scan: keep what finished, then say why
            interrupted, stopped_by = True, str(err)
        finally:
            self.bar.close()
        if options.checkpoint and self.n_seen > last_saved:
            self.save_progress()
        return self.result(interrupted, stopped_by)

    def adapt_pending(self) -> None:
        """Adapt the pending uncertain samples (one at a time, or as one block); record all."""
        task, adapter = self.task, self.adapter
        gated = [s for s, uncertain in self.pending if uncertain]
        t0 = perf_counter()
        sources = {}  # the task's metrics at θ0, for every method (`none` too)
        with torch.no_grad():
            for s in gated if task.metrics else ():
                sources[s.sample.index] = task.evaluate(self.model, s.inputs, s.sample)[1]
        results = []
        if adapter is not None and gated:
            results = self.blocks.adapt([s.inputs for s in gated])
            if results is None:
                results = []
                for s in gated:
                    if self.bound is not None:
                        self.bound.sample = s.sample
                    results.append(adapter.adapt(s.inputs, s.sample.index))
        share = (perf_counter() - t0) / max(1, len(gated))
        it = iter(results)
        for s, uncertain in self.pending:
            self.n_seen += 1
            if s.unreadable is not None:
                self.skipped.append(s.unreadable)
                continue
            a = next(it) if uncertain and adapter else None
            self.recorder.add(s, uncertain, a, s.seconds + (share if uncertain else 0.0), sources.get(s.sample.index))
            self.n_uncertain += uncertain
        self.bar.update(len(self.pending))
        self.bar.set_postfix(uncertain=self.n_uncertain, refresh=False)
        self.pending.clear()

    def save_progress(self) -> None:
        seconds = perf_counter() - self.start  # this attempt's
        attempt = {"from_sample": self.first_seen, "to_sample": self.n_seen, "seconds": seconds, **self.env}
        adapter = self.adapter
        memory = adapter.memory.double().tolist() if adapter is not None and adapter.memory is not None else None
        progress = checkpoint.Progress(self.recorder.frame(), self.n_seen, self.n_uncertain,
                                       self.prior_wall + seconds, self.skipped, self.earlier + [attempt], memory)
        try:
            checkpoint.save(self.options.checkpoint, progress, self.settings)
        except OSError as err:  # e.g. a full disk: the run goes on, its rows in memory
            if not self.unwritable:
                warnings.warn(f"could not write checkpoint {self.options.checkpoint} ({err.strerror or err}); the "
                              f"run goes on, its rows kept in memory until it ends")
            self.unwritable.append(str(err))

    def result(self, interrupted: bool, stopped_by: str | None) -> RunResult:
        task, method, protocol, options, adapter = self.task, self.method, self.protocol, self.options, self.adapter
        wall = self.prior_wall + perf_counter() - self.start
        if self.n_seen == 0 and stopped_by:
            raise TTAError(stopped_by)
        if self.n_seen == 0 and not interrupted:
            raise TTAError(f"task {task.name} yielded no samples; check its data options")
        rows = self.recorder.frame()
        if rows.empty and not interrupted:
            if options.checkpoint:
                options.checkpoint.unlink(missing_ok=True)  # it holds no row to resume
            raise TTAError(f"none of the {self.n_seen} samples of task {task.name} could be read (each was skipped "
                           f"as unreadable): nothing to score, nothing saved; check the data")
        config = {
            "task": task.name, "task_options": task.config, "method": method.name,
            "hparams": method.config, "resolved": method.resolved, "protocol": asdict(protocol),
            "options": asdict(options),
            "sweep": "one-gradient" if (adapter.one_gradient if adapter else protocol.one_gradient) else "per-lr",
            "gate_threshold": method.gate_threshold(protocol.threshold),
            **self.blocks.record(),
            "adapted_parameters": sum(p.numel() for p in adapter.params) if adapter else 0,
            "adapted_parameter_names": _names(adapter, self.model),
        }
        metadata = {**self.env, "task": task.metadata(), "resumed_from_sample": self.done.n_seen if self.done else 0,
                    "earlier_attempts": self.earlier, "skipped_unreadable": self.skipped, "stopped_by": stopped_by}
        return RunResult(rows, summarize(rows, wall, task.metrics) if len(rows) else [], config, metadata, interrupted)


class _Evaluate:
    """`Task.evaluate` bound to the sample being adapted: the Adapter calls it with (model, inputs)
    only, so what the inputs must not carry (text: the label, the byte count) reaches the
    prediction forward and never a method's loss."""

    def __init__(self, task: Task):
        self.task, self.sample = task, None

    def __call__(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, dict[str, float]]:
        return self.task.evaluate(model, inputs, self.sample)


def _checkpoint_settings(task: Task, method: Method, protocol: Protocol, options: RunOptions) -> dict:
    """What a checkpoint must match to be resumed: everything that changes the rows, the data
    itself too where the options do not fix it (a corpus read from the machine, a --data-file),
    and the batch size and block when given (the batched source forward and vmap differ in the
    last bits, which can move a sample across the gate). The device may change."""
    what = {"task": task.name, "task_options": task.config, "method": method.name,
            "hparams": method.config, "protocol": asdict(protocol),
            **{k: getattr(options, k) for k in ("limit", "max_uncertain", "seed")},
            **{k: v for k in ("batch_size", "adapt_block") if (v := getattr(options, k)) is not None}}
    if (data := task.data_identity()) is not None:
        what["data"] = data
    return json.loads(json.dumps(what, default=str))  # as the checkpoint stores it


def _reference(task: Task, device: torch.device) -> Callable[[int, int], Iterator[Any]]:
    """(n, batch) -> batches of model inputs of the task's first n reference samples (clean,
    never scored nor used for validation), for `Method.prepare`."""
    def batches(n: int, batch: int) -> Iterator[Any]:
        samples = task.reference_samples()
        if samples is None:
            raise TTAError(f"task {task.name} has no reference samples (clean data that is never scored) "
                           f"for this method to estimate from")
        it = islice(samples, n)
        while chunk := list(islice(it, batch)):
            yield to_device(task.collate([s.raw for s in chunk]), device)
    return batches


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _names(adapter: Adapter | None, model: torch.nn.Module) -> list[str] | str:
    """The adapted parameters by name ('all' when every parameter is adapted)."""
    if adapter is None:
        return []
    return "all" if len(adapter.params) == len(list(model.parameters())) else adapter.param_names
