"""Issue 26: hyperparameters chosen on held-out data (`tta-bench leaderboard --select heldout`),
from small synthetic runs tables: validation configurations are never scored, method families,
the argmax and its tie rule, the oracle and its regret, and no-op methods in words."""
import re

import numpy as np
import pandas as pd
import pytest

from tta_bench.cli import main
from tta_bench.core import stats
from tta_bench.core.errors import TTAError
from tta_bench.reporting.leaderboard import build
from tta_bench.reporting.runs import families
from tta_bench.reporting.selection import Selection
from tta_bench.reporting.tables import (
    BASE_MODEL,
    FIXED,
    HEADLINE_P,
    NOOP,
    NOOP_EVERYWHERE,
)

CORRUPTIONS = ("fog", "frost", "glass", "snow")
TEST = [f"toy(corruption={c})" for c in CORRUPTIONS]
VAL = [f"toy(corruption={c}, subset=val)" for c in CORRUPTIONS[:2]]


def run(config: str, method: str, lr: float, delta: float, changed: float | None = 20, **columns) -> dict:
    """One row of a runs table (OUT/TASK/runs.csv) at d = 0.16; changed None: not recorded."""
    fixed = 0 if changed == 0 else 10 + max(delta, 0)
    broken = 0 if changed == 0 else 10 + max(-delta, 0)
    return {"task": "toy", "configuration": config, "method": method, "method_name": re.split(r"[(\[]", method)[0],
            "lr": lr, "threshold": 0.16, "start": "2026-01-01 00:00:00+00:00", "delta_acc": delta,
            "n_fixed": fixed, "n_broken": broken, "n_total": 200, "n_uncertain": 100, "frac_uncertain": 0.5,
            "acc_source": 50.0, "acc_adapted": 50.0 + delta, "forwards_per_sample": 3.0, "backwards_per_sample": 1.0,
            "samples_per_s": 10.0, "option.corruption": re.search(r"corruption=(\w+)", config).group(1),
            "option.subset": "val" if "subset=val" in config else "test",
            **({} if changed is None else {"n_changed": changed}), **columns}


def grid(method: str, lr: float, test: list[float], val: list[float] | None = None, **kw) -> list[dict]:
    """A method at one lr: Δacc per test configuration, and per validation configuration."""
    return ([run(c, method, lr, d, **kw) for c, d in zip(TEST, test, strict=True)]
            + [run(c, method, lr, d, **kw) for c, d in zip(VAL, val or [], strict=False)])


def leaderboard(tmp_path, rows: list[dict], mode: str, name: str = "out"):
    path = tmp_path / f"{name}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    out = tmp_path / name
    build(None, "x", out, Selection(mode), runs_tables=[path], store=False, site=out / "site")
    return out


def read(out, table: str) -> pd.DataFrame:
    return pd.read_csv(out / "toy" / f"{table}.csv")


def shown(out, table: str) -> pd.DataFrame:
    """The rows of a Markdown table as strings, by method (or family)."""
    lines = [line for line in (out / "toy" / f"{table}.md").read_text().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    df = pd.DataFrame(cells[2:], columns=cells[0])
    return df.set_index(df.columns[1] if df.columns[0] == "rank" else df.columns[0])


def planted() -> list[dict]:
    """entropy: at lr 0.1 a huge Δacc on ONE test configuration (and worse on the others and on
    validation); its modest best lr on validation is 0.01. ifo: a steady reference."""
    return [*grid("entropy", 0.001, [0.5] * 4, [1.0, 1.0]),
            *grid("entropy", 0.01, [1.5] * 4, [2.0, 2.5]),
            *grid("entropy", 0.1, [100.0, -1.0, -1.0, -1.0], [-5.0, -4.0]),
            *grid("ifo", 0.01, [3.0, 4.0, 5.0, 6.0], [4.0, 4.0])]


def test_heldout_does_not_pick_a_planted_lr_that_the_oracle_and_best_pick(tmp_path):
    held = leaderboard(tmp_path, planted(), "heldout", "held")
    best = leaderboard(tmp_path, planted(), "best", "best")
    head = read(held, "headline").set_index("method")
    assert head.loc["entropy", "lr"] == 0.01 and head.loc["entropy", "mean Δacc"] == pytest.approx(1.5)
    assert shown(held, "headline").loc["entropy", "lr"] == "0.01 (held-out)"
    assert read(best, "headline").set_index("method").loc["entropy", "lr"] == 0.1  # chosen on the test data
    assert shown(best, "headline").loc["entropy", "lr"] == "0.1 (best on test ⚠)"
    sel = read(held, "selection").set_index("family")
    oracle = (100 - 3) / 4
    assert sel.loc["entropy", ["held-out variant", "held-out lr", "oracle variant", "oracle lr"]].tolist() == [
        "entropy", 0.01, "entropy", 0.1]
    assert sel.loc["entropy", "validation mean Δacc"] == pytest.approx(2.25)
    assert sel.loc["entropy", "validation configs"] == 2 and sel.loc["entropy", "test configs"] == 4
    assert sel.loc["entropy", "oracle test mean Δacc"] == pytest.approx(oracle)
    assert sel.loc["entropy", "regret"] == pytest.approx(oracle - 1.5) and (sel["regret"] >= 0).all()
    view = shown(held, "selection")
    assert view.loc["entropy", "held-out choice (variant @ lr)"] == "entropy @ 0.01"
    assert view.loc["entropy", "oracle: best on test ⚠"] == "entropy @ 0.1"
    assert view.loc["entropy", "validation mean Δacc (configs)"] == "+2.25 (2)"
    md = (held / "LEADERBOARD.md").read_text()
    assert md.index("### toy") < md.index("Per family: the held-out") < md.index("\n## toy")  # after the headline
    assert "ties: the smallest lr, then the variant label" in (held / "toy" / "headline.md").read_text()
    index = (held / "site" / "index.html").read_text()
    assert index.index('id="toy-headline"') < index.index('id="toy-selection"')


@pytest.mark.filterwarnings("ignore:toy. left out")  # default: entropy has no run near its default lr
@pytest.mark.parametrize("mode", ["heldout", "default", "best"])
def test_validation_configurations_are_never_scored(tmp_path, mode):
    rows = planted() + grid("ifo", 0.0205, [2.0] * 4, [-50.0, -50.0])  # a validation run that would drag ifo
    out = leaderboard(tmp_path, rows, mode)
    assert (read(out, "methods")["configs"] == 4).all()
    assert (read(out, "learning_rates_detail")["configs"] == 4).all()
    assert read(out, "configurations")["configuration"].tolist() == TEST
    assert "toy: 4 configuration(s)" in (out / "toy" / "headline.md").read_text()
    ifo = read(out, "methods").set_index("method").loc["ifo"]
    assert ifo["mean Δacc"] == pytest.approx(2.0 if ifo["lr"] == 0.0205 else 4.5)
    bodies = 0
    for path in sorted((out / "toy").iterdir()) + sorted((out / "site").rglob("*.*")):
        if path.suffix == ".png" or path.name == "runs.csv":  # runs.csv: the input, every run read
            continue
        text = re.sub(r'<table class="provenance">.*?</table>', "", path.read_text(), flags=re.DOTALL)  # names them
        body = {".md": "\n".join(line for line in text.splitlines() if line.startswith("|")),
                ".tex": "\n".join(line for line in text.splitlines() if not line.startswith("%")),
                ".html": "".join(re.findall(r"<tbody>.*?</tbody>", text, re.DOTALL))}.get(path.suffix, text)
        assert "subset=val" not in body and "-50" not in body, path
        bodies += bool(body)
    assert bodies > 20
    md = (out / "LEADERBOARD.md").read_text()
    assert f"validation configurations: {'; '.join(VAL)}" in md  # provenance names them
    if mode == "heldout":
        for table in ("headline", "selection"):  # and so do the captions of held-out selection
            named = "; ".join(v.replace(", subset=val", "") for v in VAL)  # every varying option, no defaults hidden
            assert f"(2, subset=val: {named})" in (out / "toy" / f"{table}.md").read_text()


def test_the_choice_is_the_argmax_of_the_validation_mean_with_the_tie_rule(tmp_path):
    rows = [*grid("tent", 0.001, [9.0] * 4, [9.0]),  # the highest mean, but not on every validation configuration
            *grid("tent", 0.01, [1.0] * 4, [2.5, 3.5]),  # 3.0
            *grid("tent(norm_stats=sample)", 0.01, [2.0] * 4, [3.25, 2.75]),  # 3.0: a tie, the label decides
            *grid("tent", 0.1, [5.0] * 4, [3.0, 3.0]),  # 3.0: a tie, the smaller lr wins
            *grid("tent(norm_stats=sample)", 0.001, [7.0] * 4, [2.0, 2.0])]
    out = leaderboard(tmp_path, rows, "heldout", "a")
    sel = read(out, "selection").set_index("family")
    assert sel.loc["tent", ["held-out variant", "held-out lr"]].tolist() == ["tent", 0.01]
    assert sel.loc["tent", ["oracle variant", "oracle lr"]].tolist() == ["tent(norm_stats=sample)", 0.001]
    assert sel.loc["tent", "regret"] == pytest.approx(7.0 - 1.0)
    # the same tie at a smaller lr: the lr decides before the label
    out = leaderboard(tmp_path, rows + grid("tent(norm_stats=sample)", 0.005, [0.0] * 4, [3.0, 3.0]), "heldout", "b")
    sel = read(out, "selection").set_index("family")
    assert sel.loc["tent", ["held-out variant", "held-out lr"]].tolist() == ["tent(norm_stats=sample)", 0.005]
    assert read(out, "headline")["method"].tolist() == ["tent(norm_stats=sample)"]
    # a larger mean wins whatever the lr and label; the choice is the exact argmax
    rng = np.random.default_rng(0)
    rows = [r for lr in (0.001, 0.01, 0.1) for m in ("tent", "tent(norm_stats=sample)")
            for r in grid(m, lr, list(rng.normal(size=4)), list(rng.normal(size=2)))]
    val = pd.DataFrame(rows).query("`option.subset` == 'val'").groupby(["method", "lr"])["delta_acc"].mean()
    out = leaderboard(tmp_path, rows, "heldout", "c")
    sel = read(out, "selection").set_index("family")
    assert tuple(sel.loc["tent", ["held-out variant", "held-out lr"]]) == val.idxmax()


def test_the_every_candidate_oracle_sees_a_variant_that_ran_on_part_of_the_test_configurations(tmp_path):
    """The oracle column ranks the candidates run on every test configuration; a candidate with
    runs on only some of them (a sweep not yet complete) still counts in the every-candidate
    oracle, on the configurations all candidates ran on, beside the held-out choice's mean there."""
    partial = [r for r in grid("tent(norm_stats=sample)", 0.01, [5.0, 7.0, 0.0, 0.0], [2.0, 2.0])
               if r["configuration"] not in TEST[2:]]
    rows = [*grid("tent", 0.01, [1.0, 1.0, 2.0, 2.0], [3.0, 3.0]), *partial,
            *grid("ifo", 0.01, [3.0, 4.0, 5.0, 6.0], [4.0, 4.0]), *grid("ifo", 0.1, [1.0] * 4, [1.0, 1.0])]
    out = leaderboard(tmp_path, rows, "heldout")
    sel = read(out, "selection").set_index("family")
    assert sel.loc["tent", ["oracle variant", "oracle lr", "regret"]].tolist() == ["tent", 0.01, 0.0]
    assert sel.loc["tent", ["every-candidate oracle variant", "every-candidate oracle lr",
                            "every-candidate configs"]].tolist() == ["tent(norm_stats=sample)", 0.01, 2]
    assert sel.loc["tent", "every-candidate oracle mean Δacc"] == pytest.approx(6.0)
    assert sel.loc["tent", "every-candidate held-out mean Δacc"] == pytest.approx(1.0)
    assert sel.loc["tent", "every-candidate regret"] == pytest.approx(5.0)
    # complete candidates: the two oracles agree
    assert sel.loc["ifo", ["every-candidate oracle variant", "every-candidate oracle lr", "every-candidate configs"]
                   ].tolist() == ["ifo", 0.01, 4]
    assert sel.loc["ifo", "every-candidate regret"] == sel.loc["ifo", "regret"] == 0.0
    view = shown(out, "selection")
    assert view.loc["tent", "every candidate, best on test ⚠ (test configs)"] == "tent(norm_stats=sample) @ 0.01: +6.00 (2)"
    assert view.loc["tent", "held-out there, regret"] == "+1.00, +5.00"
    assert "the two oracles agree once every candidate has run" in (out / "toy" / "selection.md").read_text()


def test_families_follow_the_scoring_hyperparameters(tmp_path):
    rows = [*grid("pasle", 5e-5, [1.0] * 4, [1.0, 1.0]),
            *grid("pasle(tau=0.08)", 5e-5, [0.5] * 4, [2.0, 2.0]),  # a variant of pasle: chosen on validation
            *grid("pasle(gate=own)", 5e-5, [0.2] * 4, [0.5, 0.5]),  # another family: its own row
            *grid("pasle(gate=own, tau=0.08)", 5e-5, [0.1] * 4, [0.1, 0.1]),
            *grid("tent", 1e-4, [1.0] * 4, [1.0, 1.0]),
            *grid("tent(norm_stats=sample)", 1e-4, [-3.0] * 4, [1.5, 1.5])]  # competes with tent, and wins
    out = leaderboard(tmp_path, rows, "heldout")
    assert sorted(read(out, "headline")["method"]) == ["pasle(gate=own)", "pasle(tau=0.08)", "tent(norm_stats=sample)"]
    sel = read(out, "selection").set_index("family")
    assert sorted(sel.index) == ["pasle", "pasle(gate=own)", "tent"]
    assert sel.loc["pasle(gate=own)", "held-out variant"] == "pasle(gate=own)"
    assert sel.loc["pasle", ["held-out variant", "oracle variant"]].tolist() == ["pasle(tau=0.08)", "pasle"]
    # logged hyperparameters (hp.* columns) count where a runs table has them; else the label says
    table = pd.DataFrame({"method": ["pasle", "pasle(gate=own)[optimizer=adam]", "pasle(tau=0.5)", "mine(a=1)",
                                     "tent(norm_stats=sample)"],
                          "method_name": ["pasle", "pasle", "pasle", "mine", "tent"],
                          "hp.gate": [np.nan, np.nan, "own", np.nan, np.nan]})
    assert families(table) == {"pasle": "pasle", "pasle(gate=own)[optimizer=adam]": "pasle(gate=own)",
                               "pasle(tau=0.5)": "pasle(gate=own)", "mine(a=1)": "mine(a=1)",
                               "tent(norm_stats=sample)": "tent"}


@pytest.mark.parametrize("recorded", [True, False])  # False: older runs, n_changed not recorded
def test_a_no_op_is_in_words_and_out_of_the_holm_family(tmp_path, recorded):
    changed = {} if recorded else {"changed": None}
    rows = [*grid("ifo", 0.0205, [3.0, 4.0, 5.0, 6.0], **changed),
            *grid("entropy", 0.0205, [1.0, 2.0, -0.5, 3.0], **changed),
            *grid("dofo", 0.0205, [0.0] * 4, changed=10 if recorded else None),  # Δacc 0, predictions changed
            *grid("sar", 3.1e-6, [0.0] * 4, changed=0)]
    if not recorded:  # dofo: fixed as many as it broke, so not a no-op
        rows = [r | {"n_fixed": 5, "n_broken": 5} if r["method"] == "dofo" else r for r in rows]
        rows = [{k: v for k, v in r.items() if k != "n_changed"} for r in rows]
    out = leaderboard(tmp_path, rows, "default")
    head = shown(out, "headline")
    assert head.loc["sar", "mean Δacc [95% CI]"] == NOOP and head.loc["sar", HEADLINE_P] == "–"
    assert head.loc["dofo", "mean Δacc [95% CI]"].startswith("+0.00")
    methods = read(out, "methods").set_index("method")
    assert np.isnan(methods.loc["sar", "p Wilcoxon (Holm)"]) and methods.loc["sar", "note"] == NOOP
    tested = ["ifo", "entropy", "dofo"]
    holm = stats.holm([stats.wilcoxon_greater(read_deltas(rows, m)) for m in tested])
    np.testing.assert_allclose(methods.loc[tested, "p Wilcoxon (Holm)"], holm)
    caption = (out / "toy" / "headline.md").read_text()
    assert "No-op (changed no prediction on any configuration; excluded from the Holm family): sar." in caption


def read_deltas(rows: list[dict], method: str) -> np.ndarray:
    return np.array([r["delta_acc"] for r in rows if r["method"] == method and r["option.subset"] == "test"])


def test_a_family_that_never_changes_a_prediction_says_so(tmp_path):
    rows = [*grid("ifo", 0.0205, [3.0, 4.0, 5.0, 6.0], [1.0, 1.0]),
            *grid("sar", 3.1e-6, [0.0] * 4, [0.0, 0.0], changed=0),
            *grid("sar", 1e-5, [0.0] * 4, [0.0, 0.0], changed=0),
            *grid("tent", 1e-4, [0.0] * 4, [0.0, 1.0], changed=0)]  # a no-op on test, not on validation
    rows[-1]["n_changed"] = 3
    out = leaderboard(tmp_path, rows, "heldout")
    head = shown(out, "headline")
    assert head.loc["sar", "mean Δacc [95% CI]"] == NOOP_EVERYWHERE and head.loc["sar", "lr"] == "3.1e-06 (held-out)"
    assert head.loc["tent", "mean Δacc [95% CI]"] == NOOP
    assert shown(out, "selection").loc["sar", "validation mean Δacc (configs)"] == NOOP_EVERYWHERE


def test_heldout_without_validation_configurations_is_one_line(tmp_path, capsys, monkeypatch):
    rows = planted()
    rows = [r for r in rows if r["option.subset"] == "test"]
    with pytest.raises(TTAError, match="no task has validation configurations") as err:
        leaderboard(tmp_path, rows, "heldout")
    assert "\n" not in str(err.value) and "--select default" in str(err.value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the runs table alone
    assert main(["leaderboard", "--runs", str(tmp_path / "out.csv"), "--out", str(tmp_path / "o"),
                 "--select", "heldout"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no task has validation configurations (subset=val)" in lines[0]


def test_a_task_without_validation_configurations_falls_back_to_the_default_rule_and_says_so(tmp_path):
    other = [{**r, "task": "other", "configuration": r["configuration"].replace("toy", "other")}
             for r in grid("ifo", 0.0205, [1.0, 2.0, 3.0, 4.0])]
    out = leaderboard(tmp_path, planted() + other, "heldout")
    assert "(held-out)" in (out / "toy" / "headline.md").read_text()
    fallback = (out / "other" / "headline.md").read_text()
    assert "(held-out)" not in fallback and "(default (no held-out data))" in fallback
    caption = (out / "LEADERBOARD.md").read_text()
    assert "NOT HELD-OUT (this task has no validation configurations" in caption


def test_a_family_without_a_candidate_on_every_validation_configuration_is_left_out(tmp_path):
    rows = planted() + grid("tent", 1e-4, [1.0] * 4, [1.0])  # one of the two validation configurations
    with pytest.warns(UserWarning, match="left out, no \\(variant, lr\\) run on every validation configuration: tent"):
        out = leaderboard(tmp_path, rows, "heldout")
    assert "tent" not in set(read(out, "headline")["method"]) | set(read(out, "selection")["family"])


def test_a_family_with_one_setting_and_no_validation_runs_is_scored_as_not_tuned(tmp_path):
    """Issue 29: retrieval methods at their paper's setting (one lr, no knob tuned) need no
    validation runs; a family with two settings and none is still left out (nothing to choose on)."""
    timing = {"seconds_per_sample": 1.0, "select_seconds_per_sample": 0.0}
    rows = [r | timing for r in planted()] + grid("nn", 5e-5, [2.0, 2.0, 3.0, 3.0], seconds_per_sample=2.0,
                                                 select_seconds_per_sample=0.5)
    rows += grid("sift", 5e-5, [1.0] * 4) + grid("sift", 1e-4, [9.0] * 4)
    with pytest.warns(UserWarning, match="no \\(variant, lr\\) run on every validation configuration: sift"):
        out = leaderboard(tmp_path, rows, "heldout")
    head, view = read(out, "headline").set_index("method"), shown(out, "headline")
    assert head.loc["nn", "mean Δacc"] == pytest.approx(2.5) and view.loc["nn", "lr"] == "5e-05 (not tuned)"
    assert "sift" not in head.index
    selection = shown(out, "selection")
    assert selection.loc["nn", "validation mean Δacc (configs)"] == FIXED and selection.loc["nn", "regret"] == "+0.00"
    caption = (out / "toy" / "headline.md").read_text()
    assert "Not tuned (no validation runs; one setting, scored as run): nn." in caption
    assert shown(out, "headline").loc["entropy", "lr"] == "0.01 (held-out)"  # the others are chosen as before
    assert view.loc["nn", "s per scored sample"] == "2 (selection 0.5)"  # retrieval: its selection time apart
    assert view.loc["entropy", "s per scored sample"] == "1"


def test_the_base_model_is_the_unranked_reference_row(tmp_path):
    rows = planted() + grid("none", 1e-3, [0.0] * 4, changed=0)
    out = leaderboard(tmp_path, rows, "heldout")
    view = shown(out, "headline")
    assert list(view.index) == ["ifo", "entropy", "none"]  # last, whatever its mean
    assert view.loc["none", "rank"] == "–" and view.loc["none", "lr"] == "–"
    assert view.loc["none", "mean Δacc [95% CI]"] == BASE_MODEL and view.loc["none", HEADLINE_P] == "–"
    assert "none" not in set(read(out, "selection")["family"])
    holm = stats.holm([stats.wilcoxon_greater(np.array(d)) for d in ([3.0, 4.0, 5.0, 6.0], [1.5] * 4)])
    np.testing.assert_allclose(read(out, "methods").set_index("method").loc[["ifo", "entropy"], "p Wilcoxon (Holm)"],
                               holm)
    assert "ranked beside the methods as the reference (Δacc 0 on every configuration): none" in (
        out / "toy" / "friedman.md").read_text()


def test_only_configurations_every_ranked_method_ran_on_are_scored(tmp_path):
    rows = planted() + grid("tent", 1e-4, [9.0, 9.0, 9.0, 9.0], [1.0, 1.0])
    rows = [r for r in rows if not (r["method"] == "tent" and r["configuration"] == TEST[0])]  # tent missed one
    with pytest.warns(UserWarning, match=f"1 configuration\\(s\\) not scored.*{re.escape(TEST[0])} \\(no tent\\)"):
        out = leaderboard(tmp_path, rows, "heldout")
    head = read(out, "headline").set_index("method")
    assert TEST[0] not in set(read(out, "configurations")["configuration"])
    assert head.loc["ifo", "mean Δacc"] == pytest.approx(5.0)  # over the three shared configurations (4, 5, 6)
    chosen = read(out, "selection").set_index("family")
    assert chosen.loc["ifo", "test mean Δacc"] == pytest.approx(5.0)  # the selection table: the same three
    assert chosen.loc["ifo", "test configs"] == 3


def test_validation_captions_name_a_default_option_too():
    """A configuration key leaves defaults out (`text(subset=val)` is the default corpus); the
    caption names every option that varies over the validation configurations."""
    from tta_bench.reporting.report import validation_labels
    val = pd.DataFrame({"configuration": ["text(subset=val)", "text(corpus=licenses, subset=val)"],
                        "option.corpus": ["shakespeare", "licenses"], "option.subset": ["val", "val"],
                        "option.window": ["128", "128"]})
    assert validation_labels("text", val, list(val["configuration"])) == [
        "text(corpus=licenses)", "text(corpus=shakespeare)"]
    assert validation_labels("text", val.iloc[:1], ["text(subset=val)"]) == ["text(subset=val)"]  # nothing varies


def test_a_new_variant_is_scored_only_on_every_configuration_the_published_table_scores(tmp_path):
    """benchmarks/fair_gpu.complete_view: a method variant the published table does not rank
    joins with its test runs only once they cover every configuration the table scores (fewer
    would take the others out of every method's score) unless the published selection table shows
    it is no held-out choice; its validation runs always count."""
    import json

    from tta_bench.storage.tracking import PROTOCOL_DEFAULTS
    fair_gpu = load_fair_gpu()

    def run(key, method, corruption, subset="test", **hparams):
        folder = tmp_path / "runs" / key
        folder.mkdir(parents=True)
        config = {"task": "cifar10", "task_options": {"corruption": corruption, "subset": subset},
                  "method": method, "hparams": hparams, "protocol": dict(PROTOCOL_DEFAULTS)}
        (folder / "run.json").write_text(json.dumps({"config": config}))
    published = pd.DataFrame({"task": "cifar10",
                              "configuration": ["cifar10(corruption=fog)", "cifar10(corruption=snow)",
                                                "cifar10(corruption=frost)", "cifar10(corruption=fog, subset=val)"],
                              "method": ["ifo", "ifo", "tent", "ifo"], "threshold": ["0.16"] * 4,
                              "option.subset": ["test", "test", "test", "val"]})
    published.loc[len(published)] = ["cifar10", "cifar10(corruption=fog)", "tent", "0.16", "test"]
    # a variant whose validation runs the table shows (its held-out choice) is not yet ranked
    published.loc[len(published)] = ["cifar10", "cifar10(corruption=fog, subset=val)", "eata", "0.16", "val"]
    published.to_csv(tmp_path / "runs.csv", index=False)  # scored: fog only (tent lacks snow, ifo frost)
    run("a", "ifo", "snow")
    run("b", "deyo", "fog")
    run("c", "deyo", "snow")
    run("d", "deyo", "fog", subset="val")
    run("e", "eata", "snow")
    run("f", "eata", "fog", subset="val")
    run("g", "eata", "snow", memory="none")
    left = fair_gpu.complete_view(tmp_path / "runs", tmp_path / "view", tmp_path / "runs.csv")
    assert left == ["cifar10: eata (test runs on 0 of 1)", "cifar10: eata(memory=none) (test runs on 0 of 1)"]
    assert sorted(p.name for p in (tmp_path / "view").iterdir()) == ["a", "b", "c", "d", "f"]
    # beside a published selection table: a variant of a ranked family that is not its held-out
    # choice is never ranked, so its test runs join wherever they are (for the every-candidate
    # oracle); a new family (deyo) still waits for every scored configuration
    pd.DataFrame({"family": ["ifo", "tent", "eata"], "held-out variant": ["ifo", "tent", "eata"]}).to_csv(
        tmp_path / "selection.csv", index=False)
    run("h", "deyo", "frost")
    left = fair_gpu.complete_view(tmp_path / "runs", tmp_path / "view", tmp_path / "runs.csv")
    assert left == ["cifar10: eata (test runs on 0 of 1)"]
    assert sorted(p.name for p in (tmp_path / "view").iterdir()) == ["a", "b", "c", "d", "f", "g", "h"]
    (tmp_path / "runs" / "b" / "run.json").unlink()  # deyo: no run on fog, the one scored configuration
    left = fair_gpu.complete_view(tmp_path / "runs", tmp_path / "view", tmp_path / "runs.csv")
    assert left == ["cifar10: deyo (test runs on 0 of 1)", "cifar10: eata (test runs on 0 of 1)"]
    assert sorted(p.name for p in (tmp_path / "view").iterdir()) == ["a", "d", "f", "g"]


def test_runs_that_are_no_job_of_the_published_specs_are_left_out(tmp_path):
    """complete_view with specs: a configuration the specs no longer have (the text board's
    all-document windows, superseded by the data-space split of issue 29) leaves the build."""
    import json

    from tta_bench.sweeps.spec import jobs_from_spec, load_spec
    fair_gpu = load_fair_gpu()
    toml = tmp_path / "spec.toml"
    toml.write_text('name = "s"\n[[tasks]]\nname = "cifar10"\ncorruption = "fog"\nsubset = ["val", "test"]\n'
                    '[[methods]]\nname = "ifo"\n')
    jobs = jobs_from_spec(load_spec(toml))[0]
    old = json.loads(json.dumps(jobs[0].config))
    old["task_options"]["corruption"] = "snow"  # no longer a job of the spec
    for key, config in [(j.key, j.config) for j in jobs] + [("old", old)]:
        (tmp_path / "runs" / key).mkdir(parents=True)
        (tmp_path / "runs" / key / "run.json").write_text(json.dumps({"config": config}))
    pd.DataFrame({"task": ["cifar10"], "configuration": ["cifar10(corruption=fog)"], "method": ["ifo"],
                  "threshold": ["0.16"], "option.subset": ["test"]}).to_csv(tmp_path / "runs.csv", index=False)
    left = fair_gpu.complete_view(tmp_path / "runs", tmp_path / "view", tmp_path / "runs.csv", [toml])
    assert sorted(p.name for p in (tmp_path / "view").iterdir()) == sorted(j.key for j in jobs)
    assert left == [f"1 run(s) that are no job of {toml}"]
    fair_gpu.complete_view(tmp_path / "runs", tmp_path / "view", tmp_path / "runs.csv")  # no specs: every run
    assert "old" in {p.name for p in (tmp_path / "view").iterdir()}


def load_fair_gpu():
    """benchmarks/fair_gpu.py, the sweep runner and packer of the published leaderboard."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "fair_gpu.py"
    spec = importlib.util.spec_from_file_location("fair_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_new_only_leaves_out_the_committed_runs_but_not_a_rerun(tmp_path):
    import tarfile

    fair_gpu = load_fair_gpu()
    runs, results = tmp_path / "runs", tmp_path / "results"
    for key, text in (("a", "a1"), ("b", "b1"), ("c", "c2")):
        (runs / key).mkdir(parents=True)
        (runs / key / "run.json").write_text(text)
        (runs / key / "summary.csv").write_text("lr\n0.1\n")
        pd.DataFrame({"uncertain": [True, False], "index": [0, 1]}).to_parquet(runs / key / "samples.parquet")
    (tmp_path / "old" / "a").mkdir(parents=True)
    (tmp_path / "old" / "a" / "run.json").write_text("a1")
    (tmp_path / "old" / "c").mkdir(parents=True)
    (tmp_path / "old" / "c" / "run.json").write_text("c1")  # c was rerun since: not committed
    results.mkdir()
    with tarfile.open(results / "fair-old-runs.tgz", "w:gz") as tar:
        tar.add(tmp_path / "old" / "a" / "run.json", "a/run.json")
        tar.add(tmp_path / "old" / "c" / "run.json", "c/run.json")
    assert fair_gpu.committed(runs, results) == {"a"}
    fair_gpu.pack(runs, tmp_path / "pk", fair_gpu.committed(runs, results))
    with tarfile.open(tmp_path / "pk" / "runs.tgz") as tar:
        assert sorted(tar.getnames()) == ["b/run.json", "b/summary.csv", "c/run.json", "c/summary.csv"]
    assert list(pd.read_parquet(tmp_path / "pk" / "rows.parquet")["job"]) == ["b", "c"]


def test_an_unfinished_runs_checkpoint_travels_in_the_pack_and_the_furthest_one_is_unpacked(tmp_path):
    """A job stopped midway (a session's end) leaves its checkpoint; the pack carries it (not its rows,
    no result yet), and unpacking keeps the furthest progress: a later pack's over an earlier one's,
    a local one that went further over both, none where the run has finished since."""
    import tarfile

    from tta_bench.storage import checkpoint

    fair_gpu = load_fair_gpu()

    def progress(n: int) -> checkpoint.Progress:
        return checkpoint.Progress(pd.DataFrame({"index": range(n), "uncertain": True}), n, n, float(n))

    def pack(name: str, n: int) -> None:
        runs = tmp_path / name
        for key in ("a", "b", "done", "later"):
            (runs / key).mkdir(parents=True)
            checkpoint.save(runs / key / checkpoint.FILE, progress(n), {})
        fair_gpu.pack(runs, tmp_path / name / "pk")
        (tmp_path / name / "pk" / "runs.tgz").rename(results / f"fair-{name}-runs.tgz")

    results = tmp_path / "results"
    results.mkdir()
    pack("1-early", 3)
    pack("2-late", 7)
    with tarfile.open(results / "fair-2-late-runs.tgz") as tar:
        assert sorted(tar.getnames()) == ["a/checkpoint.parquet", "b/checkpoint.parquet", "done/checkpoint.parquet",
                                          "later/checkpoint.parquet"]
    finished = tmp_path / "3-finished" / "later" / "run.json"  # `later` finished in the next pack
    finished.parent.mkdir(parents=True)
    finished.write_text('{"config": {"method": "nn", "hparams": {}}}')
    with tarfile.open(results / "fair-3-finished-runs.tgz", "w:gz") as tar:
        tar.add(finished, "later/run.json")
    runs = tmp_path / "runs"
    (runs / "b").mkdir(parents=True)
    checkpoint.save(runs / "b" / checkpoint.FILE, progress(9), {})
    (runs / "done").mkdir()
    (runs / "done" / "run.json").write_text('{"config": {"method": "nn", "hparams": {}}}')
    fair_gpu.unpack_committed(runs, results)
    assert fair_gpu._progress(runs / "a" / checkpoint.FILE) == 7
    assert fair_gpu._progress(runs / "b" / checkpoint.FILE) == 9
    assert not (runs / "done" / checkpoint.FILE).exists()
    assert (runs / "later" / "run.json").is_file() and not (runs / "later" / checkpoint.FILE).exists()


def test_a_job_another_live_sweep_claimed_is_left_to_it_and_a_dead_ones_claim_is_taken_over(tmp_path):
    """Two sweeps whose --only filters overlap share the work: a job whose claim (flock) a live
    process holds is skipped ("running elsewhere", nothing written); the claim of a killed process
    is taken over; a released claim leaves no empty folder behind."""
    import subprocess
    import sys

    fair_gpu = load_fair_gpu()
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    hold = ("import sys; from pathlib import Path; from tta_bench.storage.checkpoint import lock\n"
            "with lock(Path(sys.argv[1])) as holder:\n    print(holder, flush=True); sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", hold, str(runs / "a" / fair_gpu.CLAIM)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "None"  # the other sweep holds the claim
    outcomes = fair_gpu.run_configuration([("a", {})], str(runs), float("inf"), "cpu")
    assert outcomes == [("a", "running elsewhere")] and sorted(p.name for p in (runs / "a").iterdir()) == [".running"]
    other.kill()
    other.wait()

    # the killed sweep's claim is taken over; released after an error before the first window,
    # it leaves no empty folder
    bad = {"protocol": {"lrs": [0.1]}, "task": "no-such-task", "task_options": {}, "method": "ifo", "hparams": {},
           "options": {}}
    [(key, outcome)] = fair_gpu.run_configuration([("a", bad)], str(runs), float("inf"), "cpu")
    assert key == "a" and outcome.startswith("error:") and not (runs / "a").exists()


def test_a_job_another_sweep_finished_before_the_claim_was_won_is_not_run_again(tmp_path, monkeypatch):
    """Between the run.json check and winning the claim, another sweep may finish the job (and let
    go of its claim): it is then done, not run a second time, and no claim file is left behind."""
    from contextlib import contextmanager

    import tta_bench
    from tta_bench.storage import checkpoint as storage

    fair_gpu = load_fair_gpu()
    runs = tmp_path / "runs"
    real = storage.lock

    @contextmanager
    def finished_meanwhile(path):
        (path.parent / "run.json").write_text("{}")  # the other sweep's last act before letting go
        with real(path) as holder:
            yield holder

    monkeypatch.setattr(storage, "lock", finished_meanwhile)
    monkeypatch.setattr(tta_bench, "run", lambda *a, **k: pytest.fail("a finished job was run again"))
    assert fair_gpu.run_configuration([("a", {})], str(runs), float("inf"), "cpu") == [("a", "done earlier")]
    assert sorted(p.name for p in (runs / "a").iterdir()) == ["run.json"]


def test_status_prints_what_each_configuration_lacks_and_runs_nothing(tmp_path, capsys, monkeypatch):
    import json

    from tta_bench.sweeps.spec import jobs_from_spec, load_spec
    fair_gpu = load_fair_gpu()
    toml = tmp_path / "spec.toml"
    toml.write_text('name = "s"\n[[tasks]]\nname = "cifar10"\ncorruption = ["fog", "snow"]\n'
                    '[[methods]]\nname = "ifo"\n[[methods]]\nname = "tent"\n')
    jobs = jobs_from_spec(load_spec(toml))[0]
    finished = [j for j in jobs if "fog" in j.label or "ifo" in j.label]
    for job in finished:
        (tmp_path / "runs" / job.key).mkdir(parents=True)
        (tmp_path / "runs" / job.key / "run.json").write_text(json.dumps({"config": job.config}))
    monkeypatch.setattr("sys.argv", ["fair_gpu", str(toml), "--runs", str(tmp_path / "runs"), "--status"])
    assert fair_gpu.main() == 0
    assert capsys.readouterr().out.splitlines() == ["cifar10(corruption=snow): 1/2, lacks tent",
                                                    "1 of 2 configurations complete"]
    assert len(list((tmp_path / "runs").iterdir())) == len(finished)
