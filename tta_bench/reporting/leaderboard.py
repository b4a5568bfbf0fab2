"""`tta-bench leaderboard`: tables, significance tests and plots from the runs in MLflow
(docs/DESIGN.md §5). Methods are compared per task over its configurations (task options such as a
corpus, a dataset or a corruption), at one threshold d and one learning rate per method.
A build reads the runs (runs.py), chooses each method's hyperparameters (selection.py),
assembles each task's report (report.py) and writes its tables, plots and static site."""
from __future__ import annotations

import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from tta_bench.core.errors import TTAError
from tta_bench.reporting.output import write_table
from tta_bench.reporting.report import task_report
from tta_bench.reporting.runs import FROM, RUNS_TABLE, complete, latest, load_runs, read_runs, runs_table
from tta_bench.reporting.selection import (
    Choice,
    Selection,
    check_validation,
    choose,
    distinct_text,
    task_selection,
    threshold_text,
)
from tta_bench.reporting.site import write_site


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
        raise TTAError(f"--reference {reference!r} has no runs; methods with runs: {distinct_text(runs['method'])}")
    reference = reference or "ifo"
    at_d = runs[runs["threshold"].isna() if threshold is None else np.isclose(runs["threshold"], threshold)]
    if selection.mode == "heldout":
        check_validation(at_d, threshold)
    selections = {task: task_selection(selection, g) for task, g in at_d.groupby("task")}
    choices = {task: choose(g, selections[task]) for task, g in at_d.groupby("task")}
    d = threshold_text(threshold)
    if not any(c.lrs for c in choices.values()):
        if selection.mode == "heldout":
            raise TTAError(f"no method has a run on every validation configuration at d = {d} (methods: "
                           f"{distinct_text(at_d['method'])}); run them on every subset=val configuration, or pass "
                           f"--select default or --select best")
        raise TTAError(f"no runs at threshold d = {d}; thresholds with runs: "
                       f"{distinct_text(runs['threshold'])}; pass one of them to --threshold" if at_d.empty else
                       f"no run at {selection.target()} for method(s) {distinct_text(at_d['method'])} (d = {d}); "
                       f"learning rates with runs: {distinct_text(at_d['lr'])}; "
                       + ("pass one of them to --lr" if selection.mode == "fixed"
                          else "pass --select best, or --select fixed --lr LR"))
    built = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    origin = {"experiment": experiment, "sweep parent": parent or "", "lr selection": selection.caption(),
              "threshold": f"d = {d}", "built": built}
    reports = [task_report(task, g, at_d[at_d["task"] == task], choices.get(task, Choice({})), out / task,
                           sel := selections.get(task, selection), threshold, reference,
                           origin | {"lr selection": sel.caption()}) for task, g in runs.groupby("task")]
    tables = ", ".join(map(str, runs_tables))
    sources = " and ".join(([f"experiment `{experiment}`"] if store else []) + ([f"`{tables}`"] if tables else []))
    summary = (f"{len(runs)} result runs from {sources}. {selection.caption()}. Tables at threshold "
               f"d = {d}; tests are one-sided (improvement). Built {built}.")
    written: list[Path] = []
    headlines, sections = ["## Headline\n"], []
    for task, g in read.groupby("task"):  # the input of every number below, for rebuilding and merging
        (out / task).mkdir(parents=True, exist_ok=True)
        runs_table(g.drop(columns=FROM, errors="ignore")).to_csv(out / task / RUNS_TABLE, index=False)
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
        written += write_site(site, summary, reports)
    return written
