"""Leaderboard figures (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def lr_plot(table: pd.DataFrame, path: Path) -> Path:
    """Mean Δacc and #configurations with Δacc > 0 vs learning rate (the paper's Figures 7/8)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for method, g in table.groupby("method"):
        top.plot(g["lr"], g["mean Δacc"], marker="o", ms=3, label=method)
        bottom.plot(g["lr"], g["Δacc>0"], marker="o", ms=3, label=method)
    top.axhline(0, color="grey", lw=0.8)
    top.set(xscale="log", ylabel="mean Δacc (points)")
    bottom.set(xscale="log", xlabel="learning rate", ylabel="#configurations Δacc > 0")
    top.legend(fontsize=8)
    return _save(fig, path)


def threshold_plot(table: pd.DataFrame, path: Path) -> Path:
    """Δacc and frac_uncertain vs the threshold d (the paper's Figure 6)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for method, g in table.groupby("method"):
        left.plot(g["threshold"], g["mean Δacc"], marker="o", label=method)
        right.plot(g["threshold"], g["frac_uncertain"], marker="o", label=method)
    left.set(xscale="log", xlabel="threshold d", ylabel="mean Δacc (points)")
    right.set(xscale="log", xlabel="threshold d", ylabel="fraction uncertain")
    left.legend(fontsize=8)
    return _save(fig, path)


def cd_diagram(ranks: pd.DataFrame, cd: float, path: Path) -> Path:
    """Critical-difference diagram (Demšar 2006): average ranks on an axis, methods whose ranks
    differ by less than the Nemenyi CD joined by a bar."""
    ranks = ranks.sort_values("average rank").reset_index(drop=True)
    k = len(ranks)
    r = ranks["average rank"].to_numpy()
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.3 * k))
    ax.set(xlim=(0.5, k + 0.5), ylim=(-k - 1, 2.2))
    ax.axis("off")
    ax.hlines(0, 1, k, color="black")
    for i in range(1, k + 1):
        ax.vlines(i, 0, 0.15, color="black")
        ax.text(i, 0.3, str(i), ha="center", fontsize=8)
    ax.hlines(1.4, 1, 1 + cd, color="red", lw=2)
    ax.text(1 + cd / 2, 1.6, f"CD = {cd:.2f}", ha="center", fontsize=8, color="red")
    for i, (name, rank) in enumerate(zip(ranks["method"], r)):
        y = -0.6 - 0.5 * i
        ax.plot([rank, rank, 0.6 if rank <= (k + 1) / 2 else k + 0.4], [0, y, y], color="black", lw=0.8)
        left = rank <= (k + 1) / 2
        ax.text(0.55 if left else k + 0.45, y, f"{name} ({rank:.2f})", va="center", fontsize=8,
                ha="left" if left else "right")
    for j, (a, b) in enumerate(cliques(r, cd)):
        ax.hlines(-0.25 - 0.12 * j, r[a] - 0.03, r[b] + 0.03, color="blue", lw=3)
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
