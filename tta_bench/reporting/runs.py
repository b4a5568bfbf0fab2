"""Reading runs: the finished result runs of an MLflow experiment, earlier builds' runs tables
and run folders, as one row per configuration × method × lr × threshold (the latest counts); their
split into test and validation runs, and the method families they belong to."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tta_bench.core.errors import TTAError, first_line
from tta_bench.reporting.axes import OPTION, SUBSET
from tta_bench.storage.tracking import CONFIGURATION, KIND, METHOD, _label, check_uri, open_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

METRICS = ("delta_acc", "n_fixed", "n_broken", "n_total", "n_uncertain", "frac_uncertain",
           "acc_source", "acc_adapted", "p_mcnemar", "forwards_per_sample", "backwards_per_sample",
           "samples_per_s", "bpb_source", "bpb", "bpb_change_pct", "n_bpb_nan",  # bpb: text tasks only
           # *_all: over every image of the configuration, not only the uncertain ones (older runs: NaN)
           "n_changed", "n_updated", "acc_source_all", "acc_adapted_all", "delta_acc_all", "seconds_per_sample",
           "select_seconds_per_sample")  # of seconds_per_sample: choosing data to step on (retrieval)
PROVENANCE_TAGS = {"parent": "mlflow.parentRunId", "tta-bench": "tta_bench.version", "torch": "version.torch",
                   "commit": "mlflow.source.git.commit", "source": "tta_bench.source_sha256",
                   "device": "device_name"}  # the CPU's is its architecture: see device_label
KEY = ["configuration", "method", "lr", "threshold"]  # one run counts per key: the latest
RUNS_TABLE = "runs.csv"  # a build's whole input, per task: rebuild or merge without the store
FROM = "runs_table"  # the runs table a run was read from (none: the store)
HP = "hp."  # column prefix of the method's hyperparameters (runs tables without them: parsed from the label)


def load_runs(uri: str | None, experiment: str, parent: str | None = None,
              interrupted: bool = False) -> pd.DataFrame:
    """One row per finished result run (configuration × method × lr × threshold); when a
    combination was logged more than once, the latest run counts. `interrupted`: runs stopped early
    (KILLED, their samples so far) count too. Reads only: a missing SQLite file is an error, not a
    new store."""
    from sqlalchemy.engine import make_url

    uri = check_uri(uri)
    db = make_url(uri).database if uri.startswith("sqlite") else None
    store = db or uri
    if db and not Path(db).is_file():
        raise TTAError(f"no MLflow store at {db}; run tta-bench run first or pass --tracking-uri")
    try:
        client = open_client(uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise TTAError(f"no MLflow experiment {experiment!r} in {store}; run tta-bench run first or pass "
                           f"--experiment / --tracking-uri")
        result_runs = f"tags.`{KIND}` = 'result'"
        if parent:
            _check_parent(client, parent, found.experiment_id, experiment)
            result_runs += f" and tags.`mlflow.parentRunId` = '{parent}'"
        every = _search(uri, found.experiment_id, result_runs)  # MLflow filters a status by one value only
        counted = ["FINISHED", "KILLED"] if interrupted else ["FINISHED"]
        raw = every[every["status"].isin(counted)] if len(every) else every
        if raw.empty:  # say what there is instead, e.g. interrupted (KILLED) runs
            counts = every["status"].value_counts().items() if len(every) else []
            states = ", ".join(f"{n} {status.lower()}" for status, n in counts)
            raise TTAError(f"no finished tta-bench runs in experiment {experiment!r} at {store}"
                           + (f" under parent run {parent}" if parent else "")
                           + (f" (result runs: {states}; re-run them to finish)" if states else ""))
    except TTAError:
        raise
    except Exception as err:  # MLflow, requests and SQLAlchemy raise many types
        fix = ("it must be an MLflow SQLite database: restore it or pass another --tracking-uri" if db
               else "check --tracking-uri and that the server is running")
        raise TTAError(f"cannot read the MLflow store {store}: {_why(err)}; {fix}") from None
    df = pd.DataFrame({
        "task": raw["params.task"], "configuration": raw[f"tags.{CONFIGURATION}"],
        "method": raw[f"tags.{METHOD}"], "method_name": raw["params.method"],
        "lr": raw["params.lr"].astype(float),
        "threshold": pd.to_numeric(raw["params.threshold"], errors="coerce"),
        "run_id": raw["run_id"], "start": raw["start_time"],
        **{m: raw.get(f"metrics.{m}", math.nan) for m in METRICS},
        **{k: raw.get(f"tags.{tag}") for k, tag in PROVENANCE_TAGS.items()},
        "device": [device_label(k, n) for k, n in zip(raw.get("tags.device", [None] * len(raw)),
                                                      raw.get("tags.device_name", [None] * len(raw)), strict=True)],
        **{OPTION + c.removeprefix("params.task."): raw[c] for c in raw.columns if c.startswith("params.task.")},
        **{HP + c.removeprefix("params.hp."): raw[c] for c in raw.columns if c.startswith("params.hp.")},
    })
    return latest(df)


def latest(runs: pd.DataFrame) -> pd.DataFrame:
    """One run per configuration × method × lr × threshold: the latest started."""
    runs = runs.sort_values("start", kind="stable", na_position="first")
    return runs.drop_duplicates(KEY, keep="last").reset_index(drop=True)


def read_runs(paths: list[Path], parent: str | None = None) -> pd.DataFrame:
    """The runs tables of earlier builds (OUT/TASK/runs.csv, the tables' whole input), so a
    leaderboard is rebuilt, or merged with new runs, without the store they were read from."""
    frames = []
    for path in paths:
        if path.is_dir():  # run folders (tta-bench run --out, e.g. runs made without a store)
            frames.append(folder_runs(path, parent))
            continue
        try:
            df = pd.read_csv(path, dtype=str)
        except FileNotFoundError:
            raise TTAError(f"no runs table at {path} (--runs); pass OUT/TASK/{RUNS_TABLE} of a leaderboard "
                           f"build") from None
        except (OSError, ValueError, UnicodeDecodeError) as err:  # pandas' parser errors are ValueErrors
            raise TTAError(f"cannot read the runs table {path} (--runs): {first_line(err)}; pass "
                           f"OUT/TASK/{RUNS_TABLE} of a leaderboard build") from None
        if missing := [c for c in ["task", "method_name", *KEY, "start"] if c not in df.columns]:
            raise TTAError(f"{path} (--runs) is not a runs table of tta-bench leaderboard: no column(s) "
                           f"{', '.join(missing)}; pass OUT/TASK/{RUNS_TABLE} of a leaderboard build")
        for column in ("lr", "threshold", *(m for m in METRICS if m in df)):  # missing metrics: see complete()
            df[column] = _numbers(df[column], path, column)
        for column in ("run_id", *PROVENANCE_TAGS):  # not recorded: a gap in the provenance, not an error
            df[column] = df.get(column)
        df["start"] = pd.to_datetime(df["start"], utc=True, errors="coerce", format="ISO8601")
        if (bad := df["lr"].isna() | df[["task", "configuration", "method"]].isna().any(axis=1)).any():
            raise TTAError(f"{path} (--runs): {bad.sum()} row(s) without a task, configuration, method or numeric "
                           f"lr (first: line {int(np.argmax(bad)) + 2}); fix or drop them")
        df[FROM] = str(path)
        frames.append(df if parent is None else df[df["parent"] == parent] if "parent" in df else df.iloc[:0])
    return pd.concat(frames, ignore_index=True)


def _numbers(column: pd.Series, path: Path, name: str) -> pd.Series:
    """A runs table's column as numbers; an empty cell (or nan) is missing. Text that is not a
    number, an infinite value, and an lr <= 0 or a threshold < 0 are refused, naming the cell."""
    values = pd.to_numeric(column, errors="coerce")
    given = column.notna() & ~column.astype(str).str.strip().str.lower().isin(["", "nan"])
    bad = given & (values.isna() | ~np.isfinite(values.fillna(0)))
    if name == "lr":
        bad |= values.notna() & (values <= 0)
    if name == "threshold":
        bad |= values.notna() & (values < 0)
    if bad.any():
        line = int(np.argmax(bad.to_numpy())) + 2  # the header is line 1
        need = {"lr": "a finite number > 0", "threshold": "a finite number >= 0 (or empty: no gate)"}.get(
            name, "a finite number (or empty)")
        raise TTAError(f"{path} (--runs), line {line}, column {name}: {column.iloc[line - 2]!r} is not {need}; "
                       f"fix or drop the row ({int(bad.sum())} such row(s))")
    return values


def folder_runs(folder: Path, parent: str | None = None) -> pd.DataFrame:
    """The runs-table rows of the run folders in `folder` (or `folder` itself): one per learning
    rate from each finished run's run.json and summary.csv, as `tta-bench sync` would log them
    (labels, options, hyperparameters, metrics, provenance); started = run.json's mtime; the parent
    of a learning-rate sweep is its folder. Interrupted runs are not results and are skipped."""
    import json

    from tta_bench.storage.tracking import configuration_label, method_label

    found = [folder] if (folder / "run.json").is_file() else sorted(p.parent for p in folder.glob("*/run.json"))
    if not found:
        raise TTAError(f"--runs {folder}: no run folders (run.json, summary.csv) in it; pass a runs table "
                       f"(OUT/TASK/{RUNS_TABLE}) or a folder of tta-bench run --out folders")
    rows = []
    for run in found:
        try:
            record = json.loads((run / "run.json").read_text())
            summary = pd.read_csv(run / "summary.csv")
            config, meta = record["config"], record["metadata"]
            if record.get("interrupted"):
                continue
            def cell(v: object) -> str | None:  # None: not set (json's "null" would read back as missing)
                return v if isinstance(v, str) or v is None else json.dumps(v)

            text = {k: cell(v) for k, v in config["task_options"].items()}
            hp = {k: cell(v) for k, v in config["hparams"].items()}
            base = {"task": config["task"], "configuration": configuration_label(config),
                    "method": method_label(config), "method_name": config["method"],
                    "threshold": config["protocol"]["threshold"],
                    "start": pd.Timestamp((run / "run.json").stat().st_mtime, unit="s", tz="UTC"),
                    "parent": run.name if len(summary) > 1 else None,
                    "tta-bench": meta["versions"].get("tta-bench"), "torch": meta["versions"].get("torch"),
                    "commit": meta.get("git_commit"), "source": meta.get("source_sha256"),
                    "device": device_label(meta.get("device"), meta.get("device_name")),
                    **{OPTION + k: v for k, v in text.items()}, **{HP + k: v for k, v in hp.items()}}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TTAError(f"--runs: {run} is not a readable run folder ({first_line(err)}); re-run it or "
                           f"remove it") from None
        for s in summary.to_dict("records"):
            rows.append({**base, "run_id": f"{run.name}@lr={s['lr']:g}", "lr": float(s["lr"]),
                         **{m: s.get(m, math.nan) for m in METRICS}})
    df = pd.DataFrame(rows).assign(**{FROM: str(folder)})
    return df if parent is None else df[df["parent"] == parent]


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One task's runs as its runs table keeps them: without the columns no run of it has (other
    tasks' options and hyperparameters), rows and columns in an order that does not depend on which
    run was read first, so a rebuild with the same runs writes the same file."""
    lead = ["task", "configuration", "method", "method_name", "threshold", "lr", "start", "run_id", *PROVENANCE_TAGS]
    def recorded(column: pd.Series) -> bool:  # an empty string is written, and read back, as missing
        return bool((column.notna() & column.astype(str).str.strip().ne("")).any())

    runs = runs[[c for c in runs if c in lead or recorded(runs[c])]]  # a run without a gate: threshold empty

    def rank(column: str) -> tuple:
        if column in lead:
            return 0, lead.index(column), ""
        if column in METRICS:
            return 3, METRICS.index(column), ""
        return (1 if column.startswith(OPTION) else 2 if column.startswith(HP) else 4), 0, column

    runs = runs.sort_values([*KEY, "start", "run_id"], kind="stable", ignore_index=True)
    return runs[sorted(runs.columns, key=rank)]


def device_label(kind: str | None, name: str | None) -> str | None:
    """What ran a run, as the cost columns compare it: `CPU`, or the accelerator's name."""
    if kind is None or pd.isna(kind):
        return None
    return "CPU" if kind == "cpu" else name


def complete(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs with every metric (NaN where a runs table predates it)."""
    return runs.assign(**{m: math.nan for m in METRICS if m not in runs})


def split_validation(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(test runs, validation runs): a run with option subset=val is held out, never scored; without
    the option (older runs, other tasks) a run is a test run."""
    val = runs[SUBSET].eq("val").fillna(False).astype(bool) if SUBSET in runs else np.zeros(len(runs), bool)
    return runs[~val], runs[val]


def label_hparams(label: str) -> dict[str, str]:
    """The hyperparameters a method label names (tracking._label): `name(k=v, k2=v2)[protocol]` -> {k: v}."""
    inside = re.fullmatch(r"[^(\[]*(?:\((.*)\))?(?:\[.*\])?", label)
    parts = re.split(r", (?=[\w.]+=)", inside.group(1)) if inside and inside.group(1) else []
    return dict(part.split("=", 1) for part in parts if "=" in part)


def registered(name: str) -> type | None:
    """The registered method class of a run's `method_name`; None for a plugin not installed here."""
    from tta_bench.core.registry import method_class

    try:
        return method_class(name)
    except TTAError:
        return None


def not_adapting(runs: pd.DataFrame) -> set[str]:
    """The method labels whose registered class does not adapt (`none`, the source model; an
    unknown plugin is taken to adapt)."""
    names = runs.drop_duplicates("method").set_index("method")["method_name"]
    return {label for label, name in names.items() if (cls := registered(name)) is not None and not cls.adapts}


def families(runs: pd.DataFrame) -> dict[str, str]:
    """method label -> its family: the registry name and the values of its class's scoring
    hyperparameters (`pasle(gate=own)`; `pasle(tau=0.08)` is a variant of `pasle`); an unknown
    plugin is its own family."""
    found = {}
    for label, run in runs.drop_duplicates("method").set_index("method").iterrows():
        if (cls := registered(run["method_name"])) is None:
            found[label] = label
            continue
        written = label_hparams(label)
        logged = {k: run.get(HP + k) for k in cls.scoring_hparams}
        values = {k: str(logged[k] if isinstance(logged[k], str) else written.get(k, cls.hparams[k].default))
                  for k in cls.scoring_hparams}
        found[label] = _label(cls.name, values, {k: str(cls.hparams[k].default) for k in cls.scoring_hparams})
    return found


def _search(uri: str, experiment_id: str, where: str) -> pd.DataFrame:
    import mlflow
    from mlflow.tracking._tracking_service import utils

    # search_runs reads the global URI; setting it also sets $MLFLOW_TRACKING_URI: restore both
    previous, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs([experiment_id], where, max_results=1_000_000)
    finally:
        mlflow.set_tracking_uri(previous)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _check_parent(client: MlflowClient, parent: str, experiment_id: str, experiment: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_run(parent).info.experiment_id == experiment_id
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        found = False
    if not found:
        raise TTAError(f"--parent {parent!r} is not a run of experiment {experiment!r}; pass the id of a "
                       f"sweep's parent run (shown in the MLflow UI) or leave --parent out")


def _why(err: BaseException) -> str:
    """The cause of a store error in a few words (requests buries it in a long message)."""
    text = str(err)
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    return errno.group(0) if errno else first_line(err)
