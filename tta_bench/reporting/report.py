"""Assembling one task's report: at its chosen learning rates, every table (headline, held-out
selection, per task option, per configuration, learning rates, Friedman, thresholds) with its
caption, the figures, the provenance of its numbers and what was left out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tta_bench.reporting.axes import (
    OPTION,
    UNITS,
    at_severity,
    axis_table,
    clean,
    configuration_labels,
    describe,
    every_severity,
    option_axes,
)
from tta_bench.reporting.output import Table
from tta_bench.reporting.runs import FROM, split_validation
from tta_bench.reporting.selection import Choice, Selection, choose_heldout, incomplete_configurations, threshold_text
from tta_bench.reporting.tables import (
    BASE_MODEL,
    CHOSEN,
    HEADLINE_P,
    MIN_CI,
    ORACLE,
    TOO_FEW_CI,
    at_chosen,
    configuration_table,
    corruption_table,
    devices,
    friedman_table,
    headline_table,
    lr_grid,
    lr_table,
    method_table,
    no_ops,
    selection_table,
    threshold_table,
)


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

    main, chosen, d = split_validation(at_d)[0], choice.lrs, threshold_text(threshold)
    notes = ([f"{task}: left out, no runs at d = {d}"] if at_d.empty else
             [f"{task}: left out, only validation configurations (subset=val) at d = {d}"] if main.empty
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
    n_configs = f"{task}: {main['configuration'].nunique()} configuration(s), d = {d}"
    head = f"{n_configs}; {selection.caption()}"
    noops = no_ops(at_lr, choice.noop_everywhere)
    base = [m for m, w in noops.items() if w == BASE_MODEL]  # the unranked reference
    no_op = [m for m in noops if m not in base]
    methods = method_table(at_lr, chosen, selection.label(), reference, noops, choice.fixed)
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
        + (f", mean over the configurations run on each device ({', '.join(ds)}): compare them within a device"
           if (ds := devices(at_lr)) and "s/sample" in methods else "")
        + (" (selection: of them, choosing the data to fine-tune on)" if "select s/sample" in methods else "")
        + (f". No-op (changed no prediction on any configuration; excluded from the Holm family): "
           f"{', '.join(no_op)}" if no_op else "")
        + (f". {', '.join(base)}: {BASE_MODEL}, not tested" if base else "")
        + (f". Not tuned (no validation runs; one setting, scored as run): {', '.join(sorted(untuned))}"
           if (untuned := choice.fixed - set(base)) else "") + "."), view)}
    if choice.families is not None:
        data, view = selection_table(choice.families, order)
        tables["selection"] = Table(data, (
            f"{n_configs}; {selection.caption(named)}. Per family: the held-out choice with its mean "
            f"Δacc over the validation configurations and over the test configurations; the oracle ({ORACLE}): "
            f"the candidates run on every test configuration ranked by their mean Δacc there (optimistic, never "
            f"used for the ranking); regret = oracle test mean − held-out test mean (points). Every candidate: "
            f"the oracle over all of the family's candidates (each variant and lr run on every validation "
            f"configuration) on the test configurations where each has a run (their number in brackets), the "
            f"held-out choice's mean there and its regret; the two oracles agree once every candidate has run "
            f"on every test configuration."), view)
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
                                          f"Nemenyi critical difference (α = 0.05) = {result.cd:.3g}"
                                          + (f"; ranked beside the methods as the reference (Δacc 0 on every "
                                             f"configuration): {', '.join(base)}" if base else "") + ".")
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
        values = task_runs[column].dropna() if column in task_runs else []  # older runs tables lack newer tags
        return ", ".join(sorted({str(v)[:width] for v in values})) or "not recorded"

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
            "tta-bench": distinct("tta-bench"), "torch": distinct("torch"), "devices": distinct("device"),
            "git commit": distinct("commit", 12), "source sha256": distinct("source", 12)}
