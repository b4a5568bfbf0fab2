"""What a task's configurations are: the task options that vary over them (model, corruption,
severity, corpus, …), their display labels and sort order, the per-option views of TTA papers, the
CIFAR-10-C / ImageNet-C corruption groups, and a one-line description of a task's scored runs."""
from __future__ import annotations

import os

import pandas as pd

OPTION = "option."  # column prefix of the task options (corruption, model, corpus, …) in the runs
SUBSET = OPTION + "subset"  # test (scored) or val (held out: used only to choose hyperparameters)
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


def option_axes(runs: pd.DataFrame) -> list[str]:
    """The task options that vary over the configurations (corruption, model, corpus, …): model,
    corruption and severity first, then the others by name; subset never (scored ones are all test);
    severity only where it varies over the corrupted configurations (the clean data has none)."""
    configs = runs.drop_duplicates("configuration")
    shifted = configs[~clean(configs)]
    axes = [c.removeprefix(OPTION) for c in configs.columns if c.startswith(OPTION) and c != SUBSET
            and (shifted if c == OPTION + "severity" else configs)[c].astype(str).nunique() > 1]
    return sorted(axes, key=lambda a: (FIRST_AXES.index(a) if a in FIRST_AXES else len(FIRST_AXES), a))


def configuration_labels(runs: pd.DataFrame, axes: list[str]) -> dict[str, str]:
    """configuration key -> display label `model=…, corruption=…, severity=…`: every option in `axes`
    (option_axes: those that vary, never subset), default values too; the key where none varies."""
    configs = runs.drop_duplicates("configuration").set_index("configuration")
    return {c: ", ".join(f"{a}={'–' if pd.isna(row[OPTION + a]) else row[OPTION + a]}" for a in axes) or c
            for c, row in configs.iterrows()}


def axis_table(at_lr: pd.DataFrame, axis: str, order: list[str]) -> pd.DataFrame:
    """Methods × the values of one task option (the per-model / per-shift views of TTA papers):
    mean Δacc over the configurations with that value, and over all of them."""
    values = at_lr[OPTION + axis].astype(str)
    table = at_lr.assign(value=values).pivot_table(index="method", columns="value", values="delta_acc", aggfunc="mean")
    table = table[sorted(table.columns, key=lambda v: value_order(axis, v))].reindex(order)
    table.columns = list(table.columns)
    table["mean"] = at_lr.groupby("method")["delta_acc"].mean().reindex(order)
    return table.rename_axis("method").reset_index()


def clean(runs: pd.DataFrame) -> pd.Series:
    """Per run, whether its configuration is the clean data (corruption=none)."""
    column = runs.get(OPTION + "corruption", pd.Series(None, index=runs.index, dtype=object))
    return column.astype(str).eq(CLEAN)


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
    values = {a: sorted(part[OPTION + a].astype(str).unique(), key=lambda v: value_order(a, v)) for a in others}
    words = "; ".join(f"{a} ({len(v)}): {', '.join(v)}" for a, v in values.items())
    n = len(part.drop_duplicates([OPTION + a for a in others]))
    return part, f"the {n} ({', '.join(others)}) combinations run at every severity: {words}"


def describe(task: str, at_lr: pd.DataFrame, validation: int) -> str:
    """One line on what a task's tables cover, from its scored runs: the models, corruptions (or
    corpora, datasets, …) and severities, samples per configuration, validation configurations."""
    configs = at_lr.drop_duplicates("configuration")

    def values(axis: str) -> list[str]:
        column = configs.get(OPTION + axis, pd.Series(dtype=object)).dropna().astype(str)
        return sorted(column.unique(), key=lambda v: value_order(axis, v))

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
        levels = sorted(severity.dropna().astype(str).unique(), key=natural)
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


def value_order(axis: str, value: str) -> tuple:
    """Sort key of an option's values: corruptions in the standard order, then the others by name."""
    if axis == "corruption" and value != CLEAN:
        return 1, list(SHORT).index(value) if value in SHORT else len(SHORT), value
    return natural(value)


def natural(value: str) -> tuple:
    """Numbers in numeric order, then names; `none` (no shift: the clean data) first of all."""
    if value == "none":
        return -1, 0.0, value
    try:
        return 0, float(value), value
    except ValueError:
        return 1, 0.0, value
