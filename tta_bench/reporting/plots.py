"""Leaderboard figures (matplotlib, no display needed)."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FixedLocator, MaxNLocator, NullFormatter  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # tight: a legend outside the axes
    plt.close(fig)
    return path


def lr_plot(table: pd.DataFrame, path: Path, chosen: dict[str, float] | None = None) -> Path:
    """Mean Δacc and #configurations with Δacc > 0 vs learning rate (the paper's Figures 7/8);
    a star marks each method's chosen lr. A tick at every lr run, labelled at most ~10 of them."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8.5, 6), sharex=True)
    for i, (method, g) in enumerate(table.groupby("method")):
        style = ("-", "--", ":", "-.")[i // 10 % 4]  # the colour cycle has 10: more methods, another line style
        line, = top.plot(g["lr"], g["mean Δacc"], marker="o", ms=3, ls=style, label=method)
        bottom.plot(g["lr"], g["Δacc>0"], marker="o", ms=3, ls=style, color=line.get_color(), label=method)
        at = g[np.isclose(g["lr"], (chosen or {}).get(method, -1.0), rtol=1e-9)]
        top.plot(at["lr"], at["mean Δacc"], marker="*", ms=12, ls="", color=line.get_color())
    top.axhline(0, color="grey", lw=0.8)
    top.set(xscale="log", ylabel="mean Δacc (points)")
    if chosen:
        top.set_title("★ the lr each method is ranked at", fontsize=8)
    bottom.set(xscale="log", xlabel="learning rate", ylabel="#configurations Δacc > 0")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no half ticks
    lrs = sorted(table["lr"].unique())
    shown = lrs[::-(-len(lrs) // 10)]  # every k-th lr, k = ceil(n / 10)
    bottom.xaxis.set_minor_locator(FixedLocator(lrs))
    bottom.xaxis.set_minor_formatter(NullFormatter())
    bottom.set_xticks(shown, [_short(lr) for lr in shown], rotation=45, ha="right", rotation_mode="anchor")
    top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def _short(x: float) -> str:
    """A learning rate in few characters: 5e-6, 1.6e-4, 0.0013, 1.3."""
    text = f"{x:.2g}" if x >= 1e-3 else f"{x:.1e}".replace(".0e", "e")
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m[1].replace("+", "") + m[2], text)


def threshold_plot(table: pd.DataFrame, path: Path) -> Path:
    """Δacc and frac_uncertain vs the threshold d (the paper's Figure 6)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for method, g in table.groupby("method"):
        left.plot(g["threshold"], g["mean Δacc"], marker="o", label=method)
        right.plot(g["threshold"], g["frac_uncertain"], marker="o", label=method)
    left.set(xscale="log", xlabel="threshold d", ylabel="mean Δacc (points)")
    right.set(xscale="log", xlabel="threshold d", ylabel="fraction uncertain")
    ticks = sorted(table["threshold"].unique())
    for ax in (left, right):
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(ticks, [f"{d:g}" for d in ticks])
    left.legend(fontsize=8)
    return _save(fig, path)


def cd_diagram(ranks: pd.DataFrame, cd: float, path: Path) -> Path:
    """Critical-difference diagram (Demšar 2006): average ranks on an axis, methods whose ranks
    differ by less than the Nemenyi CD joined by a bar."""
    ranks = ranks.sort_values("average rank").reset_index(drop=True)
    k = len(ranks)
    r = ranks["average rank"].to_numpy()
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.3 * k))
    ax.set(xlim=(-1.6, k + 2.6), ylim=(-0.8 - 0.5 * k, 2.0))
    ax.axis("off")
    ax.hlines(0, 1, k, color="black")
    for i in range(1, k + 1):
        ax.vlines(i, 0, 0.15, color="black")
        ax.text(i, 0.3, str(i), ha="center", fontsize=8)
    ax.hlines(1.2, 1, 1 + cd, color="red", lw=2)
    ax.text(1 + cd / 2, 1.4, f"CD = {cd:.2f}", ha="center", fontsize=8, color="red")
    for i, (name, rank) in enumerate(zip(ranks["method"], r, strict=True)):
        y, left = -0.8 - 0.5 * i, rank <= (k + 1) / 2
        end = 0.8 if left else k + 0.2
        ax.plot([rank, rank, end], [0, y, y], color="black", lw=0.8)
        ax.text(end - 0.05 if left else end + 0.05, y, f"{name} ({rank:.2f})", va="center", fontsize=8,
                ha="right" if left else "left")
    for j, (a, b) in enumerate(cliques(r, cd)):
        ax.hlines(-0.2 - 0.12 * j, r[a] - 0.05, r[b] + 0.05, color="blue", lw=3)
    return _save(fig, path)


def cliques(ranks, cd: float) -> list[tuple[int, int]]:
    """Maximal groups (first, last index) of sorted average ranks that lie within CD."""
    starts, start = [], 0
    for end in range(len(ranks)):
        while ranks[end] - ranks[start] >= cd:
            start += 1
        starts.append(start)
    return [(s, e) for e, s in enumerate(starts)
            if e > s and (e == len(ranks) - 1 or starts[e + 1] > s)]
