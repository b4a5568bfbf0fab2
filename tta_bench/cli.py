"""`tta-bench` command line: run one configuration, list what is available."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterator, NoReturn, Sequence

import torch

from tta_bench.core.errors import TTAError
from tta_bench.core.hparams import parse_assignments
from tta_bench.core.protocol import Protocol
from tta_bench.core.registry import get_method, get_task, list_methods, list_tasks, method_class, task_class
from tta_bench.core.settings import LR_GRIDS, SETTINGS, Setting, default
from tta_bench.running.scan import RunOptions, RunResult, default_out, run
from tta_bench.storage.checkpoint import FILE as CHECKPOINT
from tta_bench.storage.checkpoint import lock
from tta_bench.storage.signals import sigterm_as_interrupt
from tta_bench.storage.tracking import DEFAULT_EXPERIMENT, Tracker, TrackingUnavailable, check_experiment, check_uri

DEFAULT_TASK, DEFAULT_METHOD = "cifar10", "ifo"


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number of GiB > 0, got {text!r}")
    return value


def _optional(kind: type):
    def parse(text: str):
        if text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__} or none, got {text!r}") from None
    return parse


def _task_options() -> dict[str, str]:
    """Every option any registered task declares -> its help (flags are shared across tasks)."""
    helps: dict[str, dict[str, list[str]]] = {}  # option -> its help -> the tasks that give it
    for name in list_tasks():
        for key, spec in task_class(name).options.items():
            helps.setdefault(key, {}).setdefault(spec.help, []).append(name)
    return {key: "; ".join(f"{', '.join(names)}: {text}" if len(by) > 1 else f"{text} [{', '.join(names)}]"
                           for text, names in by.items()).strip() for key, by in helps.items()}


def build_parser() -> Parser:
    parser = Parser(prog="tta-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_run(sub)
    ls = sub.add_parser("list", help="list methods, tasks or models")
    ls.add_argument("what", choices=("methods", "tasks", "models", "corpora", "datasets"))

    sy = sub.add_parser("sync", help="upload saved run folders to MLflow (e.g. after the server was down)",
                        description="Log results saved by `tta-bench run` to MLflow; already logged ones are skipped.")
    sy.add_argument("folders", nargs="+", type=Path, help="run folders (holding run.json), or folders of them")
    _tracking_flags(sy)

    _add_leaderboard(sub)
    _add_sweep(sub)
    return parser


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="run one method on one task", description=(
        "Apply a TTA method under the single-sample-reset protocol and summarise it."))
    r.add_argument("--method", default=DEFAULT_METHOD, help=f"method name (default {DEFAULT_METHOD})")
    r.add_argument("--task", default=DEFAULT_TASK, help=f"task name (default {DEFAULT_TASK}: embedded, offline)")
    r.add_argument("--hparam", "-H", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyperparameter, repeatable or comma-separated (e.g. -H weighted=false)")
    lr = r.add_mutually_exclusive_group()
    for name, setting in SETTINGS.items():  # the protocol's and the scan's settings
        _setting_flag(lr if name in ("lr", "lr_grid") else r, name, setting)
    r.add_argument("--gate", choices=("delta", "none"), default="delta",
                   help="none: adapt and score every sample (same as --threshold none)")
    r.add_argument("--threads", type=int, help="CPU threads for torch (recorded)")
    r.add_argument("--tf32", action="store_true", help="allow TF32 on CUDA (faster, less exact; recorded)")
    r.add_argument("--autocast", choices=("bf16",), help="bfloat16 autocast for every forward (CUDA only; recorded)")
    r.add_argument("--adapt-block", type=int, help="uncertain samples adapted at once with torch.func.vmap "
                   "(default: blocks sized to --max-memory on CUDA, 1 on CPU where blocks are slower)")
    r.add_argument("--max-memory", type=_gib, help="GiB for one block of adaptation (default: half the free GPU memory)")
    r.add_argument("--out", type=Path, help="output folder (default runs/TASK-METHOD-TIME)")
    r.add_argument("--overwrite", action="store_true", help="replace the results in an --out folder "
                   "that already holds a run")
    r.add_argument("--resume", action="store_true", help="continue the run that stopped early (Ctrl-C, "
                   "SIGTERM, a deadline, a crash) in --out: the samples it finished are kept (they were "
                   "checkpointed there), the scan goes on after them; run the stopped run's command again "
                   "with --resume (--device and --threads may change)")
    r.add_argument("--skip-unreadable", action="store_true", help="skip samples whose data cannot be "
                   "read (e.g. a corrupt image; each one is recorded in run.json) instead of stopping")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    _tracking_flags(r)
    r.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (results still saved)")
    group = r.add_argument_group("task options (each applies to the tasks named in its help)")
    for key, help_text in _task_options().items():
        group.add_argument(f"--{key.replace('_', '-')}", dest=f"task_{key}", default=None, help=help_text)



def _add_leaderboard(sub) -> None:
    lb = sub.add_parser("leaderboard", help="tables, tests and plots from the runs in MLflow",
                        description="Build leaderboard tables (Markdown, HTML, LaTeX, CSV) and plots from MLflow runs.")
    _tracking_flags(lb)
    lb.add_argument("--parent", help="only the child runs of this sweep's parent run id")
    lb.add_argument("--out", type=Path, default=Path("leaderboard"), help="output folder (default leaderboard/)")
    lb.add_argument("--select", choices=("default", "best", "fixed", "heldout"), default="default",
                    help="lr per method: default (the grid lr nearest its default lr), best (highest "
                         "mean Δacc on the test stream; flagged), fixed (--lr for every method), heldout "
                         "(per method family, the variant and lr with the highest mean Δacc on the validation "
                         "configurations, subset=val; scored on the test configurations, with the oracle's regret)")
    lb.add_argument("--lr", type=float, help="the learning rate for --select fixed")
    lb.add_argument("--threshold", type=_optional(float), default=default("threshold"), help="the threshold d "
                    f"of the tables (default {default('threshold')}; none: the runs without a gate)")
    lb.add_argument("--reference", help="method compared with every other (default ifo, where it has runs)")
    lb.add_argument("--task", action="append", help="only these tasks (repeatable; default all)")
    lb.add_argument("--site", type=Path, help="folder of the static site (index.html, a page per task; "
                    "default OUT/site)")
    lb.add_argument("--runs", type=Path, nargs="+", default=[], metavar="CSV|DIR",
                    help="runs tables of earlier builds (OUT/TASK/runs.csv, written by every build), or folders "
                         "of run folders (tta-bench run --out: run.json, summary.csv), to include; "
                         "the store is read too only with --tracking-uri or $MLFLOW_TRACKING_URI; where both "
                         "hold a run of one configuration, method, lr and threshold, the latest counts")


def _add_sweep(sub) -> None:
    sw = sub.add_parser("sweep", help="run a grid of jobs from a TOML spec (idempotent, resumable)",
                        description="Expand a sweep spec into jobs and run those without a finished MLflow run. "
                                    "Ctrl-C or SIGTERM checkpoints the running jobs (exit 130); interrupted jobs "
                                    "resume from their checkpoint, and a job another sweep is running is skipped; "
                                    "re-running the same command completes a sweep. Spec format: see sweeps/README.md.")
    sw.add_argument("spec", type=Path, help="sweep spec (.toml)")
    sw.add_argument("--dry-run", action="store_true", help="list the jobs and their count, run nothing")
    sw.add_argument("--workers", type=int, default=1, help="parallel local worker processes (default 1; "
                    "one GPU each when there are GPUs)")
    sw.add_argument("--threads-per-worker", type=int, help="CPU threads of each local worker "
                    "(default: #cores / --workers; results can differ in the last bits across thread counts)")
    sw.add_argument("--executor", choices=("local", "submitit"), default="local")
    sw.add_argument("--cluster", choices=("auto", "slurm", "local"), default="auto",
                    help="submitit backend (auto: Slurm when available)")
    sw.add_argument("--slurm-partition", help="submitit: Slurm partition")
    sw.add_argument("--timeout-min", type=int, default=60 * 24, help="submitit: minutes per job")
    sw.add_argument("--gpus-per-job", type=int, default=0, help="submitit: GPUs per job")
    sw.add_argument("--state", type=Path, help="state folder (default sweeps-state/NAME)")
    sw.add_argument("--checkpoint-every", type=int, default=200, help="samples between checkpoints (default 200; and at most 60 s between them)")
    sw.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    sw.add_argument("--experiment", help="MLflow experiment (default: the spec's experiment, else its name)")


def _setting_flag(p: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup, name: str, s: Setting) -> None:
    """The `tta-bench run` flag of a run setting, from its one declaration in core.settings."""
    kind = _floats if name == "lr" else s.type if s.choices or not s.nullable else _optional(s.type)
    shown = "" if s.unset is None else f" (default {s.default})"
    p.add_argument(f"--{name.replace('_', '-')}", type=kind, choices=s.choices, default=s.unset, help=s.help + shown)


def _tracking_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")


def cmd_run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise TTAError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    method = get_method(args.method, **parse_assignments(args.hparam))
    task_opts = {k[5:]: v for k, v in vars(args).items() if k.startswith("task_") and v is not None}
    task = get_task(args.task, **task_opts)
    lrs = LR_GRIDS[args.lr_grid] if args.lr_grid else (args.lr or [method.default_lr])
    given = {k: getattr(args, k) for k, s in SETTINGS.items() if s.kind == "protocol" and k not in ("lr", "lr_grid")}
    protocol = Protocol(lrs=tuple(lrs), **given | {"threshold": None if args.gate == "none" else args.threshold,
                                                   "optimizer": args.optimizer or method.default_optimizer})
    out = args.out or default_out(task, method)
    with _only_run_in(out):
        return _run_in(out, args, task, method, protocol)


def _run_in(out: Path, args: argparse.Namespace, task, method, protocol: Protocol) -> int:
    ckpt = _checkpoint_in(out, args.resume, args.overwrite, args.out is not None)
    options = RunOptions(**{k: getattr(args, k) for k, s in SETTINGS.items() if s.kind == "scan"}, tf32=args.tf32,
                         progress=not args.no_progress, out=out, track=not args.no_tracking,
                         adapt_block=args.adapt_block, autocast=args.autocast,
                         max_memory=int(args.max_memory * 2**30) if args.max_memory else None,
                         tracking_uri=args.tracking_uri, experiment=args.experiment,
                         skip_unreadable=args.skip_unreadable, checkpoint=ckpt)
    with sigterm_as_interrupt():  # `timeout`, Slurm, docker stop: keep what finished, as Ctrl-C does
        result = run(task, method, protocol, options)
    if result.interrupted and result.rows.empty:
        print("interrupted before the first sample finished: nothing was saved or logged", file=sys.stderr)
        return 130
    if not result.interrupted:
        ckpt.unlink(missing_ok=True)  # samples.parquet holds the finished run's rows
    print(f"{task.name} · {method!r} · {result.config['sweep']} sweep · d={protocol.threshold}")
    print(result.table())
    print(f"per-sample rows: {out / 'samples.parquet'}")
    if result.tracking:
        print(f"MLflow run: {result.tracking} (experiment {args.experiment})")
    if result.interrupted:
        print("interrupted: the rows above cover the samples finished before Ctrl-C; run the same command "
              f"with --resume --out {out} to continue", file=sys.stderr)
        return 130
    return 0


RUN_LOCK = ".tta-bench-run.lock"  # in --out, locked by the run writing there


@contextlib.contextmanager
def _only_run_in(out: Path) -> Iterator[None]:
    """The block runs as the only tta-bench run writing to `out` (a second is refused with one
    line naming the first's pid). A refused or failed run leaves no folder behind."""
    _check_writable(out)
    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    try:
        with lock(out / RUN_LOCK) as holder:
            if holder is not None:
                raise TTAError(f"--out {out} is in use by another tta-bench run (pid {holder or 'unknown'}); "
                               f"wait for it to end, or pass another --out")
            try:
                yield
            finally:
                (out / RUN_LOCK).unlink(missing_ok=True)
    finally:
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()


def _checkpoint_in(out: Path, resume: bool, overwrite: bool, named: bool) -> Path:
    """The checkpoint a run in `out` writes as it goes, after checking that the folder fits the
    flags: --resume needs a stopped run's checkpoint there, a fresh run an empty folder (or
    --overwrite, which discards the old run's checkpoint too)."""
    ckpt = out / CHECKPOINT
    if resume and overwrite:
        raise TTAError("--resume continues the run in --out and --overwrite starts it over; pass one")
    if resume and not named:
        raise TTAError("--resume needs --out FOLDER, the folder of the run to continue")
    if resume and not ckpt.is_file():
        why = "a finished run, or one stopped before its first checkpoint" if (out / "run.json").exists() \
            else "no run"
        raise TTAError(f"--out {out} holds no checkpoint to resume ({why}); run without --resume, "
                       "with --overwrite if the folder holds a run")
    if not resume and not overwrite and ckpt.is_file():
        raise TTAError(f"--out {out} holds a run that stopped early; pass --resume to continue it, or "
                       "--overwrite to start over")
    if not resume and not overwrite and (out / "run.json").exists():
        raise TTAError(f"--out {out} already holds a run (run.json); choose another folder, or pass "
                       "--overwrite to replace it")
    if overwrite:
        ckpt.unlink(missing_ok=True)
    return ckpt


def _check_writable(out: Path, flag: str = "--out") -> None:
    """Fail before any work if results could not be saved in folder `out`; leaves nothing behind
    (a refused or failed run must not leave an empty folder)."""
    if out.exists() and not out.is_dir():
        raise TTAError(f"{flag} {out} is a file, not a folder; pass {flag} DIR")
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise TTAError(f"cannot write to output folder {out} ({flag}): {err.strerror}; pass {flag} DIR") from None
    finally:
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        for name in list_methods():
            cls = method_class(name)
            hp = ", ".join(f"{k}={v.default}" + (f" in {v.interval}" if v.interval else "") for k, v in cls.hparams.items())
            print(f"{name:12} {cls.description}" + (f"  [{hp}]" if hp else ""))
    elif args.what == "tasks":
        for name in list_tasks():
            print(f"{name:12} {task_class(name).description}")
    elif args.what == "models":
        for name in list_tasks():
            print(f"{name}: {', '.join(task_class(name).models())}")
    else:  # corpora (text task) or datasets (mc task)
        print("\n".join(getattr(task_class("text" if args.what == "corpora" else "mc"), args.what)()))
    return 0


def run_folders(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if (path / "run.json").is_file():
            found.append(path)
        elif path.is_dir() and (inner := sorted(p.parent for p in path.rglob("run.json"))):
            found.extend(inner)
        else:
            raise TTAError(f"{path} is not a run folder (no run.json in it or below); pass folders "
                           f"written by tta-bench run --out")
    return found


def _checked_store(args: argparse.Namespace) -> str:
    """--experiment and --tracking-uri checked before any store is opened; returns the URI."""
    check_experiment(args.experiment)
    return check_uri(args.tracking_uri)


def cmd_sync(args: argparse.Namespace) -> int:
    uri = _checked_store(args)
    folders = run_folders(args.folders)
    try:
        tracker = Tracker(uri, args.experiment)
    except TrackingUnavailable as err:
        raise TTAError(f"{err}; check --tracking-uri and that the server is running") from None
    new, bad = 0, 0
    for folder in folders:
        try:
            result = RunResult.load(folder)
        except TTAError as err:  # one bad folder does not stop the others
            if len(folders) == 1:
                raise
            warnings.warn(f"{err}; skipped")
            bad += 1
            continue
        try:
            run_id = tracker.find(result.key)
            existed = run_id is not None
            run_id = run_id or tracker.log(result)
        except TrackingUnavailable as err:
            raise TTAError(f"{err} (while uploading {folder}); nothing after it was uploaded, "
                           f"re-run the same command to continue") from None
        new += not existed
        print(f"{'already logged' if existed else 'logged'}: {folder} -> {run_id}")
    print(f"{new} uploaded, {len(folders) - new - bad} already in {tracker.uri} (experiment {args.experiment})")
    if bad:
        raise TTAError(f"{bad} of {len(folders)} run folders not uploaded (unreadable, listed above); "
                       f"fix or remove them and re-run the same command")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from tta_bench.reporting.leaderboard import build
    from tta_bench.reporting.selection import Selection

    if (args.select == "fixed") != (args.lr is not None):
        raise TTAError("--select fixed needs --lr VALUE, and --lr is only used with --select fixed")
    if args.lr is not None and not 0 < args.lr < math.inf:
        raise TTAError(f"--lr must be a finite learning rate > 0, got {args.lr}")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise TTAError(f"--threshold must be in (0, 1] or none, got {args.threshold}")
    store = not args.runs or bool(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    uri = _checked_store(args) if store else None
    site = args.site or args.out / "site"
    _check_writable(args.out)
    _check_writable(site, "--site")
    t0 = time.perf_counter()
    try:
        written = build(uri, args.experiment, args.out, Selection(args.select, args.lr),
                        threshold=args.threshold, reference=args.reference, tasks=args.task,
                        parent=args.parent, site=site, runs_tables=args.runs, store=store)
    except OSError as err:
        raise TTAError(f"cannot write the leaderboard to {args.out} (--out) and {site} (--site): "
                       f"{err.strerror or err}; pass --out DIR / --site DIR") from None
    print(f"{len(written)} files in {args.out}; site: {site / 'index.html'} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from tta_bench.sweeps.executor import run_sweep
    from tta_bench.sweeps.spec import jobs_from_spec, load_spec

    for flag, value, least in (("--workers", args.workers, 1), ("--threads-per-worker", args.threads_per_worker, 1),
                               ("--checkpoint-every", args.checkpoint_every, 1), ("--timeout-min", args.timeout_min, 1),
                               ("--gpus-per-job", args.gpus_per_job, 0)):
        if value is not None and value < least:
            raise TTAError(f"{flag} must be >= {least}, got {value}")
    spec = load_spec(args.spec)
    jobs, notes = jobs_from_spec(spec, f"sweep spec {args.spec}")
    for note in notes:
        print(note)
    if args.dry_run:
        for job in jobs:
            print(f"{job.key}  {job.label}")
        print(f"{len(jobs)} jobs")
        return 0
    uri = check_uri(args.tracking_uri)
    state = args.state or Path("sweeps-state") / spec["name"]
    _check_writable(state, "--state")
    experiment = args.experiment or spec.get("experiment") or spec["name"]
    submitit = {"cluster": None if args.cluster == "auto" else args.cluster, "timeout_min": args.timeout_min,
                "gpus_per_node": args.gpus_per_job, **({"slurm_partition": args.slurm_partition} if args.slurm_partition else {})}
    with sigterm_as_interrupt(once=True):  # SIGTERM (timeout, Slurm, docker stop) stops it like Ctrl-C
        try:
            statuses = run_sweep(jobs, spec["name"], state, uri, experiment, args.checkpoint_every, args.executor,
                                 args.workers, args.threads_per_worker, submitit, lambda line: print(line, flush=True))
        except KeyboardInterrupt as err:  # the executors stop their jobs first (SweepInterrupted says how)
            print(f"tta-bench: interrupted: {err or '0 jobs checkpointed'}; re-run the same command to resume",
                  file=sys.stderr)
            return 130
    counts = Counter(status["status"] for status in statuses.values())
    print(", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "nothing to run")
    bad = [f for f, st in statuses.items() if st["status"] in ("failed", "unsynced", "running")]
    if bad:
        print(f"{len(bad)} job(s) not finished (errors above, details in {state}/jobs/KEY/); "
              f"re-run the same command to retry and resume them", file=sys.stderr)
        return 1
    return 0


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"tta-bench: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    warnings.formatwarning = _one_line_warning
    try:
        args = parser.parse_args(argv)
        commands = {"run": cmd_run, "list": cmd_list, "sync": cmd_sync, "leaderboard": cmd_leaderboard,
                    "sweep": cmd_sweep}
        return commands[args.command](args)
    except TTAError as err:
        print(f"tta-bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a scan (a scan keeps its finished samples and returns)
        print("tta-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
