"""Test-time fine-tuning on retrieved data (issue 13): the data space, its split and leakage guard,
nn / nn-f / sift / random selection, the engine's steps on selected inputs, and the cache."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_bit_identical, state
from hypothesis import given, settings
from hypothesis import strategies as st

import tta_bench
from tta_bench import Protocol, RunOptions, TTAError
from tta_bench.cli import main
from tta_bench.core.method import Step
from tta_bench.core.registry import get_method, get_task
from tta_bench.data import dataspace as ds
from tta_bench.engine.adapt import Adapter

ROOT = Path(__file__).parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TTA_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def preset(vectors: dict[int, list[float]]) -> ds.Embedder:
    """An embedder that maps a sequence to the preset vector of its first token (unit length)."""
    def embed(seqs):
        rows = np.array([vectors[int(s[0])] for s in seqs], dtype=np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return ds.Embedder("preset", "1", embed)


def space_of(seqs: list[list[int]], embedder: ds.Embedder) -> ds.DataSpace:
    tokens = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    offsets = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
    return ds.build(tokens, offsets, embedder, {"model": "test", "seq_len": 64}, progress=False)


def choose(name: str, space: ds.DataSpace, window: list[int], **hp) -> list[int]:
    method = get_method(name, **hp)
    step = Step(None, torch.tensor([window]), None, index=3, data_space=space)
    method.step_inputs(step)
    return method.last_selection


# Sequences are told apart by their first token (the preset embedder's key); 100 is the query.
# 1, 2, 3 are near-duplicates of each other, closest to the query; 4, 5 are relevant and distinct.
VECTORS = {100: [1, 0, 0], 1: [0.95, 0.31, 0], 2: [0.95, 0.31, 0], 3: [0.95, 0.31, 0],
           4: [0.8, -0.3, 0.5], 5: [0.8, -0.3, -0.5], 6: [0, 0, 1]}


@pytest.fixture
def planted(cache):
    seqs = [[k, 7, 8, 9] for k in (6, 1, 4, 2, 5, 3)]  # ids 0..5: 6, 1, 4, 2, 5, 3
    return space_of(seqs, preset(VECTORS))


def test_nn_selects_the_planted_duplicates_most_similar_first(planted):
    assert sorted(choose("nn", planted, [100, 11, 12], n_select=3)) == [1, 3, 5]  # the three copies
    order = choose("nn", planted, [100, 11, 12], n_select=6)
    assert sorted(order[3:5]) == [2, 4] and order[5] == 0  # then the less similar, the least last


def test_sift_selects_distinct_sequences_where_nn_takes_duplicates(planted):
    chosen = choose("sift", planted, [100, 11, 12], n_select=3)
    first_tokens = [int(planted.sequence_ids(i)[0]) for i in chosen]
    assert first_tokens[0] in (1, 2, 3)  # the most relevant first
    assert {4, 5} <= set(first_tokens)  # then diverse, relevant ones instead of more copies


def test_nn_f_repeats_the_nearest_sequence(planted):
    assert choose("nn-f", planted, [100, 11, 12], n_select=4) == [1, 1, 1, 1]


def test_random_is_uniform_seeded_by_the_sample_and_within_the_space(planted):
    a = choose("random", planted, [100, 11, 12], n_select=4)
    assert a == choose("random", planted, [100, 11, 12], n_select=4)
    assert len(set(a)) == 4 and set(a) <= set(range(6))


def test_a_test_windows_own_text_in_the_data_space_is_never_selected(cache):
    rng = np.random.default_rng(0)
    window = rng.integers(20, 1000, size=60).tolist()
    planted = [1] + window[10:50]  # 40 tokens of the window (a shared 32-gram), most similar
    other = [2] + window[10:40] + [5] * 10  # 30 shared tokens: shorter than the guard's n-gram
    seqs = [planted, other, [4, 7, 8], [5, 9, 9]]
    space = space_of(seqs, preset({1: [1, 0, 0], 2: [0.9, 0.1, 0], 4: [0.5, 0.5, 0], 5: [0, 1, 0],
                                   window[0]: [1, 0, 0]}))
    assert space.leaking(torch.tensor([window])).tolist() == [0]
    for name, hp in (("nn", {}), ("nn-f", {}), ("sift", {}), ("random", {"seed": 1})):
        chosen = choose(name, space, window, n_select=3, **hp)
        assert 0 not in chosen, name
    assert choose("nn", space, window, n_select=1) == [1]


def test_the_document_split_is_deterministic_and_disjoint(tmp_path, tiny):
    docs = [{"text": f"Document number {i} says something about topic {i % 7}."} for i in range(40)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs))
    task = get_task("text", data_files=str(path), data_space="split")
    names = [n for n, _ in task.documents()]
    space = [n for n, _ in task.data_space_documents()]
    assert space == [n for n in names if ds.in_data_space(n, 0.5)]
    assert 5 < len(space) < 35  # about half
    assert space == [n for n, _ in get_task("text", data_files=str(path), data_space="split").data_space_documents()]


def tiny_text_task(tmp_path, tiny, **options):
    text = " ".join(f"The river {i % 13} flows past the mill number {i % 17} at dawn." for i in range(400))
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": text[i:i + 900]}) for i in range(0, len(text), 900)))
    task = get_task("text", data_files=str(path), window=24, seq_len=16, embedding_model="self", **options)
    task.__dict__["lm"] = tiny
    return task


def test_steps_equal_a_hand_written_adam_loop_and_the_model_is_reset(tmp_path, tiny, cache):
    task = tiny_text_task(tmp_path, tiny, data_space="split")
    model = tiny.model
    sample = next(iter(task.samples()))
    inputs = sample.raw[None]
    method = get_method("nn", n_select=3)
    protocol = Protocol(lrs=(1e-2,), threshold=None, optimizer="adam")
    before = state(model)
    with Adapter(model, method, task.class_logits, protocol, data_space=task.data_space()) as adapter:
        out = adapter.adapt(inputs, sample.index)
    assert_bit_identical(model, before)
    assert out.updated and out.backwards == 3 and out.select_seconds > 0
    chosen = method.last_selection
    assert len(chosen) == 3

    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    for i in chosen:  # the hand-written loop: one step per selected sequence, in order
        seq = task.data_space().sequence(i)
        opt.zero_grad()
        logits = model(input_ids=seq[:, :-1]).logits
        F.cross_entropy(logits.flatten(0, 1), seq[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    with torch.no_grad():
        expected = task.class_logits(model, inputs)[0]
    with torch.no_grad():
        for p, k in zip(model.parameters(), dict(model.named_parameters())):
            p.copy_(before[k])
    torch.testing.assert_close(out.logits[0], expected, rtol=0, atol=1e-6)


def test_every_method_runs_on_the_same_test_windows_with_selection_time(tmp_path, tiny, cache, capfd):
    rows = {}
    for name, hp in (("nn", {"n_select": 2}), ("ifo", {}), ("none", {})):
        task = tiny_text_task(tmp_path, tiny, data_space="split")
        result = tta_bench.run(task, get_method(name, **hp), Protocol(lrs=(1e-3,), threshold=None,
                                                                      optimizer=get_method(name).default_optimizer),
                               RunOptions(limit=6, progress=False, track=False))
        rows[name] = result.rows
    assert rows["nn"][["index", "label"]].equals(rows["ifo"][["index", "label"]])
    assert rows["nn"][["index", "label"]].equals(rows["none"][["index", "label"]])
    assert (rows["nn"]["select_seconds"] > 0).all() and (rows["ifo"]["select_seconds"] == 0).all()
    assert (rows["nn"]["backwards"] == 2).all()
    assert result.metadata["task"]["data_space"] is None  # `none` never builds it
    assert "embedding the data space" not in capfd.readouterr().err  # progress=False: no bar while it builds


def test_a_corrupt_embedding_or_index_file_is_rebuilt(cache):
    seqs = [[k, 7, 8, 9] for k in (6, 1, 4, 2, 5, 3)]
    first = space_of(seqs, preset(VECTORS))
    assert not first.info["from_cache"]
    assert space_of(seqs, preset(VECTORS)).info["from_cache"]
    folder = cache / "dataspaces"
    for name in ("embeddings.npy", "index.faiss"):
        path = next(folder.glob(f"*/{name}"))
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
        again = space_of(seqs, preset(VECTORS))
        assert not again.info["from_cache"], name
        np.testing.assert_array_equal(again.embeddings, first.embeddings)
        assert space_of(seqs, preset(VECTORS)).info["from_cache"]


def test_retrieval_methods_refuse_what_they_cannot_do(tmp_path, tiny, capsys):
    with pytest.raises(TTAError, match="does not support image tasks"):
        get_method("sift").supports(get_task("cifar10"))
    with pytest.raises(TTAError, match="--data-space split"):
        get_method("nn").supports(get_task("text"))
    task = tiny_text_task(tmp_path, tiny, data_space="split")
    with pytest.raises(TTAError, match="--steps must be 1"):
        Adapter(tiny.model, get_method("nn"), task.class_logits, Protocol(lrs=(1e-3,), steps=2))
    assert main(["run", "--method", "nn", "--task", "text", "--no-tracking", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-space" in err[0]
    # --steps is refused before the model loads (here: loading would fail)
    task.load_model = lambda: pytest.fail("the model was loaded before --steps was refused")
    with pytest.raises(TTAError, match="--steps must be 1"):
        tta_bench.run(task, get_method("nn"), Protocol(lrs=(1e-3,), steps=2), RunOptions(progress=False, track=False))


def test_the_packaged_minilm_embeds_to_unit_length_and_ranks_by_meaning(tiny):
    embedder = ds.hf_embedder(ds.DEFAULT_EMBEDDER, lambda ids: tiny.tokenizer.decode(ids.tolist()),
                              torch.device("cpu"))
    texts = ("The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue rose by 4 percent.")
    e = embedder.embed([np.array(tiny.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_the_optimizer_state_is_freed_with_each_sample(tmp_path, tiny, cache):
    """Adam's moments (2 × the model) must go with the sample, by reference counting alone: a
    reference cycle kept them until a full garbage collection and ran a real run out of memory."""
    import gc

    task = tiny_text_task(tmp_path, tiny, data_space="split")
    sample = next(iter(task.samples()))
    protocol = Protocol(lrs=(1e-3, 2e-3), threshold=None, optimizer="adam")
    with Adapter(tiny.model, get_method("nn", n_select=2), task.class_logits, protocol,
                 data_space=task.data_space()) as adapter:
        gc.collect()
        gc.disable()
        try:
            adapter.adapt(sample.raw[None], sample.index)
            alive = [o for o in gc.get_objects() if type(o) is torch.optim.Adam]
        finally:
            gc.enable()
    assert alive == []


@given(window=st.lists(st.integers(0, 50), min_size=0, max_size=80),
       seqs=st.lists(st.lists(st.integers(0, 50), min_size=2, max_size=70), min_size=1, max_size=6),
       planted=st.integers(0, 5), start=st.integers(0, 80))
@settings(max_examples=60, deadline=None)
def test_leaking_is_exactly_the_sequences_sharing_a_32_gram(window, seqs, planted, start):
    """Property: a sequence is excluded iff it shares some 32 consecutive tokens with the window
    (a small alphabet makes shared n-grams likely; the window's text is also planted)."""
    if len(window) >= ds.NGRAM and planted < len(seqs):
        start = min(start, len(window) - ds.NGRAM)
        seqs[planted] = seqs[planted][:3] + window[start:start + ds.NGRAM] + seqs[planted][3:]
    tokens = np.concatenate([np.asarray(s, dtype=np.int32) for s in seqs])
    offsets = np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64)
    space = ds.DataSpace(tokens, offsets, np.zeros((len(seqs), 1), np.float32), None, None)
    grams = {tuple(window[i:i + ds.NGRAM]) for i in range(len(window) - ds.NGRAM + 1)}
    expected = [i for i, s in enumerate(seqs)
                if any(tuple(s[j:j + ds.NGRAM]) in grams for j in range(len(s) - ds.NGRAM + 1))]
    assert space.leaking(np.asarray(window)).tolist() == expected


def test_labels_name_only_what_differs_from_the_methods_own_defaults():
    from tta_bench.storage.tracking import method_label
    protocol = {"lrs": [5e-5], "threshold": None, "steps": 1, "clip": 1.0, "optimizer": "adam",
                "momentum": 0.0, "weight_decay": 0.0}
    assert method_label({"method": "nn", "hparams": {"n_select": 4}, "protocol": protocol}) == "nn(n_select=4)"
    assert method_label({"method": "ifo", "hparams": {}, "protocol": protocol}) == "ifo[optimizer=adam]"
    assert method_label({"method": "sift", "hparams": {}, "protocol": {**protocol, "optimizer": "sgd"}}) == "sift[optimizer=sgd]"


def _report():
    spec = importlib.util.spec_from_file_location("retrieval_report", ROOT / "benchmarks" / "retrieval_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_times_a_resumed_run_on_one_device_only():
    """A run stopped on a GPU and resumed on a CPU (windows 3..4) must not average the two
    machines' seconds: its timings come from the device most of its windows ran on."""
    report = _report()
    meta = {"device_name": "x86_64", "earlier_attempts": [
        {"from_sample": 0, "to_sample": 3, "device_name": "NVIDIA H100 80GB HBM3"}]}
    index = pd.Series(range(5))
    devices = report.window_devices(index, meta)
    assert list(devices) == ["NVIDIA H100 80GB HBM3"] * 3 + ["x86_64"] * 2
    assert list(report.window_devices(index, None)) == ["unrecorded"] * 5
    rows = pd.DataFrame({"corpus": "c", "method": "sift", "index": index, "delta": 0.5, "label": 1,
                         "pred_source": 1, "pred": 1, "bpb_source": 1.0, "bpb": 0.9, "backwards": 8,
                         "seconds": [1.0, 1.0, 1.0, 20.0, 20.0], "select_seconds": [0.1] * 3 + [2.0] * 2,
                         "device": devices})
    (row,) = report.table(rows, gated=False, d=0.16)
    assert row[2] == 5 and row[7:10] == ["0.10", "0.90", "NVIDIA H100 80GB HBM3 (3 of 5)"]


def test_a_report_rows_ci_depends_on_its_own_windows_only():
    """Adding another method's run to the report (or another corpus) must not move a row's
    bootstrap CI, nor a paired difference's: each row resamples from its own seed."""
    report = _report()
    rng = np.random.default_rng(1)

    def run(corpus: str, method: str, gain: float) -> pd.DataFrame:
        before = rng.uniform(0.8, 1.2, 30)
        return pd.DataFrame({"corpus": corpus, "method": method, "index": range(30), "delta": 0.1, "label": 1,
                             "pred_source": 1, "pred": 1, "bpb_source": before, "bpb": before * rng.normal(gain, 0.05, 30),
                             "seconds": 1.0, "select_seconds": 0.1, "backwards": 50, "device": "cpu"})

    nn, sift = run("licenses", "nn", 0.9), run("licenses", "sift", 0.8)
    alone = report.table(pd.concat([nn, sift]), gated=False, d=0.16)
    more = pd.concat([run("licenses", "a", 1.1), nn, run("licenses", "nn-f", 1.2), sift, run("python", "nn", 0.95)])
    assert [r for r in report.table(more, gated=False, d=0.16) if r[:2] in (["licenses", "nn"], ["licenses", "sift"])] == alone
    assert report.paired(more, "nn", "sift", False, 0.16)[0] == report.paired(pd.concat([nn, sift]), "nn", "sift", False, 0.16)[0]


def test_the_report_reads_a_sweep_job_stopped_midway_from_its_checkpoint(tmp_path):
    """benchmarks/fair_gpu leaves only checkpoint.parquet for a job stopped midway: the report reads
    its finished windows, named by the settings the checkpoint records, timed per attempt."""
    from tta_bench.storage import checkpoint

    rows = pd.DataFrame({"index": [0, 1, 2], "label": 1, "pred_source": 0, "pred": 1, "delta": 0.1,
                         "bpb_source": 1.0, "bpb": 0.9, "seconds": 50.0, "select_seconds": 2.0, "backwards": 50})
    attempts = [{"from_sample": 0, "to_sample": 2, "device_name": "NVIDIA H200"},
                {"from_sample": 2, "to_sample": 3, "device_name": "x86_64"}]
    settings = {"task_options": {"corpus": "licenses"}, "method": "sift", "hparams": {"n_select": 50}}
    (tmp_path / "job").mkdir()
    checkpoint.save(tmp_path / "job" / checkpoint.FILE, checkpoint.Progress(rows, 3, 3, 150.0, [], attempts), settings)
    (tmp_path / "empty").mkdir()  # a job not started: nothing to read
    read = _report().rows_of_folders([tmp_path / "job", tmp_path / "empty"])
    assert list(read["method"]) == ["sift N=50"] * 3 and set(read["corpus"]) == {"licenses"}
    assert list(read["device"]) == ["NVIDIA H200", "NVIDIA H200", "x86_64"]
    assert list(read["bpb"]) == [0.9] * 3
