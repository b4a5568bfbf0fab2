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

import itertools
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from tta_bench.core.errors import TTAError
from tta_bench.core.hashing import json_sha256
from tta_bench.core.protocol import Protocol
from tta_bench.core.registry import get_method, get_task
from tta_bench.core.settings import LR_GRIDS, SETTINGS
from tta_bench.running.scan import RunOptions, parse_device

# The spec's keys besides task options and hyperparameters: the run settings (core.settings). Values
# are converted here and range-checked by Protocol and RunOptions, as for `tta-bench run`.
RUN_SETTINGS = SETTINGS
LIST_VALUED = {"lr"}  # a flat list is one value (the lrs of one job); a list of lists crosses
TOP_ONLY = {"name", "experiment", "tasks", "methods", "pair"}
SCALARS = {float: (int, float, str), int: (int, float, str), str: (str,)}  # TOML types each accepts
PROTOCOL_KEYS = {k for k, s in SETTINGS.items() if s.kind == "protocol"} - {"lr_grid"}
OPTION_KEYS = {k for k, s in SETTINGS.items() if s.kind == "scan"}


@dataclass
class Job:
    config: dict  # resolved: task, task_options, method, hparams, protocol, options
    key: str = field(init=False)

    def __post_init__(self) -> None:
        self.key = job_key(self.config)

    @property
    def parts(self) -> tuple[str, str]:
        """(configuration label, method label), as the job's run records them."""
        from tta_bench.storage.tracking import configuration_label, method_label
        c = self.config
        as_run = {"task": c["task"], "task_options": c["task_options"], "method": c["method"],
                  "hparams": c["hparams"], "protocol": c["protocol"]}
        return configuration_label(as_run), method_label(as_run)

    @property
    def label(self) -> str:
        c = self.config
        return (f"{' · '.join(self.parts)} · d={c['protocol']['threshold']}"
                f" · seed={c['options']['seed']} · {len(c['protocol']['lrs'])} lr")


def job_key(config: dict) -> str:
    """Stable across runs and machines: the resolved configuration and the package version."""
    from tta_bench import __version__
    return json_sha256({"config": config, "version": __version__})[:16]


def expand(values: dict[str, Any], pairs: list[list[str]] | None = None) -> list[dict[str, Any]]:
    """The cartesian product of the list values; keys named together in `pairs` are zipped."""
    pairs = pairs or []
    paired = [k for group in pairs for k in group]
    if empty := [k for k, v in values.items() if _choices(k, v) == []]:
        raise TTAError(f"{empty[0]} = [] lists no value (it would leave no job); give at least one")
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
    if key in LIST_VALUED and value and not any(isinstance(v, list) for v in value):
        return [value]
    return value


def load_spec(path: Path) -> dict:
    """The spec's TOML, unchecked: `jobs_from_spec` checks it."""
    try:
        return tomllib.loads(Path(path).read_bytes().decode())
    except OSError as err:
        raise TTAError(f"cannot read sweep spec {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise TTAError(f"sweep spec {path} is not a text file (not UTF-8); pass a .toml spec "
                       f"(see sweeps/README.md)") from None
    except tomllib.TOMLDecodeError as err:
        raise TTAError(f"sweep spec {path} is not valid TOML: {err}") from None


def jobs_from_spec(spec: dict, where: str = "sweep spec") -> tuple[list[Job], list[str]]:
    """(jobs, notes on combinations left out, e.g. a method that does not support a task). Every
    key and value is checked first, each error one TTAError starting with `where` (the spec's
    file) and naming the key."""
    try:
        return _jobs(spec)
    except TTAError as err:
        raise TTAError(f"{where}: {err}") from None


def _jobs(spec: dict) -> tuple[list[Job], list[str]]:
    _check_top(spec)
    top = _settings(spec, "")
    blocks = {kind: [(b, block.get("methods")) for i, block in enumerate(spec[kind], 1)
                     for b in expand({**_without(block, "pair", "methods"), **_settings(block, f"[[{kind}]] #{i}: ")},
                                     block.get("pair"))]
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
        settings = {k: s.unset for k, s in RUN_SETTINGS.items()} | top
        for block in (t, m):
            settings.update({k: v for k, v in block.items() if k in RUN_SETTINGS})
        for run in expand(settings, spec.get("pair")):
            if run["lr_grid"] is not None and run["lr"] is not None:
                raise TTAError("give lr or lr_grid, not both")
            lrs = (LR_GRIDS[run["lr_grid"]] if run["lr_grid"] else
                   [method.default_lr] if run["lr"] is None else run["lr"])
            run["optimizer"] = run["optimizer"] or method.default_optimizer
            protocol = Protocol(lrs=tuple(lrs), **{f.name: run[f.name] for f in fields(Protocol) if f.name != "lrs"})
            options = {k: run[k] for k in OPTION_KEYS}
            config = {
                "task": task.name, "task_options": task.config, "method": method.name, "hparams": method.config,
                "protocol": {**asdict(protocol), "lrs": list(protocol.lrs)}, "options": options,
            }
            job = Job(config)
            jobs.setdefault(job.key, job)
    return list(jobs.values()), sorted(set(notes))


def _check_top(spec: dict) -> None:
    """The spec's structure: what `_jobs` reads, with the types it reads them as."""
    for key in ("name", "tasks", "methods"):
        if key not in spec:
            raise TTAError(f"no `{key}`; see sweeps/README.md for the format")
    if unknown := set(spec) - TOP_ONLY - set(RUN_SETTINGS):
        raise TTAError(f"unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(TOP_ONLY | set(RUN_SETTINGS))}")
    name = spec["name"]
    if not isinstance(name, str) or name.strip(".") == "" or "/" in name or "\\" in name:
        raise TTAError(f"name={name!r} is not a folder name (it names the state folder)")
    if not isinstance(spec.get("experiment", ""), str) or spec.get("experiment") == "":
        raise TTAError(f"experiment={spec['experiment']!r} is not a non-empty string")
    for kind in ("tasks", "methods"):
        blocks = spec[kind]
        if not isinstance(blocks, list) or not blocks or not all(isinstance(b, dict) for b in blocks):
            raise TTAError(f"`{kind}` must be one or more [[{kind}]] tables, got {blocks!r}; see sweeps/README.md")
        for i, block in enumerate(blocks, 1):
            if "name" not in block:
                raise TTAError(f"[[{kind}]] #{i} has no `name`; add one (tta-bench list {kind})")
            if not isinstance(block["name"], str):
                raise TTAError(f"[[{kind}]] #{i}: name={block['name']!r} is not a string (tta-bench list {kind})")
            _check_pair(block.get("pair"), f"[[{kind}]] #{i}: ")
    _check_pair(spec.get("pair"), "")
    methods = {b["name"] for b in spec["methods"]}
    for i, block in enumerate(spec["tasks"], 1):
        only = block.get("methods", [])
        if not isinstance(only, list) or not all(isinstance(m, str) for m in only):
            raise TTAError(f"[[tasks]] #{i}: `methods` must be a list of method names, got {only!r}")
        if missing := sorted(set(only) - methods):
            raise TTAError(f"[[tasks]] #{i}: `methods` names {missing}, which have no [[methods]] block")


def _check_pair(pair: Any, where: str) -> None:
    if pair is not None and not (isinstance(pair, list) and all(
            isinstance(g, list) and all(isinstance(k, str) for k in g) for g in pair)):
        raise TTAError(f"{where}`pair` must be a list of lists of keys, e.g. [[\"threshold\", \"seed\"]], got {pair!r}")


def _settings(block: dict, where: str) -> dict[str, list]:
    """The run settings of a spec table, each converted to its type, as its list of choices."""
    return {key: [_setting(key, choice, where) for choice in _choices(key, value)]
            for key, value in block.items() if key in RUN_SETTINGS}


def _setting(key: str, value: Any, where: str) -> Any:
    if key in LIST_VALUED:  # one choice is a list of values
        return [_scalar(key, v, where) for v in (value if isinstance(value, list) else [value])]
    return _scalar(key, value, where)


def _scalar(key: str, value: Any, where: str) -> Any:
    """One value converted to its setting's type, then through the checks `tta-bench run` applies
    to it (Protocol's, RunOptions'), so that the error names the spec's key."""
    spec = RUN_SETTINGS[key]
    if isinstance(value, bool) or not isinstance(value, SCALARS[spec.type]):
        raise TTAError(f"{where}{key}={value!r} is not a valid {spec.type.__name__}")
    value = spec.parse(f"{where}{key}", value)
    try:
        if isinstance(value, int) and value > sys.maxsize:
            raise TTAError(f"at most {sys.maxsize}")
        if key == "device":
            parse_device(value)
        if key in PROTOCOL_KEYS:
            Protocol(**{"lrs": (1.0,), key: value} if key != "lr" else {"lrs": (value,)})
        elif key in OPTION_KEYS:
            RunOptions(**{key: value})
    except TTAError as err:
        raise TTAError(f"{where}{key}={value!r} is invalid: {err}") from None
    return value


def run_parts(config: dict) -> tuple[Any, Any, Any, dict]:
    """The task, method, protocol and RunOptions arguments a resolved job configuration stands for."""
    p = config["protocol"]
    protocol = Protocol(lrs=tuple(p["lrs"]), **{k: v for k, v in p.items() if k != "lrs"})
    return (get_task(config["task"], **config["task_options"]),
            get_method(config["method"], **config["hparams"]), protocol, dict(config["options"]))


def _without(block: dict, *keys: str) -> dict:
    return {k: v for k, v in block.items() if k not in keys}
