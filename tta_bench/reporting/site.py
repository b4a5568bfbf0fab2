"""The leaderboard as a static site: `index.html` (one section per task: the headline table and
its provenance) and one page per task (every table, sortable; the figures embedded; provenance;
each table's CSV). Plain HTML with a few lines of inline CSS and JavaScript and nothing fetched
from the network: it opens from the file system and from any static host (e.g. GitHub Pages)."""
from __future__ import annotations

import base64
import re
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from tta_bench.reporting.output import Table
from tta_bench.reporting.tables import CHOSEN

if TYPE_CHECKING:
    from tta_bench.reporting.report import TaskReport

TITLES = {"headline": "Headline", "selection": "Held-out selection, oracle and regret",
          "configurations": "Per configuration", "learning_rates": "Methods × learning rates",
          "friedman": "Friedman test and critical difference", "thresholds": "Threshold d",
          "methods": "Every statistic", "learning_rates_detail": "Per learning rate, every statistic"}
FOLDED = {"learning_rates_detail"}  # long: shown on request

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:76rem;
 padding:0 1rem;color:#1f2328}
h1,h2,h3{line-height:1.2} section{margin-bottom:2.5rem} .scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.4rem 0 .3rem;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;white-space:nowrap}
table.sortable th{cursor:pointer;background:#f6f8fa;user-select:none}
th[aria-sort=ascending]::after{content:" ▲"} th[aria-sort=descending]::after{content:" ▼"}
.caption{color:#59636e;font-size:.85rem;margin:0 0 .4rem;max-width:60rem} .description{font-weight:500}
td.chosen{font-weight:600;background:#fff8c5} .note{color:#9a6700}
table.provenance th{font-weight:600;background:none} table.provenance td{white-space:normal}
img{max-width:100%;height:auto} summary{cursor:pointer;color:#0969da}
"""

# Click (or Enter on) a column header: sort its rows, ascending first, again to reverse. A column
# whose cells mostly start with a number sorts by that number ("+19.07 [+16.23, +22.02]", "0.02
# (default)"); wins/losses ("37/1") by wins − losses, then wins; cells without a number ("–", words)
# always last. Other columns: as text, digits by value. SORT_KEYS is pure (tests run it in node).
SORT_KEYS = """
const key = t => {
  const wl = /^(\\d+)\\/(\\d+)$/.exec(t);
  if (wl) return [wl[1] - wl[2], +wl[1]];
  const n = /^[+\\-\u2212]?(\\d+\\.?\\d*|\\.\\d+)(e[+\\-]?\\d+)?/i.exec(t);
  return n ? [parseFloat(n[0].replace("\u2212", "-")), 0] : null;
};
function sortTexts(items, text, dir) {
  const keys = new Map(items.map(r => [r, key(text(r))]));
  const valued = items.filter(r => text(r) !== "–"), numbers = valued.filter(r => keys.get(r) !== null);
  const numeric = numbers.length > 0 && 2 * numbers.length >= valued.length;
  const last = r => text(r) === "–" || (numeric && keys.get(r) === null);
  return items.slice().sort((a, b) => {
    if (last(a) || last(b)) return last(a) - last(b);
    const [x, y] = [keys.get(a), keys.get(b)];
    return dir * (numeric ? x[0] - y[0] || x[1] - y[1] : text(a).localeCompare(text(b), undefined, {numeric: true}));
  });
}
"""
SORT = SORT_KEYS + """
function sortTable(table, col) {
  const head = table.tHead.rows[0].cells, th = head[col];
  const dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
  for (const h of head) h.removeAttribute("aria-sort");
  th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
  const rows = Array.from(table.tBodies[0].rows);
  table.tBodies[0].append(...sortTexts(rows, r => r.cells[col].textContent.trim(), dir));
}
for (const table of document.querySelectorAll("table.sortable"))
  Array.from(table.tHead.rows[0].cells).forEach((th, i) => {
    th.tabIndex = 0;
    th.title = "sort by this column";
    th.addEventListener("click", () => sortTable(table, i));
    th.addEventListener("keydown", e => { if (e.key === "Enter") sortTable(table, i); });
  });
"""


def write_site(folder: Path, summary: str, reports: list[TaskReport]) -> list[Path]:
    """Write index.html, one page per task and the tables' CSVs into `folder`; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sections = []
    for r in reports:
        slug = _slug(r.task)
        body = _description(r) + "".join(f'<p class="note">{escape(n)}</p>' for n in r.notes)
        if r.tables:
            written += _task_page(folder, slug, r)
            body += "".join(_table(f"{slug}-{name}", r.tables[name]) for name in ("headline", "selection")
                            if name in r.tables)  # the answer, and how its settings were chosen
            body += (_provenance(r.provenance)
                     + f'<p><a href="{slug}.html">All tables and figures for {escape(r.task)} →</a></p>')
        sections.append(f'<section id="{slug}"><h2>{escape(r.task)}</h2>{body}</section>')
    index = folder / "index.html"
    index.write_text(_page("tta-bench leaderboard", f"<h1>tta-bench leaderboard</h1><p>{_text(summary)}</p>"
                                                    + "".join(sections)))
    return [*written, index]


def _task_page(folder: Path, slug: str, r: TaskReport) -> list[Path]:
    (folder / slug).mkdir(exist_ok=True)
    written, parts = [], []
    for name, table in r.tables.items():
        csv = folder / slug / f"{name}.csv"
        table.data.to_csv(csv, index=False)
        written.append(csv)
        title, body = _title(name), _table(f"{slug}-{name}", table)
        if name in FOLDED:
            body = f"<details><summary>{len(table.data)} rows</summary>{body}</details>"
        parts.append(f'<section id="{escape(name)}"><h2>{escape(title)}</h2>{body}'
                     f'<p><a href="{slug}/{escape(name)}.csv">{escape(name)}.csv</a> (raw numbers)</p>')
        if name in r.plots:
            png = base64.b64encode(r.plots[name].read_bytes()).decode()
            parts.append(f'<figure><img src="data:image/png;base64,{png}" alt="{escape(title)} figure"></figure>')
        parts.append("</section>")
    contents = "".join(f'<li><a href="#{escape(name)}">{escape(_title(name))}</a></li>' for name in r.tables)
    page = folder / f"{slug}.html"
    page.write_text(_page(f"{r.task} · tta-bench leaderboard",
                          f'<p><a href="index.html">← all tasks</a></p><h1>{escape(r.task)}</h1>'
                          f"{_description(r)}{_provenance(r.provenance)}<ul>{contents}</ul>{''.join(parts)}"))
    return [*written, page]


def _table(table_id: str, table: Table) -> str:
    view = table.view()
    head = "".join(f'<th scope="col">{escape(str(c))}</th>' for c in view.columns)
    rows = "".join("<tr>" + "".join(_cell(str(v)) for v in row) + "</tr>" for row in view.itertuples(index=False))
    return (f'<div class="scroll"><table class="sortable" id="{escape(table_id)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{rows}</tbody></table></div><p class="caption">{escape(table.caption)}</p>')


def _cell(text: str) -> str:
    return f'<td{" class=chosen" if text.endswith(CHOSEN) else ""}>{escape(text)}</td>'


def _description(r: TaskReport) -> str:
    """The task's one-line description (models, shifts, samples per configuration), if any."""
    return f'<p class="description">{escape(r.description)}</p>' if r.description else ""


def _provenance(fields: dict[str, str]) -> str:
    rows = "".join(f'<tr><th scope="row">{escape(k)}</th><td>{escape(v)}</td></tr>' for k, v in fields.items() if v)
    return f'<h3>Provenance</h3><table class="provenance"><tbody>{rows}</tbody></table>'


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>{body}\n<script>{SORT}</script></body></html>\n")


def _title(name: str) -> str:
    return TITLES.get(name) or f"Methods × {name.removeprefix('by_')}"


def _text(markdown: str) -> str:
    return escape(markdown.replace("`", ""))


def _slug(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", task).strip("-") or "task"
