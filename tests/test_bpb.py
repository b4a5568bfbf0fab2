"""Bits per byte (docs/DESIGN.md §2, issue 13): the text task's per-sample metric at θ0 and after
adaptation, for every method; hand computations on a tiny random Llama with SmolLM2's tokenizer;
the Task.evaluate hook on a toy task; summaries, MLflow and the leaderboard."""
import copy
import math
import tempfile

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ToyTask
from tta_bench.tasks.text import covered_bytes

import tta_bench
from tta_bench import HParam, Protocol, RunOptions, TTAError
from tta_bench.core.method import Step
from tta_bench.core.task import Sample
from tta_bench.engine.adapt import Adaptation
from tta_bench.reporting.leaderboard import build
from tta_bench.reporting.runs import load_runs
from tta_bench.reporting.selection import Selection
from tta_bench.running.scan import Recorder, Scored
from tta_bench.running.summary import summarize

WINDOW = 16
# iFo's gradient on a random tiny LM is ~2e-4 (not clipped): large rates for a visible change
IFO_LRS = (300.0, 1000.0)
# ASCII, 2-byte (é, ï, ö), 3-byte (—, 日本) and 4-byte (𝄞) characters
TEXT = " ".join(f"café {i} naïve — 日本 über 𝄞 line{i}." for i in range(40))


@pytest.fixture
def text_task(tiny, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT, encoding="utf-8")
    task = tta_bench.get_task("text", data_files=str(doc), window=WINDOW)
    task.__dict__["lm"] = tiny  # the task's cached language model
    return task


def byte_of_symbol() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each symbol of a byte-level BPE token is one byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, ids: list[int]) -> bytes:
    table = byte_of_symbol()
    return b"".join(bytes(table[c] for c in tok) for tok in tokenizer.convert_ids_to_tokens(ids))


def hand_bpb(model, window: list[int], n_bytes: int) -> float:
    """−Σ log2 p(token) over tokens 2..n, all in float64, ÷ bytes."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([window])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -sum(float(logp[i, window[i + 1]]) for i in range(len(window) - 1))
    return nll / math.log(2) / n_bytes


def complete(tokenizer, token: int) -> bool:
    """Whether a token is whole UTF-8 characters (not part of one split across tokens)."""
    try:
        token_bytes(tokenizer, [token]).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_bpb_equals_a_hand_computation(text_task, tiny):
    samples = list(text_task.samples())
    clean = 0
    for s in samples:
        window = s.raw.tolist() + [s.label]
        assert s.extra == len(token_bytes(tiny.tokenizer, window[1:])), s.index  # the bytes tokens 2..n stand for
        if all(complete(tiny.tokenizer, t) for t in (window[0], window[1], window[-1])):
            # no character straddles the window's ends: the bytes of its decoded text, and the
            # fallback for tokenizers that are not byte-level agrees
            text = tiny.tokenizer.decode(window[1:], clean_up_tokenization_spaces=False)
            assert s.extra == len(text.encode()) == covered_bytes(tiny.tokenizer, window)
            clean += 1
        with torch.no_grad():
            logits, metrics = text_task.evaluate(tiny.model, s.raw[None], s)
            expected_logits = text_task.class_logits(tiny.model, s.raw[None])[0]
        assert set(metrics) == {"bpb"}
        assert metrics["bpb"] == pytest.approx(hand_bpb(tiny.model, window, s.extra), rel=1e-6)
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)  # the logits predicting the label
    assert 0 < clean < len(samples)  # both kinds of window were checked


def _run(task, method, protocol, limit=5):
    return tta_bench.run(task, method, protocol, RunOptions(progress=False, track=False, device="cpu", limit=limit))


def test_none_and_every_method_record_bpb_on_the_same_windows(text_task, tiny):
    none = _run(text_task, tta_bench.get_method("none"), Protocol((1e-2, 4e-2), threshold=None))
    ifo = _run(text_task, tta_bench.get_method("ifo"), Protocol(IFO_LRS, threshold=None))
    ft = _run(text_task, tta_bench.get_method("input-ft"), Protocol((1e-2, 4e-2), threshold=None))
    samples = {s.index: s for s in text_task.samples()}
    rows = none.rows
    assert rows["uncertain"].all() and len(rows) == 2 * 5
    np.testing.assert_array_equal(rows["bpb"], rows["bpb_source"])  # the source model: no change
    assert (rows["forwards"] == 2).all()  # the source pass and the θ0 bpb forward
    for _, row in rows.iterrows():
        s = samples[row["index"]]
        assert row["bpb_source"] == pytest.approx(
            hand_bpb(tiny.model, s.raw.tolist() + [s.label], s.extra), rel=1e-6)
    for other in (ifo, ft):  # the same windows at θ0, bit for bit; adapted: changed
        np.testing.assert_array_equal(other.rows["bpb_source"], rows["bpb_source"])
        assert other.rows["updated"].all() and (other.rows["bpb"] != other.rows["bpb_source"]).all()
        assert (other.rows["forwards"] == 2 + 1 + 2).all()  # + the loss's forward, one prediction per lr
    for result in (none, ifo, ft):
        for summary in result.summary:
            g = result.rows[result.rows.lr == summary["lr"]]
            assert summary["bpb_source"] == pytest.approx(g["bpb_source"].mean())
            assert summary["bpb"] == pytest.approx(g["bpb"].mean()) and summary["n_bpb_nan"] == 0
            assert summary["bpb_change_pct"] == pytest.approx(
                100 * (g["bpb"].mean() - g["bpb_source"].mean()) / g["bpb_source"].mean())
    assert all(s["bpb_change_pct"] == 0 for s in none.summary)


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain", "momentum"])
def test_bpb_after_one_ifo_step_is_the_forward_at_theta0_minus_lr_g(text_task, tiny, momentum):
    """One SGD step (with momentum 0.9 each lr replays the optimizer's first step: plain SGD too)."""
    result = _run(text_task, tta_bench.get_method("ifo"), Protocol(IFO_LRS, threshold=None, momentum=momentum),
                  limit=3)
    assert result.config["sweep"] == "one-gradient"
    samples = {s.index: s for s in text_task.samples()}
    for _, row in result.rows.iterrows():
        s = samples[row["index"]]
        model = copy.deepcopy(tiny.model)
        params = list(model.parameters())
        loss = tta_bench.get_method("ifo").loss(Step(model, s.raw[None], text_task.class_logits))
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        scale = min(1.0, 1.0 / (norm + 1e-6))  # clip at 1 (the protocol's default)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= row["lr"] * scale * g
        window = s.raw.tolist() + [s.label]
        assert row["bpb"] == pytest.approx(hand_bpb(model, window, s.extra), rel=1e-6)
        assert row["bpb_source"] == pytest.approx(hand_bpb(tiny.model, window, s.extra), rel=1e-6)
        assert abs(row["bpb"] - row["bpb_source"]) > 2e-5 * row["bpb_source"]  # ≥ 20× the tolerance


class SeenInputs:
    """Mixin: records what the method's loss is given, and the loss."""

    def loss(self, step):
        loss = super().loss(step)
        self.seen.append((step.inputs, float(loss.detach())))
        return loss


@pytest.mark.parametrize("name", ["ifo", "input-ft"])
def test_the_losses_see_the_inputs_only_and_are_unchanged(text_task, tiny, name):
    """The label and byte count reach Task.evaluate only: each loss is given the window's first
    n−1 tokens as before, and its value is bit-identical to the loss on them alone."""
    cls = type(tta_bench.get_method(name))
    method = type("Spy", (SeenInputs, cls), {"name": name})()
    method.seen = []
    result = _run(text_task, method, Protocol((1e-2,), threshold=None), limit=4)
    samples = list(text_task.samples())[:4]
    assert len(method.seen) == 4
    for s, (inputs, value), row in zip(samples, method.seen, result.rows.itertuples()):
        assert isinstance(inputs, torch.Tensor) and torch.equal(inputs, s.raw[None])  # no label in them
        expected = float(cls().loss(Step(tiny.model, s.raw[None].clone(), text_task.class_logits)))
        assert value == expected == row.loss  # bit-identical


def test_recorder_bpb_for_declined_and_nonfinite_samples():
    s = Scored(Sample(0, None, 1, 10), None, pred=1, delta=0.1, prob=0.5, seconds=0.0)
    rec = Recorder((1e-2, 1e-1), ("bpb",))
    declined = Adaptation(logits=[None, None])
    adapted = Adaptation(logits=[torch.tensor([0.0, 1.0]), torch.tensor([math.nan, 1.0])], updated=True,
                         metrics=[{"bpb": 2.5}, {"bpb": 7.0}])
    rec.add(s, True, declined, 0.0, {"bpb": 3.0})
    rec.add(s, True, adapted, 0.0, {"bpb": 3.0})
    rec.add(s, True, None, 0.0, {"bpb": 3.0})  # the source model
    rec.add(s, False, None, 0.0)  # certain: not scored, no θ0 forward
    rows = rec.frame()
    assert rows["bpb_source"].tolist()[:6] == [3.0] * 6
    assert rows["bpb"].tolist()[:3] == [3.0, 3.0, 2.5]  # declined: as at θ0
    assert math.isnan(rows["bpb"][3]) and rows["nonfinite"][3]  # non-finite adapted logits
    assert rows["bpb"].tolist()[4:6] == [3.0, 3.0]
    assert rows["bpb"][6:].isna().all() and rows["bpb_source"][6:].isna().all()
    assert rows["forwards"].tolist() == [2, 2, 2, 2, 2, 2, 1, 1]


def test_summary_means_are_nan_safe_and_count_the_nans():
    rows = pd.DataFrame({"lr": 0.1, "label": 0, "pred_source": 0, "pred": 0, "updated": True, "nonfinite": False,
                         "forwards": 3, "backwards": 1, "uncertain": [True, True, True, False],
                         "bpb_source": [1.0, 2.0, 3.0, math.nan], "bpb": [0.5, math.nan, 2.5, math.nan]})
    s = summarize(rows, 1.0, ("bpb",))[0]
    assert s["bpb_source"] == 2.0 and s["bpb"] == 1.5 and s["n_bpb_nan"] == 1
    assert s["bpb_change_pct"] == pytest.approx(-25.0)
    assert "bpb" not in summarize(rows.drop(columns=["bpb", "bpb_source"]), 1.0, ("bpb",))[0]
    assert "bpb" not in summarize(rows, 1.0)[0]  # a task without metrics


def test_image_tasks_have_no_metric_columns(toy_task):
    r = tta_bench.run(toy_task, tta_bench.get_method("ifo"), Protocol((2e-2,)), RunOptions(progress=False, track=False))
    assert not [c for c in r.rows.columns if "bpb" in c] and not [k for k in r.summary[0] if "bpb" in k]
    assert (r.rows.loc[r.rows.uncertain, "forwards"] == 3).all()  # source, loss, prediction: no θ0 metric forward


class MetricToy(ToyTask):
    """The toy task with a per-sample metric named bpb (here the entropy of the prediction, in
    bits, plus 1): the Task.evaluate hook, summaries, MLflow and the leaderboard, without an LM."""

    metrics = ("bpb",)
    options = {"shift": HParam(0.0, float, "added to every input")}

    def __init__(self, **options):
        super().__init__(**options)
        self.x = self.x + self.opts.shift

    def evaluate(self, model, inputs, sample):
        z = self.class_logits(model, inputs)[0]
        p = torch.softmax(z.double(), -1)
        return z, {"bpb": 1 + float(-(p * p.log2()).sum())}


def test_metrics_are_logged_read_back_and_shown_beside_delta_acc(tmp_path):
    uri = f"sqlite:///{tempfile.mkdtemp(prefix='tta-bench-bpb-')}/mlflow.db"
    options = RunOptions(progress=False, tracking_uri=uri, experiment="bpb")
    summaries = {}
    for shift in (0.0, 0.5):
        for name in ("ifo", "entropy"):
            r = tta_bench.run(MetricToy(shift=shift), tta_bench.get_method(name), Protocol((2e-2,)), options)
            assert {"bpb_source", "bpb"} <= set(r.rows.columns) and r.summary[0]["n_bpb_nan"] == 0
            summaries[shift, name] = r.summary[0]
    runs = load_runs(uri, "bpb").set_index(["configuration", "method"])
    for (shift, name), s in summaries.items():
        config = f"toy(shift={shift})"  # toy is not a registered task: every option is named
        for key in ("bpb_source", "bpb", "bpb_change_pct", "n_bpb_nan"):
            assert runs.loc[(config, name), key] == pytest.approx(s[key])
    build(uri, "bpb", tmp_path / "out", Selection("default"), site=tmp_path / "site")
    head = pd.read_csv(tmp_path / "out" / "toy" / "headline.csv").set_index("method")
    methods = pd.read_csv(tmp_path / "out" / "toy" / "methods.csv").set_index("method")
    for name in ("ifo", "entropy"):
        bpb = np.mean([summaries[shift, name]["bpb"] for shift in (0.0, 0.5)])
        change = np.mean([summaries[shift, name]["bpb_change_pct"] for shift in (0.0, 0.5)])
        assert head.loc[name, "bpb"] == pytest.approx(bpb) and head.loc[name, "Δbpb %"] == pytest.approx(change)
        assert methods.loc[name, "bpb source"] == pytest.approx(
            np.mean([summaries[shift, name]["bpb_source"] for shift in (0.0, 0.5)]))
    md = (tmp_path / "out" / "toy" / "headline.md").read_text()
    assert "| bpb (Δ%)" in md and f"{head.loc['ifo', 'bpb']:.3f} ({head.loc['ifo', 'Δbpb %']:+.2f}%)" in md
    assert "bpb (Δ%)" in (tmp_path / "site" / "index.html").read_text()
    with pytest.raises(TTAError, match="blocks do not compute the per-sample metrics"):
        tta_bench.run(MetricToy(), tta_bench.get_method("ifo"), Protocol((2e-2,)),
                      RunOptions(progress=False, track=False, adapt_block=2))
