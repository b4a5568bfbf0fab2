"""Per-sample rows written incrementally and atomically, so that an interrupted run resumes where
it stopped instead of starting over (a reader sees the previous file or the next, never half)."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tta_bench.core.errors import TTAError
from tta_bench.core.hashing import json_sha256

META = b"tta_bench"
FILE = "checkpoint.parquet"  # its name in a run's or a sweep job's folder


@dataclass
class Progress:
    rows: pd.DataFrame  # every row recorded so far
    n_seen: int  # samples of the stream already processed (resume after them)
    n_uncertain: int
    wall: float  # seconds spent so far, over all attempts
    skipped: list[dict] = field(default_factory=list)  # unreadable samples passed over so far
    attempts: list[dict] = field(default_factory=list)  # each attempt's samples and environment
    memory: list[float] | None = None  # the method's memory after these samples (`Method.remembers`)


def save(path: Path, progress: Progress, settings: dict) -> None:
    """`settings`: everything that changes the rows (see `load`)."""
    table = pa.Table.from_pandas(progress.rows, preserve_index=False)
    meta = {"fingerprint": fingerprint(settings), "settings": settings, "n_seen": progress.n_seen,
            "n_uncertain": progress.n_uncertain, "wall": progress.wall, "skipped": progress.skipped,
            "attempts": progress.attempts, "memory": progress.memory}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           META: json.dumps(meta, default=str).encode()})
    write_atomically(path, lambda tmp: pq.write_table(table, tmp))


def _flat(settings: object, prefix: str = "") -> dict[str, str]:
    """{"protocol.lrs": "[0.1]", ...}: what differs between two settings, named."""
    if not isinstance(settings, dict):
        return {}
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value, default=str)
    return out


def fingerprint(settings: dict) -> str:
    return json_sha256(settings)


STOPS = ("limit", "max_uncertain")  # where a scan stops, not what it computes: a stopped run may go further


def _stops_only(was: object, written: str, now: dict) -> bool:
    """Whether the checkpoint's recorded settings `was` (whose fingerprint is `written`) differ from
    `now` in where the scan stops only (a run stopped early, resumed to go on to more samples)."""
    def computing(settings: dict) -> dict:
        return {k: v for k, v in settings.items() if k not in STOPS}
    return isinstance(was, dict) and fingerprint(was) == written and fingerprint(computing(was)) == fingerprint(computing(now))


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write` fills a temporary file beside `path`, which then replaces `path` in one rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)  # a run's --out is made when it has rows to keep
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: no half-written file (or folder) is left behind
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def metadata(schema: pa.Schema) -> dict:
    """What `save` recorded beside the rows: settings, progress (n_seen, ...) and attempts."""
    return json.loads(schema.metadata[META])


def load(path: Path, settings: dict, n_lrs: int) -> Progress | None:
    """The progress saved in `path` (None if there is none), after checking that it was written by
    a run of the same `settings` and that its rows are whole: every learning rate's rows for each
    of the samples its metadata counts, each sample once."""
    if not path.is_file():
        return None
    delete = "delete it to start this run over"
    try:
        table = pq.read_table(path)
        meta = metadata(table.schema)
        n_seen, n_uncertain, wall = int(meta["n_seen"]), int(meta["n_uncertain"]), float(meta["wall"])
        skipped, attempts = list(meta.get("skipped", [])), list(meta.get("attempts", []))
        memory = None if meta.get("memory") is None else [float(v) for v in meta["memory"]]
        written = meta["fingerprint"]
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException) as err:
        why = f"its metadata lacks {err}" if isinstance(err, KeyError) else str(err).strip().splitlines()[0]
        raise TTAError(f"checkpoint {path} is unreadable ({why}); {delete}") from None
    if written != fingerprint(settings) and not _stops_only(meta.get("settings"), written, settings):
        was, now = _flat(meta.get("settings")), _flat(settings)
        changed = [f"{k} {was.get(k, 'unset')} then, {now.get(k, 'unset')} now" for k in sorted(set(was) | set(now))
                   if was.get(k) != now.get(k) and k not in STOPS]  # a stop alone may change
        what = "; ".join(changed) if was and changed else (
            "task, method, hyperparameters, protocol, limits, seed, batch size, adapt block or the data differ")
        raise TTAError(f"checkpoint {path} was written by a run of another configuration ({what}); resume with "
                       f"the stopped run's settings, or {delete}")
    past = [f"--{key.replace('_', '-')} {settings[key]}" for key, held in (("limit", n_seen), ("max_uncertain", n_uncertain))
            if settings.get(key) is not None and held > settings[key]]
    if past:
        raise TTAError(f"checkpoint {path} already holds {n_seen} samples ({n_uncertain} uncertain), past "
                       f"{' and '.join(past)}: resume with at least as many, or {delete}")
    rows = table.to_pandas()
    n_rows = n_seen - len(skipped)  # samples with rows
    if not _whole(rows, n_rows, n_uncertain, n_lrs):
        raise TTAError(f"checkpoint {path} is damaged: its rows do not match its record ({len(rows)} rows for "
                       f"{n_rows} samples × {n_lrs} learning rates); {delete}")
    return Progress(rows, n_seen, n_uncertain, wall, skipped, attempts, memory)


def _whole(rows: pd.DataFrame, n_samples: int, n_uncertain: int, n_lrs: int) -> bool:
    """Every learning rate's row for each of the n_samples, each sample once, the same samples at
    every lr, n_uncertain of them uncertain."""
    if not {"lr", "index", "uncertain"} <= set(rows.columns) or len(rows) != n_samples * n_lrs:
        return False
    if rows.empty:
        return n_uncertain == 0
    per_lr = rows.groupby("lr")["index"]
    return (per_lr.ngroups == n_lrs and all(g.is_unique for _, g in per_lr)
            and per_lr.apply(frozenset).nunique() == 1 and int(rows["uncertain"].sum()) == n_uncertain * n_lrs)


def try_lock(file: IO[str], mode: int) -> int | None:
    """None once `file` is locked (flock), else the pid of the process holding it (0: not known yet)."""
    try:
        fcntl.flock(file, mode | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        file.seek(0)
        text = file.read().strip()
        return int(text) if text.isdigit() else 0


@contextmanager
def lock(path: Path) -> Iterator[int | None]:
    """Holds an exclusive lock on the file `path`, with this pid in it, for the block and yields
    None; or yields the pid of the live process that holds it (the block must then leave alone
    what it guards). The lock ends with the process, however it ends. A holder may unlink the file
    before it lets go: a lock won on a file no longer at `path` is let go and `path` tried again."""
    while True:
        with open(path, "a+") as file:
            if (holder := try_lock(file, fcntl.LOCK_EX)) is None:
                if not _is_at(file, path):  # won on the file its last holder unlinked
                    continue
                file.truncate(0)
                file.write(str(os.getpid()))
                file.flush()
            yield holder
            return


def _is_at(file: IO[str], path: Path) -> bool:
    """Whether the open `file` is the one `path` names now."""
    try:
        at = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(file.fileno())
    return (at.st_dev, at.st_ino) == (mine.st_dev, mine.st_ino)
