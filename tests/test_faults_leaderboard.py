"""Issue 15 for `tta-bench leaderboard` and `tta-bench sync`: every bad input is one line on
stderr and exit code 2, fast, with no traceback; a bad run folder does not stop a sync."""
import json
import shutil
import socket
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ToyTask
from test_cli import run_cli

import tta_bench
from tta_bench import Protocol, RunOptions, RunResult
from tta_bench.core.errors import TTAError
from tta_bench.reporting.runs import load_runs
from tta_bench.storage.tracking import Tracker, check_uri

LRS = (5e-3, 2e-2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small real store (ifo and entropy at two lrs, dofo at one) and the run folders saved."""
    root = tmp_path_factory.mktemp("faults")
    uri = f"sqlite:///{root}/mlflow.db"
    for name, lrs in (("ifo", LRS), ("entropy", LRS), ("dofo", (0.1,))):
        tta_bench.run(ToyTask(), tta_bench.get_method(name), Protocol(lrs),
                      RunOptions(progress=False, tracking_uri=uri, experiment="lb", out=root / "runs" / name))
    return uri, root


def one_line_error(capsys, *argv, words=()):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and err.startswith("tta-bench: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
    return err


def lb(uri, *argv):
    return ("leaderboard", "--tracking-uri", uri, "--experiment", "lb", *argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_server_fails_fast(capsys, tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    one_line_error(capsys, *lb(uri, "--out", str(tmp_path)), words=(uri, "Connection refused", "server is running"))
    assert time.perf_counter() - t0 < 15


@pytest.mark.parametrize("uri,words", [
    ("foo://bar", ("'foo://bar'", "no tracking store for the scheme 'foo'", "sqlite:///", "http(s)://")),
    ("http://", ("names no host",)),
    ("http://host:port", ("Port could not be cast",)),
    ("sqlite://", ("names no database file",)),
    ("mlflow.db", ("pass sqlite:///mlflow.db",)),
])
def test_malformed_uri(capsys, tmp_path, uri, words):
    for command in (lb(uri, "--out", str(tmp_path)), ("sync", str(tmp_path), "--tracking-uri", uri)):
        one_line_error(capsys, *command, words=("is not valid", *words))


def test_check_uri_accepts_what_mlflow_stores(monkeypatch):
    for uri in ("sqlite:///x.db", "http://127.0.0.1:5000", "https://mlflow.lab", "postgresql+psycopg2://u@h/db",
                "databricks", "databricks://profile"):
        assert check_uri(uri) == uri
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(TTAError, match="folder stores only with MLFLOW_ALLOW_FILE_STORE=true"):
        check_uri("/tmp/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert check_uri("file:///tmp/mlruns") == "file:///tmp/mlruns" and check_uri("/tmp/mlruns") == "/tmp/mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nope://x")
    with pytest.raises(TTAError, match="MLFLOW_TRACKING_URI"):
        check_uri(None)
    with pytest.raises(TTAError, match="empty"):
        check_uri("")


def test_empty_experiment(capsys, store, tmp_path):
    uri, root = store
    one_line_error(capsys, "leaderboard", "--tracking-uri", uri, "--experiment", "", "--out", str(tmp_path),
                   words=("--experiment is empty",))
    one_line_error(capsys, "sync", str(root / "runs"), "--tracking-uri", uri, "--experiment", " ",
                   words=("--experiment is empty",))


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_corrupt_sqlite_store_names_the_file(capsys, store, tmp_path, damage):
    uri, root = store
    db = tmp_path / "mlflow.db"
    data = (root / "mlflow.db").read_bytes()
    db.write_bytes(bytes(range(256)) * 400 if damage == "random" else data[:len(data) // 3])
    one_line_error(capsys, *lb(f"sqlite:///{db}", "--out", str(tmp_path / "out")),
                   words=(str(db), "cannot read the MLflow store"))


def test_missing_sqlite_store_is_not_created(capsys, tmp_path):
    db = tmp_path / "none.db"
    one_line_error(capsys, *lb(f"sqlite:///{db}", "--out", str(tmp_path / "out")), words=(f"no MLflow store at {db}",))
    assert not db.exists()


def test_fixed_lr_without_runs_lists_methods_and_lrs(capsys, store, tmp_path):
    uri, _ = store
    one_line_error(capsys, *lb(uri, "--select", "fixed", "--lr", "0.123", "--out", str(tmp_path)),
                   words=("no run at lr = 0.123", "dofo, entropy, ifo", "learning rates with runs: 0.005, 0.02, 0.1"))


def test_fixed_lr_some_methods_without_runs_is_a_warning(capsys, store, tmp_path):
    uri, _ = store
    with pytest.warns(UserWarning, match="left out, no run at lr = 0.1: entropy, ifo"):
        code, _, err = run_cli(capsys, *lb(uri, "--select", "fixed", "--lr", "0.1", "--out", str(tmp_path)))
    assert code == 0 and "Traceback" not in err
    assert "left out" in (tmp_path / "LEADERBOARD.md").read_text()


@pytest.mark.parametrize("lr", ["-1", "0", "nan", "inf"])
def test_bad_lr_is_refused_before_the_store_is_opened(capsys, tmp_path, lr):
    db = tmp_path / "never.db"
    one_line_error(capsys, *lb(f"sqlite:///{db}", "--select", "fixed", "--lr", lr),
                   words=("--lr must be a finite learning rate > 0",))
    assert not db.exists()


@pytest.mark.parametrize("argv,words", [
    (("--threshold", "0.5"), ("no runs at threshold d = 0.5", "thresholds with runs: 0.16", "--threshold")),
    (("--threshold", "none"), ("no runs at threshold d = none", "thresholds with runs: 0.16")),
    (("--threshold", "nan"), ("--threshold must be in (0, 1] or none",)),
    (("--threshold", "2"), ("--threshold must be in (0, 1] or none",)),
    (("--reference", "nope"), ("--reference 'nope' has no runs", "methods with runs: dofo, entropy, ifo")),
    (("--task", "nope"), ("no runs for task(s) nope; tasks with runs: toy",)),
    (("--parent", "0123456789abcdef0123456789abcdef"), ("--parent '0123456789abcdef0123456789abcdef' is not a run",)),
    (("--parent", "a' or '1'='1"), ("is not a run of experiment 'lb'",)),
    (("--experiment", "nope"), ("no MLflow experiment 'nope'",)),
])
def test_leaderboard_bad_selection(capsys, store, tmp_path, argv, words):
    uri, _ = store
    one_line_error(capsys, *lb(uri, "--out", str(tmp_path / "out"), *argv), words=words)


def test_out_is_a_file(capsys, store, tmp_path):
    uri, _ = store
    (tmp_path / "file").write_text("")
    one_line_error(capsys, *lb(uri, "--out", str(tmp_path / "file")), words=("--out",))


def test_experiment_with_only_interrupted_runs(capsys, store, tmp_path):
    uri, root = store
    result = RunResult.load(root / "runs" / "ifo")
    result.interrupted = True
    Tracker(uri, "stopped").log(result)
    one_line_error(capsys, "leaderboard", "--tracking-uri", uri, "--experiment", "stopped", "--out", str(tmp_path),
                   words=("no finished tta-bench runs", "2 killed"))
    # ... which a report over runs stopped early (benchmarks/retrieval_report.py) reads on request
    runs = load_runs(uri, "stopped", interrupted=True)
    assert sorted(runs["lr"]) == sorted(LRS) and (runs["n_total"] == len(result.rows) / len(LRS)).all()


@pytest.mark.parametrize("content,words", [
    ("{}", ("run.json is not a tta-bench run record", "summary, config, metadata, interrupted")),
    ("[1, 2]", ("run.json is not a tta-bench run record",)),
    ("not json", ("run.json cannot be read",)),
    ("drop:metadata", ("metadata missing",)),
    ("drop:protocol", ("incomplete or damaged", "'protocol'")),
])
def test_sync_of_a_bad_folder(capsys, store, tmp_path, content, words):
    uri, root = store
    bad = tmp_path / "bad"
    shutil.copytree(root / "runs" / "ifo", bad)
    if content.startswith("drop:"):
        record = json.loads((bad / "run.json").read_text())
        record.pop(content[5:], None) or record["config"].pop(content[5:])
        content = json.dumps(record)
    (bad / "run.json").write_text(content)
    one_line_error(capsys, "sync", str(bad), "--tracking-uri", f"sqlite:///{tmp_path}/up.db", words=(str(bad), *words))


def test_sync_of_a_folder_without_samples(capsys, store, tmp_path):
    _, root = store
    shutil.copytree(root / "runs" / "ifo", tmp_path / "run")
    (tmp_path / "run" / "samples.parquet").unlink()
    one_line_error(capsys, "sync", str(tmp_path / "run"), "--tracking-uri", f"sqlite:///{tmp_path}/up.db",
                   words=("samples.parquet is missing",))


def test_one_bad_folder_does_not_stop_the_sync(capsys, store, tmp_path):
    _, root = store
    tree = tmp_path / "tree"
    for name in ("entropy", "ifo"):
        shutil.copytree(root / "runs" / name, tree / name)
    (tree / "a-bad").mkdir()  # sorted first
    (tree / "a-bad" / "run.json").write_text("{}")
    uri = f"sqlite:///{tmp_path}/up.db"
    with pytest.warns(UserWarning, match=f"{tree / 'a-bad'}: samples.parquet is missing.*skipped"):
        code, out, err = run_cli(capsys, "sync", str(tree), "--tracking-uri", uri, "--experiment", "up")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("tta-bench: error: 1 of 3 run folders not uploaded")
    assert "2 uploaded" in out
    tracker = Tracker(uri, "up")
    for name in ("entropy", "ifo"):
        assert tracker.find(RunResult.load(tree / name).key) is not None


@pytest.mark.parametrize("column,value,need", [
    ("lr", "-0.0205", "a finite number > 0"),
    ("lr", "inf", "a finite number > 0"),
    ("lr", "abc", "a finite number > 0"),
    ("threshold", "abc", "a finite number >= 0"),
    ("threshold", "-1", "a finite number >= 0"),
    ("delta_acc", "abc", "a finite number (or empty)"),
    ("delta_acc", "-inf", "a finite number (or empty)"),
])
def test_runs_table_cells_are_validated(capsys, tmp_path, column, value, need):
    """A bad cell of a runs table (--runs) is one line naming file, line and column; nothing is
    built (before: a traceback, or a NaN or inf that moved the headline)."""
    published = Path(__file__).parent.parent / "leaderboard" / "mc" / "runs.csv"
    runs = pd.read_csv(published, dtype=str)
    runs.loc[3, column] = value
    path = tmp_path / "runs.csv"
    runs.to_csv(path, index=False)
    code, _, err = run_cli(capsys, "leaderboard", "--runs", str(path), "--out", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1, err
    assert f"{path} (--runs), line 5, column {column}: {value!r} is not {need}" in err
    assert not (tmp_path / "o").exists()
