"""MLflow tracking: runs land in a real store (SQLite and a real `mlflow server`), survive an
unreachable server, and upload later with `tta-bench sync` exactly once."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import version

import mlflow
import pandas as pd
import pytest

import tta_bench
from tta_bench import Protocol, RunOptions, RunResult
from tta_bench.cli import main
from tta_bench.reporting.runs import _search as search_store
from tta_bench.running.scan import TrackingWarning
from tta_bench.storage.tracking import CONFIGURATION, KEY, KIND, METHOD, Tracker

LRS = (1e-2, 1e-1, 1.0)


def test_sweep_is_a_parent_with_one_child_per_lr(toy_task, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = tta_bench.run(toy_task, tta_bench.get_method("ifo", weighted=False), Protocol(LRS),
                           RunOptions(progress=False, tracking_uri=uri, experiment="sweeps"))
    runs = _search(uri, "sweeps")
    assert len(runs) == 1 + len(LRS)
    parent = runs[runs[f"tags.{KIND}"] == "sweep"]
    children = runs[runs[f"tags.{KIND}"] == "result"]
    assert parent.run_id.tolist() == [result.tracking]
    assert (children["tags.mlflow.parentRunId"] == result.tracking).all()
    assert sorted(children["params.lr"].astype(float)) == list(LRS)
    for _, child in children.iterrows():
        lr = float(child["params.lr"])
        summary = next(s for s in result.summary if s["lr"] == lr)
        for metric in ("delta_acc", "n_fixed", "n_broken", "n_uncertain", "frac_uncertain", "p_mcnemar"):
            assert child[f"metrics.{metric}"] == pytest.approx(summary[metric])
        assert child["params.hp.weighted"] == "false" and child["params.threshold"] == "0.16"
        assert child[f"tags.{METHOD}"] == "ifo(weighted=False)" and child[f"tags.{CONFIGURATION}"] == "toy"
        assert child["tags.version.torch"] == version("torch")
        assert child["tags.device"] == "cpu" and child["tags.seed"] == "0"
        rows = pd.read_parquet(mlflow.artifacts.download_artifacts(
            run_id=child.run_id, artifact_path="samples.parquet", tracking_uri=uri))
        expected = result.rows[result.rows.lr == lr].reset_index(drop=True)
        pd.testing.assert_frame_equal(rows, expected)
    assert (tmp_path / "mlruns").is_dir()  # artifacts beside the database, not in the cwd
    # no per-sample metrics: one value per metric
    client = mlflow.MlflowClient(uri)
    assert len(client.get_metric_history(children.run_id.iloc[0], "delta_acc")) == 1


def _search(uri: str, experiment: str) -> pd.DataFrame:
    """Every run of `experiment` in the store at `uri`; the global tracking URI and
    $MLFLOW_TRACKING_URI are left as they were (later tests in this process use them)."""
    experiment_id = mlflow.MlflowClient(uri).get_experiment_by_name(experiment).experiment_id
    return search_store(uri, experiment_id, "")


def test_searching_another_store_leaves_the_tracking_uri_alone(toy_task, tmp_path):
    """A search of another store must not redirect the runs made afterwards in this process."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tta_bench.run(toy_task, tta_bench.get_method("entropy"), Protocol((0.05,)),
                  RunOptions(progress=False, tracking_uri=uri))
    before = os.environ["MLFLOW_TRACKING_URI"], mlflow.get_tracking_uri()
    assert len(_search(uri, "tta-bench")) == 1
    assert (os.environ["MLFLOW_TRACKING_URI"], mlflow.get_tracking_uri()) == before != (uri, uri)


def test_single_lr_is_one_run_and_logging_again_is_a_no_op(toy_task, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "run"
    result = tta_bench.run(toy_task, tta_bench.get_method("entropy"), Protocol((0.05,)),
                           RunOptions(progress=False, tracking_uri=uri, out=out))
    runs = _search(uri, "tta-bench")
    assert len(runs) == 1 and runs[f"tags.{KIND}"].tolist() == ["result"]
    assert runs[f"tags.{KEY}"].tolist() == [result.key]
    reloaded = RunResult.load(out)
    assert reloaded.key == result.key  # the same content hash after a round trip through disk
    assert Tracker(uri).log(reloaded) == result.tracking
    assert len(_search(uri, "tta-bench")) == 1


def test_unreachable_server_keeps_results_and_says_how_to_upload(toy_task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.warns(TrackingWarning, match=r"unavailable.*kept in runs/toy-ifo-.*tta-bench sync runs/toy-ifo-\S+ "
                                              r"--tracking-uri http://127\.0\.0\.1"):
        result = tta_bench.run(toy_task, tta_bench.get_method("ifo"), Protocol(LRS),
                               RunOptions(progress=False, tracking_uri=uri))
    assert result.tracking is None
    [saved] = (tmp_path / "runs").iterdir()
    assert RunResult.load(saved).key == result.key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` on 127.0.0.1 (its own process group, stopped with SIGTERM)."""

    def __init__(self, root, port: int):
        self.root, self.port, self.proc = root, port, None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root}/server.db",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("mlflow server did not start within 90 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


@pytest.mark.slow
def test_real_server_then_down_then_sync(tmp_path, capsys):
    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server", _free_port())
    server.start()
    try:
        args = ["run", "--task", "cifar10", "--limit", "20", "--lr", "0.01,0.1", "--no-progress",
                "--tracking-uri", server.uri, "--experiment", "shared"]
        assert main([*args, "--out", str(tmp_path / "a")]) == 0
        runs = _remote(server.uri)
        assert len(runs) == 3 and set(runs[f"tags.{KIND}"]) == {"sweep", "result"}
        child = runs[runs[f"tags.{KIND}"] == "result"].iloc[0]
        rows = pd.read_parquet(mlflow.artifacts.download_artifacts(
            run_id=child.run_id, artifact_path="samples.parquet", tracking_uri=server.uri))
        assert len(rows) == 20 and set(rows.lr) == {float(child["params.lr"])}
        capsys.readouterr()

        server.stop()  # down: the run completes, keeps its results and says how to upload them
        hint = f"tta-bench sync {tmp_path / 'b'} --tracking-uri {server.uri}"
        with pytest.warns(TrackingWarning, match=re.escape(hint)):
            assert main([*args, "--method", "entropy", "--out", str(tmp_path / "b")]) == 0
        assert (tmp_path / "b" / "samples.parquet").is_file()

        server.start()  # restarted on the same store: sync uploads b once, skips a
        sync = ["sync", str(tmp_path / "a"), str(tmp_path / "b"), "--tracking-uri", server.uri, "--experiment", "shared"]
        assert main(sync) == 0
        out = capsys.readouterr().out
        assert "1 uploaded, 1 already in" in out
        runs = _remote(server.uri)
        assert len(runs) == 6 and sorted(runs["params.method"].unique()) == ["entropy", "ifo"]
        assert main(sync) == 0
        assert "0 uploaded, 2 already in" in capsys.readouterr().out
    finally:
        server.stop()


def _remote(uri: str) -> pd.DataFrame:
    return _search(uri, "shared")


def test_sync_rejects_a_folder_without_results(tmp_path, capsys):
    code = main(["sync", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "is not a run folder (no run.json" in err and err.count("\n") == 1
