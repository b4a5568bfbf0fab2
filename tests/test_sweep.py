"""Sweeps: spec expansion (crossing, pairing), stable job keys, checkpoint/resume equal to an
uninterrupted run, local workers killed mid-job against a real MLflow server, submitit."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import ToyTask
from test_tracking import Server, _free_port

import tta_bench
from tta_bench import Protocol, RunOptions, RunResult, TTAError
from tta_bench.cli import main
from tta_bench.storage import checkpoint
from tta_bench.storage.tracking import JOB, KIND, run_tags
from tta_bench.sweeps.executor import prepare, run_job, run_submitit
from tta_bench.sweeps.spec import expand, jobs_from_spec, load_spec, run_parts

TIMING = {"wall_seconds", "samples_per_s", "seconds_per_sample"}


def test_expand_crosses_lists_and_zips_pairs():
    assert len(expand({"a": [1, 2], "b": [3, 4, 5], "c": 0})) == 6
    assert expand({"a": [1, 2], "b": [3, 4], "c": 0}, [["a", "b"]]) == [
        {"c": 0, "a": 1, "b": 3}, {"c": 0, "a": 2, "b": 4}]
    assert expand({"lr": [0.1, 0.2]}) == [{"lr": [0.1, 0.2]}]  # one job sweeping two lrs
    assert expand({"lr": [[0.1], [0.2, 0.4]]}) == [{"lr": [0.1]}, {"lr": [0.2, 0.4]}]
    with pytest.raises(TTAError, match="equal lengths"):
        expand({"a": [1, 2], "b": [3]}, [["a", "b"]])


SPEC = {
    "name": "t", "lr": [0.01, 0.1], "limit": 20, "threshold": [0.16, 0.32], "seed": [0, 1],
    "pair": [["threshold", "seed"]],
    "tasks": [{"name": "cifar10", "corruption": ["none", "contrast"]}, {"name": "text"}],
    "methods": [{"name": "ifo", "weighted": [True, False]}, {"name": "input-ft", "lr": 0.02}],
}


def test_jobs_from_spec_and_stable_keys(monkeypatch):
    jobs, notes = jobs_from_spec(SPEC)
    # cifar10: 2 corruptions × 2 ifo variants × 2 (paired d, seed); text: (2 ifo + input-ft) × 2
    assert len(jobs) == 8 + 6
    assert notes == ["left out: method input-ft does not support image tasks such as cifar10 (it supports: mc, text)"]
    ft = [j for j in jobs if j.config["method"] == "input-ft"]
    assert {tuple(j.config["protocol"]["lrs"]) for j in ft} == {(0.02,)}  # the method block's override
    assert {(j.config["protocol"]["threshold"], j.config["options"]["seed"]) for j in jobs} == {(0.16, 0), (0.32, 1)}
    again, _ = jobs_from_spec(json.loads(json.dumps(SPEC)))
    assert [j.key for j in jobs] == [j.key for j in again]
    explicit = {**SPEC, "tasks": [{"name": "cifar10", "corruption": ["none", "contrast"], "severity": 3}, {"name": "text"}]}
    assert {j.key for j in jobs_from_spec(explicit)[0]} == {j.key for j in jobs}  # defaults resolved
    changed = {**SPEC, "limit": 21}
    assert not {j.key for j in jobs_from_spec(changed)[0]} & {j.key for j in jobs}
    monkeypatch.setattr(tta_bench, "__version__", "999")
    assert not {j.key for j in jobs_from_spec(SPEC)[0]} & {j.key for j in jobs}


def test_bad_specs_are_clear_errors(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text('name = "x"\nthreshhold = 0.2\ntasks = [{name = "cifar10"}]\nmethods = [{name = "ifo"}]\n')
    with pytest.raises(TTAError, match=rf"^sweep spec {path}: unknown top-level key\(s\) \['threshhold'\]"):
        jobs_from_spec(load_spec(path), f"sweep spec {path}")
    with pytest.raises(TTAError, match="method ifo has no option wieghted"):
        jobs_from_spec({**SPEC, "methods": [{"name": "ifo", "wieghted": True}]})
    with pytest.raises(TTAError, match=r"threshold must be in \(0, 1\]"):  # protocol checked before any job
        jobs_from_spec({**SPEC, "threshold": [2.0, 0.16]})
    path.write_text('name = "x"\ntasks = [{name = "cifar10"}]\nmethods = [{name = "ifo"}, {name = "dofo"}]\n')
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().endswith("2 jobs")
    assert main(["sweep", str(path), "--state", "/proc/nope/state"]) == 2
    assert "cannot write to output folder /proc/nope/state (--state)" in capsys.readouterr().err


class CrashingToy(ToyTask):
    """The toy task's stream, dying at sample 23 (a killed worker, seen from the runner)."""

    def samples(self):
        for s in super().samples():
            if s.index == 23:
                raise RuntimeError("worker died")
            yield s


def _same_results(a, b):
    cols = [c for c in a.rows.columns if c != "seconds"]
    pd.testing.assert_frame_equal(a.rows[cols], b.rows[cols])
    for sa, sb in zip(a.summary, b.summary, strict=True):
        assert {k: v for k, v in sa.items() if k not in TIMING} == {k: v for k, v in sb.items() if k not in TIMING}


RESUME = tta_bench.get_method("ifo"), Protocol((1e-2, 1e-1))  # the method and protocol of the resume tests


def _run_crashed_midway(ck: Path) -> tuple[RunResult, RunOptions]:
    """The uninterrupted run's result, and the options of a run (checkpointing to `ck`) that
    crashed at sample 23 (RESUME's method and protocol; resuming with them completes it)."""
    full = tta_bench.run(ToyTask(), *RESUME, RunOptions(progress=False, track=False))
    options = RunOptions(progress=False, track=False, checkpoint=ck, checkpoint_every=5)
    with pytest.raises(RuntimeError, match="worker died"):
        tta_bench.run(CrashingToy(), *RESUME, options)
    return full, options


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    ck = tmp_path / "checkpoint.parquet"
    full, options = _run_crashed_midway(ck)
    saved = pd.read_parquet(ck)
    n_saved = len(saved) // 2  # two lrs per sample
    assert 5 <= n_saved < 23 and list(saved["index"][::2]) == list(range(n_saved))
    resumed = tta_bench.run(ToyTask(), *RESUME, options)
    assert resumed.metadata["resumed_from_sample"] == n_saved
    [before] = resumed.metadata["earlier_attempts"]  # where the first part ran, and with what
    assert (before["from_sample"], before["to_sample"], before["device"]) == (0, n_saved, "cpu")
    assert before["git_commit"] == resumed.metadata["git_commit"] and before["seconds"] > 0
    tags = run_tags(resumed)
    assert (tags["attempts"], tags["earlier_devices"]) == (2, resumed.metadata["device_name"])
    assert run_tags(full)["attempts"] == 1 and "earlier_devices" not in run_tags(full)
    _same_results(full, resumed)
    with pytest.raises(TTAError, match=r"another configuration \(protocol.lrs \[0.01, 0.1\] then, \[0.001\] now\)"):
        tta_bench.run(ToyTask(), RESUME[0], Protocol((1e-3,)), options)

    class OtherMachine(ToyTask):  # the same options, another machine's copy of the data
        def data_identity(self) -> str:
            return "another copy"

    with pytest.raises(TTAError, match=r"another configuration \(data unset then, \"another copy\" now\)"):
        tta_bench.run(OtherMachine(), *RESUME, options)


def test_a_stopped_run_resumes_to_a_later_stop_and_equals_an_uninterrupted_run(tmp_path):
    """--limit and --max-uncertain say where a scan stops, not what it computes: a run stopped
    early goes on to more samples when resumed with a larger stop (a CPU run continued for more
    windows), and equals the uninterrupted run. A stop before what the checkpoint holds is refused."""
    from dataclasses import replace
    ck = tmp_path / "checkpoint.parquet"
    full = tta_bench.run(ToyTask(), *RESUME, RunOptions(progress=False, track=False))
    options = RunOptions(progress=False, track=False, checkpoint=ck, checkpoint_every=5, limit=30, max_uncertain=25)
    with pytest.raises(RuntimeError, match="worker died"):
        tta_bench.run(CrashingToy(), *RESUME, options)
    n_saved = pd.read_parquet(ck)["index"].nunique()
    with pytest.raises(TTAError, match=rf"already holds {n_saved} samples \(\d+ uncertain\), past --limit 3: resume "
                                       r"with at least as many, or delete it"):
        tta_bench.run(ToyTask(), *RESUME, replace(options, limit=3))
    with pytest.raises(TTAError, match=r"another configuration \(seed 0 then, 1 now\)"):  # still refused
        tta_bench.run(ToyTask(), *RESUME, replace(options, limit=None, seed=1))
    resumed = tta_bench.run(ToyTask(), *RESUME, replace(options, limit=None, max_uncertain=None))
    assert resumed.metadata["resumed_from_sample"] == n_saved
    _same_results(full, resumed)


def test_slow_samples_are_checkpointed_by_time_too(tmp_path):
    """Samples that take minutes (text) are checkpointed every checkpoint_seconds, not only
    every checkpoint_every samples: at 0 s after every sample, as checkpoint_every=1 does."""
    def crash(name: str, every: int, seconds: float) -> Path:
        ck = tmp_path / name
        options = RunOptions(progress=False, track=False, checkpoint=ck, checkpoint_every=every,
                             checkpoint_seconds=seconds)
        with pytest.raises(RuntimeError, match="worker died"):
            tta_bench.run(CrashingToy(), *RESUME, options)
        return ck
    first = pd.read_parquet(crash("never.parquet", 10**6, 1e9))  # the first block is always kept
    n_first = first["index"].nunique()  # the samples up to the first uncertain one (a block of one on CPU)
    assert 1 <= n_first < 10 and list(first["index"]) == [i for i in range(n_first) for _ in range(2)]
    by_time, by_count = pd.read_parquet(crash("time.parquet", 10**6, 0)), pd.read_parquet(crash("count.parquet", 1, 1e9))
    assert len(by_time) >= 2 * 10 and list(by_time["index"]) == list(by_count["index"])
    with pytest.raises(TTAError, match="checkpoint seconds must be finite and >= 0"):
        RunOptions(checkpoint_seconds=float("nan"))


def test_resume_from_an_older_versions_checkpoint(tmp_path):
    """A checkpoint written before a column existed (select_seconds) and with one no longer
    recorded resumes: the new column is filled in the old rows, the results are unchanged."""
    ck = tmp_path / "checkpoint.parquet"
    full, options = _run_crashed_midway(ck)
    settings = json.loads(pq.read_schema(ck).metadata[checkpoint.META])["settings"]
    older = checkpoint.load(ck, settings, len(RESUME[1].lrs))
    n_old = len(older.rows)
    older.rows = older.rows.drop(columns="select_seconds").assign(dropped_since=1.0)
    checkpoint.save(ck, older, settings)
    table = pq.read_table(ck)  # and its metadata as older versions wrote it: no settings
    meta = json.loads(table.schema.metadata[checkpoint.META])
    del meta["settings"]
    pq.write_table(table.replace_schema_metadata({checkpoint.META: json.dumps(meta).encode()}), ck)
    resumed = tta_bench.run(ToyTask(), *RESUME, options)
    rows = resumed.rows
    assert rows["select_seconds"].notna().all() and (rows["select_seconds"][:n_old] == 0.0).all()
    assert (rows["dropped_since"][:n_old] == 1.0).all() and rows["dropped_since"][n_old:].isna().all()
    resumed.rows = rows.drop(columns="dropped_since")
    _same_results(full, resumed)


def test_disk_full_fails_the_job_clearly_and_a_retry_completes(tmp_path, monkeypatch):
    jobs, _ = jobs_from_spec({"name": "d", "lr": 0.1, "limit": 12, "tasks": [{"name": "cifar10"}],
                              "methods": [{"name": "entropy"}]})
    [folder] = prepare(tmp_path, jobs, "d")
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tta_bench.storage.checkpoint.save", full)
    monkeypatch.setattr("tta_bench.sweeps.executor.write_atomically", full)  # its result/ folder
    with pytest.warns(UserWarning, match="could not write checkpoint .* the run goes on"):
        status = run_job(folder, uri, "d", checkpoint_every=4)
    assert status["status"] == "failed" and "No space left on device" in status["error"]
    monkeypatch.undo()
    monkeypatch.setattr("tta_bench.storage.checkpoint.save", full)  # checkpoints alone failing: the job completes
    with pytest.warns(UserWarning, match="could not write checkpoint"):
        [other] = prepare(tmp_path / "other", jobs, "d")
        assert run_job(other, uri, "other", checkpoint_every=4)["status"] == "done"
    monkeypatch.undo()
    status = run_job(folder, uri, "d", checkpoint_every=4)
    assert status["status"] == "done"
    assert run_job(folder, uri, "d")["status"] == "skipped"  # finished: never run twice


@pytest.mark.slow
def test_submitit_local_executor(tmp_path, monkeypatch):
    jobs, _ = jobs_from_spec({"name": "s", "lr": 0.1, "limit": 10, "tasks": [{"name": "cifar10"}],
                              "methods": [{"name": "ifo"}, {"name": "entropy"}]})
    folders = prepare(tmp_path / "state", jobs, "s")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tta_bench.storage.tracking.Tracker(uri, "s")  # the store exists before the jobs start
    # submitted from a folder holding a broken `tta_bench` (like a checkout's partial package folder):
    # the jobs import the sweep's package all the same
    (tmp_path / "checkout" / "tta_bench").mkdir(parents=True)
    (tmp_path / "checkout" / "tta_bench" / "__init__.py").write_text("raise ImportError('the checkout folder')\n")
    monkeypatch.chdir(tmp_path / "checkout")
    statuses = run_submitit(folders, tmp_path / "logs", uri, "s", 200, cluster="local",
                            report=lambda *a: None, timeout_min=10)
    assert [s["status"] for s in statuses.values()] == ["done", "done"], statuses
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("s")
    for job in jobs:
        assert len(client.search_runs([exp.experiment_id], f"tags.`{JOB}` = '{job.key}'")) == 1


FAULT_SPEC = """
name = "faults"
lr = [0.02, 0.2]
limit = 120
[[tasks]]
name = "cifar10"
corruption = ["none", "contrast"]
[[methods]]
name = "ifo"
[[methods]]
name = "entropy"
"""
BROKEN_MODEL = """
[[tasks]]
name = "text"
model = "no-such-org/no-such-model"
"""


@pytest.mark.slow
def test_two_workers_kill_restart_and_resume(tmp_path):
    """SIGKILL a worker mid-job, take the tracking server down for a re-run, bring it back:
    every job ends with exactly one finished run, the resumed job equals an uninterrupted run,
    and the job whose model cannot be loaded is reported with its error each time."""
    spec = tmp_path / "faults.toml"
    spec.write_text(FAULT_SPEC + BROKEN_MODEL)
    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server", _free_port())
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "tta_bench.cli", "sweep", str(spec), "--workers", "2", "--state", str(state),
           "--tracking-uri", server.uri, "--checkpoint-every", "5"]
    env = {**os.environ, "TTA_BENCH_OFFLINE": "1"}
    server.start()
    try:
        sweep = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        killed = _kill_a_worker_mid_job(state / "jobs", sweep)
        out = sweep.communicate(timeout=600)[0]
        assert sweep.returncode == 1, out
        assert "worker exited with signal SIGKILL" in out
        assert "'no-such-org/no-such-model' is not available locally" in out
        assert sum(line.startswith("failed") for line in out.splitlines()) == 3  # the kill, 2 text jobs

        server.stop()  # down for the whole re-run: jobs run, results stay local
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600).stdout
        assert "resumed from sample" in out and "unsynced" in out, out

        server.start()  # back: the unsynced results are logged without being recomputed
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600).stdout
        assert "logged a result saved earlier" in out and "failed" in out, out
        assert "0 already finished" not in out

        jobs, _ = jobs_from_spec(load_spec(spec))
        client = mlflow.MlflowClient(server.uri)
        exp = client.get_experiment_by_name("faults")
        for job in jobs:
            runs = client.search_runs([exp.experiment_id], f"tags.`{JOB}` = '{job.key}' and tags.`{KIND}` = 'sweep'")
            finished = [r for r in runs if r.info.status == "FINISHED"]
            if job.config["task"] == "text":
                assert finished == []
            else:
                assert len(finished) == 1, job.label
        resumed = json.loads((state / "jobs" / killed / "result" / "run.json").read_text())
        assert resumed["metadata"]["resumed_from_sample"] > 0
        config = json.loads((state / "jobs" / killed / "job.json").read_text())["config"]
        task, method, protocol, options = run_parts(config)
        full = tta_bench.run(task, method, protocol, RunOptions(**options, progress=False, track=False))
        rows = pd.read_parquet(state / "jobs" / killed / "result" / "samples.parquet")
        cols = [c for c in rows.columns if c != "seconds"]
        pd.testing.assert_frame_equal(rows[cols], full.rows[cols])
        for a, b in zip(resumed["summary"], full.summary, strict=True):
            assert {k: v for k, v in a.items() if k not in TIMING} == pytest.approx(
                {k: v for k, v in b.items() if k not in TIMING}, nan_ok=True)
    finally:
        server.stop()


def _kill_a_worker_mid_job(jobs: Path, sweep: subprocess.Popen) -> str:
    deadline = time.time() + 300
    while time.time() < deadline and sweep.poll() is None:
        for folder in jobs.glob("*"):
            if (folder / "checkpoint.parquet").exists() and not (folder / "status.json").exists():
                os.kill(int((folder / "worker.pid").read_text()), signal.SIGKILL)
                return folder.name
        time.sleep(0.02)
    raise AssertionError("no job was caught mid-way")


def test_the_sweeps_readme_lists_every_spec_with_its_job_count():
    """sweeps/README.md's table: one row per spec in sweeps/, its `jobs` column the count the spec
    expands to (a spec changed without its row is caught here)."""
    import re

    folder = Path(__file__).resolve().parent.parent / "sweeps"
    rows = {m.group(1): int(m.group(2)) for m in re.finditer(
        r"^\| `([\w.-]+\.toml)` \|.*?\| (\d+) \| [^|]* \|$", (folder / "README.md").read_text(), re.M)}
    specs = {p.name: len(jobs_from_spec(load_spec(p))[0]) for p in sorted(folder.glob("*.toml"))}
    assert rows == specs
