"""The command line: clear one-line errors, listing, and an end-to-end run on the real task."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from tta_bench.cli import main
from tta_bench.running.provenance import source_sha256


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,message", [
    (["run", "--method", "nope"], "unknown method 'nope'; available:"),
    (["run", "--task", "nope"], "unknown task 'nope'; available:"),
    (["run", "--lr", "abc"], "expected comma-separated numbers, got 'abc'"),
    (["run", "--lr", "-1"], "learning rates must be finite and > 0"),
    (["run", "--lr", "0.1", "--lr-grid", "paper"], "not allowed with argument"),
    (["run", "-H", "weighted=maybe"], "weighted='maybe' is not a valid bool"),
    (["run", "-H", "foo=1"], "method ifo has no option foo"),
    (["run", "--threshold", "2"], "threshold must be in (0, 1]"),
    (["run", "--steps", "0"], "steps must be >= 1"),
    (["run", "--limit", "0"], "limit must be >= 1"),
    (["run", "--data-dir", "/tmp"], "which has no clean images: pass --corruption NAME"),
    (["run", "--device", "cuda:0"], "CUDA is not available"),
    (["run", "--autocast", "bf16", "--device", "cpu"], "bf16 autocast is a CUDA option"),
    (["run", "--adapt-block", "0"], "adapt block must be >= 1"),
    (["run", "--method", "sar", "--adapt-block", "8"], "method sar is not batchable"),
    (["run", "--out", "/proc/no-such/dir"], "cannot write to output folder"),
    (["run", "--task", "imagenet", "--weights", "none"], "no ImageNet data: pass --data-dir"),
    (["list", "things"], "invalid choice: 'things'"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_bad_input_is_one_line_exit_2(capsys, argv, message, monkeypatch):
    monkeypatch.delenv("TTA_BENCH_IMAGENET_DIR", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_console_script_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tta_bench.cli", "run", "--method", "nope"],
                          capture_output=True, text=True, cwd=tmp_path)  # the installed package
    assert proc.returncode == 2
    assert proc.stderr.startswith("tta-bench: error: unknown method") and "Traceback" not in proc.stderr


def test_list(capsys):
    code, out, _ = run_cli(capsys, "list", "methods")
    assert code == 0 and "ifo" in out and "weighted=True" in out
    code, out, _ = run_cli(capsys, "list", "models")
    assert "cifar10: efficientnet-lite0" in out and "resnet50" in out


@pytest.mark.slow
def test_source_hash_names_the_code_in_a_checkout_and_in_a_wheel_alike(tmp_path):
    files = {"tta_bench/engine/adapt.py": "a = 1\n", "methods/focus.py": "b = 2\n", "tasks/text.py": "c = 3\n"}
    for root, layout in (("checkout", {}), ("wheel", {"methods": "tta_bench/methods", "tasks": "tta_bench/tasks"})):
        for name, text in files.items():
            package, file = name.split("/", 1)
            path = tmp_path / root / layout.get(package, package) / file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    checkout = [tmp_path / "checkout" / p for p in ("tta_bench", "methods", "tasks")]
    wheel = [tmp_path / "wheel" / p for p in ("tta_bench", "tta_bench/methods", "tta_bench/tasks")]
    before = source_sha256(checkout)
    assert before == source_sha256(wheel)
    (tmp_path / "wheel/tta_bench/tasks/text.py").write_text("c = 4\n")  # one changed byte
    assert source_sha256(wheel) != before
    (tmp_path / "checkout/tasks/text.py").rename(tmp_path / "checkout/tasks/other.py")  # a renamed file
    assert source_sha256(checkout) != before
    renamed = source_sha256(checkout)
    (tmp_path / "checkout/tta_bench/engine/adapt.py").write_text("a = 2\n")  # a subpackage's code counts
    assert source_sha256(checkout) != renamed


def test_run_end_to_end_on_the_real_task(capsys, tmp_path):
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "run", "--limit", "40", "--lr", "0.02,0.5", "--out", str(out_dir),
                             "--no-progress", "-H", "weighted=false")
    assert code == 0, err
    assert "Δacc" in out and "0.02" in out and "0.5" in out
    rows = pd.read_parquet(out_dir / "samples.parquet")
    assert len(rows) == 80 and set(rows.lr) == {0.02, 0.5}
    assert set(rows.columns) >= {"index", "label", "pred_source", "pred", "delta", "p_source", "loss",
                                 "updated", "nonfinite", "seconds", "uncertain"}
    unc = rows[rows.uncertain]
    assert len(unc) and unc.updated.all() and (rows.delta[rows.uncertain] < 0.16).all()
    record = json.loads((out_dir / "run.json").read_text())
    assert record["config"]["hparams"] == {"n_focus": 2, "weighted": False, "loss": "logits"}
    assert record["config"]["protocol"]["clip"] == 1.0 and record["config"]["sweep"] == "one-gradient"
    meta = record["metadata"]
    assert meta["versions"]["torch"] and meta["threads"] >= 1 and "git_commit" in meta
    assert meta["source_sha256"] == source_sha256()
    assert record["config"]["options"]["seed"] == 0
    assert len(meta["task"]["data_sha256"]) == 64
    summary = pd.read_csv(out_dir / "summary.csv")
    assert summary.n_uncertain.tolist() == [len(unc) // 2] * 2
