"""`tta-bench run` when writes fail (a full disk) and when a resume meets a changed or damaged
checkpoint (issue 30). Whatever happens: exit 0, 2 or 130 only, one line, and the finished rows
either saved whole, kept in a folder the message names, or still resumable; never a folder that
looks complete and is not."""
import errno
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import ToyTask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import run_cli

import tta_bench.storage.checkpoint as checkpoint
from tta_bench.core import registry
from tta_bench.core.task import Task
from tta_bench.running.scan import RunResult

TIMINGS = ["seconds", "select_seconds"]
EXAMPLES = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


class Stopped(ToyTask):
    """The toy task, stopped (Ctrl-C) after its 25th sample."""

    def samples(self):
        for sample in super().samples():
            if sample.index == 25:
                raise KeyboardInterrupt
            yield sample


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


def rows(folder: Path) -> pd.DataFrame:
    return RunResult.load(folder).rows.drop(columns=TIMINGS)


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """`--task toy` in this process; returns a runner of the CLI and the rows of a whole run."""
    monkeypatch.setitem(registry._extra[Task], "toy", ToyTask)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)

    def cli(capsys, *argv):
        return run_cli(capsys, "run", "--task", "toy", "--no-tracking", "--no-progress", "--lr", "0.01,0.1", *argv)
    return cli


def full_disk(monkeypatch, inside: Path, after: int) -> list:
    """Writes under `inside` fail with ENOSPC from the (after+1)-th on, each leaving half a
    temporary file behind it (as a real full disk does); returns the paths written."""
    written = []

    def failing(real):
        def write(path, fill):
            if not Path(path).is_relative_to(inside):
                return real(path, fill)
            written.append(Path(path).name)
            if len(written) <= after:
                return real(path, fill)

            def half(tmp):
                Path(tmp).write_bytes(b"PAR1 half")
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
            return real(path, half)
        return write
    monkeypatch.setattr("tta_bench.running.scan.write_atomically", failing(checkpoint.write_atomically))
    monkeypatch.setattr("tta_bench.storage.checkpoint.write_atomically", failing(checkpoint.write_atomically))
    return written


def whole_run(capsys, toy, tmp_path) -> pd.DataFrame:
    code, _, err = toy(capsys, "--out", str(tmp_path / "whole"))
    assert code == 0, err
    return rows(tmp_path / "whole")


@EXAMPLES
@given(after=st.integers(0, 6), spare=st.booleans())
def test_a_full_disk_at_any_write_loses_nothing_that_can_be_kept(capsys, toy, tmp_path_factory, after, spare):
    tmp_path = tmp_path_factory.mktemp("disk")
    expected = whole_run(capsys, toy, tmp_path)
    out, spares = tmp_path / "o", tmp_path / "spares"
    spares.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tempfile.tempdir", str(spares if spare else out))  # the spare folder: another disk, or the full one
        written = full_disk(mp, out, after)
        code, _, err = toy(capsys, "--out", str(out))
    assert code in (0, 2), err
    assert not list(out.rglob("*.tmp")), "a half-written temporary file was left behind"
    if (out / "run.json").exists():  # it looks complete, so it is
        pd.testing.assert_frame_equal(rows(out), expected)
    if code == 0:
        assert (out / "run.json").exists() and len(written) <= after + 2  # failed checkpoints only warn
        return
    message = err.strip().splitlines()[-1]
    assert "No space left on device" in message and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    if kept := re.search(r"kept in (\S+)", message):
        pd.testing.assert_frame_equal(rows(Path(kept[1])), expected)
    else:
        assert "its results are lost" in message and not spare
    if (out / checkpoint.FILE).exists():  # resumable once space is free, to the same rows
        code, _, err = toy(capsys, "--out", str(out), "--resume")
        assert code == 0, err
        pd.testing.assert_frame_equal(rows(out), expected)


def test_a_full_disk_with_tracking_keeps_the_rows_in_mlflow_and_a_named_folder(capsys, toy, tmp_path, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    full_disk(monkeypatch, out, 0)
    code, _, err = run_cli(capsys, "run", "--task", "toy", "--no-progress", "--out", str(out),
                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    message = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert re.search(rf"could not write the results to {out}/\S+ \(No space left on device\); its 40 samples are "
                     rf"kept in {tmp_path}/tta-bench-unsaved-\S+ and as MLflow run [0-9a-f]+$", message), message
    assert not (out / "run.json").exists()


def _stopped(capsys, toy, out: Path, monkeypatch, *argv) -> None:
    monkeypatch.setitem(registry._extra[Task], "toy", Stopped)
    code, _, err = toy(capsys, "--out", str(out), *argv)
    assert code == 130 and (out / checkpoint.FILE).exists(), err
    monkeypatch.setitem(registry._extra[Task], "toy", ToyTask)


def _rewrite(path: Path, table_rows=None, drop_meta: str | None = None) -> None:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[checkpoint.META])
    meta.pop(drop_meta, None)
    if table_rows is not None:
        table = table.slice(0, table_rows)
    pq.write_table(table.replace_schema_metadata({checkpoint.META: json.dumps(meta).encode()}), path)


CHANGES = {  # what changed between the stop and the resume -> what the refusal says
    "none": ([], None),
    "lr": (["--lr", "0.5"], "protocol.lrs [0.01, 0.1] then, [0.5] now"),
    "seed": (["--seed", "3"], "seed 0 then, 3 now"),
    "limit": (["--limit", "30"], "limit null then, 30 now"),
    "batch size": (["--batch-size", "4"], "batch_size unset then, 4 now"),
    "adapt block": (["--adapt-block", "2"], "adapt_block unset then, 2 now"),
    "hyperparameter": (["-H", "weighted=false"], "hparams.weighted true then, false now"),
    "threshold": (["--threshold", "0.5"], "protocol.threshold 0.16 then, 0.5 now"),
}
DAMAGE = {  # what happened to the checkpoint -> what the refusal says
    "half its rows lost": (lambda p: _rewrite(p, table_rows=pq.read_metadata(p).num_rows // 2), "is damaged"),
    "a row lost": (lambda p: _rewrite(p, table_rows=pq.read_metadata(p).num_rows - 1), "is damaged"),
    "n_seen missing": (lambda p: _rewrite(p, drop_meta="n_seen"), "its metadata lacks 'n_seen'"),
    "fingerprint missing": (lambda p: _rewrite(p, drop_meta="fingerprint"), "its metadata lacks 'fingerprint'"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:100]), "is unreadable"),
    "a column lost": (lambda p: pq.write_table(pq.read_table(p).drop(["uncertain"]), p), "is damaged"),
}


@EXAMPLES
@given(change=st.sampled_from(sorted(CHANGES)), damage=st.sampled_from([None, *sorted(DAMAGE)]))
def test_resume_refuses_what_changed_and_what_was_damaged(capsys, toy, tmp_path_factory, change, damage):
    tmp_path = tmp_path_factory.mktemp("resume")
    expected = whole_run(capsys, toy, tmp_path)
    out = tmp_path / "o"
    with pytest.MonkeyPatch.context() as mp:
        _stopped(capsys, toy, out, mp)
    if damage:
        DAMAGE[damage][0](out / checkpoint.FILE)
    argv, refusal = CHANGES[change]
    code, _, err = toy(capsys, "--out", str(out), "--resume", *argv)
    assert code in (0, 2) and "Traceback" not in err, err
    whys = [w for w in (DAMAGE[damage][1] if damage else None, refusal) if w]  # either, when both
    if not whys:
        assert code == 0, err
        pd.testing.assert_frame_equal(rows(out), expected)
        return
    assert code == 2 and one_line(err) and any(why in err for why in whys), err
    assert (out / checkpoint.FILE).exists()  # a refused resume deletes nothing
    if not damage:  # and with the stopped run's settings it resumes, to the whole run's rows
        code, _, err = toy(capsys, "--out", str(out), "--resume")
        assert code == 0, err
        pd.testing.assert_frame_equal(rows(out), expected)


def test_resume_refuses_a_changed_data_file(capsys, tmp_path, monkeypatch):
    """--data-file names a file whose contents changed between the stop and the resume."""
    rng = np.random.default_rng(0)
    data = tmp_path / "images.npz"

    def write(seed: int) -> None:
        r = np.random.default_rng(seed)
        np.savez(data, images=r.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), labels=rng.integers(0, 10, 12))
    write(0)
    out = tmp_path / "o"
    stop = {"n": 0}
    from tta_bench.tasks import cifar10

    original = cifar10.Cifar10.samples

    def stopping(self):
        for k, sample in enumerate(original(self)):
            if stop["n"] and k == stop["n"]:
                raise KeyboardInterrupt
            yield sample
    monkeypatch.setattr(cifar10.Cifar10, "samples", stopping)
    stop["n"] = 5
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--no-progress", "--gate", "none", "--data-file", str(data),
                           "--out", str(out))
    assert code == 130 and (out / checkpoint.FILE).exists(), err
    stop["n"] = 0
    write(1)
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--no-progress", "--gate", "none", "--data-file", str(data),
                           "--out", str(out), "--resume")
    assert code == 2 and one_line(err) and "another configuration (data " in err, err


@pytest.mark.parametrize("damage", ["truncated tokenizer", "edited merge rule", "changed config", "deleted template",
                                    "added file", "flipped weights", "old manifest"])
def test_the_model_cache_is_verified_file_by_file_and_rebuilt(tmp_path, monkeypatch, damage):
    from tta_bench.data import cache
    monkeypatch.setenv("TTA_BENCH_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"weights")
    builds = []

    def fill(folder: Path) -> None:
        builds.append(folder)
        (folder / "model.safetensors").write_bytes(b"\x01" * 64)
        (folder / "tokenizer.json").write_text(json.dumps({"merges": ["a b", "c d"]}))
        (folder / "config.json").write_text(json.dumps({"rms_norm_eps": 1e-5}))
        (folder / "chat_template.jinja").write_text("{{ messages }}")
    folder = cache.weights_cache("m", source, fill)
    assert cache.weights_cache("m", source, fill) == folder and len(builds) == 1  # verified, reused
    edits = {
        "truncated tokenizer": lambda: os.truncate(folder / "tokenizer.json", 5),
        "edited merge rule": lambda: (folder / "tokenizer.json").write_text(json.dumps({"merges": ["a b", "c e"]})),
        "changed config": lambda: (folder / "config.json").write_text(json.dumps({"rms_norm_eps": 1e-6})),
        "deleted template": lambda: (folder / "chat_template.jinja").unlink(),
        "added file": lambda: (folder / "special_tokens_map.json").write_text("{}"),
        "flipped weights": lambda: (folder / "model.safetensors").write_bytes(b"\x02" * 64),
        "old manifest": lambda: (folder / cache.MANIFEST).write_text(json.dumps(
            {k: v for k, v in json.loads((folder / cache.MANIFEST).read_text()).items() if k != "files"})),
    }
    edits[damage]()
    assert cache.weights_cache("m", source, fill) == folder and len(builds) == 2  # rebuilt
    assert json.loads((folder / "config.json").read_text()) == {"rms_norm_eps": 1e-5}
    assert sorted(p.name for p in folder.iterdir()) == sorted(["model.safetensors", "tokenizer.json", "config.json",
                                                                "chat_template.jinja", cache.MANIFEST])


def test_an_unwritable_model_cache_is_one_line_before_any_work(tmp_path, monkeypatch):
    from tta_bench.core.errors import TTAError
    from tta_bench.data import cache
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TTA_BENCH_CACHE", str(tmp_path / "file" / "cache"))  # under a file: never writable
    source = tmp_path / "model.gguf"
    source.write_bytes(b"weights")
    with pytest.raises(TTAError, match=r"cannot write the model cache .* set TTA_BENCH_CACHE to a writable folder"):
        cache.weights_cache("m", source, lambda folder: (folder / "model.safetensors").write_bytes(b"x"))


def test_an_unwritable_corruption_cache_warns_once_and_the_images_are_the_same(tmp_path, monkeypatch):
    from tta_bench.data import corruptions
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    monkeypatch.setenv("TTA_BENCH_CACHE", str(tmp_path / "ok"))
    expected = corruptions.CorruptedSet(images, "gaussian_noise", 3).take(np.arange(6))
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TTA_BENCH_CACHE", str(tmp_path / "file" / "cache"))
    corrupted = corruptions.CorruptedSet(images, "gaussian_noise", 3)
    with pytest.warns(UserWarning, match="cannot write the corruption cache") as caught:
        got = np.concatenate([corrupted.take(np.arange(3)), corrupted.take(np.arange(3, 6))])
    assert len(caught) == 1 and np.array_equal(got, expected)
