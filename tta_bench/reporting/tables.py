"""The leaderboard's tables (docs/DESIGN.md §5), built from the runs at each method's chosen learning
rate: the headline, every statistic per method, methods × configurations / learning rates /
task options, thresholds and the Friedman ranks; each written as CSV (raw numbers), Markdown,
HTML and LaTeX."""
from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from tta_bench.core import stats

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
SELECT = {"select s/sample": "select_seconds_per_sample"}  # of s/sample; only where a method selects data
NOOP = "no-op: changed no prediction"
NOOP_EVERYWHERE = "no-op at every setting tried"  # held-out selection: every candidate, on validation too
FIXED = "not tuned"  # held-out selection: no validation runs and one (variant, lr): nothing to choose
BASE_MODEL = "the base model, not adapted (the reference)"  # the method `none`, and any that does not adapt
ORACLE = "best on test ⚠"
MIN_CI = 5  # fewer configurations: a BCa bootstrap CI of the mean is degenerate; shown as –
TOO_FEW_CI = f"–: too few configurations for a bootstrap CI (n < {MIN_CI})"
# CIFAR-10-C / ImageNet-C (Hendrycks & Dietterich 2019): the 15 standard corruptions in their groups
# and order, then the 4 extra; each with its short header in the per-corruption tables
CORRUPTION_GROUPS = {
    "noise": {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul"},
    "blur": {"defocus_blur": "defoc", "glass_blur": "glass", "motion_blur": "motn", "zoom_blur": "zoom"},
    "weather": {"snow": "snow", "frost": "frost", "fog": "fog", "brightness": "brit"},
    "digital": {"contrast": "contr", "elastic_transform": "elast", "pixelate": "pixel", "jpeg_compression": "jpeg"},
    "extra": {"speckle_noise": "speck", "gaussian_blur": "gblur", "spatter": "spatt", "saturate": "satur"}}
SHORT = {name: short for group in CORRUPTION_GROUPS.values() for name, short in group.items()}
STANDARD = [name for group in ("noise", "blur", "weather", "digital") for name in CORRUPTION_GROUPS[group]]
CLEAN = "none"  # corruption=none: the clean data, no severity
FIRST_AXES = ("model", "corruption", "severity")  # in labels and tables these options come first, in this order
# the task descriptions: what a configuration's samples are, and the corruption benchmark's name
UNITS = {"cifar10": "images", "imagenet": "images", "text": "windows", "mc": "questions"}
BENCHMARKS = {"cifar10": "CIFAR-10-C", "imagenet": "ImageNet-C"}
PLURALS = {"corpus": "corpora", "severity": "severities"}


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
    everywhere: those whose every setting tried was a no-op too (held-out selection); the base
    model (a method that does not adapt) is named as the reference."""
    changed = changed_predictions(at_lr).groupby(at_lr["method"]).sum(min_count=1)
    base = not_adapting(at_lr)
    return {m: BASE_MODEL if m in base else NOOP_EVERYWHERE if m in everywhere else NOOP
            for m, n in changed.items() if n == 0 or m in base}


def not_adapting(runs: pd.DataFrame) -> set[str]:
    """The method labels whose registered class does not adapt (`none`, the source model)."""
    from tta_bench.core.errors import TTAError
    from tta_bench.core.registry import method_class

    def adapts(name: str) -> bool:
        try:
            return method_class(name).adapts
        except TTAError:  # an unknown plugin: assume it adapts
            return True
    names = runs.drop_duplicates("method").set_index("method")["method_name"]
    return {label for label, name in names.items() if not adapts(name)}


def method_table(at_lr: pd.DataFrame, chosen: dict[str, float], how: str, reference: str,
                 noops: dict[str, str] | None = None, fixed: set[str] = frozenset()) -> pd.DataFrame:
    """The paper's Table 2/5: each method against the source model and against the reference.
    noops: method -> words; left out of the Holm family (their adjusted p-values are NaN);
    fixed: methods with nothing to tune (their lr is `FIXED`, not `how`)."""
    noops = noops or {}
    deltas = at_lr.pivot_table(index="configuration", columns="method", values="delta_acc")
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
    table = table.drop(columns="base").reset_index(drop=True)
    table.insert(0, "rank", pd.array([i + 1 if not b else pd.NA for i, b in enumerate(sorted(base))], dtype="Int64"))
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
    view = _rounded(data.drop(columns=[OPTION + a for a in axes]))
    view["configuration"] = data["configuration"].map(labels)
    return data, view


def configuration_labels(runs: pd.DataFrame, axes: list[str]) -> dict[str, str]:
    """configuration key -> display label `model=…, corruption=…, severity=…`: every option in `axes`
    (option_axes: those that vary, never subset), default values too; the key where none varies."""
    configs = runs.drop_duplicates("configuration").set_index("configuration")
    return {c: ", ".join(f"{a}={'–' if pd.isna(row[OPTION + a]) else row[OPTION + a]}" for a in axes) or c
            for c, row in configs.iterrows()}


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


def headline_table(methods: pd.DataFrame, unit: str = "images") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The answer first: per method its rank, lr and how it was chosen, mean Δacc with its CI,
    wins/losses over configurations, Holm-adjusted p and cost. Returns (raw numbers, view)."""
    extra = [c for c in ("note", *WHOLE, *SECONDS, *SELECT) if c in methods]
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
    if "s/sample" in data:
        view["s per scored sample"] = [_or_dash(x, "s/sample") for x in data["s/sample"]]
    if "select s/sample" in data:  # retrieval: of which choosing the data
        view["s per scored sample"] = [f"{total} (selection {_or_dash(sel, 's/sample')})" if sel > 0 else total
                                       for total, sel in zip(view["s per scored sample"], data["select s/sample"],
                                                             strict=True)]
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


def option_axes(runs: pd.DataFrame) -> list[str]:
    """The task options that vary over the configurations (corruption, model, corpus, …): model,
    corruption and severity first, then the others by name; subset never (scored ones are all test);
    severity only where it varies over the corrupted configurations (the clean data has none)."""
    configs = runs.drop_duplicates("configuration")
    shifted = configs[~clean(configs)]
    axes = [c.removeprefix(OPTION) for c in configs.columns if c.startswith(OPTION) and c != SUBSET
            and (shifted if c == OPTION + "severity" else configs)[c].astype(str).nunique() > 1]
    return sorted(axes, key=lambda a: (FIRST_AXES.index(a) if a in FIRST_AXES else len(FIRST_AXES), a))


def axis_table(at_lr: pd.DataFrame, axis: str, order: list[str]) -> pd.DataFrame:
    """Methods × the values of one task option (the per-model / per-shift views of TTA papers):
    mean Δacc over the configurations with that value, and over all of them."""
    values = at_lr[OPTION + axis].astype(str)
    table = at_lr.assign(value=values).pivot_table(index="method", columns="value", values="delta_acc", aggfunc="mean")
    table = table[sorted(table.columns, key=lambda v: _order(axis, v))].reindex(order)
    table.columns = list(table.columns)
    table["mean"] = at_lr.groupby("method")["delta_acc"].mean().reindex(order)
    return table.rename_axis("method").reset_index()


def clean(runs: pd.DataFrame) -> pd.Series:
    """Per run, whether its configuration is the clean data (corruption=none)."""
    column = runs.get(OPTION + "corruption", pd.Series(None, index=runs.index, dtype=object))
    return column.astype(str).eq(CLEAN)


def corruption_table(at_lr: pd.DataFrame, order: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Methods × corruption as CIFAR-10-C / ImageNet-C papers print it: the standard corruptions in
    their groups and order, then any other; the mean over the corrupted configurations only; clean
    (none) apart, after the mean. Returns (raw: full names; view: short headers, one decimal; the
    column groups in words)."""
    table = axis_table(at_lr[~clean(at_lr)], "corruption", order).set_index("method")
    if clean(at_lr).any():
        table[CLEAN] = axis_table(at_lr[clean(at_lr)], "corruption", order).set_index("method")[CLEAN]
    view = table.map(lambda x: _or_dash(x, ".1f"))
    view = view.rename(columns={**SHORT, CLEAN: "clean"}).reset_index()
    names = [c for c in table.columns if c not in ("mean", CLEAN)]
    groups = {g: [short for name, short in members.items() if name in names]
              for g, members in CORRUPTION_GROUPS.items()}
    groups["other"] = [name for name in names if name not in SHORT]
    words = "; ".join(f"{g}: {' '.join(shorts)}" for g, shorts in groups.items() if shorts)
    return table.reset_index(), view, words


def at_severity(at_lr: pd.DataFrame, level: str, axis: str) -> pd.DataFrame:
    """The corrupted configurations at one severity; for the per-corruption table also the clean
    configurations of the same models (its clean column: clean data has no severity)."""
    part = at_lr[~clean(at_lr) & at_lr[OPTION + "severity"].astype(str).eq(level)]
    if axis != "corruption":
        return part
    same = at_lr[OPTION + "model"].isin(part[OPTION + "model"]) if OPTION + "model" in at_lr else True
    return pd.concat([part, at_lr[clean(at_lr) & same]])


def every_severity(at_lr: pd.DataFrame, axes: list[str]) -> tuple[pd.DataFrame, str]:
    """The corrupted configurations whose other options (model, corruption, …) were run at every
    severity there is, to compare severities like with like; and those options' values in words."""
    part, others = at_lr[~clean(at_lr)], [a for a in axes if a != "severity"]
    if not others:
        return part, ""
    severity = part[OPTION + "severity"].astype(str)
    part = part[severity.groupby([part[OPTION + a].astype(str) for a in others]).transform("nunique")
                .eq(severity.nunique())]
    values = {a: sorted(part[OPTION + a].astype(str).unique(), key=lambda v: _order(a, v)) for a in others}
    words = "; ".join(f"{a} ({len(v)}): {', '.join(v)}" for a, v in values.items())
    n = len(part.drop_duplicates([OPTION + a for a in others]))
    return part, f"the {n} ({', '.join(others)}) combinations run at every severity: {words}"


def describe(task: str, at_lr: pd.DataFrame, validation: int) -> str:
    """One line on what a task's tables cover, from its scored runs: the models, corruptions (or
    corpora, datasets, …) and severities, samples per configuration, validation configurations."""
    configs = at_lr.drop_duplicates("configuration")

    def values(axis: str) -> list[str]:
        column = configs.get(OPTION + axis, pd.Series(dtype=object)).dropna().astype(str)
        return sorted(column.unique(), key=lambda v: _order(axis, v))

    parts = [_compact(values("model"))] if values("model") else []
    if corruptions := values("corruption"):
        shifted = [c for c in corruptions if c != CLEAN]
        standard = [c for c in shifted if c in STANDARD]
        named = f"{BENCHMARKS[task]} " if task in BENCHMARKS else ""
        words = (["clean"] if CLEAN in corruptions else []) + (
            [f"the {len(STANDARD)} standard {named}corruptions"] if len(standard) == len(STANDARD) else
            [f"{len(standard)} of the {len(STANDARD)} standard {named}corruptions ({_which(standard, STANDARD)})"]
            if standard else []) + ([f"{len(other)} other ({', '.join(other)})"]
                                    if (other := [c for c in shifted if c not in STANDARD]) else [])
        severity = configs[~clean(configs)].get(OPTION + "severity", pd.Series(dtype=object))  # clean: none
        levels = sorted(severity.dropna().astype(str).unique(), key=_natural)
        parts.append(" + ".join(words) + (f" at severit{'ies' if len(levels) > 1 else 'y'} {', '.join(levels)}"
                                          if levels else ""))
    for axis in option_axes(at_lr):
        if axis not in FIRST_AXES:
            parts.append(f"{len(values(axis))} {PLURALS.get(axis, axis + 's')} ({', '.join(values(axis))})")
    n = configs["n_total"].dropna()
    size = f"{n.min():.0f}" if n.nunique() == 1 else f"{n.min():.0f}–{n.max():.0f}"
    return (f"{task}: {' × '.join(parts) or f'{len(configs)} configuration(s)'}"
            + (f"; {size} {UNITS.get(task, 'samples')} per configuration" if len(n) else "")
            + (f"; {validation} validation configuration{'s' * (validation != 1)} (held out)" if validation else ""))


def _which(some: list[str], every: list[str]) -> str:
    """Which of `every` are in `some`, in the fewer words: the ones in it, or those without."""
    missing = [x for x in every if x not in some]
    return ", ".join(some) if len(some) <= len(missing) else f"without {', '.join(missing)}"


def _compact(names: list[str]) -> str:
    """Names that differ in a numeric suffix, compactly: efficientnet-lite0/1/2."""
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    while prefix and not (prefix[-1] in "-_./" or all(n[len(prefix):][:1].isdigit() for n in names)):
        prefix = prefix[:-1]
    return prefix + "/".join(n[len(prefix):] for n in names)


def _order(axis: str, value: str) -> tuple:
    """Sort key of an option's values: corruptions in the standard order, then the others by name."""
    if axis == "corruption" and value != CLEAN:
        return 1, list(SHORT).index(value) if value in SHORT else len(SHORT), value
    return _natural(value)


def _natural(value: str) -> tuple:
    """Numbers in numeric order, then names; `none` (no shift: the clean data) first of all."""
    if value == "none":
        return -1, 0.0, value
    try:
        return 0, float(value), value
    except ValueError:
        return 1, 0.0, value


def _or_dash(x: float | None, column: str) -> str:
    """x formatted for its column (or by a format spec such as ".1f"), – where there is none."""
    if x is None or pd.isna(x):
        return "–"
    return format(x, column) if column.startswith(".") else _fmt(column, x)


def _rounded(data: pd.DataFrame) -> pd.DataFrame:
    """The raw numbers rounded for their columns, as text."""
    shown = data.copy()
    for col in shown.columns:
        if shown[col].dtype.kind == "f":
            shown[col] = [_or_dash(x, col) for x in shown[col]]
    return shown.astype(str)


@dataclass
class Table:
    """One published table: raw numbers (its CSV), caption, and the rendered view (default: the
    raw numbers rounded)."""

    data: pd.DataFrame
    caption: str
    shown: pd.DataFrame | None = None

    def view(self) -> pd.DataFrame:
        return _rounded(self.data) if self.shown is None else self.shown


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


