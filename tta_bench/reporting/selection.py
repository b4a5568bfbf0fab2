"""Choosing hyperparameters: per task, the learning rate of each method's row (the default, the
best on test, or a fixed one), or under held-out selection each family's (variant, lr), chosen on
the validation configurations (never scored) and scored on the test configurations."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from tta_bench.core.errors import TTAError
from tta_bench.reporting.runs import families, not_adapting, split_validation
from tta_bench.reporting.tables import FIXED, NOOP_EVERYWHERE, ORACLE, changed_predictions

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
    fixed: set[str] = field(default_factory=set)  # held-out selection: variants with nothing to tune


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
    oracle: the same candidates ranked on the test configurations, for the regret only. A family
    with no validation run and one (variant, lr) on the test configurations tunes nothing (the base
    model `none`, a method run at its paper's setting): it is fixed in advance, scored as it is."""
    fam = families(pd.concat([test, val]))
    on_val, on_test, per_test = _per_variant(val), _per_variant(test), _per_configuration(test)
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
                     "regret": oracle_mean - test_mean, **_every_candidate(per_test, c.index, (variant, lr)),
                     "note": NOOP_EVERYWHERE if noop else ""})
        if math.isnan(test_mean):
            no_test.append(f"{family} ({variant} @ {lr:g})")
        else:
            lrs[variant] = lr
            if noop:
                everywhere.add(variant)
    chosen_families = {r["family"] for r in rows}
    fixed = _fixed(on_test, fam, chosen_families | {fam[m] for m in val["method"].unique()})
    for family, (variant, lr) in fixed.items():
        lrs[variant] = lr
        test_mean = on_test.at[(variant, lr), "mean"]
        rows.append({"family": family, "held-out variant": variant, "held-out lr": lr, "validation configs": 0,
                     "validation mean Δacc": math.nan, "test configs": on_test.at[(variant, lr), "configs"],
                     "test mean Δacc": test_mean, "oracle variant": variant, "oracle lr": lr,
                     "oracle test mean Δacc": test_mean, "regret": 0.0,
                     **_every_candidate(per_test, pd.Index([(variant, lr)]), (variant, lr)), "note": FIXED})
    chosen_families |= set(fixed)
    base = not_adapting(test)  # the base model: a row in the headline, nothing chosen for the selection table
    rows = [r for r in rows if r["held-out variant"] not in base]
    left = sorted({f for f in fam.values() if f not in chosen_families})
    left_out = ([f"no (variant, lr) run on every validation configuration: {', '.join(left)}"] if left else []) + (
        [f"held-out choice without test runs: {', '.join(no_test)}"] if no_test else [])
    return Choice(lrs, left_out, validation, pd.DataFrame(rows), everywhere, {v for v, _ in fixed.values()})


def _fixed(on_test: pd.DataFrame, fam: dict[str, str], tuned: set[str]) -> dict[str, tuple[str, float]]:
    """family -> its one (variant, lr), for the families outside `tuned` (those with validation runs)
    that have exactly one (variant, lr) with scored test runs."""
    scored = on_test.dropna(subset=["mean"])
    by_family = scored.groupby(scored.index.get_level_values("method").map(fam))
    return {family: t.index[0] for family, t in by_family if family not in tuned and len(t) == 1}


def incomplete_configurations(at_lr: pd.DataFrame, chosen: dict[str, float]) -> dict[str, str]:
    """Configuration -> the ranked methods without a run at their lr on it (a partly finished sweep)."""
    have = at_lr.groupby("configuration")["method"].agg(set)
    return {c: ", ".join(sorted(set(chosen) - ms)) for c, ms in have.items() if set(chosen) - ms}


def _per_configuration(runs: pd.DataFrame) -> pd.Series:
    """Mean Δacc per (method, lr, configuration), over the scored runs."""
    runs = runs[np.isfinite(runs["delta_acc"])]
    return runs.groupby(["method", "lr", "configuration"])["delta_acc"].mean()


def _every_candidate(per: pd.Series, candidates: pd.Index, chosen: tuple[str, float]) -> dict:
    """The oracle over every candidate of a family (each (variant, lr) run on every validation
    configuration), on the test configurations where each of them has a scored run (per: the test
    runs' _per_configuration), and the held-out choice's mean and regret on the same ones: exact
    over the candidates, on fewer configurations while some candidates ran on only part of them."""
    ran = set(per.index.droplevel("configuration"))
    configs = [set(per.loc[k].index) if k in ran else set() for k in candidates]
    common = sorted(set.intersection(*configs)) if configs else []
    if not common:
        return {"every-candidate configs": 0, "every-candidate oracle variant": None,
                "every-candidate oracle lr": math.nan, "every-candidate oracle mean Δacc": math.nan,
                "every-candidate held-out mean Δacc": math.nan, "every-candidate regret": math.nan}
    means = pd.DataFrame({"mean": [per.loc[k].loc[common].mean() for k in candidates]}, index=candidates)
    oracle = _argmax(means)
    return {"every-candidate configs": len(common), "every-candidate oracle variant": oracle[0],
            "every-candidate oracle lr": oracle[1], "every-candidate oracle mean Δacc": means.at[oracle, "mean"],
            "every-candidate held-out mean Δacc": means.at[chosen, "mean"],
            "every-candidate regret": means.at[oracle, "mean"] - means.at[chosen, "mean"]}


def _per_variant(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (method, lr): #configurations, mean Δacc and #predictions changed, over the scored runs."""
    runs = runs[np.isfinite(runs["delta_acc"])]
    g = runs.assign(changed=changed_predictions(runs)).groupby(["method", "lr"])
    return g.agg(configs=("configuration", "nunique"), mean=("delta_acc", "mean"),
                 changed=("changed", lambda n: n.sum(min_count=1)))  # NaN: not recorded


def _argmax(means: pd.DataFrame) -> tuple[str, float]:
    """The (method, lr) of the highest mean (to 1e-9 points); ties: the smallest lr, then the label."""
    return min(means.index, key=lambda k: (-round(float(means.at[k, "mean"]), 9), k[1], k[0]))


def task_selection(selection: Selection, runs: pd.DataFrame) -> Selection:
    """The rule for one task: under heldout, a task without validation configurations falls back to
    the default rule, and every caption of it says so."""
    if selection.mode == "heldout" and split_validation(runs)[1].empty:
        return Selection("default", fallback=True)
    return selection


def check_validation(at_d: pd.DataFrame, threshold: float | None) -> None:
    """Held-out selection needs validation configurations in at least one task (the others fall back)."""
    if split_validation(at_d)[1].empty:
        raise TTAError(f"--select heldout: no task has validation configurations (subset=val) at "
                       f"d = {threshold_text(threshold)} (tasks: {distinct_text(at_d['task'])}); run configurations "
                       f"with subset=val too, or pass --select default or --select best")


def threshold_text(threshold: float | None) -> str:
    return "none (no gate)" if threshold is None or math.isnan(threshold) else f"{threshold:g}"


def distinct_text(values: pd.Series) -> str:
    """The distinct values, sorted, for a message (thresholds: NaN is a run without a gate)."""
    distinct = values.drop_duplicates()
    if distinct.dtype.kind == "f":
        return ", ".join(threshold_text(x) for x in sorted(distinct, key=lambda x: (math.isnan(x), x)))
    return ", ".join(sorted(map(str, distinct)))
