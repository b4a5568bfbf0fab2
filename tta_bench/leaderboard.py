"""`tta-bench leaderboard`: tables, significance tests and plots from the runs in MLflow
(DESIGN §5). Methods are compared per task over its configurations (task options such as a
corpus, a dataset or a corruption), at one threshold d and one learning rate per method."""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .errors import TTAError
from .tables import (CHOSEN, HEADLINE_P, OPTION, Table, at_chosen, axis_table, configuration_table, friedman_table,
                     headline_table, lr_grid, lr_table, method_table, option_axes, threshold_table, write_table)
from .tracking import CONFIGURATION, KIND, METHOD, _first_line, check_uri, open_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

METRICS = ("delta_acc", "n_fixed", "n_broken", "n_total", "n_uncertain", "frac_uncertain",
           "acc_source", "acc_adapted", "p_mcnemar", "forwards_per_sample", "backwards_per_sample",
           "samples_per_s", "bpb_source", "bpb", "bpb_change_pct", "n_bpb_nan")  # bpb: text tasks only
PROVENANCE_TAGS = {"parent": "mlflow.parentRunId", "tta-bench": "tta_bench.version", "torch": "version.torch",
                   "commit": "mlflow.source.git.commit", "source": "tta_bench.source_sha256"}
KEY = ["configuration", "method", "lr", "threshold"]  # one run counts per key: the latest
RUNS_TABLE = "runs.csv"  # a build's whole input, per task: rebuild or merge without the store
FROM = "runs_table"  # the runs table a run was read from (none: the store)


@dataclass(frozen=True)
class Selection:
    """How each method's learning rate is chosen; recorded in every caption."""

    mode: str = "default"  # default | best | fixed
    lr: float | None = None

    def caption(self) -> str:
        if self.mode == "fixed":
            return f"lr = {self.lr:g} for every method"
        if self.mode == "best":
            return ("lr per method: BEST MEAN Δacc ON THE TEST STREAM (optimistic: chosen on the "
                    "data it is scored on)")
        return "lr per method: the grid lr nearest (within ×2) the method's default, fixed in advance"

    def label(self) -> str:
        return {"default": "default", "best": "best on test ⚠", "fixed": "fixed"}[self.mode]

    def target(self) -> str:
        """The learning rate a method needs runs at to get a row."""
        if self.mode == "fixed":
            return f"lr = {self.lr:g}"
        return {"default": "a learning rate within ×2 of its default",
                "best": "any learning rate with scored samples"}[self.mode]


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
        **{OPTION + c.removeprefix("params.task."): raw[c] for c in raw.columns if c.startswith("params.task.")},
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
        try:
            df = pd.read_csv(path, dtype=str)
        except FileNotFoundError:
            raise TTAError(f"no runs table at {path} (--runs); pass OUT/TASK/{RUNS_TABLE} of a leaderboard "
                           f"build") from None
        except (OSError, ValueError, UnicodeDecodeError) as err:  # pandas' parser errors are ValueErrors
            raise TTAError(f"cannot read the runs table {path} (--runs): {_first_line(err)}; pass "
                           f"OUT/TASK/{RUNS_TABLE} of a leaderboard build") from None
        if missing := [c for c in ["task", "method_name", *KEY, "start"] if c not in df.columns]:
            raise TTAError(f"{path} (--runs) is not a runs table of tta-bench leaderboard: no column(s) "
                           f"{', '.join(missing)}; pass OUT/TASK/{RUNS_TABLE} of a leaderboard build")
        for column in ("lr", "threshold", *METRICS):
            df[column] = pd.to_numeric(df[column], errors="coerce") if column in df else math.nan
        for column in ("run_id", *PROVENANCE_TAGS):  # not recorded: a gap in the provenance, not an error
            df[column] = df.get(column)
        df["start"] = pd.to_datetime(df["start"], utc=True, errors="coerce", format="ISO8601")
        if (bad := df["lr"].isna() | df[["task", "configuration", "method"]].isna().any(axis=1)).any():
            raise TTAError(f"{path} (--runs): {bad.sum()} row(s) without a task, configuration, method or numeric "
                           f"lr (first: line {int(np.argmax(bad)) + 2}); fix or drop them")
        df[FROM] = str(path)
        frames.append(df if parent is None else df[df["parent"] == parent] if "parent" in df else df.iloc[:0])
    return pd.concat(frames, ignore_index=True)


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
    return errno.group(0) if errno else _first_line(err)


def choose_lrs(runs: pd.DataFrame, selection: Selection) -> dict[str, float]:
    """method -> the learning rate its row uses."""
    from .registry import method_class

    chosen: dict[str, float] = {}
    for method, g in runs.dropna(subset=["delta_acc"]).groupby("method"):  # NaN: no sample was scored
        lrs = np.array(sorted(g["lr"].unique()))
        if selection.mode == "best":
            means = g.groupby("lr")["delta_acc"].agg(["mean", "count"])
            full = means[means["count"] == means["count"].max()]  # lrs run on every configuration
            chosen[method] = float(full["mean"].idxmax())
            continue
        if selection.mode == "fixed":
            target = selection.lr
        else:
            try:
                target = method_class(g["method_name"].iloc[0]).default_lr
            except TTAError:
                continue
        nearest = lrs[np.argmin(np.abs(np.log(lrs / target)))]
        near = (math.isclose(nearest, target, rel_tol=1e-3) if selection.mode == "fixed"
                else abs(math.log(nearest / target)) <= math.log(2) + 1e-9)
        if near:
            chosen[method] = float(nearest)
    return chosen


@dataclass
class TaskReport:
    """What is published for one task: tables in reading order (headline first), the figures next
    to the table they illustrate, where the numbers come from, and what was left out."""

    task: str
    tables: dict[str, Table]
    plots: dict[str, Path]  # table name -> PNG
    provenance: dict[str, str]
    notes: list[str]


def task_report(task: str, task_runs: pd.DataFrame, main: pd.DataFrame, chosen: dict[str, float], folder: Path,
                selection: Selection, threshold: float | None, reference: str, origin: dict[str, str]) -> TaskReport:
    """Every table and figure of one task (figures are written to `folder`). main: the runs at
    threshold d; chosen: each method's learning rate."""
    from . import plots

    missing = sorted(set(main["method"]) - set(chosen))
    notes = [f"{task}: left out, " + (f"no runs at d = {_d(threshold)}" if main.empty else
                                      f"no run at {selection.target()}: {', '.join(missing)}")
             ] if not chosen or missing else []
    if not chosen:
        return TaskReport(task, {}, {}, {}, notes)
    at_lr = at_chosen(main, chosen)
    head = f"{task}: {main['configuration'].nunique()} configuration(s), d = {_d(threshold)}; {selection.caption()}"
    methods = method_table(at_lr, chosen, selection.label(), reference)
    order = list(methods["method"])
    data, view = headline_table(methods)
    tables = {"headline": Table(data, (
        f"{head}. Mean Δacc (points, on the uncertain samples) with its BCa bootstrap 95% CI; wins/losses: "
        f"configurations with Δacc > 0 / < 0; {HEADLINE_P}: one-sided Wilcoxon signed-rank test against the source "
        f"model, Holm-adjusted across the methods; cost: forward/backward passes per uncertain (scored) sample "
        f"as run (a one-gradient sweep over K learning rates includes its K prediction forwards)"
        + ("; bpb (Δ%): mean bits per byte of the uncertain windows after adaptation over the configurations, "
           "and its mean change from the source model's (%)" if "bpb" in methods else "") + "."), view)}
    axes = option_axes(at_lr)
    for axis in axes:
        tables[f"by_{axis}"] = Table(axis_table(at_lr, axis, order), (
            f"{head}. Methods × {axis}: mean Δacc (points) over the configurations with that {axis}; "
            f"mean: over all configurations."))
        if axis != "severity" and "severity" in axes:  # the corruption papers' view: one severity at a time
            for level, part in at_lr.groupby(at_lr[OPTION + "severity"].astype(str)):
                tables[f"by_{axis}_severity_{level}"] = Table(axis_table(part, axis, order), (
                    f"{head}. Methods × {axis} at severity {level}: mean Δacc (points) over the "
                    f"configurations with that {axis} and severity; mean: over those configurations."))
    tables["configurations"] = Table(configuration_table(at_lr, reference),
                                     f"{head}. Per configuration: Δacc in points (n_fixed/n_broken).")
    by_lr, figures = lr_table(main), {}
    if by_lr.groupby("method")["lr"].nunique().max() > 1:  # an lr sweep (one lr each: the headline says it)
        data, view = lr_grid(by_lr, chosen, order)
        tables["learning_rates"] = Table(data, (f"{task}: methods × learning rates, mean Δacc (points) over the "
                                                f"configurations;{CHOSEN} marks the lr each method is ranked at "
                                                f"({selection.caption()})."), view)
        figures["learning_rates"] = plots.lr_plot(by_lr, folder / "delta_vs_lr.png", chosen)
    if (fr := friedman_table(at_lr)) is not None:
        table, result = fr
        tables["friedman"] = Table(table, f"{head}. Friedman χ² = {result.statistic:.3g}, p = {result.p:.3g}; "
                                          f"Nemenyi critical difference (α = 0.05) = {result.cd:.3g}.")
        figures["friedman"] = plots.cd_diagram(table, result.cd, folder / "cd.png")
    if not (th := threshold_table(task_runs, chosen)).empty:
        tables["thresholds"] = Table(th, f"{task}: Δacc and frac_uncertain vs threshold d; {selection.caption()}.")
        figures["thresholds"] = plots.threshold_plot(th, folder / "threshold.png")
    tables["methods"] = Table(methods, (f"{head}. Every statistic: each method vs the source model over "
                                        f"configurations (sign test, t-test, Wilcoxon; Holm across methods) and "
                                        f"vs {reference} (paired)."))
    tables["learning_rates_detail"] = Table(by_lr, f"{task}: mean Δacc and #configurations improved per "
                                                   f"learning rate.")
    return TaskReport(task, tables, figures, provenance(task_runs, at_lr, origin), notes)


def provenance(task_runs: pd.DataFrame, at_lr: pd.DataFrame, origin: dict[str, str]) -> dict[str, str]:
    """Where a task's numbers come from: the store selection (origin) and the runs' own tags."""
    def distinct(column: str, width: int | None = None) -> str:  # width: commits and hashes, shortened
        return ", ".join(sorted({str(v)[:width] for v in task_runs[column].dropna()})) or "not recorded"

    start = pd.to_datetime(task_runs["start"], utc=True)
    parents = task_runs["parent"].nunique()  # learning-rate sweeps; one-lr runs have none
    tables = task_runs[FROM] if FROM in task_runs else pd.Series(None, index=task_runs.index, dtype=object)
    sources = {"experiment": origin.get("experiment", "") if tables.isna().any() else "",  # this task's own
               "runs tables": ", ".join(sorted(tables.dropna().unique()))}
    return {**sources, **{k: v for k, v in origin.items() if k not in sources},
            "sweep parent": origin.get("sweep parent") or "all runs of the experiment" +
            (f" (under {parents} parent run{'s' * (parents > 1)})" if parents else ", none under a parent run"),
            "runs": f"{len(task_runs)} finished result runs; {len(at_lr)} at the chosen learning rates",
            "runs started": f"{start.min():%Y-%m-%d %H:%M} to {start.max():%Y-%m-%d %H:%M} UTC",
            "tta-bench": distinct("tta-bench"), "torch": distinct("torch"),
            "git commit": distinct("commit", 12), "source sha256": distinct("source", 12)}


def build(uri: str | None, experiment: str, out: Path, selection: Selection, threshold: float | None = 0.16,
          reference: str | None = None, tasks: list[str] | None = None, parent: str | None = None,
          site: Path | None = None, runs_tables: list[Path] = (), store: bool = True) -> list[Path]:
    """Write every table and plot (and the static site into `site`, if given); returns the files
    written. threshold None: the runs without a gate; reference None: ifo (where it has runs);
    runs_tables: earlier builds' runs.csv, merged with the store's runs (store False: those alone;
    the latest run counts where both hold one). Methods or tasks without runs at the chosen lr or
    threshold are left out with a warning; a TTAError if that leaves nothing."""
    earlier = read_runs(list(runs_tables), parent) if runs_tables else None
    runs = load_runs(uri, experiment, parent) if store else None
    runs = latest(pd.concat([r for r in (earlier, runs) if r is not None], ignore_index=True))
    if runs.empty:
        raise TTAError(f"no runs in {', '.join(map(str, runs_tables))} (--runs)"
                       + (f" under parent run {parent}" if parent else ""))
    if tasks:
        unknown = set(tasks) - set(runs["task"])
        if unknown:
            raise TTAError(f"no runs for task(s) {', '.join(sorted(unknown))}; tasks with runs: "
                           f"{', '.join(sorted(runs['task'].unique()))}")
        runs = runs[runs["task"].isin(tasks)]
    if reference is not None and reference not in set(runs["method"]):
        raise TTAError(f"--reference {reference!r} has no runs; methods with runs: {_names(runs['method'])}")
    reference = reference or "ifo"
    at_d = runs[runs["threshold"].isna() if threshold is None else np.isclose(runs["threshold"], threshold)]
    chosen_by_task = {task: choose_lrs(g, selection) for task, g in at_d.groupby("task")}
    if not any(chosen_by_task.values()):
        raise TTAError(f"no runs at threshold d = {_d(threshold)}; thresholds with runs: "
                       f"{_names(runs['threshold'])}; pass one of them to --threshold" if at_d.empty else
                       f"no run at {selection.target()} for method(s) {_names(at_d['method'])} (d = {_d(threshold)}); "
                       f"learning rates with runs: {_names(at_d['lr'])}; "
                       + ("pass one of them to --lr" if selection.mode == "fixed"
                          else "pass --select best, or --select fixed --lr LR"))
    built = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    origin = {"experiment": experiment, "sweep parent": parent or "", "lr selection": selection.caption(),
              "threshold": f"d = {_d(threshold)}", "built": built}
    reports = [task_report(task, g, at_d[at_d["task"] == task], chosen_by_task.get(task, {}), out / task,
                           selection, threshold, reference, origin) for task, g in runs.groupby("task")]
    tables = ", ".join(map(str, runs_tables))
    sources = " and ".join(([f"experiment `{experiment}`"] if store else []) + ([f"`{tables}`"] if tables else []))
    summary = (f"{len(runs)} result runs from {sources}. {selection.caption()}. Tables at threshold "
               f"d = {_d(threshold)}; tests are one-sided (improvement). Built {built}.")
    written: list[Path] = []
    headlines, sections = ["## Headline\n"], []
    for task, g in runs.groupby("task"):  # the input of every number below, for rebuilding and merging
        (out / task).mkdir(parents=True, exist_ok=True)
        g.drop(columns=FROM, errors="ignore").to_csv(out / task / RUNS_TABLE, index=False)
        written.append(out / task / RUNS_TABLE)
    for r in reports:
        for note in r.notes:
            warnings.warn(note, stacklevel=2)
        sections += [f"## {r.task}\n", *(note + "\n" for note in r.notes)]
        if r.provenance:
            sections.append("Provenance: " + "; ".join(f"{k}: {v}" for k, v in r.provenance.items() if v) + ".\n")
        written += r.plots.values()
        for name, table in r.tables.items():
            files, markdown = write_table(table, out / r.task / name)
            written += files
            if name == "headline":
                headlines.append(f"### {r.task}\n\n{markdown}")
            elif name != "learning_rates_detail":  # in its CSV, HTML and LaTeX files only
                sections.append(f"### {name}\n\n{markdown}")
    (out / "LEADERBOARD.md").write_text("\n".join([f"# Leaderboard\n\n{summary}\n", *headlines, *sections]))
    written.append(out / "LEADERBOARD.md")
    if site is not None:
        from .site import write_site
        written += write_site(site, summary, reports)
    return written


def _d(threshold: float | None) -> str:
    return "none (no gate)" if threshold is None or math.isnan(threshold) else f"{threshold:g}"


def _names(values: pd.Series) -> str:
    """The distinct values, sorted, for a message (thresholds: NaN is a run without a gate)."""
    distinct = values.drop_duplicates()
    if distinct.dtype.kind == "f":
        return ", ".join(_d(x) for x in sorted(distinct, key=lambda x: (math.isnan(x), x)))
    return ", ".join(sorted(map(str, distinct)))
