"""`tta-bench run` under bad inputs and faults: one line and exit 2 before any work (and no folder
left behind), finished samples kept when the data or a signal stops a run, nothing logged for
a run stopped before its first sample, no half-logged MLflow run."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_cli import run_cli

# A toy task for subprocess runs: a small CNN, with a marker file once the scan is under way and
# an optional delay per sample, so that a signal reliably lands mid-scan (or before the first).
# It imports tests/conftest.py: the subprocess runs with tests/ on PYTHONPATH.
TOY_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from conftest import ToyTask
    from tta_bench.cli import main
    from tta_bench.core.registry import register_task

    @register_task
    class Slow(ToyTask):
        name = "slow"
        def __init__(self, **options):
            super().__init__(n=400, **options)
        def collate(self, raws):
            first = not MARK.exists()
            MARK.touch()
            if DELAY_FIRST or not first:
                time.sleep(DELAY)
            return super().collate(raws)

    MARK, DELAY, DELAY_FIRST = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "first"
    sys.exit(main(sys.argv[4:]))
""")


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["--seed", "-1"], "seed must be in 0 .. 2**32 - 1"),
    (["--seed", "4294967296"], "seed must be in 0 .. 2**32 - 1"),
    (["--device", "meta"], "unsupported device 'meta'"),
    (["--device", "mps"], "MPS is not available"),
    (["--device", "cuda:abc"], "unsupported device"),
    (["--max-memory", "nan"], "expected a finite number of GiB > 0"),
    (["--max-memory", "inf"], "expected a finite number of GiB > 0"),
    (["--lr", "inf"], "learning rates must be finite and > 0"),
    (["--lr", ""], "expected comma-separated numbers, got ''"),
    (["--lr", ","], "expected comma-separated numbers"),
    (["--momentum", "nan"], "momentum must be finite and >= 0"),
    (["--weight-decay", "inf"], "weight decay must be finite and >= 0"),
    (["--clip", "inf"], "clip must be finite and > 0"),
    (["-H", "n_focus=10"], "n_focus=10 puts every class of task cifar10 in focus"),
    (["--method", "dofo", "-H", "n_focus=12"], "use n_focus <= 9"),
    (["--task", "imagenet", "--model", "nope", "--weights", "none"], "unknown torchvision classification model 'nope'"),
    (["--experiment", ""], "--experiment is empty"),
    (["--tracking-uri", "foo://bar"], "tracking URI 'foo://bar' (--tracking-uri) is not valid"),
])
def test_bad_run_input_is_one_line_and_leaves_no_folder(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, _, err = run_cli(capsys, "run", "--limit", "2", "--no-progress", *argv)
    assert code == 2 and message in err and one_line(err), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_entropy_ablation_of_ifo_needs_no_out_of_focus_class(capsys, tmp_path):
    """n_focus does not apply to ifo loss=entropy: it is not refused there."""
    from tta_bench.core.registry import get_method, get_task
    get_method("ifo", n_focus=10, loss="entropy").supports(get_task("cifar10"))


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("make,message", [
    (lambda d: _npz(d / "a.npz", images=np.zeros((4, 32, 32, 3), np.uint8)), "has no labels array (it holds: images)"),
    (lambda d: _npz(d / "a.npz", images=np.zeros((4, 32, 32), np.uint8), labels=np.zeros(4, int)),
     "holds images uint8 [4, 32, 32]"),
    (lambda d: _npz(d / "a.npz", images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.array([0, 10])),
     "expected an .npz with `images` uint8 [N, 32, 32, 3]"),
    (lambda d: (d / "a.txt").write_text("hello") and str(d / "a.txt"), "is not an .npz archive"),
    (lambda d: (np.save(d / "a.npy", np.zeros(3)), str(d / "a.npy"))[1], "is not an .npz archive"),
    (lambda d: (d / "a.npz").write_bytes(b"PK\x03\x04broken") and str(d / "a.npz"), "is not an .npz archive"),
])
def test_bad_cifar_data_file(capsys, tmp_path, make, message):
    path = make(tmp_path)
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--data-file", path, "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and path in err and one_line(err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,content,message", [
    ("a.jsonl", b"", "is empty"),
    ("a.jsonl", bytes(range(256)) * 8, "is binary, not UTF-8 text"),
    ("a.jsonl", b'{"text": ', "is not valid JSON"),
    ("a.jsonl", b'{"body": "x"}\n', "has no 'text' field in its first record (body); pass --text-field"),
    ("a.json", b"[1, 2]", "has no 'text' field"),
    ("a.parquet", b"PAR1 nonsense", "is not a readable Parquet file"),
    ("a.txt", b"\x00\x01\x02", "is binary"),
])
def test_bad_text_data_file(capsys, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--task", "text", "--data-files",
                           str(tmp_path / name), "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and name in err and one_line(err), err


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (bytes(range(256)) * 8, "is binary, not UTF-8 JSON"),
    (b'[{"question": "q", ', "is not valid JSON"),
    (b'{"question": "q"}', "holds no list of questions"),
    (b'[{"question": "q", "choices": ["a"], "answer": 0}]', "record 0 is not a question"),
    (b'[{"question": "q", "choices": ["a", "b"], "answer": "Z"}]', "answer 'Z' is not an index from 0 or a letter"),
    (b'[{"question": "q", "choices": ["a", "b"], "answer": 2}]', "among its 2 choices (A, B)"),
    (b'[{"question": "q", "choices": ["a", "b"], "answer": true}]', "answer True is not an index"),
])
def test_bad_mc_data_file(capsys, tmp_path, content, message):
    (tmp_path / "q.json").write_bytes(content)
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--task", "mc", "--data-files",
                           str(tmp_path / "q.json"), "--out", str(tmp_path / "o"))
    assert code == 2 and message in err and "q.json" in err and one_line(err), err


def test_mc_answer_may_be_a_letter(tmp_path):
    from tta_bench.tasks.mc import load_questions
    (tmp_path / "q.jsonl").write_text('{"question": "q", "choices": ["a", "b", "c"], "answer": "c"}\n'
                                      '{"question": "r", "choices": ["a", "b"], "answer": 1}\n')
    assert [q["answer"] for q in load_questions("x", str(tmp_path / "q.jsonl"), None)] == [2, 1]


def test_existing_out_is_refused_unless_overwrite(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text("{}")
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--out", str(out))
    assert code == 2 and "already holds a run" in err and "--overwrite" in err and one_line(err)
    assert (out / "run.json").read_text() == "{}"
    (tmp_path / "f").write_text("")
    code, _, err = run_cli(capsys, "run", "--no-tracking", "--out", str(tmp_path / "f"))
    assert code == 2 and "--out" in err and "is a file" in err and one_line(err)


@pytest.mark.parametrize("argv,message", [
    (["--resume"], "--resume needs --out FOLDER"),
    (["--resume", "--overwrite", "--out", "o"], "pass one"),
    (["--resume", "--out", "o"], "holds no checkpoint to resume (no run)"),
    (["--resume", "--out", "finished"], "holds no checkpoint to resume (a finished run"),
    (["--out", "stopped"], "holds a run that stopped early; pass --resume"),
])
def test_resume_flags_are_checked_before_any_work(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    Path("finished").mkdir()
    Path("finished/run.json").write_text("{}")
    Path("stopped").mkdir()
    Path("stopped/checkpoint.parquet").write_text("")
    code, _, err = run_cli(capsys, "run", "--no-tracking", *argv)
    assert code == 2 and message in err and one_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finished", "stopped"]


@pytest.fixture
def imagenet_dir(tmp_path) -> Path:
    """An ImageNet val layout: 2 synsets × 3 JPEGs, the second image of the first one truncated."""
    root = tmp_path / "val"
    rng = np.random.default_rng(0)
    for wnid in ("n01440764", "n01443537"):
        (root / wnid).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / wnid / f"{k}.JPEG")
    bad = root / "n01440764" / "1.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    return root


def _imagenet(capsys, root: Path, out: Path, *extra: str):
    return run_cli(capsys, "run", "--task", "imagenet", "--model", "resnet18", "--weights", "none",
                   "--data-dir", str(root), "--gate", "none", "--no-progress", "--out", str(out), *extra)


def test_corrupt_image_names_the_file_and_keeps_what_finished(capsys, tmp_path, imagenet_dir):
    out = tmp_path / "o"
    code, _, err = _imagenet(capsys, imagenet_dir, out)
    assert code == 2 and one_line(err) and "n01440764/1.JPEG" in err and "--skip-unreadable" in err, err
    assert "the 1 samples finished before it are kept in" in err and "MLflow run" in err
    record = json.loads((out / "run.json").read_text())
    assert record["interrupted"] and "1.JPEG" in record["metadata"]["stopped_by"]
    assert pd.read_parquet(out / "samples.parquet")["index"].tolist() == [0]


def test_skip_unreadable_records_each_skipped_file(capsys, tmp_path, imagenet_dir):
    out = tmp_path / "o"
    code, _, err = _imagenet(capsys, imagenet_dir, out, "--skip-unreadable", "--no-tracking")
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    skipped = record["metadata"]["skipped_unreadable"]
    assert [s["index"] for s in skipped] == [1] and skipped[0]["what"].endswith("n01440764/1.JPEG")
    assert not record["interrupted"] and record["metadata"]["stopped_by"] is None
    assert sorted(pd.read_parquet(out / "samples.parquet")["index"]) == [0, 2, 3, 4, 5]


def test_skip_unreadable_survives_a_resume(tmp_path, imagenet_dir, monkeypatch):
    """A run interrupted after the skipped file still lists it once resumed."""
    from tta_bench import RunOptions, get_method, get_task, run
    from tta_bench.core.protocol import Protocol
    task = get_task("imagenet", model="resnet18", weights="none", data_dir=str(imagenet_dir))
    options = RunOptions(progress=False, track=False, skip_unreadable=True, checkpoint=tmp_path / "c.parquet",
                         checkpoint_every=1)
    samples = task.samples

    def interrupted():
        for sample in samples():
            if sample.index == 4:
                raise KeyboardInterrupt
            yield sample

    monkeypatch.setattr(task, "samples", interrupted)
    first = run(task, get_method("ifo"), Protocol(lrs=(0.01,), threshold=None), options)
    monkeypatch.setattr(task, "samples", samples)
    again = run(task, get_method("ifo"), Protocol(lrs=(0.01,), threshold=None), options)
    assert first.interrupted and [s["index"] for s in first.metadata["skipped_unreadable"]] == [1]
    assert [s["index"] for s in again.metadata["skipped_unreadable"]] == [1]
    assert again.metadata["resumed_from_sample"] == 4 and sorted(again.rows["index"]) == [0, 2, 3, 4, 5]


def _toy_cli(tmp_path: Path, delay: float, when: str, *argv: str) -> subprocess.Popen:
    script = tmp_path / "toy_cli.py"
    script.write_text(TOY_SCRIPT)
    path = os.pathsep.join([str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "mark"), str(delay), when,
                             "run", "--task", "slow", "--gate", "none", "--no-progress",
                             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *argv],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": path},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended early ({proc.returncode}): {proc.communicate()[1]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _finished_runs(tmp_path: Path) -> list:
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tta-bench")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_keeps_finished_samples(tmp_path, signum):
    proc = _toy_cli(tmp_path, 0.02, "later", "--out", str(tmp_path / "o"))
    _wait_for(tmp_path / "mark", proc)
    time.sleep(0.5)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted: the rows above cover the samples finished" in err
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    n = len(pd.read_parquet(tmp_path / "o" / "samples.parquet"))
    assert record["interrupted"] and 0 < n < 400
    runs = _finished_runs(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]  # logged, never as a finished result


def test_a_stopped_run_resumes_with_resume_and_equals_an_uninterrupted_one(tmp_path):
    out, argv = tmp_path / "o", ("--no-tracking", "--limit", "150")
    proc = _toy_cli(tmp_path, 0.02, "later", "--out", str(out), *argv)
    _wait_for(tmp_path / "mark", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and f"--resume --out {out}" in err, err
    n = len(pd.read_parquet(out / "samples.parquet"))
    assert 0 < n < 150 and (out / "checkpoint.parquet").is_file()

    again = _toy_cli(tmp_path, 0, "later", "--out", str(out), *argv)  # forgot --resume
    assert again.wait(120) == 2 and "pass --resume to continue it" in again.communicate()[1]
    resumed = _toy_cli(tmp_path, 0, "later", "--out", str(out), "--resume", *argv)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    record = json.loads((out / "run.json").read_text())
    assert not record["interrupted"] and record["metadata"]["resumed_from_sample"] == n
    assert not (out / "checkpoint.parquet").exists()  # the finished run's rows are samples.parquet

    whole = _toy_cli(tmp_path, 0, "later", "--out", str(tmp_path / "whole"), *argv)
    assert whole.wait(120) == 0
    rows, expected = (pd.read_parquet(p / "samples.parquet").drop(columns=["seconds", "select_seconds"])
                      for p in (out, tmp_path / "whole"))
    pd.testing.assert_frame_equal(rows, expected)


def test_interrupt_before_the_first_sample_saves_and_logs_nothing(tmp_path):
    proc = _toy_cli(tmp_path, 30, "first", "--out", str(tmp_path / "o"))
    _wait_for(tmp_path / "mark", proc)  # in the first sample's source forward
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted before the first sample finished: nothing was saved or logged" in err
    assert not (tmp_path / "o").exists() and _finished_runs(tmp_path) == []


def test_untracked_hint_names_the_experiment(capsys, tmp_path, monkeypatch):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    from tta_bench.storage.tracking import Tracker, TrackingUnavailable
    with pytest.raises(TrackingUnavailable):
        Tracker(f"http://127.0.0.1:{port}", "my exp")
    assert time.monotonic() - t0 < 30
    from tta_bench.running.scan import RunOptions, _warn_untracked
    with pytest.warns(UserWarning) as caught:
        _warn_untracked("down", Path("runs/x"), RunOptions(tracking_uri=f"http://127.0.0.1:{port}",
                                                            experiment="my exp"))
    assert f"tta-bench sync runs/x --tracking-uri http://127.0.0.1:{port} --experiment 'my exp'" in str(caught[0].message)


def test_second_interrupt_while_logging_leaves_one_complete_run(tmp_path, toy_task):
    """Ctrl-C arriving in the middle of logging is held off: the run is logged whole."""
    from tta_bench import RunOptions, get_method, run
    from tta_bench.core.protocol import Protocol
    from tta_bench.storage.tracking import Tracker
    result = run(toy_task, get_method("ifo"), Protocol(lrs=(0.01, 0.1)), RunOptions(progress=False, track=False))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tta-bench")
    original, calls = tracker._run, []

    def interrupted_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # between the parent and its children
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        return original(*args, **kwargs)

    tracker._run = interrupted_run
    run_id = tracker.log(result)
    runs = _finished_runs(tmp_path)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"} and tracker.find(result.key) == run_id


@pytest.mark.parametrize("argv", [["--task", "mc", "--dataset", "cais/mmlu"],
                                  ["--task", "text", "--corpus", "openwebtext"]])
def test_offline_hub_dataset_fails_at_once(tmp_path, argv):
    """TTA_BENCH_OFFLINE tells `datasets` before its import: no minutes of retries (28 s before)."""
    env = {**os.environ, "TTA_BENCH_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_DATASETS_OFFLINE", None)

    def seconds(*args: str) -> tuple[float, subprocess.CompletedProcess]:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=120)
        return time.monotonic() - t0, proc

    # Relative to the imports alone, so a loaded machine slows both: the retries slept ~28 s more.
    imports, _ = seconds("-c", "import tta_bench.cli, datasets, transformers")
    elapsed, proc = seconds("-m", "tta_bench.cli", "run", "--no-tracking", *argv)
    assert proc.returncode == 2 and one_line(proc.stderr) and "OfflineModeIsEnabled" in proc.stderr, proc.stderr
    assert elapsed - imports < 12, (elapsed, imports)


def test_a_second_run_into_a_running_runs_out_is_refused(tmp_path):
    """Two runs started together into one --out (different lrs): the second is refused with one
    line naming the first's pid, even with --overwrite; the first's result is whole."""
    out = tmp_path / "o"
    first = _toy_cli(tmp_path, 0.2, "later", "--out", str(out), "--no-tracking", "--lr", "0.01")
    _wait_for(tmp_path / "mark", first)
    for extra in ([], ["--overwrite"], ["--resume"]):
        second = _toy_cli(tmp_path, 0, "later", "--out", str(out), "--no-tracking", "--lr", "0.5", *extra)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and one_line(err), err
        assert f"--out {out} is in use by another tta-bench run (pid {first.pid})" in err
    first.send_signal(signal.SIGTERM)  # it runs on undisturbed until stopped
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["protocol"]["lrs"] == [0.01] and record["interrupted"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.parquet", "run.json", "samples.parquet", "summary.csv"]


def test_skip_unreadable_with_nothing_readable_is_no_result(capsys, tmp_path, imagenet_dir):
    """Every image unreadable: one line, no run folder and no MLflow run that could mask a good
    run of the same configuration on the leaderboard."""
    for image in imagenet_dir.rglob("*.JPEG"):
        image.write_bytes(b"not a jpeg")
    out = tmp_path / "o"
    code, _, err = _imagenet(capsys, imagenet_dir, out, "--skip-unreadable",
                             "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert code == 2 and one_line(err) and "none of the 6 samples of task imagenet could be read" in err, err
    assert not out.exists() and _finished_runs(tmp_path) == []


def test_sync_refuses_rows_that_do_not_belong_to_their_record(capsys, tmp_path, toy_task):
    from tta_bench import RunOptions, get_method, run
    from tta_bench.core.protocol import Protocol
    out = tmp_path / "o"
    run(toy_task, get_method("ifo"), Protocol(lrs=(0.01,)), RunOptions(progress=False, track=False, out=out))
    rows = pd.read_parquet(out / "samples.parquet")
    for damaged, why in ((pd.concat([rows, rows.head(10)]), "it has 50 rows, the record counts 40 over 1 learning rate(s)"),
                         (rows.head(20), "it has 20 rows, the record counts 40 over 1 learning rate(s)"),
                         (rows.assign(index=0), "a sample appears twice")):
        damaged.to_parquet(out / "samples.parquet")
        code, _, err = run_cli(capsys, "sync", str(out), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert code == 2 and one_line(err) and f"samples.parquet does not belong to its run.json ({why})" in err, err
    assert _finished_runs(tmp_path) == []


def test_sigkill_loses_at_most_one_checkpoint_interval(tmp_path):
    """SIGKILL (no handler runs): the first block was checkpointed at once, so the run resumes
    from it instead of starting over, to the rows of an uninterrupted run."""
    out, argv = tmp_path / "o", ("--no-tracking", "--limit", "120")
    proc = _toy_cli(tmp_path, 0.02, "later", "--out", str(out), *argv)
    _wait_for(out / "checkpoint.parquet", proc)
    time.sleep(0.3)
    proc.kill()
    proc.communicate(timeout=60)
    kept = pd.read_parquet(out / "checkpoint.parquet")
    assert 0 < kept["index"].nunique() < 120
    resumed = _toy_cli(tmp_path, 0, "later", "--out", str(out), "--resume", *argv)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert json.loads((out / "run.json").read_text())["metadata"]["resumed_from_sample"] == kept["index"].nunique()
    whole = _toy_cli(tmp_path, 0, "later", "--out", str(tmp_path / "whole"), *argv)
    assert whole.wait(120) == 0
    rows, expected = (pd.read_parquet(p / "samples.parquet").drop(columns=["seconds", "select_seconds"])
                      for p in (out, tmp_path / "whole"))
    pd.testing.assert_frame_equal(rows, expected)
