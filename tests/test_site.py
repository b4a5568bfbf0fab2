"""The static leaderboard site: pages, provenance, escaping, no network, and — in a real headless
Chromium — the headline table and click-to-sort."""
import html
import json
import re
import shutil
import subprocess
from datetime import datetime, timezone

import mlflow
import pandas as pd
import pytest
import torch
from lb_store import CONFIGS, LRS, grid_store
from test_cli import run_cli

import tta_bench
from tta_bench.reporting.leaderboard import build
from tta_bench.reporting.output import Table
from tta_bench.reporting.report import TaskReport
from tta_bench.reporting.report import provenance as provenance_of
from tta_bench.reporting.selection import Selection
from tta_bench.reporting.site import write_site
from tta_bench.running.provenance import source_sha256

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH; install it with "
                                    "`apt-get install -y chromium` (Debian) to run the browser test")
HEADLINE_COLUMNS = ["rank", "method", "lr", "mean Δacc [95% CI]", "source acc, all samples (%)", "Δacc all samples",
                    "wins/losses", "p Wilcoxon (Holm)", "fwd/bwd per sample", "s per scored sample"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    uri, _ = grid_store()
    root = tmp_path_factory.mktemp("site")
    build(uri, "lb", root / "out", Selection("default"), site=root / "site")
    return root


def provenance(page: str) -> dict[str, str]:
    rows = re.findall(r'<tr><th scope="row">(.*?)</th><td>(.*?)</td></tr>', page)
    return {html.unescape(k): html.unescape(v) for k, v in rows}


def test_pages_tables_and_provenance(site):
    folder = site / "site"
    assert sorted(p.name for p in folder.iterdir()) == ["index.html", "toy", "toy.html"]
    index, page = (folder / "index.html").read_text(), (folder / "toy.html").read_text()
    assert 'id="toy-headline"' in index and 'href="toy.html"' in index
    names = ["headline", "by_model", "by_shift", "configurations", "learning_rates", "friedman", "thresholds",
             "methods", "learning_rates_detail"]
    assert re.findall(r'<table class="sortable" id="toy-(\w+)"', page) == names
    for name in names:  # each table's raw numbers beside the page, equal to the leaderboard's CSV
        pd.testing.assert_frame_equal(pd.read_csv(folder / "toy" / f"{name}.csv"),
                                      pd.read_csv(site / "out" / "toy" / f"{name}.csv"))
    assert page.count('<img src="data:image/png;base64,') == 3  # lr, CD and threshold figures, embedded
    assert page.count('<td class=chosen>') == 3  # one chosen lr per method
    for text in (index, page):
        fields = provenance(text)
        assert fields["experiment"] == "lb" and fields["threshold"] == "d = 0.16"
        assert fields["sweep parent"] == "all runs of the experiment (under 14 parent runs)"
        assert fields["runs"] == f"42 finished result runs; {len(CONFIGS) * 3} at the chosen learning rates"
        assert fields["lr selection"] == Selection("default").caption()
        assert fields["tta-bench"] == tta_bench.__version__ and torch.__version__.startswith(fields["torch"])
        assert fields["source sha256"] == source_sha256()[:12]  # the code that made the runs, git or not
        assert fields["built"].startswith(f"{datetime.now(timezone.utc):%Y-%m-%d}")
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d to \d{4}-\d\d-\d\d \d\d:\d\d UTC", fields["runs started"])
        # nothing fetched from the network: every link and source is relative, an anchor or inline data
        for ref in re.findall(r'(?:src|href)="([^"]*)"', text):
            assert not re.match(r"[a-z]+:", ref) or ref.startswith("data:image/png;base64,"), ref


def test_provenance_names_the_sweep_parent(tmp_path):
    uri, _ = grid_store()
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("lb").experiment_id
    child = client.search_runs([experiment], "params.threshold = '0.16'", max_results=1)[0]
    parent = child.data.tags["mlflow.parentRunId"]
    build(uri, "lb", tmp_path / "out", Selection("default"), parent=parent, site=tmp_path / "site")
    fields = provenance((tmp_path / "site" / "toy.html").read_text())
    assert fields["sweep parent"] == parent
    assert fields["runs"] == f"{len(LRS)} finished result runs; 1 at the chosen learning rates"


@pytest.mark.parametrize("parents, said", [
    ([None, None], "all runs of the experiment, none under a parent run"),  # one-lr sweep jobs
    (["a", "a"], "all runs of the experiment (under 1 parent run)"),
    (["a", "b"], "all runs of the experiment (under 2 parent runs)")])
def test_provenance_counts_parent_runs_in_words(parents, said):
    runs = pd.DataFrame({"parent": parents, "start": [0, 0], "tta-bench": "0", "torch": "2",
                         "commit": None, "source": None})
    assert provenance_of(runs, runs, {})["sweep parent"] == said


def test_every_value_is_escaped(tmp_path):
    evil = '<img src=x onerror="alert(1)">'
    table = Table(pd.DataFrame({evil: [evil]}), evil)
    write_site(tmp_path, evil, [TaskReport(evil, {"headline": table}, {}, {evil: evil}, [evil], evil)])
    for page in tmp_path.glob("*.html"):
        text = page.read_text()
        assert "<img" not in text and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in text


def test_cli_writes_the_site_under_out_or_to_site(capsys, tmp_path):
    uri, _ = grid_store()
    lb = ("leaderboard", "--tracking-uri", uri, "--experiment", "lb")
    code, out, _ = run_cli(capsys, *lb, "--out", str(tmp_path / "a"))
    assert code == 0 and (tmp_path / "a" / "site" / "index.html").is_file() and "site:" in out
    code, _, _ = run_cli(capsys, *lb, "--out", str(tmp_path / "b"), "--site", str(tmp_path / "pages"))
    assert code == 0 and (tmp_path / "pages" / "toy.html").is_file() and not (tmp_path / "b" / "site").exists()


# Runs in the page after its own script: reads the headline table, clicks column headers and
# reports what it saw in <pre id="probe">, which --dump-dom then prints.
PROBE = """<script>
window.addEventListener("load", () => {
  const t = document.getElementById("toy-headline"), head = t.tHead.rows[0].cells;
  const cells = () => Array.from(t.tBodies[0].rows, r => Array.from(r.cells, c => c.textContent));
  const col = name => Array.from(head).findIndex(th => th.textContent === name);
  const out = {headers: Array.from(head, th => th.textContent), initial: cells(),
               images: Array.from(document.images, i => i.naturalWidth)};
  const mean = head[col("mean Δacc [95% CI]")];
  mean.click(); out.ascending = cells(); out.aria = mean.getAttribute("aria-sort");
  mean.click(); out.descending = cells();
  head[col("method")].click(); out.byMethod = cells();
  head[col("wins/losses")].click(); out.byWins = cells();
  const pre = document.createElement("pre"); pre.id = "probe"; pre.textContent = JSON.stringify(out);
  document.body.append(pre);
});
</script>"""


def chromium(profile, *args: str) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--hide-scrollbars", "--virtual-time-budget=5000"]
    done = subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_chromium
@pytest.mark.parametrize("page", ["index.html", "toy.html"])
def test_in_a_headless_browser_the_headline_sorts_on_click(site, tmp_path, page):
    folder = site / "site"
    probe = folder / f"probe-{page}"
    probe.write_text((folder / page).read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(tmp_path / "profile", "--dump-dom", probe.as_uri())
    out = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
    md = [line.strip("|").split("|") for line in (site / "out" / "toy" / "headline.md").read_text().splitlines()
          if line.startswith("|")]
    assert out["headers"] == HEADLINE_COLUMNS and out["initial"] == [[c.strip() for c in row] for row in md[2:]]
    mean = {row[1]: float(row[3].split()[0]) for row in out["initial"]}
    ascending = sorted(out["initial"], key=lambda row: mean[row[1]])  # stable, as the page's sort
    assert out["aria"] == "ascending" and out["ascending"] == ascending
    assert out["descending"] == sorted(ascending, key=lambda row: -mean[row[1]])
    assert [row[1] for row in out["byMethod"]] == sorted(mean)
    wins = {row[1]: tuple(map(int, row[6].split("/"))) for row in out["initial"]}  # by wins − losses, then wins
    assert [row[1] for row in out["byWins"]] == sorted([row[1] for row in out["byMethod"]],  # stable, as the page
                                                      key=lambda m: (wins[m][0] - wins[m][1], wins[m][0]))
    assert len(set(mean.values())) > 1 and out["ascending"] != out["initial"]  # the clicks did reorder
    assert all(width > 0 for width in out["images"]) and len(out["images"]) == (3 if page == "toy.html" else 0)
    shot = tmp_path / f"{page}.png"
    chromium(tmp_path / "profile", "--window-size=1280,1600", f"--screenshot={shot}", (folder / page).as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
