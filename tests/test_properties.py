"""Property-based tests (hypothesis): whatever a user types or feeds in, the command line answers
with exit 0 or 2, no traceback, at most 3 lines on stderr, and leaves no output folder behind for a
refused input; every loader answers a malformed file with a TTAError. The real work (model loading,
the scan, a sweep's jobs) is replaced by a sentinel: these checks all come before it."""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tta_bench.cli import main
from tta_bench.core.errors import TTAError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TTA_BENCH_OFFLINE", "1")

SANDBOX = Path(tempfile.mkdtemp(prefix="tta-bench-properties-"))
FILE, FOLDER, MISSING = SANDBOX / "a-file.txt", SANDBOX / "a-folder", SANDBOX / "missing"
FILE.write_text("not what anyone expects\n")
FOLDER.mkdir()
PATHS = [str(FILE), str(FOLDER), str(MISSING), f"{MISSING}/x/y", f"{FILE}/inside", "/proc/no/such", "."]
SETTINGS = settings(max_examples=int(os.environ.get("TTA_BENCH_PROPERTY_EXAMPLES", 60)), deadline=None,
                    suppress_health_check=list(HealthCheck), derandomize=True)

# Values of every type a flag may get: numbers at and beyond every edge, text, unicode, paths.
EDGES = ["-1", "0", "1", "2", "10", "1e-300", "1e300", "-1e300", "nan", "-nan", "inf", "-inf", "",
         " ", "none", "None", "true", "abc", "∞", "é", "日本", "1,2", ",", ",,1", "0x10", "1_000",
         "4294967296", "99999999999999999999", "-0", "0.5", "1.5", "auto", "cpu", "cuda", "meta",
         "sqlite:///", "foo://bar", "http://", "file:///nonexistent/x", "n_focus=3", "=1", "a=b=c"]
VALUES = st.one_of(st.sampled_from(EDGES + PATHS), st.text(max_size=6),
                   st.integers(-2**70, 2**70).map(str), st.floats().map(repr))
RUN_FLAGS = ["--method", "--task", "--lr", "--lr-grid", "--threshold", "--gate", "--steps", "--clip",
             "--optimizer", "--momentum", "--weight-decay", "--limit", "--max-uncertain", "--batch-size",
             "--seed", "--device", "--threads", "--adapt-block", "--max-memory", "--autocast", "--out",
             "--experiment", "--tracking-uri", "-H", "--model", "--weights", "--data-dir", "--data-file",
             "--corruption", "--severity", "--corpus", "--data-files", "--window", "--dataset",
             "--chat-template", "--shuffle-seed", "--text-field", "--split"]
LEADERBOARD_FLAGS = ["--select", "--lr", "--threshold", "--out", "--experiment", "--tracking-uri",
                     "--task", "--reference", "--parent"]


class Reached(BaseException):
    """The point where real work would start: the input was accepted."""


def _refuse_work(*args, **kwargs):
    raise Reached


def invoke(argv: list[str]) -> tuple[int | str, str]:
    """(exit code, or "work" if the input was accepted; stderr) of `tta-bench ARGV`."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code: int | str = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
        except Reached:
            code = "work"
    return code, err.getvalue()


def check(argv: list[str], workdir: Path) -> None:
    before = set(workdir.rglob("*"))
    code, err = invoke(argv)
    assert code in (0, 2, "work"), (argv, code, err)
    assert "Traceback" not in err and err.count("\n") <= 3, (argv, err)
    if code == 2:
        assert err.strip(), argv
        left = {p for p in set(workdir.rglob("*")) - before if "mlflow" not in p.name and "mlruns" not in p.parts}
        assert not left, (argv, sorted(map(str, left)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(path)
    yield path
    os.chdir(old)


def pairs(flags: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.tuples(st.sampled_from(flags), VALUES), min_size=1, max_size=3).map(
        lambda ps: [x for flag, value in ps for x in (flag, value)])


@SETTINGS
@given(argv=pairs(RUN_FLAGS))
def test_run_flags(workdir, argv):
    with mock.patch("tta_bench.running.scan._run", _refuse_work), mock.patch("torch.cuda.is_available", lambda: False):
        check(["run", "--no-progress", *argv], workdir)


@SETTINGS
@given(argv=pairs(LEADERBOARD_FLAGS))
def test_leaderboard_flags(workdir, argv):
    with mock.patch("tta_bench.reporting.leaderboard.load_runs", _refuse_work):
        check(["leaderboard", *argv], workdir)


RUN_JSONS = [b"", b"{}", b"[]", b"null", b"\x00\xff", b'{"config": {}, "metadata": {}, "summary": [], "interrupted": false}',
             b'{"config": 1}', b"not json"]


@pytest.mark.filterwarnings("ignore:.*run.json:UserWarning")  # each refused folder warns; checked below
@SETTINGS
@given(contents=st.lists(st.one_of(st.sampled_from(RUN_JSONS), st.binary(max_size=40)), min_size=1, max_size=3),
       extra=st.lists(st.sampled_from(PATHS + ["--experiment", "", "--tracking-uri", "foo://bar"]), max_size=2))
def test_sync_inputs(workdir, contents, extra):
    root = Path(tempfile.mkdtemp(dir=SANDBOX))
    for i, content in enumerate(contents):
        (root / f"run{i}").mkdir()
        (root / f"run{i}" / "run.json").write_bytes(content)
    with mock.patch("tta_bench.storage.tracking.Tracker.log", _refuse_work):
        code, err = invoke(["sync", str(root), *extra])
    assert code in (0, 1, 2) and "Traceback" not in err, (contents, extra, err)  # 1: some folders refused
    assert err.count("\n") <= 3 + len(contents), err  # one line per refused folder, plus a summary


SPEC_KEYS = ["lr", "lr_grid", "threshold", "seed", "steps", "clip", "optimizer", "momentum", "weight_decay",
             "limit", "max_uncertain", "batch_size", "device", "pair", "experiment", "bogus"]
TOML_VALUES = st.one_of(
    st.sampled_from(['"high"', '["fast"]', "0", "-1", "1", "0.16", "nan", "inf", "-inf", "true", '"cifar10"',
                     "[]", "[[1e-3]]", "[1e-3, 2e-2]", '"paper"', '"tpu"', "1e400", "9223372036854775807",
                     '[["lr", "seed"]]', '"cpu"', "{}", '"sgd"']),
    st.integers(-2**63, 2**63 - 1).map(str), st.floats().map(repr),
    st.text(max_size=5).map(json.dumps))


@st.composite
def specs(draw) -> str:
    name = draw(st.sampled_from(['"p"', "5", '""', '"a/b"', '"../x"']))
    lines = [f"name = {name}"]
    lines += [f"{k} = {draw(TOML_VALUES)}" for k in draw(st.lists(st.sampled_from(SPEC_KEYS), max_size=3, unique=True))]
    tasks = draw(st.sampled_from(['[[tasks]]\nname = "cifar10"\nlimit = 2', '[[tasks]]\nname = "cifar10"\ncorruption = ' +
                                  draw(TOML_VALUES), 'tasks = "cifar10"', '[[tasks]]\nfoo = 1', '[[tasks]]\nname = 5', ""]))
    methods = draw(st.sampled_from(['[[methods]]\nname = "ifo"', '[[methods]]\nname = "ifo"\nn_focus = ' + draw(TOML_VALUES),
                                    "[[methods]]", 'methods = ["ifo"]', '[[methods]]\nname = "nope"', ""]))
    return "\n".join(lines) + "\n" + tasks + "\n" + methods + "\n"


@SETTINGS
@given(spec=st.one_of(specs(), st.binary(max_size=60).map(lambda b: b.decode("latin-1"))))
def test_sweep_specs(workdir, spec):
    path = Path(tempfile.mkdtemp(dir=SANDBOX)) / "spec.toml"
    path.write_text(spec, encoding="utf-8", errors="surrogateescape")
    with mock.patch("tta_bench.sweeps.executor.run_local", _refuse_work), \
            mock.patch("tta_bench.sweeps.executor.run_submitit", _refuse_work):
        check(["sweep", str(path), "--dry-run"], workdir)


# Loaders: a malformed small file is answered by a TTAError (or read), never by another exception.
FILES = st.one_of(st.binary(max_size=200), st.sampled_from([
    b"", b"{}", b"[]", b"[{}]", b'{"text": 5}\n', b'{"text": "a"}\n{broken', b'[{"question": 1}]',
    b'[{"question": "q", "choices": "ab", "answer": 0}]', b'[{"question": "q", "choices": ["a", 2], "answer": 0}]',
    b'[{"question": "q", "choices": ["a", "b"], "answer": "1"}]', b'[{"question": "q", "choices": ["a", "b"], "answer": 1.5}]',
    b'[{"question": "q", "choices": ["a", "b"], "answer": -1}]', b"PK\x03\x04", b"\xef\xbb\xbf[]", b"\x93NUMPY"]),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4),
                 lambda children: st.lists(children, max_size=3) | st.dictionaries(
                     st.sampled_from(["question", "choices", "answer", "text"]), children, max_size=4),
                 max_leaves=8).map(lambda v: json.dumps(v).encode()))


@SETTINGS
@given(content=FILES, suffix=st.sampled_from([".json", ".jsonl", ".txt", ".parquet", ".npz"]))
def test_loaders_answer_malformed_files_with_one_clear_error(content, suffix):
    from tta_bench.tasks.cifar10 import load_cifar10
    from tta_bench.tasks.mc import load_questions
    from tta_bench.tasks.text import local_files

    path = Path(tempfile.mkdtemp(dir=SANDBOX)) / f"data{suffix}"
    path.write_bytes(content)
    loaders = {".npz": lambda: load_cifar10(path), ".parquet": lambda: local_files([str(path)], "text"),
               ".txt": lambda: local_files([str(path)], "text")}
    for load in [loaders.get(suffix, lambda: load_questions("x", str(path), None)),
                 *([lambda: local_files([str(path)], "text")] if suffix in (".json", ".jsonl") else [])]:
        try:
            load()
        except TTAError as err:
            assert str(err) and "\n" not in str(err)


def test_cifar_npz_variants(tmp_path):
    """Arrays of the wrong dtype, rank or range are refused by name."""
    from tta_bench.tasks.cifar10 import load_cifar10
    for i, (images, labels) in enumerate([(np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, int)),
                                          (np.zeros((2, 32, 32, 3), np.uint8), np.zeros(3, int)),
                                          (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, int)),
                                          (np.zeros((2, 32, 32, 3), np.uint8), np.array([0.5, 1.0]))]):
        np.savez(tmp_path / f"{i}.npz", images=images, labels=labels)
        with pytest.raises(TTAError, match="expected an .npz"):
            load_cifar10(tmp_path / f"{i}.npz")


def _numeric_hparams() -> list[tuple[str, str, object]]:
    from tta_bench.core.registry import list_methods, method_class

    return [(m, name, hp) for m in list_methods() for name, hp in method_class(m).hparams.items()
            if hp.type in (int, float)]


def test_every_numeric_hyperparameter_declares_its_range():
    for method, name, hp in _numeric_hparams():
        assert hp.interval, f"{method}: {name} has no interval"
        assert hp.default is None and hp.nullable or hp.within(hp.default), (method, name)


def _edges(hp) -> list:
    """The interval's ends, just inside and just outside them, and every non-finite number."""
    low, high = hp.bounds()[:2]
    step = 1 if hp.type is int else 1e-9
    near = [v for end in (low, high) if np.isfinite(end) for v in (end, end - step, end + step)]
    return near + [0, -1, 1e308, -1e308, 2**32, 2**64, 10**30, "nan", "inf", "-inf", "1e999"]


@SETTINGS
@given(data=st.data())
def test_hyperparameters_are_range_checked_for_every_method(data):
    """-H name=value of every registered method: accepted only inside the declared interval (and
    finite), otherwise one line saying the range; the parsed value is what the method gets."""
    from tta_bench.core.registry import get_method

    method, name, hp = data.draw(st.sampled_from(_numeric_hparams()))
    value = data.draw(st.one_of(st.sampled_from(_edges(hp)), st.floats(), st.integers(-2**70, 2**70)))
    text = str(value) if hp.type is int or isinstance(value, str) else repr(value)
    try:
        got = getattr(get_method(method, **{name: text}).hp, name)
    except TTAError as err:
        assert "\n" not in str(err) and name in str(err)
        return
    assert np.isfinite(got) and hp.within(got), (method, name, text, got)
