"""Run a sweep spec's jobs in-process on one machine (one GPU shared by many worker processes),
under a deadline, resumably, and pack the results small enough to carry back:
    python -m benchmarks.fair_gpu sweeps/fair.toml --runs DIR --workers 12 --deadline 450 --pack OUT
Each job is `tta_bench.run` with tracking off, saved to DIR/<job key>/ (run.json, summary.csv,
samples.parquet); a job with a run.json is done and skipped, and a job stopped midway (killed, or
past a session) resumes from its checkpoint.parquet, a window at most lost. Workers take whole
configurations (every method of one configuration in turn: its corrupted images are generated
once), validation configurations first. A job another sweep is running (it holds DIR/<job key>/.running,
flock) is left to it, so sweeps with overlapping --only filters share the work. A job whose model
package is not installed yet is put back and retried (the weights can arrive in a later call). At
the deadline no new job starts; one that started finishes.
--status runs nothing: it prints what each configuration still lacks. --pack writes OUT/runs.tgz
(run.json + summary.csv of every finished run, checkpoint.parquet of every unfinished one, so that
a later session resumes it) and OUT/rows.parquet (every scored sample's rows,
with the job key); `tta-bench leaderboard --runs DIR` reads the unpacked run folders."""
from __future__ import annotations

import argparse
import importlib
import io
import os
import sys
import tarfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

CLAIM = ".running"  # DIR/<job key>/CLAIM: locked (flock) by the process running the job


def priority(config: dict) -> tuple:
    """Validation first, then severity 5, each corruption on every model in turn."""
    o = config["task_options"]
    return (o.get("subset") != "val", -int(o.get("severity", 5)), o.get("corruption", ""), o.get("model", ""))


def die_with_parent(parent: int) -> None:
    """Worker initializer: exit when the sweep that started this worker is gone (killing a sweep
    must not leave its workers running their queues on, orphaned)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def run_configuration(jobs: list[tuple[str, dict]], runs: str, deadline: float, device: str) -> list[tuple[str, str]]:
    """Run one configuration's jobs in turn; (key, outcome) for each."""
    import torch

    from tta_bench import RunOptions, run
    from tta_bench.core.errors import TTAError
    from tta_bench.storage.checkpoint import FILE as CHECKPOINT
    from tta_bench.storage.checkpoint import lock
    from tta_bench.sweeps.spec import run_parts

    torch.set_num_threads(1)
    outcomes = []
    for key, config in jobs:
        folder = Path(runs) / key
        if (folder / "run.json").is_file():
            outcomes.append((key, "done earlier"))
            continue
        if time.time() > deadline:
            outcomes.append((key, "deadline"))
            continue
        folder.mkdir(parents=True, exist_ok=True)
        with lock(folder / CLAIM) as holder:  # ends with this process, however it ends
            if holder is not None:
                outcomes.append((key, "running elsewhere"))
                continue
            importlib.invalidate_caches()  # weights packages installed while this ran
            t0 = time.time()
            try:
                if (folder / "run.json").is_file():  # finished by another sweep since the check above
                    outcomes.append((key, "done earlier"))
                    continue
                task, method, protocol, options = run_parts(config)
                options = {k: v for k, v in options.items() if k not in ("device", "threads")}
                if device.startswith("cuda"):  # blocks of many workers share one GPU: 4 GiB each at most
                    options.setdefault("max_memory", 4 << 30)
                result = run(task, method, protocol, RunOptions(**options, device=device, track=False, progress=False,
                                                                out=folder, checkpoint=folder / CHECKPOINT))
                if result.interrupted:  # Ctrl-C: its windows are in the checkpoint; the job is not done
                    (folder / "run.json").unlink()
                    outcomes.append((key, f"interrupted after {time.time() - t0:.1f} s"))
                    continue
                (folder / CHECKPOINT).unlink(missing_ok=True)
                outcomes.append((key, f"ok {time.time() - t0:.1f} s"))
            except TTAError as err:
                outcomes.append((key, f"error: {err}"))
                if "pip install" in str(err):  # its model's weights are not installed (yet)
                    outcomes[-1] = (key, "missing weights")
            finally:
                (folder / CLAIM).unlink(missing_ok=True)
        if not any(folder.iterdir()):  # claimed, then nothing ran (an error before the first window)
            folder.rmdir()
    return outcomes


def pack(runs: Path, out: Path, skip: set[str] = frozenset(), new_only: bool = False) -> None:
    """OUT/runs.tgz and OUT/rows.parquet of the finished runs in `runs`, but those named in `skip`
    (e.g. the runs of an earlier pack) and those without their samples (unpacked from a pack);
    new_only: also those already committed in benchmarks/results/fair-*-runs.tgz (`committed`).
    An unfinished run's checkpoint goes into runs.tgz too (not its rows: they are not a result yet)."""
    import pandas as pd

    from tta_bench.storage.checkpoint import FILE as CHECKPOINT

    if new_only:
        skip = set(skip) | committed(runs)
    out.mkdir(parents=True, exist_ok=True)
    frames = []
    with tarfile.open(out / "runs.tgz", "w:gz") as tar:
        for ckpt in sorted(p / CHECKPOINT for p in runs.iterdir() if (p / CHECKPOINT).is_file()
                           and not (p / "run.json").is_file() and p.name not in skip):
            tar.add(ckpt, arcname=f"{ckpt.parent.name}/{CHECKPOINT}")  # unfinished: resumed from it
        for folder in sorted(p for p in runs.iterdir() if (p / "run.json").is_file()
                             and (p / "samples.parquet").is_file() and p.name not in skip):
            for name in ("run.json", "summary.csv"):
                tar.add(folder / name, arcname=f"{folder.name}/{name}")
            rows = pd.read_parquet(folder / "samples.parquet")
            frames.append(rows[rows["uncertain"]].assign(job=folder.name))
    if frames:
        pd.concat(frames, ignore_index=True).to_parquet(out / "rows.parquet", index=False, compression="zstd")
    print(f"packed {len(frames)} runs into {out}")


def committed(runs: Path, results: Path = Path("benchmarks/results")) -> set[str]:
    """The run folders of `runs` whose run.json is, byte for byte, in a committed pack (a job rerun
    since, e.g. a superseded one, is not)."""
    found = set()
    for tgz in sorted(results.glob("fair-*-runs.tgz")):
        with tarfile.open(tgz) as tar:
            for member in tar.getmembers():
                key, _, name = member.name.partition("/")
                local = runs / key / "run.json"
                if name == "run.json" and local.is_file() and tar.extractfile(member).read() == local.read_bytes():
                    found.add(key)
    return found


def unpack_committed(runs: Path, results: Path = Path("benchmarks/results")) -> None:
    """Unpack every committed pack (results/fair-*-runs.tgz) into `runs`, keeping files already
    there, and set the superseded runs aside after each pack: a job rerun under today's method
    definition has the folder name of its superseded run, so the newer run wins whatever the
    order of the packs. Of an unfinished run's checkpoints the furthest is kept, and none once the
    run has finished (in any pack)."""
    from tta_bench.storage.checkpoint import FILE as CHECKPOINT

    runs.mkdir(parents=True, exist_ok=True)
    for tgz in sorted(results.glob("fair-*-runs.tgz")):
        with tarfile.open(tgz) as tar:
            for member in tar.getmembers():
                local = runs / member.name
                if member.name.endswith(f"/{CHECKPOINT}"):  # an unfinished run: keep the furthest one
                    if not (local.parent / "run.json").is_file() and _progress(io.BytesIO(tar.extractfile(member).read())) > (
                            _progress(local) if local.is_file() else -1):
                        tar.extract(member, runs, filter="data")
                elif member.isfile() and not local.exists():
                    tar.extract(member, runs, filter="data")
        set_aside_superseded(runs)
    for stale in runs.glob(f"*/{CHECKPOINT}"):  # a run finished in a later pack than its checkpoint's
        if (stale.parent / "run.json").is_file():
            stale.unlink()


def _progress(checkpoint) -> int:
    """The samples a checkpoint (a path or a file object) has seen."""
    import pyarrow.parquet as pq

    from tta_bench.storage.checkpoint import metadata

    return int(metadata(pq.read_schema(checkpoint))["n_seen"])


def set_aside_superseded(runs: Path) -> None:
    """Move the run folders of a method whose definition has changed since to RUNS/../superseded:
    they are not results of today's method, and their jobs run again. So far: pasle gate=own
    before issue 27 (it gated Δ1,2 < τ, not PASLE's partial set; today's runs record
    `resolved.gate`)."""
    import json
    import shutil

    for record in sorted(runs.glob("*/run.json")):
        config = json.loads(record.read_text())["config"]
        if (config["method"] == "pasle" and config["hparams"].get("gate") == "own"
                and "gate" not in config.get("resolved", {})):
            aside = runs.parent / "superseded" / record.parent.name
            aside.parent.mkdir(exist_ok=True)
            if aside.exists():  # set aside before, and unpacked again from a committed pack
                shutil.rmtree(record.parent)
            else:
                shutil.move(str(record.parent), str(aside))


def complete_view(runs: Path, view: Path, published: Path | list[Path], specs: list[Path] = ()) -> list[str]:
    """Fill `view` with links to the run folders of `runs` that a leaderboard can score together
    with the published one (`published`: its runs tables, e.g. leaderboard/*/runs.csv; a task
    without one takes every run): every run of the method variants a task's table ranks, every
    validation run (the held-out choice sees every candidate), and the test runs of each new variant
    that has one on every test configuration the table scores or that is a candidate of a family the
    published selection table (beside the runs table) ranks, not its held-out choice (it is not
    ranked; its runs feed the every-candidate oracle only). A variant ranked with fewer would take
    the other configurations out of every method's score: it waits, named in the leaderboard's notes
    (e.g. a retrieval method still running on one corpus of the text board). With `specs`, only
    runs that are jobs of these sweep specs (a configuration a spec no longer has is superseded).
    Returns what is left out: the new variants whose test runs wait, with their counts, and the
    number of superseded runs."""
    import json
    import shutil
    from collections import defaultdict

    from tta_bench.storage.tracking import configuration_label, method_label
    from tta_bench.sweeps.spec import jobs_from_spec, load_spec

    jobs = {j.key for spec in specs for j in jobs_from_spec(load_spec(spec))[0]} if specs else None
    boards = dict(_published_board(path) for path in ([published] if isinstance(published, Path) else published))
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    new: dict[tuple[str, str], dict[str, Path]] = defaultdict(dict)  # (task, variant) -> configuration -> folder
    family: dict[tuple[str, str], str] = {}  # (task, variant) -> its family
    superseded = 0
    for record in sorted(runs.glob("*/run.json")):
        if jobs is not None and record.parent.name not in jobs:
            superseded += 1
            continue
        config = json.loads(record.read_text())["config"]
        variant, board = method_label(config), boards.get(config["task"])
        if board is None or variant in board["known"] or config["task_options"].get("subset") == "val":
            (view / record.parent.name).symlink_to(record.parent.resolve())
        else:
            new[config["task"], variant][configuration_label(config)] = record.parent
            family[config["task"], variant] = _family(variant, config)
    left_out = []
    for (task, variant), configs in sorted(new.items()):
        board = boards[task]
        candidate = (family[task, variant] in board["families"]  # of a ranked family, not its choice:
                     and variant not in board["chosen"])  # never ranked
        if board["scored"] <= set(configs) or candidate:
            for folder in configs.values():
                (view / folder.name).symlink_to(folder.resolve())
        else:
            left_out.append(f"{task}: {variant} (test runs on {len(set(configs) & board['scored'])} of "
                            f"{len(board['scored'])})")
    return left_out + ([f"{superseded} run(s) that are no job of {', '.join(map(str, specs))}"] if superseded else [])


def _published_board(path: Path) -> tuple[str, dict]:
    """(task, what its published runs table ranks: the variants, the test configurations where all
    ran, and from the selection table beside it the families and their held-out choices)."""
    import pandas as pd

    table = pd.read_csv(path, dtype=str)
    at_d = table[(pd.to_numeric(table["threshold"]) == 0.16) & (table["option.subset"] != "val")]
    choices = path.parent / "selection.csv"  # without one, any new variant may be a held-out choice
    selection = pd.read_csv(choices) if choices.is_file() else pd.DataFrame(columns=["family", "held-out variant"])
    return table["task"].iloc[0], {
        "known": set(at_d["method"]),  # the variants ranked (not those with validation runs only)
        "scored": set.intersection(*(set(g) for _, g in at_d.groupby("method")["configuration"])),
        "families": set(selection["family"]), "chosen": set(selection["held-out variant"])}


def _family(variant: str, config: dict) -> str:
    """The family of a run's method variant, as the leaderboard's selection groups them."""
    import pandas as pd

    from tta_bench.reporting.runs import HP, families

    run = {"method": variant, "method_name": config["method"], **{HP + k: v for k, v in config["hparams"].items()}}
    return families(pd.DataFrame([run]))[variant]


def print_status(by_config: dict[str, list], done: set[str]) -> None:
    """Each configuration's finished/total jobs and the method labels it still lacks, then a count."""
    complete = 0
    for js in sorted(by_config.values(), key=lambda js: js[0].label):
        missing = [j.parts[1] for j in js if j.key not in done]
        complete += not missing
        if missing:
            print(f"{js[0].parts[0]}: {len(js) - len(missing)}/{len(js)}, lacks {', '.join(missing)}")
    print(f"{complete} of {len(by_config)} configurations complete")


def _config_key(job) -> str:
    return str(sorted(job.config["task_options"].items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--deadline", type=float, default=float("inf"), help="seconds from now")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pack", type=Path)
    ap.add_argument("--only", default="", help="semicolon-separated substrings; run only jobs whose label has one")
    ap.add_argument("--skip", default="", help="semicolon-separated substrings; leave out jobs whose label has one")
    ap.add_argument("--started", action="store_true",
                    help="only configurations with a finished job (new methods join the configurations scored so far)")
    ap.add_argument("--scored", action="store_true",
                    help="only configurations where every job outside --only has finished (the ones the tables score)")
    ap.add_argument("--status", action="store_true",
                    help="run nothing: print each chosen configuration's finished/total jobs and what it lacks")
    args = ap.parse_args()
    from tta_bench.sweeps.spec import jobs_from_spec, load_spec

    start = time.time()
    deadline = start + args.deadline
    jobs, _ = jobs_from_spec(load_spec(args.spec))
    done = {p.parent.name for p in args.runs.glob("*/run.json")}
    # --started: configurations with a finished job of any method (before --only and --skip)
    started = {_config_key(j) for j in jobs if j.key in done}
    only = [s for s in args.only.split(";") if s]
    chosen = [j for j in jobs if not only or any(s in j.label for s in only)]
    # --scored: configurations whose jobs outside --only are all finished (before --skip)
    chosen_keys = {j.key for j in chosen}
    unfinished = {_config_key(j) for j in jobs if j.key not in chosen_keys | done}
    jobs = chosen
    if args.skip:
        jobs = [j for j in jobs if not any(s in j.label for s in args.skip.split(";"))]
    by_config: dict[str, list] = defaultdict(list)
    for job in jobs:
        by_config[_config_key(job)].append(job)
    if args.started:
        by_config = {c: js for c, js in by_config.items() if c in started}
    if args.scored:
        by_config = {c: js for c, js in by_config.items() if c not in unfinished}
    if args.status:
        print_status(by_config, done)
        return 0
    if args.runs.is_dir():
        set_aside_superseded(args.runs)
    # validation first; then the configurations closest to complete (a resumed sweep finishes them first)
    queue = sorted(by_config.values(), key=lambda js: (priority(js[0].config)[0], -sum(j.key in done for j in js),
                                                       priority(js[0].config)))
    args.runs.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = defaultdict(int)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn"), initializer=die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        pending = {pool.submit(run_configuration, [(j.key, j.config) for j in js], str(args.runs), deadline,
                               args.device): js for js in queue}
        while pending:
            for future in as_completed(list(pending)):
                js = pending.pop(future)
                retry = []
                for key, outcome in future.result():
                    counts[outcome.split(" ")[0]] += 1
                    if outcome == "missing weights":
                        retry.append(next(j for j in js if j.key == key))
                    elif not outcome.startswith(("ok", "done")):
                        print(key, outcome, flush=True)
                if retry and time.time() < deadline - 30:
                    counts["missing"] -= len(retry)
                    time.sleep(5)
                    pending[pool.submit(run_configuration, [(j.key, j.config) for j in retry], str(args.runs),
                                        deadline, args.device)] = retry
                print(f"{time.time() - start:6.0f} s: {dict(counts)}", flush=True)
                break
    if args.pack:
        pack(args.runs, args.pack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
