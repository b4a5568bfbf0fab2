"""Running a sweep's jobs: local worker processes (one per GPU when there are GPUs) or submitit
(Slurm, or its local executor). Each job lives in its own folder under the sweep's state folder:

    jobs/<key>/job.json            the resolved configuration
    jobs/<key>/checkpoint.parquet  per-sample rows so far (atomic writes; resumed after a crash)
    jobs/<key>/result/             run.json, samples.parquet, summary.csv of a complete run
    jobs/<key>/status.json         done | skipped | unsynced | failed, with the error
    jobs/<key>/worker.pid          locked (flock) by the process running the job, holding its pid
    jobs/<key>/worker.log          the worker's output

A job whose finished MLflow run exists is skipped; a computed result that could not be logged
(server down) is logged by the next attempt without being recomputed. A job folder locked by a
live process is left alone (reported `running`), so one job never runs twice at once.

Stopping: Ctrl-C or SIGTERM stops a job the same way: its finished samples are checkpointed,
nothing goes to result/ or MLflow, the status is `failed` (marked interrupted) and the next
attempt resumes from the checkpoint. Local workers get SIGTERM when the sweep dies (Linux). Under
submitit, Slurm's SIGTERM and submitit's timeout/preemption signal (SIGUSR2) do the same, instead
of submitit's requeue: the job is reported failed, and re-running the sweep resumes it."""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from tta_bench.core.errors import TTAError
from tta_bench.storage.checkpoint import FILE, lock, try_lock, write_atomically
from tta_bench.storage.signals import die_with_parent, shielded, sigterm_as_interrupt
from tta_bench.sweeps.spec import Job

if TYPE_CHECKING:
    from tta_bench.running.scan import RunResult
    from tta_bench.storage.tracking import Tracker

STATUS, RESULT, LOCK = "status.json", "result", "worker.pid"
CHECKPOINT = FILE
LOCKED = 75  # a worker's exit code when another process holds its job (EX_TEMPFAIL)
Report = Callable[[Path, dict], None]
# A worker (local or submitit's) imports the package its sweep runs, never a `tta_bench` folder in
# the working directory (e.g. a checkout beside a non-editable install, whose folder lacks tasks/
# and methods/): -P keeps the working directory off sys.path (Python >= 3.11).
WORKER_PYTHON = (sys.executable, *("-P",) * (sys.version_info >= (3, 11)))


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped (Ctrl-C, SIGTERM); the message says what became of its jobs."""


def prepare(state: Path, jobs: list[Job], sweep: str) -> list[Path]:
    """A folder per job holding its configuration (written atomically)."""
    folders = []
    for job in jobs:
        folder = state / "jobs" / job.key
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "job.json", {"key": job.key, "sweep": sweep, "label": job.label, "config": job.config})
        folders.append(folder)
    return folders


def _write_json(path: Path, data: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


def read_status(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STATUS).read_text())
    except (OSError, ValueError):
        return None


def job_lock(folder: Path) -> AbstractContextManager[int | None]:
    """Holds the job folder's lock for the block (yields None), or yields the pid of the live
    process that holds it (the block must then leave the folder alone)."""
    return lock(folder / LOCK)


def lock_holder(folder: Path) -> int | None:
    """The pid of the live process running the job in `folder` (0: not known yet), if any."""
    try:
        with open(folder / LOCK) as file:
            return try_lock(file, fcntl.LOCK_SH)
    except OSError:  # no lock file yet (or unreadable: the worker will say why)
        return None


def _running(folder: Path, pid: int | None) -> dict:
    where = f"pid {pid}" if pid else "another process"
    return {"status": "running", "error": f"job {folder.name} is running in {where}; skipped"}


def _interrupted(samples: int = 0) -> dict:
    kept = f" after {samples} samples, which are checkpointed" if samples else ""
    return {"status": "failed", "interrupted": True, "error": f"interrupted{kept}; re-run the sweep to resume"}


def run_job(folder: Path, tracking_uri: str | None, experiment: str, threads: int | None = None,
            checkpoint_every: int = 200) -> dict:
    """Run one job to completion in this process and write its status (with this pid); returns
    it. A job another process is running is left alone (status `running`, nothing written)."""
    folder = Path(folder)
    try:
        with job_lock(folder) as holder:
            if holder is not None:
                return _running(folder, holder)
            previous = read_status(folder)
            (folder / STATUS).unlink(missing_ok=True)
            try:
                status = _run_job(folder, tracking_uri, experiment, threads, checkpoint_every, previous)
            except KeyboardInterrupt:  # outside the scan (e.g. loading the model): nothing to keep
                status = _interrupted()
            except TTAError as err:
                status = {"status": "failed", "error": str(err)}
            except Exception as err:  # a bug or an environment failure: keep the sweep going, report it
                status = {"status": "failed", "error": f"{type(err).__name__}: {err}".splitlines()[0],
                          "traceback": traceback.format_exc()}
            with shielded():
                _write_json(folder / STATUS, {**status, "pid": os.getpid()})
    except OSError as err:  # the job folder cannot be written (locked, cleared or its status saved)
        status = {"status": "failed", "error": f"cannot write to {folder}: {err.strerror}"}
    return status


def _run_job(folder: Path, uri: str | None, experiment: str, threads: int | None, every: int,
             previous: dict | None) -> dict:
    import torch

    from tta_bench.running.scan import RunOptions, run
    from tta_bench.storage.tracking import JOB, SWEEP, Tracker, TrackingUnavailable
    from tta_bench.sweeps.spec import run_parts

    job = json.loads((folder / "job.json").read_text())
    key, config = job["key"], job["config"]
    try:
        tracker, why = Tracker(uri, experiment), ""
    except TrackingUnavailable as err:
        tracker, why = None, str(err)
    if (skipped := finished(key, tracker, previous)) is not None:
        return skipped
    result_dir = folder / RESULT
    result, resumed = _saved_result(result_dir), "logged a result saved earlier"
    if result is None:
        if threads:
            torch.set_num_threads(threads)
        task, method, protocol, options = run_parts(config)
        result = run(task, method, protocol, RunOptions(
            **options, progress=False, track=False, checkpoint=folder / CHECKPOINT, checkpoint_every=every))
        if result.interrupted:  # Ctrl-C or SIGTERM: its samples are in the checkpoint, never in result/
            return _interrupted(len(result.rows) // len(protocol.lrs))
        start = result.metadata["resumed_from_sample"]
        resumed = f"resumed from sample {start}" if start else ""
    with shielded():  # a complete result is saved and logged whole, whatever signal comes meanwhile
        if not result_dir.exists():
            write_atomically(result_dir, result.save)
            (folder / CHECKPOINT).unlink(missing_ok=True)
        if tracker is None:
            return {"status": "unsynced", "error": why, "resumed_from": resumed}
        try:
            if (skipped := finished(key, tracker, None)) is not None:  # by another attempt meanwhile
                return skipped
            run_id = tracker.log(result, tags={JOB: key, SWEEP: job["sweep"]})
        except TrackingUnavailable as err:
            return {"status": "unsynced", "error": str(err), "resumed_from": resumed}
    return {"status": "done", "run_id": run_id, "resumed_from": resumed}


def _saved_result(folder: Path) -> RunResult | None:
    """The complete result an earlier attempt saved, if any. An interrupted one (saved by older
    versions) or an unreadable one is removed: its samples are resumed from the checkpoint."""
    from tta_bench.running.scan import RunResult

    if not folder.exists():
        return None
    try:
        result = RunResult.load(folder)
        if not result.interrupted:
            return result
    except TTAError:
        pass
    shutil.rmtree(folder)
    return None


def finished(key: str, tracker: Tracker | None, status: dict | None) -> dict | None:
    """The "skipped" status of a finished job, else None: finished per MLflow, or per the job's
    last local status when MLflow cannot be reached."""
    if tracker is not None:
        run_id = tracker.find_job(key)
        return {"status": "skipped", "run_id": run_id} if run_id else None
    if status and status["status"] in ("done", "skipped"):
        return {**status, "status": "skipped"}
    return None


def run_local(folders: list[Path], workers: int, tracking_uri: str | None, experiment: str,
              checkpoint_every: int, report: Report = print, threads: int | None = None) -> dict[Path, dict]:
    """One worker process per job, `workers` at a time: each on its own GPU when there are GPUs
    (CUDA_VISIBLE_DEVICES), else with an equal share of the CPU threads. Workers share this
    process group (Ctrl-C reaches them) and get SIGTERM if this process dies. On Ctrl-C or SIGTERM
    the workers checkpoint and stop, then SweepInterrupted is raised."""
    import torch

    gpus = torch.cuda.device_count()
    if threads is None and not gpus:
        threads = max(1, (os.cpu_count() or 1) // workers)
    pending, running, free = list(folders), {}, list(range(workers))
    statuses: dict[Path, dict] = {}

    def collect(proc: subprocess.Popen) -> None:
        folder, slot = running.pop(proc)
        free.append(slot)
        statuses[folder] = status = _worker_status(folder, proc)
        report(folder, status)

    try:
        while pending or running:
            while pending and free:
                folder = pending.pop(0)
                if (pid := lock_holder(folder)) is not None:  # e.g. a worker of a sweep still running
                    statuses[folder] = _running(folder, pid)
                    report(folder, statuses[folder])
                    continue
                slot = free.pop(0)
                env = dict(os.environ)
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                cmd = [*WORKER_PYTHON, "-m", "tta_bench.sweeps.executor", str(folder), "--experiment", experiment,
                       "--checkpoint-every", str(checkpoint_every), "--parent", str(os.getpid())]
                cmd += ["--tracking-uri", tracking_uri] if tracking_uri else []
                cmd += ["--threads", str(threads)] if threads else []
                with open(folder / "worker.log", "ab") as log:
                    running[subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)] = (folder, slot)
            for proc in [p for p in running if p.poll() is not None]:
                collect(proc)
            time.sleep(0.05)
    except KeyboardInterrupt:
        with shielded():
            for proc in running:  # a worker stops at its first signal and ignores a second (Ctrl-C reached it too)
                proc.send_signal(signal.SIGTERM)
            for proc in list(running):
                proc.wait()
                collect(proc)
        n = sum(bool(s.get("interrupted")) for s in statuses.values())
        raise SweepInterrupted(f"{n} job{'s' * (n != 1)} checkpointed") from None
    return statuses


def _worker_status(folder: Path, proc: subprocess.Popen) -> dict:
    """What the worker wrote (checked by its pid: an older status may be there), else why it died."""
    if proc.returncode == LOCKED:
        return _running(folder, lock_holder(folder))
    status = read_status(folder)
    if status is not None and status.get("pid") == proc.pid:
        return status
    return {"status": "failed", "error": f"worker exited with {_exit_reason(proc.returncode)}; "
                                         f"see {folder / 'worker.log'}"}


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def submitted_job(folder: Path, tracking_uri: str | None, experiment: str, threads: int | None,
                  checkpoint_every: int) -> dict:
    """`run_job` as a submitit job: Slurm's SIGTERM and submitit's timeout/preemption signal
    (SIGUSR2) stop it like Ctrl-C (checkpoint, status failed), instead of submitit's requeue."""
    with sigterm_as_interrupt(once=True, extra=(signal.SIGUSR2,)):
        return run_job(folder, tracking_uri, experiment, threads, checkpoint_every)


def run_submitit(folders: list[Path], logs: Path, tracking_uri: str | None, experiment: str,
                 checkpoint_every: int, cluster: str | None = None, report: Report = print,
                 **parameters) -> dict[Path, dict]:
    """Submit every job through submitit: Slurm (`cluster=None` picks it when available, or
    "slurm"), or "local" for its local executor. `parameters` go to update_parameters
    (e.g. slurm_partition, timeout_min, gpus_per_node, cpus_per_task). On Ctrl-C or SIGTERM the
    unfinished jobs are cancelled (each checkpoints as it stops), then SweepInterrupted is raised."""
    try:
        import submitit
    except ImportError:
        raise TTAError("the submitit executor needs submitit: pip install submitit") from None
    python = shlex.join(WORKER_PYTHON)
    executor = submitit.AutoExecutor(folder=str(logs), cluster=cluster, slurm_python=python, local_python=python)
    executor.update_parameters(**parameters)
    n = len(folders)
    jobs = executor.map_array(submitted_job, folders, [tracking_uri] * n, [experiment] * n, [None] * n,
                              [checkpoint_every] * n)
    statuses: dict[Path, dict] = {}
    try:
        for folder, job in zip(folders, jobs, strict=True):
            try:
                status = job.result()
            except Exception as err:  # the job died (killed, out of time, node failure)
                status = {"status": "failed", "error": f"submitit job {job.job_id}: {str(err).strip().splitlines()[-1][:300]}"}
            statuses[folder] = status
            report(folder, status)
    except KeyboardInterrupt:
        with shielded():
            left = [job for job in jobs if not job.done()]
            for job in left:
                job.cancel(check=False)
        raise SweepInterrupted(f"{len(left)} submitted job{'s' * (len(left) != 1)} cancelled, "
                               f"each checkpointing as it stops") from None
    return statuses


def run_sweep(jobs: list[Job], sweep: str, state: Path, tracking_uri: str | None, experiment: str,
              checkpoint_every: int, executor: str = "local", workers: int = 1, threads: int | None = None,
              submitit: dict | None = None, report: Callable[[str], None] = print) -> dict[Path, dict]:
    """Run the jobs that have no finished run (in the store or under `state`) with the executor
    ("local" worker processes, or "submitit" with `submitit`'s cluster and parameters); their
    statuses by job folder. Ctrl-C or SIGTERM stops them (KeyboardInterrupt, after checkpointing)."""
    from tta_bench.storage.tracking import Tracker, TrackingUnavailable
    try:  # the store is created here, once, before any worker starts
        tracker = Tracker(tracking_uri, experiment)
    except TrackingUnavailable as err:
        tracker = None
        warnings.warn(f"{err}; jobs keep their results under {state}; re-run this command to upload them")
    todo = [job for job in jobs if finished(job.key, tracker, read_status(state / "jobs" / job.key)) is None]
    report(f"{len(jobs)} jobs: {len(jobs) - len(todo)} already finished, {len(todo)} to run")
    try:
        folders = prepare(state, todo, sweep)
    except OSError as err:
        raise TTAError(f"cannot write the sweep state under {state}: {err.strerror}; pass --state DIR") from None
    labels = {folder: job.label for folder, job in zip(folders, todo, strict=True)}

    def job_report(folder: Path, status: dict) -> None:
        extra = "; ".join(x for x in (status.get("resumed_from"), status.get("error")) if x)
        report(f"{status['status']:9} {labels[folder]}  {extra}")

    if executor == "submitit":
        options = dict(submitit or {})
        cluster = options.pop("cluster", None)
        return run_submitit(folders, state / "submitit", tracking_uri, experiment, checkpoint_every,
                            cluster=cluster, report=job_report, **options)
    return run_local(folders, workers, tracking_uri, experiment, checkpoint_every, report=job_report,
                     threads=threads)


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: python -m tta_bench.sweeps.executor JOB_FOLDER [...]"""
    parser = argparse.ArgumentParser(prog="tta_bench.sweeps.executor")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tracking-uri")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--parent", type=int, help="pid of the sweep: stop when it dies")
    args = parser.parse_args(argv)
    with sigterm_as_interrupt(once=True):
        if not die_with_parent(args.parent):
            return 130
        status = run_job(args.folder, args.tracking_uri, args.experiment, args.threads, args.checkpoint_every)
    print(json.dumps({k: v for k, v in status.items() if k != "traceback"}))
    return LOCKED if status["status"] == "running" else 130 if status.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
