"""Sweep faults (issue 15): a bad spec is one line and exit 2 before any job; Ctrl-C, SIGTERM (to
the sweep or to a worker) and SIGKILL of the sweep never lose finished samples, never log a
partial result, never run one job twice; a re-run completes every job exactly once, equal to an
uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import tomllib
from conftest import ToyTask

import tta_bench
from tta_bench import RunOptions, Task
from tta_bench.cli import main
from tta_bench.core import registry
from tta_bench.storage.signals import shielded, sigterm_as_interrupt
from tta_bench.storage.tracking import JOB, Tracker
from tta_bench.sweeps.executor import job_lock, prepare, run_job
from tta_bench.sweeps.spec import jobs_from_spec, run_parts

BLOCKS = '[[tasks]]\nname = "cifar10"\n[[methods]]\nname = "ifo"\n'


@pytest.mark.parametrize("text, key", [
    (f'threshold = "high"\n{BLOCKS}', "threshold"),
    (f'lr = ["fast"]\n{BLOCKS}', "lr"),
    ('tasks = "cifar10"\n[[methods]]\nname = "ifo"\n', "tasks"),
    ('[[tasks]]\nname = "cifar10"\n[[methods]]\nweighted = true\n', "[[methods]] #1 has no `name`"),
    (f'limit = "forty"\n{BLOCKS}', "limit"),
    (f'limit = 0\n{BLOCKS}', "limit"),
    (f'device = "tpu"\n{BLOCKS}', "device"),
    (f'threshold = nan\n{BLOCKS}', "threshold"),
    (f'lr = [0.1, inf]\n{BLOCKS}', "lr"),
    (f'clip = true\n{BLOCKS}', "clip"),
    (f'momentum = -inf\n{BLOCKS}', "momentum"),
    (f'weight_decay = -1.0\n{BLOCKS}', "weight_decay"),
    (f'seed = -1\n{BLOCKS}', "seed"),
    (f'seed = 99999999999999999999\n{BLOCKS}', "seed"),
    (f'steps = 1.5\n{BLOCKS}', "steps"),
    (f'max_uncertain = 0\n{BLOCKS}', "max_uncertain"),
    (f'batch_size = [8, "big"]\n{BLOCKS}', "batch_size"),
    (f'optimizer = "rmsprop"\n{BLOCKS}', "optimizer"),
    (f'lr_grid = "fine"\n{BLOCKS}', "lr_grid"),
    (f'{BLOCKS}limit = 0\n', "[[methods]] #1: limit"),  # a run setting in a block, located
    ('[[tasks]]\nname = "cifar10"\nmethods = ["tent"]\n[[methods]]\nname = "ifo"\n', "methods"),
    (f'pair = "threshold"\n{BLOCKS}', "pair"),
    (f'threshold = []\n{BLOCKS}', "threshold = []"),
    (f'lr = []\n{BLOCKS}', "lr = []"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_bad_spec_is_one_line_before_any_job(tmp_path, capsys, text, key, dry_run):
    path = tmp_path / "spec.toml"
    path.write_text(("" if text.startswith("name") else 'name = "bad"\n') + text)
    state, db = tmp_path / "state", tmp_path / "mlflow.db"
    flags = ["--dry-run"] if dry_run else ["--state", str(state), "--tracking-uri", f"sqlite:///{db}"]
    assert main(["sweep", str(path), *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"tta-bench: error: sweep spec {path}: ") and key in err, err
    assert not state.exists() and not db.exists()  # nothing started


def test_bad_spec_name_binary_spec_and_state_file(tmp_path, capsys):
    path = tmp_path / "spec.toml"
    path.write_text(f"name = 5\n{BLOCKS}")
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert "name=5 is not a folder name" in capsys.readouterr().err
    path.write_bytes(bytes(range(256)))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"sweep spec {path} is not a text file" in err
    path.write_text(f'name = "ok"\n{BLOCKS}')
    (tmp_path / "taken").write_text("")
    assert main(["sweep", str(path), "--state", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--state" in err and "--out" not in err
    assert main(["sweep", str(path), "--checkpoint-every", "0"]) == 2
    assert "--checkpoint-every must be >= 1" in capsys.readouterr().err


def test_sigterm_as_interrupt_once_and_shielded():
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    with sigterm_as_interrupt(once=True):
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)  # the second signal is ignored: the first one's cleanup runs
        with shielded():
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler


# In-process jobs on the toy task (fast): what an interruption leaves behind.

class StoppedToy(ToyTask):
    """The toy task's stream, Ctrl-C'd when sample `at` is read."""

    at = 23

    def samples(self):
        for s in super().samples():
            if s.index == self.at:
                raise KeyboardInterrupt
            yield s


@pytest.fixture
def toy_job(tmp_path, monkeypatch):
    """A prepared job on the toy task, its MLflow store, and a way to swap the task's stream."""
    monkeypatch.setitem(registry._extra[Task], "toy", ToyTask)
    jobs, _ = jobs_from_spec({"name": "toy", "lr": [0.01, 0.1], "tasks": [{"name": "toy"}],
                              "methods": [{"name": "ifo"}]})
    [folder] = prepare(tmp_path / "state", jobs, "toy")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    Tracker(uri, "toy")

    def use(cls: type) -> None:
        monkeypatch.setitem(registry._extra[Task], "toy", cls)
    return folder, uri, jobs[0], use


def _top_runs(uri: str, experiment: str, key: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`{JOB}` = '{key}'")
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def _logged_rows(uri: str, run) -> pd.DataFrame:
    return _rows(pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="samples.parquet", tracking_uri=uri)))


def _rows(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns="seconds").reset_index(drop=True)


def test_interrupted_job_is_not_a_result_and_resumes(toy_job):
    folder, uri, job, use = toy_job
    use(StoppedToy)
    status = run_job(folder, uri, "toy", checkpoint_every=5)
    assert status["status"] == "failed" and status["interrupted"]
    n = pd.read_parquet(folder / "checkpoint.parquet")["index"].nunique()  # recorded before sample 23
    assert 0 < n <= 23
    assert status["error"] == f"interrupted after {n} samples, which are checkpointed; re-run the sweep to resume"
    assert not (folder / "result").exists()
    assert _top_runs(uri, "toy", job.key) == []
    # an interrupted result/ left by older versions is dropped, not logged as finished
    _, method, protocol, options = run_parts(job.config)
    stale = tta_bench.run(StoppedToy(), method, protocol, RunOptions(**options, progress=False, track=False))
    stale.save(folder / "result")
    use(ToyTask)
    status = run_job(folder, uri, "toy", checkpoint_every=5)
    assert status["status"] == "done" and status["resumed_from"] == f"resumed from sample {n}"
    [logged] = _top_runs(uri, "toy", job.key)
    assert logged.info.status == "FINISHED"
    full = tta_bench.run(ToyTask(), method, protocol, RunOptions(**options, progress=False, track=False))
    pd.testing.assert_frame_equal(_logged_rows(uri, logged), _rows(full.rows))
    assert not (folder / "checkpoint.parquet").exists()
    assert run_job(folder, uri, "toy")["status"] == "skipped"


def test_interrupt_before_the_first_sample_leaves_nothing(toy_job):
    folder, uri, job, use = toy_job
    use(type("StoppedAtOnce", (StoppedToy,), {"at": 0}))
    status = run_job(folder, uri, "toy", checkpoint_every=5)
    assert status["interrupted"] and status["error"] == "interrupted; re-run the sweep to resume"
    assert sorted(p.name for p in folder.iterdir()) == ["job.json", "status.json", "worker.pid"]
    assert _top_runs(uri, "toy", job.key) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_logging_does_not_cut_the_run_in_half(toy_job, monkeypatch, signum):
    folder, uri, job, _ = toy_job
    log = Tracker.log

    def log_with_a_signal(self, *args, **kwargs):
        os.kill(os.getpid(), signum)  # arrives mid-logging
        time.sleep(0.2)
        return log(self, *args, **kwargs)

    monkeypatch.setattr(Tracker, "log", log_with_a_signal)
    with sigterm_as_interrupt(once=True):  # as in a worker
        status = run_job(folder, uri, "toy")
    assert status["status"] == "done"
    [logged] = _top_runs(uri, "toy", job.key)
    assert logged.info.status == "FINISHED"


def test_a_locked_job_is_skipped_not_run_twice(toy_job, tmp_path, capsys):
    folder, uri, job, _ = toy_job
    with job_lock(folder) as holder:
        assert holder is None
        status = run_job(folder, uri, "toy")
        assert status == {"status": "running", "error": f"job {job.key} is running in pid {os.getpid()}; skipped"}
        assert not (folder / "status.json").exists()
        spec = tmp_path / "toy.toml"
        spec.write_text('name = "toy"\nlr = [0.01, 0.1]\n[[tasks]]\nname = "toy"\n[[methods]]\nname = "ifo"\n')
        assert main(["sweep", str(spec), "--state", str(tmp_path / "state"), "--tracking-uri", uri]) == 1
        out = capsys.readouterr().out
        assert (f"running   toy · ifo · d=0.16 · seed=0 · 2 lr  job {job.key} is running in pid {os.getpid()}; "
                "skipped") in out
    assert _top_runs(uri, "toy", job.key) == []


def test_a_lock_won_on_a_file_its_last_holder_unlinked_is_taken_on_the_file_now_at_the_path(tmp_path, monkeypatch):
    """A holder unlinks its lock file before it lets go (tta-bench run's --out lock, fair_gpu's
    claim). A process that opened the file before the unlink wins the old, nameless file: it must
    lock the file at the path instead, or a third process would lock that one too."""
    from tta_bench.storage import checkpoint as storage

    path = tmp_path / "claim"
    real = storage.try_lock
    unlinked = []

    def last_holder_lets_go_first(file, mode):
        if not unlinked:  # this open file is the one the last holder unlinks, then lets go
            path.unlink()
            unlinked.append(True)
        return real(file, mode)

    path.write_text("")
    monkeypatch.setattr(storage, "try_lock", last_holder_lets_go_first)
    with storage.lock(path) as holder:
        assert holder is None and path.read_text() == str(os.getpid())
        monkeypatch.setattr(storage, "try_lock", real)
        with storage.lock(path) as third:  # a third process sees the lock held
            assert third == os.getpid()


# Real worker processes on the embedded CIFAR-10 task.

SPEC = """
name = "faults"
lr = 0.02
limit = 40
[[tasks]]
name = "cifar10"
[[methods]]
name = "ifo"
[[methods]]
name = "entropy"
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """Per job key: the rows of an uninterrupted run (in this process, one thread like a worker)."""
    jobs, _ = jobs_from_spec(tomllib.loads(SPEC))
    full = {}
    for job in jobs:
        task, method, protocol, options = run_parts(job.config)
        full[job.key] = _rows(tta_bench.run(task, method, protocol,
                                            RunOptions(**options, progress=False, track=False)).rows)
    return full


class Sweep:
    """`tta-bench sweep` on SPEC in its own process group, against a SQLite store in tmp_path."""

    def __init__(self, tmp_path: Path, cwd: Path | None = None):
        self.spec, self.state, self.cwd = tmp_path / "faults.toml", tmp_path / "state", cwd
        self.spec.write_text(SPEC)
        self.uri = f"sqlite:///{tmp_path}/mlflow.db"
        # From another working directory: the console script, which (unlike -m) leaves it off sys.path
        launcher = [str(Path(sys.executable).parent / "tta-bench")] if cwd else [sys.executable, "-m", "tta_bench.cli"]
        self.cmd = [*launcher, "sweep", str(self.spec), "--workers", "2",
                    "--state", str(self.state), "--tracking-uri", self.uri, "--checkpoint-every", "3",
                    "--threads-per-worker", "1"]
        self.env = {**os.environ, "TTA_BENCH_OFFLINE": "1"}

    def start(self) -> subprocess.Popen:
        return subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True, cwd=self.cwd)

    def run(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd, env=self.env, capture_output=True, text=True, timeout=600, cwd=self.cwd,
                              check=False)  # the caller asserts the return code

    def workers_mid_job(self, proc: subprocess.Popen, n: int = 2) -> dict[str, int]:
        """Job key -> worker pid of the jobs with checkpointed samples and no status yet, once
        there are `n` of them."""
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            mid = [f for f in (self.state / "jobs").glob("*")
                   if (f / "checkpoint.parquet").exists() and not (f / "status.json").exists()]
            if len(mid) >= n:
                return {f.name: int((f / "worker.pid").read_text()) for f in mid}
            time.sleep(0.02)
        raise AssertionError(f"no job was caught mid-way: {proc.communicate()}")

    def check_complete(self, full: dict[str, pd.DataFrame]) -> None:
        """One finished top-level MLflow run per job, holding the rows of an uninterrupted run."""
        assert sorted(full) == sorted(f.name for f in (self.state / "jobs").glob("*"))
        for key, rows in full.items():
            [logged] = _top_runs(self.uri, "faults", key)
            assert logged.info.status == "FINISHED"
            pd.testing.assert_frame_equal(_logged_rows(self.uri, logged), rows)
        for log in (self.state / "jobs").glob("*/worker.log"):
            assert "Traceback" not in log.read_text(), log.read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split(")")[-1].split()[0] != "Z"


def _interrupted_then_resumed(sweep: Sweep, full: dict, stop) -> None:
    proc = sweep.start()
    workers = sweep.workers_mid_job(proc)
    stop(proc, workers)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert err.strip().splitlines() == [
        "tta-bench: interrupted: 2 jobs checkpointed; re-run the same command to resume"], err
    for key in workers:
        folder = sweep.state / "jobs" / key
        assert json.loads((folder / "status.json").read_text())["interrupted"]
        assert (folder / "checkpoint.parquet").exists() and not (folder / "result").exists()
        assert _top_runs(sweep.uri, "faults", key) == []  # nothing partial logged
    again = sweep.run()
    assert again.returncode == 0 and again.stdout.count("resumed from sample") == 2, again.stdout + again.stderr
    sweep.check_complete(full)
    assert "2 already finished, 0 to run" in sweep.run().stdout


def test_workers_import_the_sweeps_package_not_a_tta_bench_folder_in_the_working_directory(tmp_path, uninterrupted):
    """Run from a checkout's root, where the `tta_bench` folder is not the whole package (tasks/ and
    methods/ live beside it): the workers still import what the sweep imported, and finish."""
    checkout = tmp_path / "checkout"
    (checkout / "tta_bench").mkdir(parents=True)
    (checkout / "tta_bench" / "__init__.py").write_text("raise ImportError('the checkout folder was imported')\n")
    sweep = Sweep(tmp_path, cwd=checkout)
    done = sweep.run()
    assert done.returncode == 0, done.stdout + done.stderr
    sweep.check_complete(uninterrupted)


@pytest.mark.slow
def test_ctrl_c_checkpoints_every_job_and_a_rerun_resumes(tmp_path, uninterrupted):
    _interrupted_then_resumed(Sweep(tmp_path), uninterrupted, lambda proc, _: os.killpg(proc.pid, signal.SIGINT))


@pytest.mark.slow
def test_sigterm_to_the_sweep_stops_its_workers_like_ctrl_c(tmp_path, uninterrupted):
    _interrupted_then_resumed(Sweep(tmp_path), uninterrupted, lambda proc, _: proc.send_signal(signal.SIGTERM))


@pytest.mark.slow
def test_sigterm_to_a_worker_fails_that_job_only(tmp_path, uninterrupted):
    sweep = Sweep(tmp_path)
    proc = sweep.start()
    key, pid = next(iter(sweep.workers_mid_job(proc, 1).items()))
    os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    failed = [line for line in out.splitlines() if line.startswith("failed")]
    assert len(failed) == 1 and "interrupted after" in failed[0] and "re-run the sweep to resume" in failed[0], out
    assert "1 done, 1 failed" in out and "Traceback" not in err
    assert _top_runs(sweep.uri, "faults", key) == []
    again = sweep.run()
    assert again.returncode == 0 and "1 already finished" in again.stdout and "resumed from sample" in again.stdout
    sweep.check_complete(uninterrupted)


@pytest.mark.slow
def test_sigkill_of_the_sweep_takes_its_workers_and_a_rerun_never_doubles_a_job(tmp_path, uninterrupted):
    sweep = Sweep(tmp_path)
    proc = sweep.start()
    workers = sweep.workers_mid_job(proc, 1)
    proc.kill()
    proc.communicate()
    again = sweep.run()  # at once: a job whose old worker still holds it is skipped, never run twice
    for key, pid in workers.items():
        assert f"job {key} is running in pid {pid}; skipped" in again.stdout or "resumed from sample" in again.stdout
    deadline = time.time() + 60
    while any(_alive(pid) for pid in workers.values()) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers.values()), "workers outlived their sweep"
    for key in workers:  # stopped by the SIGTERM their dying parent sent, not run to the end
        assert '"interrupted": true' in (sweep.state / "jobs" / key / "worker.log").read_text()
    if again.returncode != 0:
        again = sweep.run()
    assert again.returncode == 0, again.stdout + again.stderr
    sweep.check_complete(uninterrupted)


@pytest.mark.slow
def test_submitit_jobs_stopped_or_killed_midway_fail_in_one_line_and_resume(tmp_path, uninterrupted):
    """Slurm's time limit and preemption reach a submitit job as SIGUSR2 (submitit's signal) or
    SIGTERM: it checkpoints and fails like a Ctrl-C'd worker; a SIGKILLed one fails with
    submitit's reason. The next sweep resumes both."""
    sweep = Sweep(tmp_path)
    sweep.cmd += ["--executor", "submitit", "--cluster", "local"]
    sweep.env["OMP_NUM_THREADS"] = "1"  # one thread per job, as the uninterrupted run (the last bits differ otherwise)
    proc = sweep.start()
    (stopped, pid), (killed, other) = sweep.workers_mid_job(proc).items()
    os.kill(pid, signal.SIGUSR2)
    os.kill(other, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    failed = {line.split("  ")[-1] for line in out.splitlines() if line.startswith("failed")}
    assert len(failed) == 2 and "interrupted after" in " ".join(failed), out
    assert all("\n" not in line and "submitit job" in line for line in failed if "interrupted" not in line), out
    assert _top_runs(sweep.uri, "faults", stopped) == [] and _top_runs(sweep.uri, "faults", killed) == []
    again = sweep.run()
    assert again.returncode == 0 and again.stdout.count("resumed from sample") == 2, again.stdout + again.stderr
    sweep.check_complete(uninterrupted)
