"""Writing a table: its raw numbers as CSV, its rounded view with the caption as Markdown, HTML and
LaTeX (booktabs)."""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tabulate import tabulate

BPB_COLUMNS = ("bpb source", "bpb", "Δbpb %")  # bits per byte: three decimals
FORMATS = {"md": "github", "html": "html", "tex": "latex_booktabs"}


def fmt(column: str, x: float) -> str:
    if column.startswith("p ") or column in ("lr", "threshold", "s/sample") or column.endswith(" lr"):
        return f"{x:.3g}"
    if column == "frac_uncertain":
        return f"{x:.3f}"
    if column.startswith(("n_", "Δacc>", "Δacc<", "configs")):
        return f"{x:.0f}"
    if column in BPB_COLUMNS:
        return f"{x:.3f}"
    return f"{x:.2f}"


def or_dash(x: float | None, column: str) -> str:
    """x formatted for its column (or by a format spec such as ".1f"), – where there is none."""
    if x is None or pd.isna(x):
        return "–"
    return format(x, column) if column.startswith(".") else fmt(column, x)


def rounded(data: pd.DataFrame) -> pd.DataFrame:
    """The raw numbers rounded for their columns, as text."""
    shown = data.copy()
    for col in shown.columns:
        if shown[col].dtype.kind == "f":
            shown[col] = [or_dash(x, col) for x in shown[col]]
    return shown.astype(str)


@dataclass
class Table:
    """One published table: raw numbers (its CSV), caption, and the rendered view (default: the
    raw numbers rounded)."""

    data: pd.DataFrame
    caption: str
    shown: pd.DataFrame | None = None

    def view(self) -> pd.DataFrame:
        return rounded(self.data) if self.shown is None else self.shown


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
