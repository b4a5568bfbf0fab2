"""`tta-bench leaderboard` from a small real MLflow store: table contents, lr selection,
significance columns and plots."""
import math

import numpy as np
import pandas as pd
import pytest

import tta_bench
from tta_bench import HParam, Protocol, RunOptions, stats
from tta_bench.cli import main
from tta_bench.errors import TTAError
from tta_bench.leaderboard import Selection, build

from conftest import ToyTask

LRS = (5e-3, 2e-2, 1e-1)  # 2e-2 is within x2 of the focus methods' default lr 2.05e-2
METHODS = ("ifo", "entropy", "dofo")
SHIFTS = (0.0, 0.5, 1.0, 1.5)


class ShiftedToy(ToyTask):
    """The toy task under a configurable input shift: one configuration per shift."""

    options = {"shift": HParam(0.0, float, "added to every input")}

    def __init__(self, **options):
        super().__init__(**options)
        self.x = self.x + self.opts.shift


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    results = {}
    for shift in SHIFTS:
        for name in METHODS:
            r = tta_bench.run(ShiftedToy(shift=shift), tta_bench.get_method(name), Protocol(LRS),
                              RunOptions(progress=False, tracking_uri=uri, experiment="lb"))
            results[shift, name] = {s["lr"]: s for s in r.summary}
    for d in (0.08, 0.32):
        tta_bench.run(ShiftedToy(), tta_bench.get_method("ifo"), Protocol(LRS, threshold=d),
                      RunOptions(progress=False, tracking_uri=uri, experiment="lb"))
    return uri, root, results


def _read(out, name):
    return pd.read_csv(out / "toy" / f"{name}.csv")


def test_method_table_matches_the_runs(store, tmp_path):
    uri, _, results = store
    files = build(uri, "lb", tmp_path, Selection("default"))
    methods = _read(tmp_path, "methods").set_index("method")
    assert sorted(methods.index) == sorted(METHODS)
    assert (methods["lr"] == 2e-2).all() and (methods["lr chosen"] == "default").all()
    for name in METHODS:
        d = np.array([results[s, name][2e-2]["delta_acc"] for s in SHIFTS])
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
    assert sorted(configs.index) == sorted(f"toy(shift={s})" for s in SHIFTS)
    s = results[1.0, "dofo"][2e-2]
    assert configs.loc["toy(shift=1.0)", "dofo"] == f"{s['delta_acc']:+.2f} ({s['n_fixed']}/{s['n_broken']})"
    assert (configs["n_total"] == 40).all()
    md = (tmp_path / "toy" / "methods.md").read_text()
    assert "nearest (within ×2) the method's default" in md and "| ifo " in md
    assert "<caption>" in (tmp_path / "toy" / "methods.html").read_text()
    assert "\\toprule" in (tmp_path / "toy" / "methods.tex").read_text()
    for png in ("delta_vs_lr.png", "cd.png", "threshold.png"):
        assert (tmp_path / "toy" / png).read_bytes()[:4] == b"\x89PNG"
    assert tmp_path / "LEADERBOARD.md" in files


def test_best_lr_is_flagged_and_fixed_lr_is_applied(store, tmp_path):
    uri, _, results = store
    build(uri, "lb", tmp_path / "best", Selection("best"))
    methods = _read(tmp_path / "best", "methods").set_index("method")
    for name in METHODS:
        means = {lr: np.mean([results[s, name][lr]["delta_acc"] for s in SHIFTS]) for lr in LRS}
        assert methods.loc[name, "lr"] == pytest.approx(max(means, key=means.get))
    assert (methods["lr chosen"] == "best on test ⚠").all()
    assert "BEST MEAN Δacc ON THE TEST STREAM" in (tmp_path / "best" / "toy" / "methods.md").read_text()
    build(uri, "lb", tmp_path / "fixed", Selection("fixed", 0.1))
    assert (_read(tmp_path / "fixed", "methods")["lr"] == 0.1).all()


def test_learning_rate_threshold_and_friedman_tables(store, tmp_path):
    uri, _, results = store
    build(uri, "lb", tmp_path, Selection("default"))
    lrs = _read(tmp_path, "learning_rates")
    assert len(lrs) == len(METHODS) * len(LRS)
    row = lrs[(lrs["method"] == "entropy") & (lrs["lr"] == 0.1)].iloc[0]
    d = [results[s, "entropy"][0.1]["delta_acc"] for s in SHIFTS]
    assert row["Δacc>0"] == sum(x > 0 for x in d) and row["mean Δacc"] == pytest.approx(np.mean(d))
    th = _read(tmp_path, "thresholds")
    assert list(th["threshold"]) == [0.08, 0.16, 0.32] and set(th["method"]) == {"ifo"}
    assert th["frac_uncertain"].is_monotonic_increasing
    fr = _read(tmp_path, "friedman")
    assert fr["average rank"].sum() == pytest.approx(6.0)  # k(k+1)/2 for k = 3
    caption = (tmp_path / "toy" / "friedman.md").read_text()
    assert f"critical difference (α = 0.05) = {stats.critical_difference(3, 4):.3g}" in caption


def test_missing_experiment_and_bad_flags_are_clear_errors(store, capsys):
    uri, _, _ = store
    with pytest.raises(TTAError, match="no MLflow experiment 'nope'"):
        build(uri, "nope", None, Selection())
    assert main(["leaderboard", "--tracking-uri", uri, "--experiment", "lb", "--lr", "0.1"]) == 2
    assert "--select fixed needs --lr" in capsys.readouterr().err
    assert main(["leaderboard", "--tracking-uri", uri, "--experiment", "lb", "--task", "cifar10"]) == 2
    assert "no runs for task(s) cifar10; tasks with runs: toy" in capsys.readouterr().err
