"""MLflow tracking (docs/DESIGN.md §5): one MLflow run per (configuration, method, hyperparameters,
learning rate) with params, metrics, provenance tags and its per-sample rows as a parquet
artifact. A learning-rate sweep is a parent run with one child run per learning rate."""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pandas as pd

from tta_bench.core.errors import TTAError, first_line
from tta_bench.core.settings import PROTOCOL_DEFAULTS

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_EXPERIMENT = "tta-bench"
KIND = "tta_bench.kind"  # "result": one learning rate; "sweep": the parent of a sweep's results
KEY = "tta_bench.run_key"  # content hash of the run: logging the same results twice is a no-op
CONFIGURATION = "tta_bench.configuration"  # task + its non-default options, e.g. text(corpus=licenses)
JOB = "tta_bench.job_key"  # a sweep job's stable key (configuration + package version)
SWEEP = "tta_bench.sweep"
METHOD = "tta_bench.method"  # method + non-default hyperparameters and protocol, e.g. ifo(weighted=False)
# Fail within seconds on an unreachable server instead of MLflow's default minutes of retries.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
BATCH = 100  # MLflow's log_batch limit on params and tags per call


class TrackingUnavailable(Exception):
    """The tracking store cannot be reached or written; the message says why."""


def resolve_uri(uri: str | None) -> str:
    """The given URI, else MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db)."""
    import mlflow
    return uri or mlflow.get_tracking_uri()


URI_FORMS = ("sqlite:///PATH.db, http(s)://HOST:PORT, postgresql|mysql|mssql://USER@HOST/DB, "
             "databricks[://PROFILE], file:///DIR or a folder path (with MLFLOW_ALLOW_FILE_STORE=true)")


def check_uri(uri: str | None) -> str:
    """The resolved tracking URI (see `resolve_uri`) if MLflow has a store for its form; else a
    TTAError saying what is wrong and which forms are accepted. Opens and creates nothing."""
    from mlflow import environment_variables
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service import utils
    from sqlalchemy.engine import make_url

    resolved = uri if uri == "" else resolve_uri(uri)  # "" is not "unset": refuse it
    parsed = urlparse(resolved)
    allow_folder = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)
    try:
        scheme = utils.get_uri_scheme(resolved)
        try:  # MLflow's own stores and installed plugins
            store = utils._tracking_store_registry.get_store_builder(resolved)
        except MlflowException:
            store = None
        if not resolved.strip():
            problem = "it is empty"
        elif resolved != resolved.strip():
            problem = "it has leading or trailing spaces"
        elif store is None:
            problem = f"MLflow has no tracking store for the scheme {scheme!r} (nor an installed plugin)"
        elif scheme in ("http", "https") and not parsed.hostname:
            problem = "it names no host"
        elif scheme in utils.DATABASE_ENGINES and not make_url(resolved).database:
            problem = "it names no database" + (" file (sqlite:/// then the path)" if scheme == "sqlite" else "")
        elif store is utils._get_file_store and Path(parsed.path).suffix in (".db", ".sqlite", ".sqlite3"):
            problem = f"a plain path means a folder store; for a SQLite file pass sqlite:///{parsed.path}"
        elif store is utils._get_file_store and allow_folder is not None and not allow_folder.get():
            problem = ("MLflow 3 opens folder stores only with MLFLOW_ALLOW_FILE_STORE=true; use a "
                       "SQLite store (`mlflow migrate-filestore` converts a folder)")
        else:
            problem = "it names port 0" if parsed.port == 0 else ""  # .port raises for a bad port
    except Exception as err:  # a bad port or an unparsable database URL
        problem = first_line(err)
    if problem:
        source = "--tracking-uri" if uri is not None else "MLFLOW_TRACKING_URI"
        raise TTAError(f"tracking URI {resolved!r} ({source}) is not valid: {problem}; accepted: {URI_FORMS}")
    return resolved


def check_experiment(name: str) -> str:
    """The experiment name, if it is one (MLflow refuses an empty one)."""
    if not name.strip():
        raise TTAError(f"--experiment is empty; pass an MLflow experiment name (default {DEFAULT_EXPERIMENT})")
    return name


def open_client(uri: str) -> MlflowClient:
    """An MlflowClient that gives up within seconds on an unreachable server (MLflow's default
    retries for minutes) and keeps the store's schema-creation chatter off stderr."""
    from mlflow import MlflowClient

    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri)


def sync_hint(out: Path | str, uri: str, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """The command that uploads `out` later to where it would have gone."""
    words = ["tta-bench", "sync", str(out), "--tracking-uri", uri]
    words += ["--experiment", experiment] if experiment != DEFAULT_EXPERIMENT else []
    return shlex.join(words)


class Tracker:
    """An MLflow store and experiment, opened (and created if need be) before any work."""

    def __init__(self, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT):
        self.uri = check_uri(uri)  # a malformed URI or name is a bad input, not an outage
        self.experiment = check_experiment(experiment)
        try:
            self.client = open_client(self.uri)
            self.experiment_id = self._experiment_id(experiment)
        except Exception as err:  # MLflow, requests and SQLAlchemy raise many types
            raise TrackingUnavailable(f"MLflow tracking at {self.uri} is unavailable: {first_line(err)}") from None

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=_artifact_location(self.uri, name))
        except Exception:  # created meanwhile by another process
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _top_runs(self, tag: str, value: str) -> list:
        try:
            runs = self.client.search_runs([self.experiment_id], f"tags.`{tag}` = '{value}'", max_results=1000)
        except Exception as err:  # MLflow, requests and SQLAlchemy raise many types
            raise TrackingUnavailable(f"searching MLflow at {self.uri} failed: {first_line(err)}") from None
        return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]

    def find(self, key: str) -> str | None:
        """The id of the complete top-level run already logged for these results, if any."""
        return _first(self._top_runs(KEY, key))

    def find_job(self, job_key: str) -> str | None:
        """The id of a sweep job's finished top-level run, if any."""
        return _first(self._top_runs(JOB, job_key), ("FINISHED",))

    def log(self, result: Any, tags: dict[str, str] | None = None) -> str:
        """Log a RunResult; returns the id of its top-level run (the sweep parent, if a sweep).
        The top-level run is marked finished last, so a finished parent has all its children."""
        from tta_bench.storage.signals import shielded

        try:
            with shielded():  # a second Ctrl-C (or SIGTERM) cannot leave a half-logged run
                return self._log(result, tags or {})
        except TrackingUnavailable:
            raise
        except Exception as err:
            raise TrackingUnavailable(f"logging to MLflow at {self.uri} failed: {first_line(err)}") from None

    def _log(self, result: Any, extra: dict[str, str]) -> str:
        key = result.key
        logged = self._top_runs(KEY, key)
        if (existing := _first(logged)) is not None:
            return existing
        for stale in logged:  # left half-logged by a crash: replace it
            for child in self.client.search_runs([self.experiment_id], f"tags.`mlflow.parentRunId` = '{stale.info.run_id}'"):
                self.client.delete_run(child.info.run_id)
            self.client.delete_run(stale.info.run_id)
        config = result.config
        params, tags = run_params(config), {**run_tags(result), **extra, KEY: key}
        status = "KILLED" if result.interrupted else "FINISHED"
        record = result.record()
        lrs = list(config["protocol"]["lrs"])
        name = f"{tags[CONFIGURATION]} · {tags[METHOD]}"
        if len(lrs) == 1:
            summary = result.summary[0] if result.summary else {}
            run_id = self._run(f"{name} · lr={lrs[0]:g}", {**tags, KIND: "result"},
                               {**params, "lr": lrs[0]}, summary, result.rows, record)
            self.client.set_terminated(run_id, status)
            return run_id
        parent = self._run(f"{name} · sweep of {len(lrs)} lrs", {**tags, KIND: "sweep"},
                           {**params, "lrs": ",".join(f"{lr:g}" for lr in lrs)}, {}, result.rows, record)
        for summary in result.summary:
            lr = summary["lr"]
            child = self._run(f"{name} · lr={lr:g}", {**tags, KIND: "result", "mlflow.parentRunId": parent},
                              {**params, "lr": lr}, summary, result.rows[result.rows["lr"] == lr], None)
            self.client.set_terminated(child, status)
        self.client.set_terminated(parent, status)
        return parent

    def _run(self, name: str, tags: dict, params: dict, summary: dict, rows: pd.DataFrame,
             record: dict | None) -> str:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.time import get_current_time_millis

        run = self.client.create_run(self.experiment_id, run_name=name)
        run_id, now = run.info.run_id, get_current_time_millis()
        metrics = [Metric(k, float(v), now, 0) for k, v in summary.items()
                   if k != "lr" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        params_ = [Param(k, _text(v, 6000)) for k, v in params.items()]
        tags_ = [RunTag(k, _text(v, 5000)) for k, v in tags.items()]
        self.client.log_batch(run_id, metrics=metrics)
        for i in range(0, max(len(params_), len(tags_)), BATCH):
            self.client.log_batch(run_id, params=params_[i:i + BATCH], tags=tags_[i:i + BATCH])
        with tempfile.TemporaryDirectory() as tmp:
            rows.to_parquet(Path(tmp) / "samples.parquet", index=False)
            self.client.log_artifact(run_id, str(Path(tmp) / "samples.parquet"))
            if record is not None:
                (Path(tmp) / "run.json").write_text(json.dumps(record, indent=2, default=str))
                self.client.log_artifact(run_id, str(Path(tmp) / "run.json"))
        return run_id


def _first(runs: list, statuses: tuple[str, ...] = ("FINISHED", "KILLED")) -> str | None:
    """The id of the first run in one of these states (default: completely logged, also a
    result of an interrupted run)."""
    return next((r.info.run_id for r in runs if r.info.status in statuses), None)


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store sit beside its database file (MLflow's own default is
    ./mlruns of whichever directory first created the store)."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    db = Path(uri[len("sqlite:///"):]).resolve()
    return (db.parent / "mlruns" / re.sub(r"[^\w.-]", "_", experiment)).as_uri()


def _text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _registered(kind: str, name: str) -> Any:
    """The task or method class of that name, None for a plugin that is not installed here."""
    from tta_bench.core.registry import method_class, task_class
    try:
        return task_class(name) if kind == "task" else method_class(name)
    except TTAError:
        return None


def _defaults(kind: str, name: str) -> dict[str, Any]:
    cls = _registered(kind, name)
    if cls is None:  # label with every option
        return {}
    return {k: spec.default for k, spec in (cls.options if kind == "task" else cls.hparams).items()}


def _label(name: str, values: dict[str, Any], defaults: dict[str, Any]) -> str:
    changed = [f"{k}={v}" for k, v in values.items() if k not in defaults or defaults[k] != v]
    return f"{name}({', '.join(changed)})" if changed else name


def configuration_label(config: dict) -> str:
    """The task and its non-default options: what methods are compared on."""
    return _label(config["task"], config["task_options"], _defaults("task", config["task"]))


def method_label(config: dict) -> str:
    """The method, its non-default hyperparameters and non-default protocol settings."""
    label = _label(config["method"], config["hparams"], _defaults("method", config["method"]))
    method = _registered("method", config["method"])
    defaults = {**PROTOCOL_DEFAULTS, **({"optimizer": method.default_optimizer} if method else {})}
    changed = [f"{k}={config['protocol'][k]}" for k in PROTOCOL_DEFAULTS if config["protocol"][k] != defaults[k]]
    return label + (f"[{', '.join(changed)}]" if changed else "")


def run_params(config: dict) -> dict[str, Any]:
    protocol, options = config["protocol"], config["options"]
    return {
        "task": config["task"], **{f"task.{k}": v for k, v in config["task_options"].items()},
        "method": config["method"], **{f"hp.{k}": v for k, v in config["hparams"].items()},
        **{f"resolved.{k}": v for k, v in config.get("resolved", {}).items()},
        "threshold": protocol["threshold"], "gate_threshold": config.get("gate_threshold"),
        **{k: protocol[k] for k in PROTOCOL_DEFAULTS},
        **{k: options.get(k) for k in ("limit", "max_uncertain", "seed", "batch_size", "device", "tf32")},
        "sweep": config["sweep"], "adapted_parameters": config.get("adapted_parameters"),
    }


def run_tags(result: Any) -> dict[str, Any]:
    meta, config = result.metadata, result.config
    tags: dict[str, Any] = {
        CONFIGURATION: configuration_label(config), METHOD: method_label(config),
        "tta_bench.version": meta["versions"].get("tta-bench"), "tta_bench.source_sha256": meta.get("source_sha256"),
        "seed": config["options"]["seed"],
        "device": meta["device"], "device_name": meta["device_name"], "threads": meta["threads"],
        "python": meta["python"], "platform": meta["platform"], "interrupted": result.interrupted,
        "attempts": 1 + len(earlier := meta.get("earlier_attempts", [])),  # >1: resumed; run.json says where
        "earlier_devices": ", ".join(dict.fromkeys(a["device_name"] for a in earlier)) or None,
        **{f"version.{k}": v for k, v in meta["versions"].items() if v is not None},
        **{f"numerics.{k}": v for k, v in meta.get("numerics", {}).items()},
    }
    if meta.get("git_commit"):
        tags["mlflow.source.git.commit"] = meta["git_commit"]
    for k, v in meta.get("task", {}).items():  # task provenance: hashes, prompt template, token ids
        text = _text(v, 10_000)
        if len(text) <= 500:
            tags[f"task.{k}"] = text
    return {k: v for k, v in tags.items() if v is not None}
