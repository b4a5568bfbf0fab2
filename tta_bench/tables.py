"""The leaderboard's tables (DESIGN §5), built from the runs at each method's chosen learning
rate: the headline, every statistic per method, methods × configurations / learning rates /
task options, thresholds and the Friedman ranks; each written as CSV (raw numbers), Markdown,
HTML and LaTeX."""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from . import stats

FORMATS = {"md": "github", "html": "html", "tex": "latex_booktabs"}
OPTION = "option."  # column prefix of the task options (corruption, model, corpus, …) in the runs
SUBSET = OPTION + "subset"  # test (scored) or val (held out: used only to choose hyperparameters)
HEADLINE_P = "p Wilcoxon (Holm)"
CHOSEN = " ◀"  # marks the chosen learning rate in the methods × learning rates table
# text tasks: mean bits per byte over the configurations at θ0 and adapted, and its mean change (%)
BPB = {"bpb source": "bpb_source", "bpb": "bpb", "Δbpb %": "bpb_change_pct"}
# over every image of a configuration (not only the uncertain ones), and the cost per scored sample
WHOLE = {"source acc all (%)": "acc_source_all", "Δacc all": "delta_acc_all"}
SECONDS = {"s/sample": "seconds_per_sample"}
NOOP = "no-op: changed no prediction"
NOOP_EVERYWHERE = "no-op at every setting tried"  # held-out selection: every candidate, on validation too
ORACLE = "best on test ⚠"


def at_chosen(runs: pd.DataFrame, chosen: dict[str, float]) -> pd.DataFrame:
    """The rows at each method's chosen learning rate."""
    return runs[[math.isclose(lr, chosen.get(m, -1.0), rel_tol=1e-9) for m, lr in zip(runs["method"], runs["lr"], strict=True)]]


def _fmt(column: str, x: float) -> str:
    if column.startswith("p ") or column in ("lr", "threshold", "s/sample") or column.endswith(" lr"):
        return f"{x:.3g}"
    if column == "frac_uncertain":
        return f"{x:.3f}"
    if column.startswith(("n_", "Δacc>", "Δacc<", "configs")):
        return f"{x:.0f}"
    if column in BPB:
        return f"{x:.3f}"
    return f"{x:.2f}"


def changed_predictions(runs: pd.DataFrame) -> pd.Series:
    """Per run, how many predictions adaptation changed (older runs: n_fixed + n_broken)."""
    return runs["n_changed"].fillna(runs["n_fixed"] + runs["n_broken"])


def no_ops(at_lr: pd.DataFrame, everywhere: set[str] = frozenset()) -> dict[str, str]:
    """method -> words, for the methods that changed no prediction on any configuration;
    everywhere: those whose every setting tried was a no-op too (held-out selection)."""
    changed = changed_predictions(at_lr).groupby(at_lr["method"]).sum(min_count=1)
    return {m: NOOP_EVERYWHERE if m in everywhere else NOOP for m, n in changed.items() if n == 0}


def method_table(at_lr: pd.DataFrame, chosen: dict[str, float], how: str, reference: str,
                 noops: dict[str, str] | None = None) -> pd.DataFrame:
    """The paper's Table 2/5: each method against the source model and against the reference.
    noops: method -> words; left out of the Holm family (their adjusted p-values are NaN)."""
    noops = noops or {}
    deltas = at_lr.pivot_table(index="configuration", columns="method", values="delta_acc")
    rows = []
    for method in deltas.columns:
        d = deltas[method].dropna()
        vs = stats.versus_source(d.to_numpy())
        row = {"method": method, "lr": chosen[method], "lr chosen": how,
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
        if has_bpb(at_lr):
            row.update({column: g[metric].mean() for column, metric in BPB.items()})
        row.update({column: g[metric].mean() for column, metric in {**SECONDS, **WHOLE}.items()
                    if has(at_lr, metric)})
        rows.append(row)
    table = pd.DataFrame(rows)
    in_family = ~table["method"].isin(list(noops))  # a no-op has nothing to test
    for col in ("p sign", "p t", "p Wilcoxon", f"p t {reference}>", f"p W {reference}>"):
        if col in table:
            table.insert(table.columns.get_loc(col) + 1, f"{col} (Holm)", stats.holm(table[col].where(in_family)))
    if noops:
        table["note"] = [noops.get(m, "") for m in table["method"]]
    table = table.sort_values("mean Δacc", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def has_bpb(runs: pd.DataFrame) -> bool:
    """Whether these runs recorded bits per byte (text tasks)."""
    return has(runs, "bpb")


def has(runs: pd.DataFrame, metric: str) -> bool:
    """Whether any of these runs recorded `metric` (older runs tables lack the newer ones)."""
    return metric in runs and bool(runs[metric].notna().any())


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


def headline_table(methods: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The answer first: per method its rank, lr and how it was chosen, mean Δacc with its CI,
    wins/losses over configurations, Holm-adjusted p and cost. Returns (raw numbers, view)."""
    extra = [c for c in ("note", *WHOLE, *SECONDS) if c in methods]
    data = methods[["rank", "method", "lr", "lr chosen", "mean Δacc", "CI95 low", "CI95 high", "Δacc>0",
                    "Δacc<0", HEADLINE_P, "fwd/sample", "bwd/sample", *extra]].reset_index(drop=True)
    ci = [f" [{lo:+.2f}, {hi:+.2f}]" if np.isfinite([lo, hi]).all() else " [–]"
          for lo, hi in zip(data["CI95 low"], data["CI95 high"], strict=True)]
    notes = data["note"] if "note" in data else [""] * len(data)
    view = pd.DataFrame({
        "rank": data["rank"].astype(str), "method": data["method"],
        "lr": [f"{lr:.3g} ({how})" for lr, how in zip(data["lr"], data["lr chosen"], strict=True)],
        "mean Δacc [95% CI]": [note or f"{m:+.2f}{c}"  # a no-op in words, not +0.00
                               for m, c, note in zip(data["mean Δacc"], ci, notes, strict=True)],
        "wins/losses": [f"{w:.0f}/{lo:.0f}" for w, lo in zip(data["Δacc>0"], data["Δacc<0"], strict=True)],
        HEADLINE_P: ["–" if pd.isna(x) else f"{x:.3g}" for x in data[HEADLINE_P]],
        "fwd/bwd per sample": [f"{f:.3g} / {b:.3g}"
                               for f, b in zip(data["fwd/sample"], data["bwd/sample"], strict=True)],
    })
    if "bpb" in methods:  # text tasks: bits per byte beside Δacc
        data = data.join(methods[["bpb", "Δbpb %"]].reset_index(drop=True))
        view.insert(view.columns.get_loc("wins/losses"), "bpb (Δ%)", [
            "–" if pd.isna(b) else f"{b:.3f} ({c:+.2f}%)" for b, c in zip(data["bpb"], data["Δbpb %"], strict=True)])
    at = view.columns.get_loc("mean Δacc [95% CI]") + 1  # whole-set figures beside the uncertain-set Δacc
    for column, shown, fmt in (("Δacc all", "Δacc all images", "{:+.2f}"),
                               ("source acc all (%)", "source acc, all images (%)", "{:.2f}")):
        if column in data:
            view.insert(at, shown, ["–" if pd.isna(x) else fmt.format(x) for x in data[column]])
    if "s/sample" in data:
        view["s per scored sample"] = [_or_dash(x, "s/sample") for x in data["s/sample"]]
    return data, view


def selection_table(choices: pd.DataFrame, order: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Held-out selection per method family: the choice and its validation and test means, the
    oracle (the same candidates ranked on the test configurations) and the regret. Rows in the
    headline's order of the chosen variants. Returns (raw, view)."""
    rank = {m: i for i, m in enumerate(order)}
    data = choices.sort_values("held-out variant", key=lambda v: v.map(rank).fillna(len(rank)), kind="stable")
    data = data.reset_index(drop=True)

    def pick(variant: str, lr: float) -> str:
        return "–" if pd.isna(lr) else f"{variant} @ {lr:.3g}"

    return data, pd.DataFrame({
        "family": data["family"],
        "held-out choice (variant @ lr)": [pick(v, lr) for v, lr in zip(data["held-out variant"],
                                                                         data["held-out lr"], strict=True)],
        "validation mean Δacc (configs)": [note or f"{m:+.2f} ({n:.0f})" for m, n, note in zip(
            data["validation mean Δacc"], data["validation configs"], data["note"], strict=True)],
        "test mean Δacc": [_signed(x) for x in data["test mean Δacc"]],
        f"oracle: {ORACLE}": [pick(v, lr) for v, lr in zip(data["oracle variant"], data["oracle lr"], strict=True)],
        "oracle test mean Δacc": [_signed(x) for x in data["oracle test mean Δacc"]],
        "regret": [_signed(x) for x in data["regret"]],
    })


def _signed(x: float) -> str:
    return "–" if pd.isna(x) else f"{x:+.2f}"


def lr_grid(by_lr: pd.DataFrame, chosen: dict[str, float], order: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Methods × learning rates: mean Δacc per lr, the chosen lr marked. Returns (raw, view)."""
    grid = by_lr.pivot(index="method", columns="lr", values="mean Δacc")
    grid = grid.reindex([m for m in order if m in grid.index] + sorted(set(grid.index) - set(order)))
    lrs = list(grid.columns)
    data = grid.set_axis([f"{lr:g}" for lr in lrs], axis=1)
    data.insert(0, "chosen lr", [chosen.get(m, math.nan) for m in grid.index])
    view = pd.DataFrame({"method": grid.index, "chosen lr": [_or_dash(chosen.get(m), "lr") for m in grid.index]})
    for lr in lrs:
        view[f"{lr:.3g}"] = [("–" if pd.isna(x) else f"{x:+.2f}")
                             + (CHOSEN if math.isclose(lr, chosen.get(m, -1.0), rel_tol=1e-9) else "")
                             for m, x in zip(grid.index, grid[lr], strict=True)]
    return data.reset_index(), view


def option_axes(at_lr: pd.DataFrame) -> list[str]:
    """The task options that vary over the configurations (corruption, model, corpus, …)."""
    configs = at_lr.drop_duplicates("configuration")
    return sorted(c.removeprefix(OPTION) for c in configs.columns  # subset: scored ones are all test
                  if c.startswith(OPTION) and c != SUBSET and configs[c].astype(str).nunique() > 1)


def axis_table(at_lr: pd.DataFrame, axis: str, order: list[str]) -> pd.DataFrame:
    """Methods × the values of one task option (the per-model / per-shift views of TTA papers):
    mean Δacc over the configurations with that value, and over all of them."""
    values = at_lr[OPTION + axis].astype(str)
    table = at_lr.assign(value=values).pivot_table(index="method", columns="value", values="delta_acc", aggfunc="mean")
    table = table[sorted(table.columns, key=_natural)].reindex(order)
    table.columns = list(table.columns)
    table["mean"] = at_lr.groupby("method")["delta_acc"].mean().reindex(order)
    return table.rename_axis("method").reset_index()


def _natural(value: str) -> tuple:
    """Numbers in numeric order, then names; `none` (no shift: the clean data) first of all."""
    if value == "none":
        return -1, 0.0, value
    try:
        return 0, float(value), value
    except ValueError:
        return 1, 0.0, value


def _or_dash(x: float | None, column: str) -> str:
    return "–" if x is None or pd.isna(x) else _fmt(column, x)


@dataclass
class Table:
    """One published table: raw numbers (its CSV), caption, and the rendered view (default: the
    raw numbers rounded)."""

    data: pd.DataFrame
    caption: str
    shown: pd.DataFrame | None = None

    def view(self) -> pd.DataFrame:
        if self.shown is not None:
            return self.shown
        shown = self.data.copy()
        for col in shown.columns:
            if shown[col].dtype.kind == "f":
                shown[col] = [_or_dash(x, col) for x in shown[col]]
        return shown.astype(str)


def write_table(table: Table, path: Path) -> tuple[list[Path], str]:
    """CSV with raw numbers; Markdown, HTML and LaTeX of the view with the caption.
    Returns the files written and the Markdown."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table.data.to_csv(path.with_suffix(".csv"), index=False)
    written, markdown = [path.with_suffix(".csv")], ""
    for ext, fmt in FORMATS.items():
        body = tabulate(table.view(), headers="keys", tablefmt=fmt, showindex=False, disable_numparse=True)
        if ext == "md":
            body = markdown = f"{table.caption}\n\n{body}\n"
        elif ext == "html":
            body = body.replace("<table>", f"<table>\n<caption>{html.escape(table.caption)}</caption>", 1)
        else:
            body = f"% {table.caption}\n{body}\n"
        path.with_suffix(f".{ext}").write_text(body)
        written.append(path.with_suffix(f".{ext}"))
    return written, markdown


