"""The leaderboard's tables (docs/DESIGN.md §5), built from the runs at each method's chosen learning
rate: the headline, every statistic per method, methods × configurations / learning rates /
task options, thresholds and the Friedman ranks; each as raw numbers and a view (output.py writes
them; axes.py knows the task options)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from tta_bench.core import stats
from tta_bench.reporting.axes import CLEAN, CORRUPTION_GROUPS, OPTION, SHORT, axis_table, clean, configuration_labels
from tta_bench.reporting.output import or_dash, rounded
from tta_bench.reporting.runs import not_adapting

HEADLINE_P = "p Wilcoxon (Holm)"
CHOSEN = " ◀"  # marks the chosen learning rate in the methods × learning rates table
# text tasks: mean bits per byte over the configurations at θ0 and adapted, and its mean change (%)
BPB = {"bpb source": "bpb_source", "bpb": "bpb", "Δbpb %": "bpb_change_pct"}
# over every image of a configuration (not only the uncertain ones), and the cost per scored sample
WHOLE = {"source acc all (%)": "acc_source_all", "Δacc all": "delta_acc_all"}
SECONDS = {"s/sample": "seconds_per_sample"}
SELECT = {"select s/sample": "select_seconds_per_sample"}  # of s/sample; only where a method selects data
NOOP = "no-op: changed no prediction"
NOOP_EVERYWHERE = "no-op at every setting tried"  # held-out selection: every candidate, on validation too
FIXED = "not tuned"  # held-out selection: no validation runs and one (variant, lr): nothing to choose
BASE_MODEL = "the base model, not adapted (the reference)"  # the method `none`, and any that does not adapt
ORACLE = "best on test ⚠"
MIN_CI = 5  # fewer configurations: a BCa bootstrap CI of the mean is degenerate; shown as –
TOO_FEW_CI = f"–: too few configurations for a bootstrap CI (n < {MIN_CI})"


def at_chosen(runs: pd.DataFrame, chosen: dict[str, float]) -> pd.DataFrame:
    """The rows at each method's chosen learning rate."""
    return runs[[math.isclose(lr, chosen.get(m, -1.0), rel_tol=1e-9)
                 for m, lr in zip(runs["method"], runs["lr"], strict=True)]]


def changed_predictions(runs: pd.DataFrame) -> pd.Series:
    """Per run, how many predictions adaptation changed (older runs: n_fixed + n_broken)."""
    return runs["n_changed"].fillna(runs["n_fixed"] + runs["n_broken"])


def no_ops(at_lr: pd.DataFrame, everywhere: set[str] = frozenset()) -> dict[str, str]:
    """method -> words, for the methods that changed no prediction on any configuration;
    everywhere: those whose every setting tried was a no-op too (held-out selection); the base
    model (a method that does not adapt) is named as the reference."""
    changed = changed_predictions(at_lr).groupby(at_lr["method"]).sum(min_count=1)
    base = not_adapting(at_lr)
    return {m: BASE_MODEL if m in base else NOOP_EVERYWHERE if m in everywhere else NOOP
            for m, n in changed.items() if n == 0 or m in base}


def method_table(at_lr: pd.DataFrame, chosen: dict[str, float], how: str, reference: str,
                 noops: dict[str, str] | None = None, fixed: set[str] = frozenset()) -> pd.DataFrame:
    """The paper's Table 2/5: each method against the source model and against the reference.
    noops: method -> words; left out of the Holm family (their adjusted p-values are NaN);
    fixed: methods with nothing to tune (their lr is `FIXED`, not `how`)."""
    noops = noops or {}
    deltas = at_lr.pivot_table(index="configuration", columns="method", values="delta_acc")
    several = devices(at_lr)  # none where the runs ran on one device
    rows = []
    for method in deltas.columns:
        d = deltas[method].dropna()
        vs = stats.versus_source(d.to_numpy())
        if vs.n < MIN_CI:  # a bootstrap over so few values is degenerate: no CI
            vs.ci_low = vs.ci_high = math.nan
        row = {"method": method, "lr": chosen[method], "lr chosen": FIXED if method in fixed else how,
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
        if has(at_lr, SECONDS["s/sample"]):  # seconds compare within a device only
            row.update({f"s/sample {device}": g.loc[g["device"] == device, SECONDS["s/sample"]].mean()
                        for device in several})
        if selects(at_lr):
            row["select s/sample"] = g[SELECT["select s/sample"]].mean()
        rows.append(row)
    table = pd.DataFrame(rows)
    in_family = ~table["method"].isin(list(noops))  # a no-op has nothing to test
    for col in ("p sign", "p t", "p Wilcoxon", f"p t {reference}>", f"p W {reference}>"):
        if col in table:
            table.insert(table.columns.get_loc(col) + 1, f"{col} (Holm)", stats.holm(table[col].where(in_family)))
    if noops:
        table["note"] = [noops.get(m, "") for m in table["method"]]
    base = table["method"].map(noops).eq(BASE_MODEL)  # the reference: last, unranked
    table = table.assign(base=base).sort_values(["base", "mean Δacc"], ascending=[True, False], kind="stable")
    rank = pd.Series(np.arange(1, len(table) + 1), index=table.index, dtype="Int64")
    table.insert(0, "rank", rank.mask(table["base"]))
    table = table.drop(columns="base").reset_index(drop=True)
    return table


def has_bpb(runs: pd.DataFrame) -> bool:
    """Whether these runs recorded bits per byte (text tasks)."""
    return has(runs, "bpb")


def selects(runs: pd.DataFrame) -> bool:
    """Whether a method of these runs spent time choosing data to step on (retrieval)."""
    return has(runs, SELECT["select s/sample"]) and bool((runs[SELECT["select s/sample"]] > 0).any())


def has(runs: pd.DataFrame, metric: str) -> bool:
    """Whether any of these runs recorded `metric` (older runs tables lack the newer ones)."""
    return metric in runs and bool(runs[metric].notna().any())


def configuration_table(at_lr: pd.DataFrame, reference: str, order: list[str],
                        axes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's Table 4: per configuration, the gate's statistics and each method's Δacc
    (methods in rank order). Returns (raw: the configuration key and its options `axes`; view: the
    display label of those options instead)."""
    base = at_lr.sort_values("method", key=lambda m: m != reference).groupby("configuration").first()
    table = base[[OPTION + a for a in axes] + ["n_total", "n_uncertain", "frac_uncertain", "acc_source"]].copy()
    for method in order:
        g = at_lr[at_lr["method"] == method].set_index("configuration")
        table[method] = [f"{g.at[c, 'delta_acc']:+.2f} ({int(g.at[c, 'n_fixed'])}/{int(g.at[c, 'n_broken'])})"
                         if c in g.index else "–" for c in table.index]
    data = table.reset_index()
    labels = configuration_labels(at_lr, axes)
    view = rounded(data.drop(columns=[OPTION + a for a in axes]))
    view["configuration"] = data["configuration"].map(labels)
    return data, view


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


def devices(runs: pd.DataFrame) -> list[str]:
    """The devices the runs ran on, most runs first, where there are several (else none)."""
    found = runs["device"].value_counts() if "device" in runs else pd.Series(dtype=int)
    return list(found.index) if len(found) > 1 else []


def headline_table(methods: pd.DataFrame, unit: str = "images") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The answer first: per method its rank, lr and how it was chosen, mean Δacc with its CI,
    wins/losses over configurations, Holm-adjusted p and cost. Returns (raw numbers, view)."""
    by_device = [c for c in methods if c.startswith("s/sample ")]
    extra = [c for c in ("note", *WHOLE, *SECONDS, *by_device, *SELECT) if c in methods]
    data = methods[["rank", "method", "lr", "lr chosen", "mean Δacc", "CI95 low", "CI95 high", "Δacc>0",
                    "Δacc<0", HEADLINE_P, "fwd/sample", "bwd/sample", *extra]].reset_index(drop=True)
    ci = [f" [{lo:+.2f}, {hi:+.2f}]" if np.isfinite([lo, hi]).all() else " [–]"
          for lo, hi in zip(data["CI95 low"], data["CI95 high"], strict=True)]
    notes = data["note"] if "note" in data else [""] * len(data)
    view = pd.DataFrame({
        "rank": ["–" if pd.isna(r) else str(r) for r in data["rank"]], "method": data["method"],
        "lr": ["–" if note == BASE_MODEL else f"{lr:.3g} ({how})"
               for lr, how, note in zip(data["lr"], data["lr chosen"], notes, strict=True)],
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
    for column, shown, fmt in (("Δacc all", f"Δacc all {unit}", "{:+.2f}"),
                               ("source acc all (%)", f"source acc, all {unit} (%)", "{:.2f}")):
        if column in data:
            view.insert(at, shown, ["–" if pd.isna(x) else fmt.format(x) for x in data[column]])
    if by_device:  # runs on several devices: each one's seconds, not their mixture
        view["s per scored sample"] = [" · ".join(f"{or_dash(row[c], 's/sample')} {c.removeprefix('s/sample ')}"
                                                  for c in by_device if pd.notna(row[c])) or "–"
                                       for _, row in data.iterrows()]
    elif "s/sample" in data:
        view["s per scored sample"] = [or_dash(x, "s/sample") for x in data["s/sample"]]
    if "select s/sample" in data:  # retrieval: of which choosing the data
        view["s per scored sample"] = [f"{total} (selection {or_dash(sel, 's/sample')})" if sel > 0 else total
                                       for total, sel in zip(view["s per scored sample"], data["select s/sample"],
                                                             strict=True)]
    return data, view


def selection_table(choices: pd.DataFrame, order: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Held-out selection per method family: the choice and its validation and test means, the
    oracle (the candidates run on every test configuration, ranked there) and the regret, and the
    oracle over every candidate on the test configurations they all ran on. Rows in the
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
        f"every candidate, {ORACLE} (test configs)": [
            "–" if n == 0 else f"{pick(v, lr)}: {_signed(m)} ({n:.0f})" for v, lr, m, n in zip(
                data["every-candidate oracle variant"], data["every-candidate oracle lr"],
                data["every-candidate oracle mean Δacc"], data["every-candidate configs"], strict=True)],
        "held-out there, regret": ["–" if n == 0 else f"{_signed(h)}, {_signed(r)}" for h, r, n in zip(
            data["every-candidate held-out mean Δacc"], data["every-candidate regret"],
            data["every-candidate configs"], strict=True)],
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
    view = pd.DataFrame({"method": grid.index, "chosen lr": [or_dash(chosen.get(m), "lr") for m in grid.index]})
    for lr in lrs:
        view[f"{lr:.3g}"] = [("–" if pd.isna(x) else f"{x:+.2f}")
                             + (CHOSEN if math.isclose(lr, chosen.get(m, -1.0), rel_tol=1e-9) else "")
                             for m, x in zip(grid.index, grid[lr], strict=True)]
    return data.reset_index(), view


def corruption_table(at_lr: pd.DataFrame, order: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Methods × corruption as CIFAR-10-C / ImageNet-C papers print it: the standard corruptions in
    their groups and order, then any other; the mean over the corrupted configurations only; clean
    (none) apart, after the mean. Returns (raw: full names; view: short headers, one decimal; the
    column groups in words)."""
    table = axis_table(at_lr[~clean(at_lr)], "corruption", order).set_index("method")
    if clean(at_lr).any():
        table[CLEAN] = axis_table(at_lr[clean(at_lr)], "corruption", order).set_index("method")[CLEAN]
    view = table.map(lambda x: or_dash(x, ".1f"))
    view = view.rename(columns={**SHORT, CLEAN: "clean"}).reset_index()
    names = [c for c in table.columns if c not in ("mean", CLEAN)]
    groups = {g: [short for name, short in members.items() if name in names]
              for g, members in CORRUPTION_GROUPS.items()}
    groups["other"] = [name for name in names if name not in SHORT]
    words = "; ".join(f"{g}: {' '.join(shorts)}" for g, shorts in groups.items() if shorts)
    return table.reset_index(), view, words
