"""Sweeps: a TOML spec expands into jobs (task configuration × method × threshold × seed), each
with a stable key. A job is idempotent (skipped once its finished MLflow run exists) and
resumable (per-sample rows are checkpointed as it goes).

    name = "embedded-image"            # the state folder and the default experiment
    lr_grid = "paper"                  # or lr = [1e-3, 2e-2]: one job sweeps these lrs
    threshold = [0.16, 0.32]           # lists cross; scalars are fixed
    seed = 0
    limit = 1000                       # scan and protocol settings: see RUN_SETTINGS
    pair = [["threshold", "seed"]]     # zip these lists instead of crossing them

    [[tasks]]
    name = "cifar10"
    corruption = ["none", "contrast"]  # task options; a run setting here overrides the top level
    methods = ["ifo"]                  # optional: only these method blocks run on this task

    [[methods]]
    name = "ifo"
    weighted = [true, false]           # hyperparameters (run settings, e.g. lr, override too)
"""
from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import TTAError

# Settings of a run (not task options or method hyperparameters), with their defaults.
RUN_SETTINGS: dict[str, Any] = {
    "lr": None, "lr_grid": None, "threshold": 0.16, "seed": 0, "steps": 1, "clip": 1.0,
    "optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "limit": None, "max_uncertain": None,
    "batch_size": None, "device": "auto",
}
LIST_VALUED = {"lr"}  # a flat list is one value (the lrs of one job); a list of lists crosses
TOP_ONLY = {"name", "experiment", "tasks", "methods", "pair"}


@dataclass
class Job:
    config: dict  # resolved: task, task_options, method, hparams, protocol, options
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = job_key(self.config)

    @property
    def label(self) -> str:
        from .tracking import configuration_label, method_label
        c = self.config
        as_run = {"task": c["task"], "task_options": c["task_options"], "method": c["method"],
                  "hparams": c["hparams"], "protocol": c["protocol"]}
        return (f"{configuration_label(as_run)} · {method_label(as_run)} · d={c['protocol']['threshold']}"
                f" · seed={c['options']['seed']} · {len(c['protocol']['lrs'])} lr")


def job_key(config: dict) -> str:
    """Stable across runs and machines: the resolved configuration and the package version."""
    from . import __version__
    text = json.dumps({"config": config, "version": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand(values: dict[str, Any], pairs: list[list[str]] | None = None) -> list[dict[str, Any]]:
    """The cartesian product of the list values; keys named together in `pairs` are zipped."""
    pairs = pairs or []
    paired = [k for group in pairs for k in group]
    for group in pairs:
        missing = [k for k in group if k not in values]
        if missing:
            raise TTAError(f"pair {group} names {missing}, which are not set here")
        lengths = {k: len(_choices(k, values[k])) for k in group}
        if len(set(lengths.values())) != 1:
            raise TTAError(f"paired values must have equal lengths, got {lengths}")
    axes: list[list[dict]] = [[{k: v} for v in _choices(k, values[k])] for k in values if k not in paired]
    for group in pairs:
        axes.append([dict(zip(group, vs, strict=True)) for vs in zip(*(_choices(k, values[k]) for k in group), strict=True)])
    return [{k: v for part in combo for k, v in part.items()} for combo in itertools.product(*axes)]


def _choices(key: str, value: Any) -> list:
    if not isinstance(value, list):
        return [value]
    if key in LIST_VALUED and not any(isinstance(v, list) for v in value):
        return [value]
    return value


def load_spec(path: Path) -> dict:
    try:
        spec = tomllib.loads(Path(path).read_text())
    except OSError as err:
        raise TTAError(f"cannot read sweep spec {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise TTAError(f"sweep spec {path} is not valid TOML: {err}") from None
    for key in ("name", "tasks", "methods"):
        if key not in spec:
            raise TTAError(f"sweep spec {path} has no `{key}`; see `tta-bench sweep --help` for the format")
    unknown = set(spec) - TOP_ONLY - set(RUN_SETTINGS)
    if unknown:
        raise TTAError(f"sweep spec {path}: unknown top-level key(s) {sorted(unknown)}; allowed: "
                       f"{sorted(TOP_ONLY | set(RUN_SETTINGS))}")
    return spec


def jobs_from_spec(spec: dict) -> tuple[list[Job], list[str]]:
    """(jobs, notes on combinations left out, e.g. a method that does not support a task)."""
    from .cli import LR_GRIDS
    from .engine import Protocol
    from .registry import get_method, get_task

    top = {k: v for k, v in spec.items() if k in RUN_SETTINGS}
    blocks = {kind: [(b, block.get("methods")) for block in spec[kind]
                     for b in expand(_without(block, "pair", "methods"), block.get("pair"))]
              for kind in ("tasks", "methods")}
    jobs: dict[str, Job] = {}
    notes: list[str] = []
    for (t, only), (m, _) in itertools.product(blocks["tasks"], blocks["methods"]):
        if only is not None and m["name"] not in only:  # the task block names its methods
            continue
        task = get_task(t["name"], **{k: v for k, v in t.items() if k != "name" and k not in RUN_SETTINGS})
        method = get_method(m["name"], **{k: v for k, v in m.items() if k != "name" and k not in RUN_SETTINGS})
        try:
            method.supports(task)
        except TTAError as err:
            notes.append(f"left out: {err}")
            continue
        settings = {**RUN_SETTINGS, **top}
        for block in (t, m):
            settings.update({k: v for k, v in block.items() if k in RUN_SETTINGS})
        for run in expand(settings, spec.get("pair")):
            if run["lr_grid"] is not None and run["lr"] is not None:
                raise TTAError("give lr or lr_grid, not both")
            if run["lr_grid"] is not None and run["lr_grid"] not in LR_GRIDS:
                raise TTAError(f"unknown lr_grid {run['lr_grid']!r}; choose one of: {', '.join(LR_GRIDS)}")
            lrs = (LR_GRIDS[run["lr_grid"]] if run["lr_grid"] else
                   run["lr"] if isinstance(run["lr"], list) else [run["lr"] or method.default_lr])
            protocol = Protocol(lrs=tuple(float(x) for x in lrs),
                                **{f.name: run[f.name] for f in fields(Protocol) if f.name != "lrs"})
            config = {
                "task": task.name, "task_options": task.config, "method": method.name, "hparams": method.config,
                "protocol": {**asdict(protocol), "lrs": list(protocol.lrs)},
                "options": {k: run[k] for k in ("limit", "max_uncertain", "seed", "batch_size", "device")},
            }
            job = Job(config)
            jobs.setdefault(job.key, job)
    return list(jobs.values()), sorted(set(notes))


def run_parts(config: dict) -> tuple[Any, Any, Any, dict]:
    """The task, method, protocol and RunOptions arguments a resolved job configuration stands for."""
    from .engine import Protocol
    from .registry import get_method, get_task

    p = config["protocol"]
    protocol = Protocol(lrs=tuple(p["lrs"]), **{k: v for k, v in p.items() if k != "lrs"})
    return (get_task(config["task"], **config["task_options"]),
            get_method(config["method"], **config["hparams"]), protocol, dict(config["options"]))


def _without(block: dict, *keys: str) -> dict:
    return {k: v for k, v in block.items() if k not in keys}
