"""`tta-bench leaderboard`: tables, significance tests and plots from the runs in MLflow
(DESIGN §5). Methods are compared per task over its configurations (task options such as a
corpus, a dataset or a corruption), at one threshold d and one learning rate per method."""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tta_bench.core.errors import TTAError
from tta_bench.reporting.tables import (CHOSEN, HEADLINE_P, MIN_CI, NOOP_EVERYWHERE, OPTION, ORACLE, SUBSET, TOO_FEW_CI, UNITS, Table,
                     at_chosen, at_severity, axis_table, changed_predictions, clean, configuration_labels,
                     configuration_table, corruption_table, describe, every_severity, friedman_table, headline_table,
                     lr_grid, lr_table, method_table, no_ops, option_axes, selection_table, threshold_table, write_table)
from tta_bench.storage.tracking import CONFIGURATION, KIND, METHOD, _first_line, _label, check_uri, open_client

if TYPE_CHECKING:
    from mlflow import MlflowClient

METRICS = ("delta_acc", "n_fixed", "n_broken", "n_total", "n_uncertain", "frac_uncertain",
           "acc_source", "acc_adapted", "p_mcnemar", "forwards_per_sample", "backwards_per_sample",
           "samples_per_s", "bpb_source", "bpb", "bpb_change_pct", "n_bpb_nan",  # bpb: text tasks only
           # *_all: over every image of the configuration, not only the uncertain ones (older runs: NaN)
           "n_changed", "n_updated", "acc_source_all", "acc_adapted_all", "delta_acc_all", "seconds_per_sample")
PROVENANCE_TAGS = {"parent": "mlflow.parentRunId", "tta-bench": "tta_bench.version", "torch": "version.torch",
                   "commit": "mlflow.source.git.commit", "source": "tta_bench.source_sha256"}
KEY = ["configuration", "method", "lr", "threshold"]  # one run counts per key: the latest
RUNS_TABLE = "runs.csv"  # a build's whole input, per task: rebuild or merge without the store
FROM = "runs_table"  # the runs table a run was read from (none: the store)
HP = "hp."  # column prefix of the method's hyperparameters (runs tables without them: parsed from the label)
HELDOUT_RULE = ("per method family (registry name and scoring hyperparameters), the (variant, lr) with the highest "
                "mean Δacc over the validation configurations{}, among those run on every one (ties: the smallest "
                "lr, then the variant label in sorted order); scored on the test configurations only")


@dataclass(frozen=True)
class Selection:
    """How each method's learning rate is chosen; recorded in every caption."""

    mode: str = "default"  # default | best | fixed | heldout
    lr: float | None = None
    fallback: bool = False  # default rule for a task without validation configurations under heldout

    def caption(self, validation: list[str] | None = None) -> str:
        """The rule; validation: the held-out configurations, named (None: not listed)."""
        if self.mode == "heldout":
            named = f" ({len(validation)}, subset=val: {'; '.join(validation)})" if validation else " (subset=val)"
            return "hyperparameters chosen on HELD-OUT data: " + HELDOUT_RULE.format(named)
        if self.fallback:
            return ("NOT HELD-OUT (this task has no validation configurations, subset=val): lr per method: the grid "
                    "lr nearest (within ×2) the method's default, fixed in advance")
        if self.mode == "fixed":
            return f"lr = {self.lr:g} for every method"
        if self.mode == "best":
            return ("lr per method: BEST MEAN Δacc ON THE TEST STREAM (optimistic: chosen on the "
                    "data it is scored on)")
        return "lr per method: the grid lr nearest (within ×2) the method's default, fixed in advance"

    def label(self) -> str:
        if self.fallback:
            return "default (no held-out data)"
        return {"default": "default", "best": ORACLE, "fixed": "fixed", "heldout": "held-out"}[self.mode]

    def target(self) -> str:
        """The learning rate a method needs runs at to get a row."""
        if self.mode == "fixed":
            return f"lr = {self.lr:g}"
        return {"default": "a learning rate within ×2 of its default",
                "best": "any learning rate with scored samples",
                "heldout": "a (variant, lr) on every validation configuration"}[self.mode]


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
            raise TTAError(f"cannot read the runs table {path} (--runs): {_first_line(err)}; pass "
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
            text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in config["task_options"].items()}
            hp = {k: v if isinstance(v, str) else json.dumps(v) for k, v in config["hparams"].items()}
            base = {"task": config["task"], "configuration": configuration_label(config),
                    "method": method_label(config), "method_name": config["method"],
                    "threshold": config["protocol"]["threshold"],
                    "start": pd.Timestamp((run / "run.json").stat().st_mtime, unit="s", tz="UTC"),
                    "parent": run.name if len(summary) > 1 else None,
                    "tta-bench": meta["versions"].get("tta-bench"), "torch": meta["versions"].get("torch"),
                    "commit": meta.get("git_commit"), "source": meta.get("source_sha256"),
                    **{OPTION + k: v for k, v in text.items()}, **{HP + k: v for k, v in hp.items()}}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TTAError(f"--runs: {run} is not a readable run folder ({_first_line(err)}); re-run it or "
                           f"remove it") from None
        for s in summary.to_dict("records"):
            rows.append({**base, "run_id": f"{run.name}@lr={s['lr']:g}", "lr": float(s["lr"]),
                         **{m: s.get(m, math.nan) for m in METRICS}})
    df = pd.DataFrame(rows).assign(**{FROM: str(folder)})
    return df if parent is None else df[df["parent"] == parent]


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


def families(runs: pd.DataFrame) -> dict[str, str]:
    """method label -> its family: the registry name and the values of its class's scoring
    hyperparameters (`pasle(gate=own)`; `pasle(tau=0.08)` is a variant of `pasle`); an unknown
    plugin is its own family."""
    from tta_bench.core.registry import method_class

    found = {}
    for label, run in runs.drop_duplicates("method").set_index("method").iterrows():
        try:
            cls = method_class(run["method_name"])
        except TTAError:
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
    return errno.group(0) if errno else _first_line(err)


def choose_lrs(runs: pd.DataFrame, selection: Selection) -> dict[str, float]:
    """method -> the learning rate its row uses."""
    from tta_bench.core.registry import method_class

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
class Choice:
    """What one task's rows are: method label -> lr; why methods were left out; for held-out
    selection, the choice per family (the selection table) and the chosen variants whose every
    candidate was a no-op on validation too."""

    lrs: dict[str, float]
    left_out: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)  # the validation configurations (never scored)
    families: pd.DataFrame | None = None
    noop_everywhere: set[str] = field(default_factory=set)


def choose(at_d: pd.DataFrame, selection: Selection) -> Choice:
    """One task's rows at threshold d: the test runs pick each method's lr (default, best, fixed),
    or each family's variant and lr is chosen on the validation runs (heldout)."""
    test, val = split_validation(at_d)
    validation = sorted(val["configuration"].unique())
    if selection.mode == "heldout":
        return choose_heldout(test, val, validation)
    lrs = choose_lrs(test, selection)
    missing = sorted(set(test["method"]) - set(lrs))
    return Choice(lrs, [f"no run at {selection.target()}: {', '.join(missing)}"] if missing else [], validation)


def choose_heldout(test: pd.DataFrame, val: pd.DataFrame, validation: list[str]) -> Choice:
    """Per family, the (variant, lr) with the highest mean Δacc over the validation configurations
    among those run on every one (ties: smallest lr, then label), scored on the test runs; and the
    oracle: the same candidates ranked on the test configurations, for the regret only."""
    fam = families(pd.concat([test, val]))
    on_val, on_test = _per_variant(val), _per_variant(test)
    candidates = on_val[on_val["configs"] == len(validation)]
    rows, lrs, everywhere, no_test = [], {}, set(), []
    for family, c in candidates.groupby(candidates.index.get_level_values("method").map(fam)):
        variant, lr = _argmax(c)
        t = on_test.reindex(c.index).dropna(subset=["mean"])
        full = t[t["configs"] == t["configs"].max()]  # the oracle: over the most test configurations
        oracle = _argmax(full) if len(full) else (None, math.nan)
        test_mean = on_test["mean"].get((variant, lr), math.nan)
        oracle_mean = full["mean"].get(oracle, math.nan)
        noop = bool((c["changed"] == 0).all())
        rows.append({"family": family, "held-out variant": variant, "held-out lr": lr,
                     "validation configs": len(validation), "validation mean Δacc": c.at[(variant, lr), "mean"],
                     "test configs": on_test["configs"].get((variant, lr), 0), "test mean Δacc": test_mean,
                     "oracle variant": oracle[0], "oracle lr": oracle[1], "oracle test mean Δacc": oracle_mean,
                     "regret": oracle_mean - test_mean, "note": NOOP_EVERYWHERE if noop else ""})
        if math.isnan(test_mean):
            no_test.append(f"{family} ({variant} @ {lr:g})")
        else:
            lrs[variant] = lr
            if noop:
                everywhere.add(variant)
    chosen_families = {r["family"] for r in rows}
    left = sorted({f for f in fam.values() if f not in chosen_families})
    left_out = ([f"no (variant, lr) run on every validation configuration: {', '.join(left)}"] if left else []) + (
        [f"held-out choice without test runs: {', '.join(no_test)}"] if no_test else [])
    return Choice(lrs, left_out, validation, pd.DataFrame(rows), everywhere)


def incomplete_configurations(at_lr: pd.DataFrame, chosen: dict[str, float]) -> dict[str, str]:
    """Configuration -> the ranked methods without a run at their lr on it (a partly finished sweep)."""
    have = at_lr.groupby("configuration")["method"].agg(set)
    return {c: ", ".join(sorted(set(chosen) - ms)) for c, ms in have.items() if set(chosen) - ms}


def _per_variant(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (method, lr): #configurations, mean Δacc and #predictions changed, over the scored runs."""
    runs = runs[np.isfinite(runs["delta_acc"])]
    g = runs.assign(changed=changed_predictions(runs)).groupby(["method", "lr"])
    return g.agg(configs=("configuration", "nunique"), mean=("delta_acc", "mean"),
                 changed=("changed", lambda n: n.sum(min_count=1)))  # NaN: not recorded


def _argmax(means: pd.DataFrame) -> tuple[str, float]:
    """The (method, lr) of the highest mean (to 1e-9 points); ties: the smallest lr, then the label."""
    return min(means.index, key=lambda k: (-round(float(means.at[k, "mean"]), 9), k[1], k[0]))


@dataclass
class TaskReport:
    """What is published for one task: tables in reading order (headline first), the figures next
    to the table they illustrate, where the numbers come from, and what was left out."""

    task: str
    tables: dict[str, Table]
    plots: dict[str, Path]  # table name -> PNG
    provenance: dict[str, str]
    notes: list[str]
    description: str = ""  # one line: the models, shifts (corpora, datasets), samples per configuration


def sample_unit(task: str) -> str:
    """What one sample of `task` is called in the tables (images, windows, questions)."""
    return UNITS.get(task, "samples")


def validation_labels(task: str, val: pd.DataFrame, keys: list[str]) -> list[str]:
    """The validation configurations as `task(model=…, corruption=…, severity=…)`: every option that
    varies over them, defaults too (a configuration key leaves defaults out)."""
    if not keys:
        return []
    labels = configuration_labels(val, option_axes(val))
    return sorted(f"{task}({labels[k]})" if labels.get(k, k) != k else k for k in keys)


def task_report(task: str, task_runs: pd.DataFrame, at_d: pd.DataFrame, choice: Choice, folder: Path,
                selection: Selection, threshold: float | None, reference: str, origin: dict[str, str]) -> TaskReport:
    """Every table and figure of one task (figures are written to `folder`). at_d: the runs at
    threshold d; choice: each row's learning rate. Validation configurations are never scored."""
    from tta_bench.reporting import plots

    main, chosen = split_validation(at_d)[0], choice.lrs
    notes = ([f"{task}: left out, no runs at d = {_d(threshold)}"] if at_d.empty else
             [f"{task}: left out, only validation configurations (subset=val) at d = {_d(threshold)}"] if main.empty
             else [f"{task}: left out, {why}" for why in choice.left_out])
    if not chosen:
        return TaskReport(task, {}, {}, {}, notes)
    at_lr = at_chosen(main, chosen)
    if incomplete := incomplete_configurations(at_lr, chosen):  # methods are compared on the same configurations
        notes.append(f"{task}: {len(incomplete)} configuration(s) not scored, not every ranked method has a run on "
                     f"them: {'; '.join(f'{c} (no {m})' for c, m in incomplete.items())}")
        main, at_lr = (df[~df["configuration"].isin(incomplete)] for df in (main, at_lr))
        if choice.families is not None:  # the oracle and the regret on the scored configurations too
            choice.families = choose_heldout(main, split_validation(at_d)[1], choice.validation).families
    n_configs = f"{task}: {main['configuration'].nunique()} configuration(s), d = {_d(threshold)}"
    head = f"{n_configs}; {selection.caption()}"
    noops = no_ops(at_lr, choice.noop_everywhere)
    methods = method_table(at_lr, chosen, selection.label(), reference, noops)
    order = list(methods["method"])
    too_few = f" ({TOO_FEW_CI})" if (methods["configs"] < MIN_CI).any() else ""
    unit, named = sample_unit(task), validation_labels(task, split_validation(at_d)[1], choice.validation)
    data, view = headline_table(methods, unit)
    tables = {"headline": Table(data, (
        f"{n_configs}; {selection.caption(named)}. Mean Δacc (points, on the uncertain samples) with "
        f"its BCa bootstrap 95% CI{too_few}; wins/losses: configurations with Δacc > 0 / < 0; {HEADLINE_P}: one-sided "
        f"Wilcoxon signed-rank test against the source model, Holm-adjusted across the methods; cost: "
        f"forward/backward passes per uncertain (scored) sample as run (a one-gradient sweep over K learning rates "
        f"includes its K prediction forwards)"
        + ("; bpb (Δ%): mean bits per byte of the uncertain windows after adaptation over the configurations, "
           "and its mean change from the source model's (%)" if "bpb" in methods else "")
        + (f"; source acc and Δacc, all {unit}: over every one of a configuration's {unit} (not only the "
           f"uncertain ones), mean over the configurations" if "Δacc all" in methods else "")
        + ("; s per scored sample: wall seconds per uncertain (scored) sample" if "s/sample" in methods else "")
        + (f". No-op (changed no prediction on any configuration; excluded from the Holm family): "
           f"{', '.join(noops)}" if noops else "") + "."), view)}
    if choice.families is not None:
        data, view = selection_table(choice.families, order)
        tables["selection"] = Table(data, (
            f"{n_configs}; {selection.caption(named)}. Per family: the held-out choice with its mean "
            f"Δacc over the validation configurations and over the test configurations; the oracle ({ORACLE}): "
            f"the same candidates ranked by their mean Δacc on the test configurations (optimistic, never used "
            f"for the ranking); regret = oracle test mean − held-out test mean (points)."), view)
    axes = option_axes(at_lr)
    for axis in axes:
        tables.update(axis_tables(at_lr, axis, axes, order, head))
    data, view = configuration_table(at_lr, reference, order, option_axes(at_d))  # every option that varies
    tables["configurations"] = Table(data, f"{head}. Per configuration (the options that vary over the task's "
                                           f"configurations): Δacc in points (n_fixed/n_broken).", view)
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
    if not (th := threshold_table(split_validation(task_runs)[0], chosen)).empty:
        tables["thresholds"] = Table(th, f"{task}: Δacc and frac_uncertain vs threshold d; {selection.caption()}.")
        figures["thresholds"] = plots.threshold_plot(th, folder / "threshold.png")
    tables["methods"] = Table(methods, (f"{head}. Every statistic: each method vs the source model over "
                                        f"configurations (sign test, t-test, Wilcoxon; Holm across methods) and "
                                        f"vs {reference} (paired); CI95: BCa bootstrap{too_few}."))
    tables["learning_rates_detail"] = Table(by_lr, f"{task}: mean Δacc and #configurations improved per "
                                                   f"learning rate.")
    return TaskReport(task, tables, figures, provenance(task_runs, at_lr, origin, choice.validation), notes,
                      describe(task, at_lr, len(choice.validation)))


def axis_tables(at_lr: pd.DataFrame, axis: str, axes: list[str], order: list[str], head: str) -> dict[str, Table]:
    """Methods × one task option (by_AXIS), and where severity varies too, one severity at a time
    (by_AXIS_severity_S: the corruption papers' view); severities over the (model, corruption, …)
    run at every one of them, like with like."""
    def table(part: pd.DataFrame, what: str) -> Table:
        if axis != "corruption":
            return Table(axis_table(part, axis, order), f"{head}. Methods × {axis}{what}: mean Δacc (points) over "
                                                        f"the configurations with that {axis}; mean: over all of them.")
        data, view, groups = corruption_table(part, order)
        return Table(data, f"{head}. Methods × corruption{what}: mean Δacc (points, one decimal; the CSV has every "
                           f"digit) over the configurations with that corruption; columns {groups}; mean: over the "
                           f"corrupted configurations only" + ("; clean (corruption=none): apart, not in the mean"
                                                               if "clean" in view else "") + ".", view)

    if axis == "severity":
        part, which = every_severity(at_lr, axes)
        return {"by_severity": Table(axis_table(part, axis, order), (
            f"{head}. Methods × severity, like with like: mean Δacc (points) over the corrupted configurations of "
            f"{which or 'every configuration'}; clean configurations (no severity) not included; mean: over all "
            f"of them."))} if len(part) else {}
    tables = {f"by_{axis}": table(at_lr, "")}
    if "severity" in axes:
        for level in sorted(at_lr[~clean(at_lr)][OPTION + "severity"].astype(str).unique(), key=float):
            tables[f"by_{axis}_severity_{level}"] = table(at_severity(at_lr, level, axis), (
                f" at severity {level} (corrupted configurations" + (", and the clean ones of the same models"
                                                                     if axis == "corruption" else "") + ")"))
    return tables


def provenance(task_runs: pd.DataFrame, at_lr: pd.DataFrame, origin: dict[str, str],
               validation: list[str] = ()) -> dict[str, str]:
    """Where a task's numbers come from: the store selection (origin), the runs' own tags and the
    validation configurations (held out: only held-out selection reads them)."""
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
            "runs": f"{len(task_runs)} finished result runs; {len(at_lr)} at the chosen learning rates"
            + (f"; {n_val} on validation configurations (never scored)" if (n_val := len(split_validation(
                task_runs)[1])) else ""),
            "validation configurations": "; ".join(validation),
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
    read = runs  # runs.csv: the input as read (complete() adds the metrics older tables lack)
    if runs.empty:
        raise TTAError(f"no runs in {', '.join(map(str, runs_tables))} (--runs)"
                       + (f" under parent run {parent}" if parent else ""))
    if tasks:
        unknown = set(tasks) - set(runs["task"])
        if unknown:
            raise TTAError(f"no runs for task(s) {', '.join(sorted(unknown))}; tasks with runs: "
                           f"{', '.join(sorted(runs['task'].unique()))}")
        runs = read = runs[runs["task"].isin(tasks)]
    runs = complete(runs)
    if reference is not None and reference not in set(runs["method"]):
        raise TTAError(f"--reference {reference!r} has no runs; methods with runs: {_names(runs['method'])}")
    reference = reference or "ifo"
    at_d = runs[runs["threshold"].isna() if threshold is None else np.isclose(runs["threshold"], threshold)]
    if selection.mode == "heldout":
        _check_validation(at_d, threshold)
    selections = {task: task_selection(selection, g) for task, g in at_d.groupby("task")}
    choices = {task: choose(g, selections[task]) for task, g in at_d.groupby("task")}
    if not any(c.lrs for c in choices.values()):
        if selection.mode == "heldout":
            raise TTAError(f"no method has a run on every validation configuration at d = {_d(threshold)} (methods: "
                           f"{_names(at_d['method'])}); run them on every subset=val configuration, or pass "
                           f"--select default or --select best")
        raise TTAError(f"no runs at threshold d = {_d(threshold)}; thresholds with runs: "
                       f"{_names(runs['threshold'])}; pass one of them to --threshold" if at_d.empty else
                       f"no run at {selection.target()} for method(s) {_names(at_d['method'])} (d = {_d(threshold)}); "
                       f"learning rates with runs: {_names(at_d['lr'])}; "
                       + ("pass one of them to --lr" if selection.mode == "fixed"
                          else "pass --select best, or --select fixed --lr LR"))
    built = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    origin = {"experiment": experiment, "sweep parent": parent or "", "lr selection": selection.caption(),
              "threshold": f"d = {_d(threshold)}", "built": built}
    reports = [task_report(task, g, at_d[at_d["task"] == task], choices.get(task, Choice({})), out / task,
                           sel := selections.get(task, selection), threshold, reference,
                           origin | {"lr selection": sel.caption()}) for task, g in runs.groupby("task")]
    tables = ", ".join(map(str, runs_tables))
    sources = " and ".join(([f"experiment `{experiment}`"] if store else []) + ([f"`{tables}`"] if tables else []))
    summary = (f"{len(runs)} result runs from {sources}. {selection.caption()}. Tables at threshold "
               f"d = {_d(threshold)}; tests are one-sided (improvement). Built {built}.")
    written: list[Path] = []
    headlines, sections = ["## Headline\n"], []
    for task, g in read.groupby("task"):  # the input of every number below, for rebuilding and merging
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
            if name in ("headline", "selection"):  # the answer, and how its settings were chosen
                headlines.append(f"### {r.task}\n\n{r.description}\n\n{markdown}" if name == "headline" else markdown)
            elif name != "learning_rates_detail":  # in its CSV, HTML and LaTeX files only
                sections.append(f"### {name}\n\n{markdown}")
    (out / "LEADERBOARD.md").write_text("\n".join([f"# Leaderboard\n\n{summary}\n", *headlines, *sections]))
    written.append(out / "LEADERBOARD.md")
    if site is not None:
        from tta_bench.reporting.site import write_site
        written += write_site(site, summary, reports)
    return written


def task_selection(selection: Selection, runs: pd.DataFrame) -> Selection:
    """The rule for one task: under heldout, a task without validation configurations falls back to
    the default rule, and every caption of it says so."""
    if selection.mode == "heldout" and split_validation(runs)[1].empty:
        return Selection("default", fallback=True)
    return selection


def _check_validation(at_d: pd.DataFrame, threshold: float | None) -> None:
    """Held-out selection needs validation configurations in at least one task (the others fall back)."""
    if split_validation(at_d)[1].empty:
        raise TTAError(f"--select heldout: no task has validation configurations (subset=val) at "
                       f"d = {_d(threshold)} (tasks: {_names(at_d['task'])}); run configurations with subset=val "
                       f"too, or pass --select default or --select best")


def _d(threshold: float | None) -> str:
    return "none (no gate)" if threshold is None or math.isnan(threshold) else f"{threshold:g}"


def _names(values: pd.Series) -> str:
    """The distinct values, sorted, for a message (thresholds: NaN is a run without a gate)."""
    distinct = values.drop_duplicates()
    if distinct.dtype.kind == "f":
        return ", ".join(_d(x) for x in sorted(distinct, key=lambda x: (math.isnan(x), x)))
    return ", ".join(sorted(map(str, distinct)))
