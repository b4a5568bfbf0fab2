"""Issue 26 §4: how the leaderboard presents its numbers — the per-corruption table in the standard
groups and order with clean apart, severities compared like with like, configuration labels that
name every option that varies, no bootstrap CI over too few configurations, and the site (the lr
plot's ticks, integer count axes, click-to-sort keys, a one-line description of each task)."""
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from tta_bench.core import stats
from tta_bench.reporting.axes import CORRUPTION_GROUPS, SHORT, STANDARD
from tta_bench.reporting.leaderboard import build
from tta_bench.reporting.selection import Selection
from tta_bench.reporting.tables import TOO_FEW_CI

METHODS = ("ifo", "entropy")  # both at their default lr 0.0205
MODELS = ("efficientnet-lite0", "efficientnet-lite1")
CORRUPTIONS = ("fog", "speckle_noise", "gaussian_noise", "contrast", "none", "zoom_blur")  # not in order
# left out of the configuration keys, as tracking does
DEFAULTS = {"model": "efficientnet-lite0", "severity": "3", "subset": "test"}


def key(options: dict[str, str]) -> str:
    """The configuration key as tracking writes it: the task and its non-default options."""
    named = [f"{k}={v}" for k, v in options.items() if DEFAULTS.get(k) != v]
    return "cifar10" + (f"({', '.join(named)})" if named else "")


def run(method: str, delta: float, n_total: int = 500, **options: str) -> dict:
    """One row of a runs table (OUT/TASK/runs.csv) at d = 0.16."""
    return {"task": "cifar10", "configuration": key(options), "method": method, "method_name": method,
            "lr": 0.0205, "threshold": 0.16, "start": "2026-01-01 00:00:00+00:00", "delta_acc": delta,
            "n_fixed": 10 + max(delta, 0), "n_broken": 10 + max(-delta, 0), "n_changed": 20, "n_total": n_total,
            "n_uncertain": 100, "frac_uncertain": 0.2, "acc_source": 50.0, "acc_adapted": 50.0 + delta,
            "forwards_per_sample": 3.0, "backwards_per_sample": 1.0, "samples_per_s": 10.0,
            **{f"option.{k}": v for k, v in options.items()}}


def delta(method: str, model: str, corruption: str, severity: str) -> float:
    """A distinct, reproducible Δacc per configuration; ifo ahead of entropy."""
    seed = sum(map(ord, f"{method}{model}{corruption}{severity}"))
    return round(float(np.random.default_rng(seed).normal(3.0 if method == "ifo" else 1.0, 2.0)), 4)


def corruption_runs() -> list[dict]:
    """Both models at severity 5; lite0 also at severity 3 on all but contrast; the clean data per model
    (its severity a leftover default). Two validation configurations."""
    configs = [(m, c, "5") for m in MODELS for c in CORRUPTIONS] + [
        (MODELS[0], c, "3") for c in CORRUPTIONS if c not in ("none", "contrast")]
    rows = [run(me, delta(me, m, c, s), model=m, corruption=c, severity=s, subset="test")
            for m, c, s in configs for me in METHODS]
    return rows + [run(me, 1.0, model=MODELS[0], corruption=c, severity="5", subset="val")
                   for c in ("saturate", "spatter") for me in METHODS]


def leaderboard(tmp_path, rows: list[dict], name: str = "out", mode: str = "default"):
    path = tmp_path / f"{name}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    out = tmp_path / name
    build(None, "x", out, Selection(mode), runs_tables=[path], store=False, site=out / "site")
    return out


def read(out, table: str, task: str = "cifar10") -> pd.DataFrame:
    return pd.read_csv(out / task / f"{table}.csv", dtype={"option.severity": str})


def shown(out, table: str, task: str = "cifar10") -> pd.DataFrame:
    """The rows of a Markdown table as strings."""
    lines = [line for line in (out / task / f"{table}.md").read_text().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return pd.DataFrame(cells[2:], columns=cells[0])


@pytest.fixture(scope="module")
def corrupted(tmp_path_factory):
    rows = corruption_runs()
    return leaderboard(tmp_path_factory.mktemp("presentation"), rows), pd.DataFrame(rows)


def test_the_corruption_order_is_the_benchmarks():
    from tta_bench.data.corruptions import EXTRA
    from tta_bench.data.corruptions import STANDARD as GENERATED

    assert STANDARD == list(GENERATED) and list(SHORT) == [*GENERATED, *EXTRA]
    assert list(CORRUPTION_GROUPS) == ["noise", "blur", "weather", "digital", "extra"]
    assert len(set(SHORT.values())) == len(SHORT) and max(map(len, SHORT.values())) <= 5


def test_per_corruption_table_in_the_standard_order_with_clean_apart(corrupted):
    out, runs = corrupted
    test = runs[runs["option.subset"] == "test"]
    table = read(out, "by_corruption")
    names = ["gaussian_noise", "zoom_blur", "fog", "contrast", "speckle_noise"]  # noise, blur, weather, digital, extra
    assert list(table.columns) == ["method", *names, "mean", "none"]
    assert list(table["method"]) == list(read(out, "headline")["method"]) == ["ifo", "entropy"]  # rank order
    table = table.set_index("method")
    for method, g in test.groupby("method"):
        shifted = g[g["option.corruption"] != "none"]
        assert table.loc[method, "mean"] == pytest.approx(shifted["delta_acc"].mean())  # clean not in the mean
        assert table.loc[method, "none"] == pytest.approx(g.loc[g["option.corruption"] == "none", "delta_acc"].mean())
        assert table.loc[method, "fog"] == pytest.approx(g.loc[g["option.corruption"] == "fog", "delta_acc"].mean())
    view = shown(out, "by_corruption")
    assert list(view.columns) == ["method", "gauss", "zoom", "fog", "contr", "speck", "mean", "clean"]
    assert view.set_index("method").loc["ifo", "fog"] == f"{table.loc['ifo', 'fog']:.1f}"  # one decimal
    assert all(re.fullmatch(r"-?\d+\.\d", x) for x in view.drop(columns="method").to_numpy().ravel())
    caption = (out / "cifar10" / "by_corruption.md").read_text().split("\n\n")[0]
    assert ("noise: gauss; blur: zoom; weather: fog; digital: contr; extra: speck;" in caption
            and "mean: over the corrupted configurations only" in caption and "not in the mean" in caption)
    at3 = read(out, "by_corruption_severity_3").set_index("method")  # lite0 only: its clean column too
    assert list(at3.columns) == ["gaussian_noise", "zoom_blur", "fog", "speckle_noise", "mean", "none"]
    lite0_clean = test[(test["option.model"] == MODELS[0]) & (test["option.corruption"] == "none")]
    assert at3.loc["ifo", "none"] == pytest.approx(lite0_clean.set_index("method").loc["ifo", "delta_acc"])


def test_by_severity_compares_like_with_like(corrupted):
    out, runs = corrupted
    both = ["gaussian_noise", "zoom_blur", "fog", "speckle_noise"]  # lite0 at 3 and 5; lite1 and contrast: 5 only
    like = runs[(runs["option.subset"] == "test") & (runs["option.model"] == MODELS[0])
                & runs["option.corruption"].isin(both)]
    table = read(out, "by_severity").set_index("method")
    assert list(table.columns) == ["3", "5", "mean"]
    for method, g in like.groupby("method"):
        for severity in ("3", "5"):
            assert table.loc[method, severity] == pytest.approx(g.loc[g["option.severity"] == severity,
                                                                      "delta_acc"].mean())
        assert table.loc[method, "mean"] == pytest.approx(g["delta_acc"].mean())
    caption = (out / "cifar10" / "by_severity.md").read_text()
    assert ("the 4 (model, corruption) combinations run at every severity: model (1): efficientnet-lite0; "
            "corruption (4): gaussian_noise, zoom_blur, fog, speckle_noise; clean configurations") in caption


def test_configuration_labels_name_every_option_that_varies(corrupted):
    out, runs = corrupted
    data, view = read(out, "configurations"), shown(out, "configurations")
    test = runs[runs["option.subset"] == "test"].drop_duplicates("configuration")
    assert sorted(data["configuration"]) == sorted(test["configuration"])  # the key, as in runs.csv
    assert list(data.columns[:4]) == ["configuration", "option.model", "option.corruption", "option.severity"]
    assert list(data.columns[-2:]) == ["ifo", "entropy"]  # methods in rank order
    assert "cifar10(corruption=fog)" in set(data["configuration"])  # the key hides two defaults …
    labels = dict(zip(data["configuration"], view["configuration"], strict=True))
    assert labels["cifar10(corruption=fog)"] == "model=efficientnet-lite0, corruption=fog, severity=3"  # … not so
    assert labels["cifar10(model=efficientnet-lite1, corruption=none, severity=5)"] == (
        "model=efficientnet-lite1, corruption=none, severity=5")
    assert not any("subset" in label for label in view["configuration"])


def test_a_default_corpus_is_named(tmp_path):
    """text(corpus=…) keys leave the default corpus out: the label says it."""
    rows = [run(m, d, n_total=n, corpus=c) | {"task": "text", "configuration": "text" if c == "shakespeare" else
                                                 f"text(corpus={c})", "option.model": "smollm2"}
            for c, n, d in (("shakespeare", 342, 1.0), ("licenses", 449, 2.0), ("python-stdlib", 680, -1.0))
            for m in METHODS]
    for row in rows:
        del row["option.corpus"], row["option.model"]
        row.update({"option.corpus": row["configuration"].partition("=")[2].rstrip(")") or "shakespeare",
                    "option.model": "smollm2-135m"})
    out = leaderboard(tmp_path, rows)
    assert sorted(shown(out, "configurations", "text")["configuration"]) == [
        "corpus=licenses", "corpus=python-stdlib", "corpus=shakespeare"]
    md = (out / "LEADERBOARD.md").read_text()
    assert ("### text\n\ntext: smollm2-135m × 3 corpora (licenses, python-stdlib, shakespeare); 342–680 windows "
            "per configuration\n\n") in md


@pytest.mark.parametrize("n", [4, 6])
def test_no_bootstrap_ci_over_fewer_than_five_configurations(tmp_path, n):
    deltas = [1.0, 3.0, 2.5, -0.5, 4.0, 2.0][:n]
    rows = [run(m, d + (m == "ifo"), corruption=c, severity="5", subset="test")
            for m in METHODS for c, d in zip(STANDARD, deltas, strict=False)]
    out = leaderboard(tmp_path, rows)
    head, methods = shown(out, "headline").set_index("method"), read(out, "methods").set_index("method")
    caption = (out / "cifar10" / "headline.md").read_text()
    by_key = pd.DataFrame(rows).query("method == 'ifo'").sort_values("configuration")  # the bootstrap's order
    vs = stats.versus_source(by_key["delta_acc"].to_numpy())
    if n < 5:
        assert head.loc["ifo", "mean Δacc [95% CI]"] == f"{vs.mean:+.2f} [–]"
        assert methods[["CI95 low", "CI95 high"]].isna().all().all()
        assert f"BCa bootstrap 95% CI ({TOO_FEW_CI})" in caption and TOO_FEW_CI in caption
        assert "too few configurations for a bootstrap CI (n < 5)" in (out / "cifar10" / "methods.md").read_text()
    else:
        assert head.loc["ifo", "mean Δacc [95% CI]"] == f"{vs.mean:+.2f} [{vs.ci_low:+.2f}, {vs.ci_high:+.2f}]"
        assert methods.loc["ifo", "CI95 low"] == pytest.approx(vs.ci_low) and TOO_FEW_CI not in caption


def test_each_task_is_described_in_one_line_above_its_tables(corrupted):
    out, _ = corrupted
    line = ("cifar10: efficientnet-lite0/1 × clean + 4 of the 15 standard CIFAR-10-C corruptions (gaussian_noise, "
            "zoom_blur, fog, contrast) + 1 other (speckle_noise) at severities 3, 5; 500 images per configuration; "
            "2 validation configurations (held out)")
    md = (out / "LEADERBOARD.md").read_text()
    assert f"### cifar10\n\n{line}\n\ncifar10: " in md
    for page in ("index.html", "cifar10.html"):
        text = (out / "site" / page).read_text()
        assert text.index(f'<p class="description">{line}</p>') < text.index('id="cifar10-headline"'), page


def test_lr_plot_ticks_every_other_lr_without_overlap_and_counts_are_integers(tmp_path, monkeypatch):
    from matplotlib.ticker import MaxNLocator

    from tta_bench.reporting import plots

    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)  # keep the figure to inspect it
    lrs = [5e-6 * 2 ** k for k in range(19)]  # the fair sweep's grid, 5e-6 … 1.31
    table = pd.DataFrame([{"method": m, "lr": lr, "mean Δacc": i - k / 4, "Δacc>0": (k + i) % 3}
                          for i, m in enumerate(("ifo", "entropy", "tent")) for k, lr in enumerate(lrs)])
    plots.lr_plot(table, tmp_path / "lr.png", {"ifo": lrs[12]})
    fig, = figures
    top, bottom = fig.axes
    renderer = fig.canvas.get_renderer()
    labels = [t for t in bottom.get_xticklabels() if t.get_visible() and t.get_text()]
    assert [t.get_text() for t in labels] == ["5e-6", "2e-5", "8e-5", "3.2e-4", "0.0013", "0.0051", "0.02",
                                              "0.082", "0.33", "1.3"]  # every second lr, compactly
    assert np.allclose([t.get_position()[0] for t in labels], lrs[::2])
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert np.allclose(sorted([*bottom.xaxis.get_minorticklocs(), *bottom.get_xticks()]), lrs)  # a tick at every lr
    assert isinstance(bottom.yaxis.get_major_locator(), MaxNLocator)
    ticks = [y for y in bottom.get_yticks() if bottom.get_ylim()[0] <= y <= bottom.get_ylim()[1]]
    assert ticks and all(float(y).is_integer() for y in ticks)  # counts 0..2: no half ticks


def sort_in_node(cells: list[str], direction: int = 1) -> list[str]:
    from tta_bench.reporting.site import SORT_KEYS

    code = SORT_KEYS + f"console.log(JSON.stringify(sortTexts({json.dumps(cells)}, t => t, {direction})));"
    done = subprocess.run([shutil.which("node"), "-e", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(shutil.which("node") is None, reason="no node on PATH to run the site's sort keys")
def test_the_sites_sort_keys():
    assert sort_in_node(["37/1", "5/0", "–", "36/0", "12/3", "2/9"]) == ["2/9", "5/0", "12/3", "36/0", "37/1", "–"]
    means = ["+19.07 [+16.23, +22.02]", "-3.10 [–]", "no-op: changed no prediction", "+0.00 [–]", "–",
             "+2.50 [+1.00, +4.00]", "+11.85 [+9.62, +14.34]"]
    assert sort_in_node(means) == ["-3.10 [–]", "+0.00 [–]", "+2.50 [+1.00, +4.00]", "+11.85 [+9.62, +14.34]",
                                   "+19.07 [+16.23, +22.02]", "no-op: changed no prediction", "–"]
    assert sort_in_node(["0.0205 (held-out)", "5e-06 (held-out)", "0.0819 (held-out)"], -1) == [
        "0.0819 (held-out)", "0.0205 (held-out)", "5e-06 (held-out)"]
    assert sort_in_node(["tent", "ifo(weighted=False)", "entropy"]) == ["entropy", "ifo(weighted=False)", "tent"]


def test_the_clean_datas_severity_is_no_severity(tmp_path):
    """Clean runs logged at the default severity 3, every corruption at 5: severity does not vary."""
    rows = [run(m, delta(m, "x", c, s), corruption=c, severity=s, subset="test")
            for m in METHODS for c, s in (("none", "3"), ("fog", "5"), ("snow", "5"), ("contrast", "5"))]
    out = leaderboard(tmp_path, rows)
    assert sorted(p.stem for p in (out / "cifar10").glob("by_*.csv")) == ["by_corruption"]
    assert list(shown(out, "configurations")["configuration"]) == [
        "corruption=contrast", "corruption=fog", "corruption=none", "corruption=snow"]  # the keys' order
    assert "clean + 3 of the 15 standard CIFAR-10-C corruptions (snow, fog, contrast) at severity 5" in (
        out / "LEADERBOARD.md").read_text()


def test_seconds_per_sample_compare_within_a_device(tmp_path):
    """Runs of one table on a GPU and on a CPU: the cost column gives each device's mean, never
    their mixture (a method run only on the CPU would look 10× slower than one run on the GPU)."""
    rows = [run(m, 1.0 + (m == "ifo"), corruption=c, severity="5")
            | {"device": device, "seconds_per_sample": seconds * (2 if m == "entropy" else 1)}
            for m in METHODS for c, device, seconds in (("fog", "NVIDIA H200", 0.1), ("frost", "NVIDIA H200", 0.3),
                                                        ("snow", "CPU", 1.0))]
    rows = [r for r in rows if not (r["method"] == "entropy" and r["device"] == "CPU")] + [
        run("entropy", 1.0, corruption="snow", severity="5") | {"device": "CPU", "seconds_per_sample": 3.0}]
    out = leaderboard(tmp_path, rows)
    head = shown(out, "headline").set_index("method")
    assert head.loc["ifo", "s per scored sample"] == "0.2 NVIDIA H200 · 1 CPU"  # most runs first
    assert head.loc["entropy", "s per scored sample"] == "0.4 NVIDIA H200 · 3 CPU"
    data = read(out, "headline").set_index("method")
    assert data.loc["ifo", ["s/sample NVIDIA H200", "s/sample CPU"]].tolist() == pytest.approx([0.2, 1.0])
    text = (out / "cifar10" / "headline.md").read_text()
    assert "mean over the configurations run on each device (NVIDIA H200, CPU): compare them within a device" in text
    assert "devices: CPU, NVIDIA H200" in (out / "LEADERBOARD.md").read_text()
    # one device: one number, as before
    one = leaderboard(tmp_path, [r | {"device": "CPU"} for r in rows], "one")
    assert shown(one, "headline").set_index("method").loc["ifo", "s per scored sample"] == "0.467"
    assert "compare them within a device" not in (one / "cifar10" / "headline.md").read_text()
