"""Running a sweep's jobs: local worker processes (one per GPU when there are GPUs) or submitit
(Slurm, or its local executor). Each job lives in its own folder under the sweep's state folder:

    jobs/<key>/job.json            the resolved configuration
    jobs/<key>/checkpoint.parquet  per-sample rows so far (atomic writes; resumed after a crash)
    jobs/<key>/result/             run.json, samples.parquet, summary.csv once computed
    jobs/<key>/status.json         done | skipped | unsynced | failed, with the error
    jobs/<key>/worker.log          the worker's output

A job whose finished MLflow run exists is skipped; a computed result that could not be logged
(server down) is logged by the next attempt without being recomputed."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import write_atomically
from .errors import TTAError
from .sweep import Job

if TYPE_CHECKING:
    from .tracking import Tracker

STATUS, CHECKPOINT, RESULT = "status.json", "checkpoint.parquet", "result"


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


def run_job(folder: Path, tracking_uri: str | None, experiment: str, threads: int | None = None,
            checkpoint_every: int = 200) -> dict:
    """Run one job to completion in this process; its status is written and returned."""
    folder = Path(folder)
    previous = read_status(folder)
    (folder / STATUS).unlink(missing_ok=True)
    try:
        status = _run_job(folder, tracking_uri, experiment, threads, checkpoint_every, previous)
    except TTAError as err:
        status = {"status": "failed", "error": str(err)}
    except Exception as err:  # a bug or an environment failure: keep the sweep going, report it
        status = {"status": "failed", "error": f"{type(err).__name__}: {err}".splitlines()[0],
                  "traceback": traceback.format_exc()}
    try:
        _write_json(folder / STATUS, status)
    except OSError as err:
        status = {"status": "failed", "error": f"cannot write {folder / STATUS}: {err.strerror}"}
    return status


def _run_job(folder: Path, uri: str | None, experiment: str, threads: int | None, every: int,
             previous: dict | None) -> dict:
    import torch

    from .runner import RunOptions, RunResult, run
    from .sweep import run_parts
    from .tracking import JOB, SWEEP, Tracker, TrackingUnavailable

    job = json.loads((folder / "job.json").read_text())
    key, config = job["key"], job["config"]
    (folder / "worker.pid").write_text(str(os.getpid()))
    try:
        tracker, why = Tracker(uri, experiment), ""
    except TrackingUnavailable as err:
        tracker, why = None, str(err)
    if (skipped := finished(key, tracker, previous)) is not None:
        return skipped
    result_dir = folder / RESULT
    if (result_dir / "run.json").is_file():  # computed by an earlier attempt, not yet logged
        result, resumed = RunResult.load(result_dir), "logged a result saved earlier"
    else:
        if threads:
            torch.set_num_threads(threads)
        task, method, protocol, options = run_parts(config)
        result = run(task, method, protocol, RunOptions(
            **options, progress=False, out=result_dir, track=False, checkpoint=folder / CHECKPOINT,
            checkpoint_every=every))
        if result.interrupted:
            return {"status": "failed", "error": "interrupted; re-run to resume from the checkpoint"}
        (folder / CHECKPOINT).unlink(missing_ok=True)
        start = result.metadata["resumed_from_sample"]
        resumed = f"resumed from sample {start}" if start else ""
    if tracker is None:
        return {"status": "unsynced", "error": why, "resumed_from": resumed}
    try:
        if (skipped := finished(key, tracker, None)) is not None:  # by another attempt meanwhile
            return skipped
        run_id = tracker.log(result, tags={JOB: key, SWEEP: job["sweep"]})
    except TrackingUnavailable as err:
        return {"status": "unsynced", "error": str(err), "resumed_from": resumed}
    return {"status": "done", "run_id": run_id, "resumed_from": resumed}


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
              checkpoint_every: int, report=print, threads: int | None = None) -> dict[Path, dict]:
    """One worker process per job, `workers` at a time: each on its own GPU when there are GPUs
    (CUDA_VISIBLE_DEVICES), else with an equal share of the CPU threads."""
    import torch

    gpus = torch.cuda.device_count()
    if threads is None and not gpus:
        threads = max(1, (os.cpu_count() or 1) // workers)
    pending, running, free = list(folders), {}, list(range(workers))
    statuses: dict[Path, dict] = {}
    try:
        while pending or running:
            while pending and free:
                slot, folder = free.pop(0), pending.pop(0)
                (folder / STATUS).unlink(missing_ok=True)
                env = dict(os.environ)
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                cmd = [sys.executable, "-m", "tta_bench.executor", str(folder), "--experiment", experiment,
                       "--checkpoint-every", str(checkpoint_every)]
                cmd += ["--tracking-uri", tracking_uri] if tracking_uri else []
                cmd += ["--threads", str(threads)] if threads else []
                with open(folder / "worker.log", "ab") as log:
                    running[subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)] = (folder, slot)
            for proc in [p for p in running if p.poll() is not None]:
                folder, slot = running.pop(proc)
                free.append(slot)
                status = read_status(folder) if proc.returncode == 0 else None
                if status is None:
                    status = {"status": "failed", "error": f"worker exited with {_exit_reason(proc.returncode)}; "
                                                           f"see {folder / 'worker.log'}"}
                statuses[folder] = status
                report(folder, status)
            time.sleep(0.05)
    except KeyboardInterrupt:  # the workers got SIGINT too: they save a checkpoint and stop
        for proc in running:
            proc.wait()
        raise
    return statuses


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def run_submitit(folders: list[Path], logs: Path, tracking_uri: str | None, experiment: str,
                 checkpoint_every: int, cluster: str | None = None, report=print,
                 **parameters) -> dict[Path, dict]:
    """Submit every job through submitit: Slurm (`cluster=None` picks it when available, or
    "slurm"), or "local" for its local executor. `parameters` go to update_parameters
    (e.g. slurm_partition, timeout_min, gpus_per_node, cpus_per_task)."""
    try:
        import submitit
    except ImportError:
        raise TTAError("the submitit executor needs submitit: pip install submitit") from None
    executor = submitit.AutoExecutor(folder=str(logs), cluster=cluster)
    executor.update_parameters(**parameters)
    n = len(folders)
    jobs = executor.map_array(run_job, folders, [tracking_uri] * n, [experiment] * n, [None] * n,
                              [checkpoint_every] * n)
    statuses: dict[Path, dict] = {}
    for folder, job in zip(folders, jobs, strict=True):
        try:
            status = job.result()
        except Exception as err:  # the job died (killed, out of time, node failure)
            status = {"status": "failed", "error": f"submitit job {job.job_id}: {str(err).strip().splitlines()[-1][:300]}"}
        statuses[folder] = status
        report(folder, status)
    return statuses


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: python -m tta_bench.executor JOB_FOLDER [...]"""
    parser = argparse.ArgumentParser(prog="tta_bench.executor")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--tracking-uri")
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    args = parser.parse_args(argv)
    status = run_job(args.folder, args.tracking_uri, args.experiment, args.threads, args.checkpoint_every)
    print(json.dumps({k: v for k, v in status.items() if k != "traceback"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
