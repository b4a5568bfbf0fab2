"""`tta-bench leaderboard` from a small real MLflow store: table contents, lr selection,
significance columns, the headline, the methods × lr / model / shift views, and plots."""
import math

import numpy as np
import pandas as pd
import pytest
from lb_store import CONFIGS, LRS, METHODS, MODELS, SHIFTS, grid_store

from tta_bench.cli import main
from tta_bench.core import stats
from tta_bench.core.errors import TTAError
from tta_bench.reporting.leaderboard import build
from tta_bench.reporting.selection import Selection
from tta_bench.reporting.tables import HEADLINE_P


@pytest.fixture(scope="module")
def store():
    return grid_store()


def _deltas(results, name, lr=2e-2, configs=CONFIGS):
    return np.array([results[c, name][lr]["delta_acc"] for c in configs])


def _read(out, name):
    return pd.read_csv(out / "toy" / f"{name}.csv")


def test_method_table_matches_the_runs(store, tmp_path):
    uri, results = store
    files = build(uri, "lb", tmp_path, Selection("default"))
    methods = _read(tmp_path, "methods").set_index("method")
    assert sorted(methods.index) == sorted(METHODS)
    assert (methods["lr"] == 2e-2).all() and (methods["lr chosen"] == "default").all()
    for name in METHODS:
        d = _deltas(results, name)
        row = methods.loc[name]
        assert row["configs"] == 4 and row["mean Δacc"] == pytest.approx(d.mean())
        assert row["Δacc>0"] == (d > 0).sum() and row["Δacc<0"] == (d < 0).sum()
        assert row["p sign"] == pytest.approx(stats.sign_test((d > 0).sum(), (d < 0).sum()))
        assert row["p Wilcoxon"] == pytest.approx(stats.wilcoxon_greater(d))
    np.testing.assert_allclose(methods["p sign (Holm)"], stats.holm(methods["p sign"]))
    assert list(methods["rank"]) == sorted(methods["rank"])  # ranked by mean Δacc
    assert methods["mean Δacc"].is_monotonic_decreasing
    assert math.isnan(methods.loc["ifo", "p t ifo>"]) and not math.isnan(methods.loc["dofo", "p W ifo>"])
    configs = _read(tmp_path, "configurations").set_index("configuration")
    assert sorted(configs.index) == sorted(CONFIGS)
    s = results["toy(model=b, shift=1.0)", "dofo"][2e-2]
    assert configs.loc["toy(model=b, shift=1.0)", "dofo"] == f"{s['delta_acc']:+.2f} ({s['n_fixed']}/{s['n_broken']})"
    assert (configs["n_total"] == 40).all()
    md = (tmp_path / "toy" / "methods.md").read_text()
    assert "nearest (within ×2) the method's default" in md and "| ifo " in md
    assert "<caption>" in (tmp_path / "toy" / "methods.html").read_text()
    assert "\\toprule" in (tmp_path / "toy" / "methods.tex").read_text()
    for png in ("delta_vs_lr.png", "cd.png", "threshold.png"):
        assert (tmp_path / "toy" / png).read_bytes()[:4] == b"\x89PNG"
    assert tmp_path / "LEADERBOARD.md" in files


def test_best_lr_is_flagged_and_fixed_lr_is_applied(store, tmp_path):
    uri, results = store
    build(uri, "lb", tmp_path / "best", Selection("best"))
    methods = _read(tmp_path / "best", "methods").set_index("method")
    for name in METHODS:
        means = {lr: _deltas(results, name, lr).mean() for lr in LRS}
        assert methods.loc[name, "lr"] == pytest.approx(max(means, key=means.get))
    assert (methods["lr chosen"] == "best on test ⚠").all()
    assert "BEST MEAN Δacc ON THE TEST STREAM" in (tmp_path / "best" / "toy" / "methods.md").read_text()
    build(uri, "lb", tmp_path / "fixed", Selection("fixed", 0.1))
    assert (_read(tmp_path / "fixed", "methods")["lr"] == 0.1).all()


def test_learning_rate_threshold_and_friedman_tables(store, tmp_path):
    uri, results = store
    build(uri, "lb", tmp_path, Selection("default"))
    lrs = _read(tmp_path, "learning_rates_detail")
    assert len(lrs) == len(METHODS) * len(LRS)
    row = lrs[(lrs["method"] == "entropy") & (lrs["lr"] == 0.1)].iloc[0]
    d = _deltas(results, "entropy", 0.1)
    assert row["Δacc>0"] == (d > 0).sum() and row["mean Δacc"] == pytest.approx(d.mean())
    th = _read(tmp_path, "thresholds")
    assert list(th["threshold"]) == [0.08, 0.16, 0.32] and set(th["method"]) == {"ifo"}
    assert th["frac_uncertain"].is_monotonic_increasing
    fr = _read(tmp_path, "friedman")
    assert fr["average rank"].sum() == pytest.approx(6.0)  # k(k+1)/2 for k = 3
    caption = (tmp_path / "toy" / "friedman.md").read_text()
    assert f"critical difference (α = 0.05) = {stats.critical_difference(3, 4):.3g}" in caption


def test_missing_experiment_and_bad_flags_are_clear_errors(store, capsys):
    uri, _ = store
    with pytest.raises(TTAError, match="no MLflow experiment 'nope'"):
        build(uri, "nope", None, Selection())
    assert main(["leaderboard", "--tracking-uri", uri, "--experiment", "lb", "--lr", "0.1"]) == 2
    assert "--select fixed needs --lr" in capsys.readouterr().err
    assert main(["leaderboard", "--tracking-uri", uri, "--experiment", "lb", "--task", "cifar10"]) == 2
    assert "no runs for task(s) cifar10; tasks with runs: toy" in capsys.readouterr().err


def _md_table(path) -> pd.DataFrame:
    """The rows of a Markdown (github) table as strings."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return pd.DataFrame(cells[2:], columns=cells[0])


def test_whole_set_columns_name_what_a_sample_is():
    from tta_bench.reporting.report import sample_unit
    assert [sample_unit(t) for t in ("cifar10", "imagenet", "text", "mc", "toy")] == [
        "images", "images", "windows", "questions", "samples"]  # toy: a task this installation does not know


def test_headline_comes_first_and_matches_the_runs(store, tmp_path):
    uri, results = store
    build(uri, "lb", tmp_path, Selection("default"))
    deltas = {name: _deltas(results, name) for name in METHODS}
    order = sorted(METHODS, key=lambda m: -deltas[m].mean())
    p_holm = dict(zip(METHODS, stats.holm([stats.wilcoxon_greater(deltas[m]) for m in METHODS]), strict=True))
    raw = _read(tmp_path, "headline").set_index("method")
    shown = _md_table(tmp_path / "toy" / "headline.md").set_index("method")
    assert list(shown.columns) == ["rank", "lr", "mean Δacc [95% CI]", "source acc, all samples (%)",
                                   "Δacc all samples", "wins/losses", HEADLINE_P, "fwd/bwd per sample", "s per scored sample"]
    assert [raw.loc[m, "mean Δacc"] for m in shown.index] == pytest.approx([deltas[m].mean() for m in order])
    for name, d in deltas.items():
        vs = stats.versus_source(d)
        fwd = np.mean([results[c, name][2e-2]["forwards_per_sample"] for c in CONFIGS])
        assert raw.loc[name, HEADLINE_P] == pytest.approx(p_holm[name])
        assert raw.loc[name, "fwd/sample"] == pytest.approx(fwd) and fwd == 2 + len(LRS)  # source, adapt, 3 predictions
        row = shown.loc[name]
        assert row["rank"] == str(order.index(name) + 1) and row["lr"] == "0.02 (default)"
        assert vs.n == 4 and np.isnan(raw.loc[name, "CI95 low"])  # too few configurations for a bootstrap CI
        assert row["mean Δacc [95% CI]"] == f"{d.mean():+.2f} [–]"
        assert row["wins/losses"] == f"{(d > 0).sum()}/{(d < 0).sum()}"
        assert row[HEADLINE_P] == f"{p_holm[name]:.3g}" and row["fwd/bwd per sample"] == "5 / 1"
        whole = {k: np.mean([results[c, name][2e-2][k] for c in CONFIGS])  # over every image, not only uncertain
                 for k in ("acc_source_all", "delta_acc_all", "seconds_per_sample")}
        assert raw.loc[name, "source acc all (%)"] == pytest.approx(whole["acc_source_all"])
        assert row["Δacc all samples"] == f"{whole['delta_acc_all']:+.2f}"
        assert row["s per scored sample"] == f"{whole['seconds_per_sample']:.3g}"
    assert any(np.isfinite(stats.versus_source(d).ci_low) for d in deltas.values())  # BCa gives one, degenerate
    assert "(–: too few configurations for a bootstrap CI (n < 5))" in (tmp_path / "toy" / "headline.md").read_text()
    text = (tmp_path / "LEADERBOARD.md").read_text()
    described = "### toy\n\ntoy: a/b × 2 shifts (0.5, 1.0); 40 samples per configuration\n\ntoy: 4 configuration(s)"
    assert text.index("## Headline") < text.index(described) < text.index("## toy")
    assert text.index("## toy") < text.index("### methods") and "learning_rates_detail" not in text
    assert "Provenance: experiment: lb; " in text and "runs: 42 finished result runs; 12 at the chosen" in text


@pytest.mark.parametrize("select", ["default", "best"])
def test_learning_rates_are_methods_by_lr_with_the_chosen_lr_marked(store, tmp_path, select):
    uri, results = store
    build(uri, "lb", tmp_path, Selection(select))
    chosen = _read(tmp_path, "methods").set_index("method")["lr"]
    grid = _read(tmp_path, "learning_rates").set_index("method")
    assert grid.shape == (len(METHODS), 1 + len(LRS)) and list(grid.columns) == ["chosen lr", "0.005", "0.02", "0.1"]
    assert list(grid.index) == list(_read(tmp_path, "headline")["method"])  # headline order
    shown = _md_table(tmp_path / "toy" / "learning_rates.md").set_index("method")
    for name in METHODS:
        assert grid.loc[name, "chosen lr"] == pytest.approx(chosen[name])
        for lr in LRS:
            mean = _deltas(results, name, lr).mean()
            assert grid.loc[name, f"{lr:g}"] == pytest.approx(mean)
            marked = math.isclose(lr, chosen[name])
            assert shown.loc[name, f"{lr:.3g}"] == f"{mean:+.2f}" + (" ◀" if marked else "")
    if select == "default":
        assert (chosen == 2e-2).all()


def test_without_an_lr_sweep_there_is_no_methods_by_lr_grid(tmp_path):
    """Each method at one lr (a benchmark at fixed defaults): a grid of dashes and a plot of single
    points say nothing the headline's lr column does not; the per-lr details stay in their CSV."""
    from lb_store import GridToy

    import tta_bench
    from tta_bench import Protocol, RunOptions
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lrs = {name: tta_bench.get_method(name).default_lr for name in METHODS} | {"tent": 1.0}  # tent: far off
    for shift in SHIFTS:
        for name, lr in lrs.items():
            tta_bench.run(GridToy(shift=shift), tta_bench.get_method(name), Protocol((lr,)),
                          RunOptions(progress=False, tracking_uri=uri, experiment="one"))
    with pytest.warns(UserWarning, match="no run at a learning rate within ×2 of its default: tent"):
        build(uri, "one", tmp_path / "lb", Selection("default"))
    folder = tmp_path / "lb" / "toy"
    assert not (folder / "learning_rates.csv").exists() and not (folder / "delta_vs_lr.png").exists()
    headline = pd.read_csv(folder / "headline.csv").set_index("method")["lr"]
    assert headline.to_dict() == pytest.approx({name: lrs[name] for name in METHODS})
    assert len(pd.read_csv(folder / "learning_rates_detail.csv")) == len(lrs)


def test_per_model_and_per_shift_tables(store, tmp_path):
    uri, results = store
    build(uri, "lb", tmp_path, Selection("default"))
    assert sorted(p.stem for p in (tmp_path / "toy").glob("by_*.csv")) == ["by_model", "by_shift"]
    order = list(_read(tmp_path, "headline")["method"])
    for axis, values in (("model", MODELS), ("shift", SHIFTS)):
        table = _read(tmp_path, f"by_{axis}")
        table.columns = [str(c) for c in table.columns]
        assert list(table.columns) == ["method", *map(str, values), "mean"] and list(table["method"]) == order
        table = table.set_index("method")
        for name in METHODS:
            for value in values:
                configs = [c for c in CONFIGS if f"{axis}={value}" in c]
                assert len(configs) == 2
                assert table.loc[name, str(value)] == pytest.approx(_deltas(results, name, configs=configs).mean())
            assert table.loc[name, "mean"] == pytest.approx(_deltas(results, name).mean())
    md = (tmp_path / "LEADERBOARD.md").read_text()
    assert "Methods × model: mean Δacc" in md and "### by_shift" in md


def test_corruption_tables_are_split_by_severity(tmp_path):
    """With both corruption and severity varying (the corruption benchmark), the per-corruption
    view is also given one severity at a time, as TTA papers print it."""
    import tempfile

    from conftest import ToyTask

    import tta_bench
    from tta_bench import HParam, Protocol, RunOptions

    class Corrupted(ToyTask):
        options = {"corruption": HParam("none", str, "shift", choices=("none", "noise")),
                   "severity": HParam(3, int, "its size", choices=(3, 5))}

        def __init__(self, **options):
            super().__init__(**options)
            if self.opts.corruption == "noise":
                self.x = self.x + 0.2 * self.opts.severity * self.x.flip(0)

    uri = f"sqlite:///{tempfile.mkdtemp(prefix='tta-bench-lb-')}/mlflow.db"
    options = RunOptions(progress=False, tracking_uri=uri, experiment="c")
    deltas = {}
    for corruption, severity in (("none", 5), ("noise", 3), ("noise", 5)):
        for name in ("ifo", "entropy"):
            r = tta_bench.run(Corrupted(corruption=corruption, severity=severity), tta_bench.get_method(name),
                              Protocol((2e-2,)), options)
            deltas[corruption, severity, name] = r.summary[0]["delta_acc"]
    build(uri, "c", tmp_path, Selection("default"))
    assert sorted(p.stem for p in (tmp_path / "toy").glob("by_*.csv")) == [
        "by_corruption", "by_corruption_severity_3", "by_corruption_severity_5", "by_severity"]
    at5 = _read(tmp_path, "by_corruption_severity_5").set_index("method")
    at3 = _read(tmp_path, "by_corruption_severity_3").set_index("method")
    # clean (none) apart, after the mean and not in it; in every severity's table (clean has no severity)
    assert list(at3.columns) == list(at5.columns) == ["noise", "mean", "none"]
    for name in ("ifo", "entropy"):
        assert at5.loc[name, "noise"] == at5.loc[name, "mean"] == pytest.approx(deltas["noise", 5, name])
        assert at3.loc[name, "noise"] == at3.loc[name, "mean"] == pytest.approx(deltas["noise", 3, name])
        assert at3.loc[name, "none"] == at5.loc[name, "none"] == pytest.approx(deltas["none", 5, name])


def _tables(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.csv")) if p.name != "runs.csv"}


def test_a_build_rebuilds_from_its_runs_table_alone(store, tmp_path, monkeypatch):
    """runs.csv is the tables' whole input: without the store, it gives the same tables."""
    uri, _ = store
    build(uri, "lb", tmp_path / "a", Selection("default"))
    runs = tmp_path / "a" / "toy" / "runs.csv"
    assert len(pd.read_csv(runs)) == len(METHODS) * len(CONFIGS) * len(LRS) + 2 * len(LRS)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["leaderboard", "--runs", str(runs), "--out", str(tmp_path / "b")]) == 0  # no store read
    assert _tables(tmp_path / "b" / "toy") == _tables(tmp_path / "a" / "toy")
    assert pd.read_csv(tmp_path / "b" / "toy" / "runs.csv").equals(pd.read_csv(runs))
    md = (tmp_path / "b" / "LEADERBOARD.md").read_text()
    assert f"result runs from `{runs}`" in md and "experiment `lb`" not in md


def test_each_task_writes_only_its_own_columns_in_an_order_independent_of_its_runs(tmp_path, monkeypatch):
    """Two tasks read together (run folders of both): each runs.csv has its own options and
    hyperparameters only, and the same runs in another order write the same bytes."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    def row(task: str, method: str, delta: float, **extra) -> dict:
        return {"task": task, "configuration": task, "method": method, "method_name": method, "lr": 0.01,
                "threshold": 0.16, "start": "2026-01-01 00:00:00+00:00", "delta_acc": delta, "n_fixed": 1,
                "n_broken": 0, "n_total": 10, "n_uncertain": 5, "frac_uncertain": 0.5, "acc_source": 50.0,
                "acc_adapted": 50.0 + delta, "forwards_per_sample": 3.0, "backwards_per_sample": 1.0,
                "samples_per_s": 1.0, **extra}
    rows = [row("img", "ifo", 1.0, **{"option.corruption": "fog", "hp.weighted": "false"}),
            row("img", "tent", 2.0, **{"option.corruption": "fog", "hp.norm_stats": "source"}),
            row("txt", "ifo", 0.5, **{"option.corpus": "licenses", "bpb": 1.2})]
    built = []
    for name, order in (("a", rows), ("b", rows[::-1])):
        frame = pd.DataFrame(order)
        frame = frame[list(frame.columns)[::-1] if name == "b" else list(frame.columns)]
        frame.to_csv(tmp_path / f"{name}.csv", index=False)
        assert main(["leaderboard", "--runs", str(tmp_path / f"{name}.csv"), "--out", str(tmp_path / name),
                     "--select", "best"]) == 0
        built.append({t: (tmp_path / name / t / "runs.csv").read_bytes() for t in ("img", "txt")})
    assert built[0] == built[1]
    img, txt = (pd.read_csv(tmp_path / "a" / t / "runs.csv") for t in ("img", "txt"))
    assert "option.corpus" not in img and "bpb" not in img and "option.corruption" not in txt
    assert "hp.weighted" not in txt and list(img.columns[:4]) == ["task", "configuration", "method", "method_name"]


def test_runs_tables_merge_with_the_store_and_the_latest_run_counts(store, tmp_path):
    uri, _ = store
    build(uri, "lb", tmp_path / "a", Selection("default"))
    earlier = pd.read_csv(tmp_path / "a" / "toy" / "runs.csv")
    older = earlier.assign(task="other", start="2020-01-01 00:00:00+00:00",
                           configuration=earlier["configuration"].str.replace("toy", "other"))
    stale = earlier.assign(start="2020-01-01 00:00:00+00:00", delta_acc=99.0)  # replaced by the store's runs
    older.to_csv(tmp_path / "other.csv", index=False)
    stale.to_csv(tmp_path / "stale.csv", index=False)
    build(uri, "lb", tmp_path / "m", Selection("default"), runs_tables=[tmp_path / "other.csv", tmp_path / "stale.csv"])
    assert _tables(tmp_path / "m" / "toy") == _tables(tmp_path / "a" / "toy")  # 99 lost to the newer runs
    assert (pd.read_csv(tmp_path / "m" / "other" / "headline.csv")["mean Δacc"].to_numpy()
            == pd.read_csv(tmp_path / "a" / "toy" / "headline.csv")["mean Δacc"].to_numpy()).all()
    md = (tmp_path / "m" / "LEADERBOARD.md").read_text()
    assert "result runs from experiment `lb` and" in md
    other, toy = (line for line in md.splitlines() if line.startswith("Provenance: "))  # tasks in order
    assert f"runs tables: {tmp_path / 'other.csv'};" in other and "experiment: lb" not in other
    assert toy.startswith("Provenance: experiment: lb;") and "runs tables" not in toy  # stale.csv: all replaced


@pytest.mark.parametrize("content, message", [
    (None, "no runs table at"),
    ("task,method\ntoy,ifo\n", "is not a runs table of tta-bench leaderboard: no column(s) method_name, configuration"),
    ("task,method_name,configuration,method,lr,threshold,start\ntoy,ifo,toy,ifo,fast,0.16,2026-01-01\n",
     "runs.csv (--runs), line 2, column lr: 'fast' is not a finite number > 0"),
])
def test_a_bad_runs_table_is_a_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "runs.csv"
    if content is not None:
        path.write_text(content)
    assert main(["leaderboard", "--runs", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_published_leaderboard_rebuilds_from_its_runs_tables(tmp_path, monkeypatch):
    """leaderboard/ in this repository is what its committed runs tables give under the published
    rule (held-out selection): no stale table, no number that the runs do not produce."""
    from pathlib import Path
    published = Path(__file__).parent.parent / "leaderboard"
    tables = sorted(published.glob("*/runs.csv"))
    assert tables, "leaderboard/ holds no runs tables"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["leaderboard", "--runs", *map(str, tables), "--out", str(tmp_path), "--select", "heldout"]) == 0
    for table in tables:
        task = table.parent.name
        rebuilt = {p.name for p in (tmp_path / task).iterdir()}
        assert {p.name for p in table.parent.iterdir()} == rebuilt, task  # nothing stale, nothing missing
        for name in sorted(n for n in rebuilt if n.endswith(".csv")):
            before, now = (pd.read_csv(f, low_memory=False) for f in (table.parent / name, tmp_path / task / name))
            pd.testing.assert_frame_equal(before, now, check_exact=False, rtol=1e-9, obj=f"{task}/{name}")
