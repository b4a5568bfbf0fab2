"""`tta-bench leaderboard`: tables, significance tests and plots from the runs in MLflow
(DESIGN §5). Methods are compared per task over its configurations (task options such as a
corpus, a dataset or a corruption), at one threshold d and one learning rate per method."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from . import stats
from .errors import TTAError
from .tracking import CONFIGURATION, KIND, METHOD, resolve_uri

FORMATS = {"md": "github", "html": "html", "tex": "latex_booktabs"}
METRICS = ("delta_acc", "n_fixed", "n_broken", "n_total", "n_uncertain", "frac_uncertain",
           "acc_source", "acc_adapted", "p_mcnemar", "forwards_per_sample", "backwards_per_sample",
           "samples_per_s")


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


def load_runs(uri: str | None, experiment: str, parent: str | None = None) -> pd.DataFrame:
    """One row per finished result run (configuration × method × lr × threshold); when a
    combination was logged more than once, the latest run counts."""
    import mlflow

    uri = resolve_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise TTAError(f"no MLflow experiment {experiment!r} at {uri}; run tta-bench run first or pass "
                       f"--experiment / --tracking-uri")
    where = f"tags.`{KIND}` = 'result' and attributes.status = 'FINISHED'"
    if parent:
        where += f" and tags.`mlflow.parentRunId` = '{parent}'"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # search_runs reads the global URI
    try:
        raw = mlflow.search_runs([found.experiment_id], where, max_results=1_000_000)
    finally:
        mlflow.set_tracking_uri(previous)
    if raw.empty:
        raise TTAError(f"no finished tta-bench runs in experiment {experiment!r} at {uri}"
                       + (f" under parent run {parent}" if parent else ""))
    df = pd.DataFrame({
        "task": raw["params.task"], "configuration": raw[f"tags.{CONFIGURATION}"],
        "method": raw[f"tags.{METHOD}"], "method_name": raw["params.method"],
        "lr": raw["params.lr"].astype(float),
        "threshold": pd.to_numeric(raw["params.threshold"], errors="coerce"),
        "run_id": raw["run_id"], "start": raw["start_time"],
        **{m: raw[f"metrics.{m}"] for m in METRICS},
    })
    df = df.sort_values("start").drop_duplicates(["configuration", "method", "lr", "threshold"], keep="last")
    return df.reset_index(drop=True)


def choose_lrs(runs: pd.DataFrame, selection: Selection) -> dict[str, float]:
    """method -> the learning rate its row uses."""
    from .registry import method_class

    chosen: dict[str, float] = {}
    for method, g in runs.groupby("method"):
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


def at_chosen(runs: pd.DataFrame, chosen: dict[str, float]) -> pd.DataFrame:
    """The rows at each method's chosen learning rate."""
    return runs[[math.isclose(lr, chosen.get(m, -1.0), rel_tol=1e-9) for m, lr in zip(runs["method"], runs["lr"], strict=True)]]


def _fmt(column: str, x: float) -> str:
    if column.startswith("p ") or column in ("lr", "threshold"):
        return f"{x:.3g}"
    if column == "frac_uncertain":
        return f"{x:.3f}"
    if column.startswith(("n_", "Δacc>", "Δacc<", "configs")):
        return f"{x:.0f}"
    return f"{x:.2f}"


def method_table(at_lr: pd.DataFrame, chosen: dict[str, float], selection: Selection,
                 reference: str) -> pd.DataFrame:
    """The paper's Table 2/5: each method against the source model and against the reference."""
    deltas = at_lr.pivot_table(index="configuration", columns="method", values="delta_acc")
    rows = []
    for method in deltas.columns:
        d = deltas[method].dropna()
        vs = stats.versus_source(d.to_numpy())
        row = {"method": method, "lr": chosen[method], "lr chosen": selection.label(),
               "configs": vs.n, "mean Δacc": vs.mean, "std": vs.std, "Δacc>0": vs.n_pos,
               "Δacc<0": vs.n_neg, "p sign": vs.p_sign, "p t": vs.p_t, "p Wilcoxon": vs.p_wilcoxon,
               "CI95 low": vs.ci_low, "CI95 high": vs.ci_high}
        if reference in deltas.columns:
            both = deltas[[reference, method]].dropna()
            row[f"p t {reference}>"], row[f"p W {reference}>"] = (
                stats.paired(both[reference], both[method]) if method != reference else (math.nan, math.nan))
        g = at_lr[at_lr["method"] == method]
        row.update({"fwd/sample": g["forwards_per_sample"].mean(), "bwd/sample": g["backwards_per_sample"].mean(),
                    "samples/s": g["samples_per_s"].mean()})
        rows.append(row)
    table = pd.DataFrame(rows)
    for col in ("p sign", "p t", "p Wilcoxon", f"p t {reference}>", f"p W {reference}>"):
        if col in table:
            table.insert(table.columns.get_loc(col) + 1, f"{col} (Holm)", stats.holm(table[col]))
    table = table.sort_values("mean Δacc", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def configuration_table(at_lr: pd.DataFrame, reference: str) -> pd.DataFrame:
    """The paper's Table 4: per configuration, the gate's statistics and each method's Δacc."""
    base = at_lr.sort_values("method", key=lambda m: m != reference).groupby("configuration").first()
    table = base[["n_total", "n_uncertain", "frac_uncertain", "acc_source"]].copy()
    for method, g in at_lr.groupby("method"):
        g = g.set_index("configuration")
        table[method] = [f"{g.at[c, 'delta_acc']:+.2f} ({int(g.at[c, 'n_fixed'])}/{int(g.at[c, 'n_broken'])})"
                         if c in g.index else "–" for c in table.index]
    return table.reset_index()


def lr_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean Δacc and #configurations improved per learning rate (the paper's Figures 7/8)."""
    g = runs.groupby(["method", "lr"])["delta_acc"]
    return pd.DataFrame({"configs": g.count(), "mean Δacc": g.mean(), "Δacc>0": g.apply(lambda d: int((d > 0).sum())),
                         "Δacc<0": g.apply(lambda d: int((d < 0).sum()))}).reset_index()


def threshold_table(runs: pd.DataFrame, chosen: dict[str, float]) -> pd.DataFrame:
    """Δacc and frac_uncertain vs the threshold d at each method's chosen lr (Figure 6)."""
    at = at_chosen(runs, chosen).dropna(subset=["threshold"])
    # per method, only the configurations run at every one of its thresholds (comparable means)
    n_th = at.groupby(["method", "configuration"])["threshold"].transform("nunique")
    at = at[n_th == at.groupby("method")["threshold"].transform("nunique")]
    g = at.groupby(["method", "threshold"])
    table = g.agg(configs=("delta_acc", "count"), mean_delta=("delta_acc", "mean"),
                  frac_uncertain=("frac_uncertain", "mean"), n_fixed=("n_fixed", "sum"),
                  n_broken=("n_broken", "sum")).reset_index()
    many = table.groupby("method")["threshold"].transform("nunique") >= 2
    return table[many].rename(columns={"mean_delta": "mean Δacc"}).reset_index(drop=True)


def friedman_table(at_lr: pd.DataFrame) -> tuple[pd.DataFrame, stats.Friedman] | None:
    deltas = at_lr.pivot_table(index="configuration", columns="method", values="delta_acc").dropna()
    if deltas.shape[1] < 3 or deltas.shape[0] < 2:
        return None
    result = stats.friedman(deltas.to_numpy())
    table = pd.DataFrame({"method": deltas.columns, "average rank": result.avg_ranks}).sort_values("average rank")
    return table.reset_index(drop=True), result


def write_table(table: pd.DataFrame, path: Path, caption: str) -> tuple[list[Path], str]:
    """CSV with raw numbers; Markdown, HTML and LaTeX with rounded ones and the caption.
    Returns the files written and the Markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path.with_suffix(".csv"), index=False)
    shown = table.copy()
    for col in shown.columns:
        if shown[col].dtype.kind == "f":
            shown[col] = [("–" if pd.isna(x) else _fmt(col, x)) for x in shown[col]]
    written, markdown = [path.with_suffix(".csv")], ""
    for ext, fmt in FORMATS.items():
        body = tabulate(shown, headers="keys", tablefmt=fmt, showindex=False, disable_numparse=True)
        if ext == "md":
            body = markdown = f"{caption}\n\n{body}\n"
        elif ext == "html":
            body = body.replace("<table>", f"<table>\n<caption>{caption}</caption>", 1)
        else:
            body = f"% {caption}\n{body}\n"
        path.with_suffix(f".{ext}").write_text(body)
        written.append(path.with_suffix(f".{ext}"))
    return written, markdown


def build(uri: str | None, experiment: str, out: Path, selection: Selection, threshold: float = 0.16,
          reference: str = "ifo", tasks: list[str] | None = None, parent: str | None = None) -> list[Path]:
    """Write every table and plot; returns the files written."""
    from . import plots

    runs = load_runs(uri, experiment, parent)
    if tasks:
        unknown = set(tasks) - set(runs["task"])
        if unknown:
            raise TTAError(f"no runs for task(s) {', '.join(sorted(unknown))}; tasks with runs: "
                           f"{', '.join(sorted(runs['task'].unique()))}")
        runs = runs[runs["task"].isin(tasks)]
    written: list[Path] = []
    sections = [f"# Leaderboard\n\nExperiment `{experiment}`, {len(runs)} result runs. {selection.caption()}. "
                f"Tables at threshold d = {threshold:g}; tests are one-sided (improvement).\n"]
    for task, task_runs in runs.groupby("task"):
        folder = out / task
        main = task_runs[np.isclose(task_runs["threshold"], threshold)]
        if main.empty:
            continue
        chosen = choose_lrs(main, selection)
        sections.append(f"## {task}\n")
        if missing := sorted(set(main["method"]) - set(chosen)):
            sections.append(f"{task}: left out, no run at a learning rate near their default: {', '.join(missing)}\n")
        at_lr = at_chosen(main, chosen)
        by_lr = lr_table(main)
        n_conf = main["configuration"].nunique()
        head = f"{task}: {n_conf} configuration(s), d = {threshold:g}; {selection.caption()}"
        tables = {
            "methods": (method_table(at_lr, chosen, selection, reference),
                        f"{head}. Each method vs the source model over configurations "
                        f"(sign test, t-test, Wilcoxon; Holm across methods) and vs {reference} (paired)."),
            "configurations": (configuration_table(at_lr, reference),
                               f"{head}. Per configuration: Δacc in points (n_fixed/n_broken)."),
            "learning_rates": (by_lr, f"{task}: mean Δacc and #configurations improved per learning rate."),
        }
        if (fr := friedman_table(at_lr)) is not None:
            table, result = fr
            tables["friedman"] = (table, f"{head}. Friedman χ² = {result.statistic:.3g}, p = {result.p:.3g}; "
                                  f"Nemenyi critical difference (α = 0.05) = {result.cd:.3g}.")
            written.append(plots.cd_diagram(table, result.cd, folder / "cd.png"))
        if not (th := threshold_table(task_runs, chosen)).empty:
            tables["thresholds"] = (th, f"{task}: Δacc and frac_uncertain vs threshold d; {selection.caption()}.")
            written.append(plots.threshold_plot(th, folder / "threshold.png"))
        written.append(plots.lr_plot(by_lr, folder / "delta_vs_lr.png"))
        for name, (table, caption) in tables.items():
            files, markdown = write_table(table, folder / name, caption)
            written += files
            sections.append(f"### {name}\n\n{markdown}")
    (out / "LEADERBOARD.md").write_text("\n".join(sections))
    return [*written, out / "LEADERBOARD.md"]
