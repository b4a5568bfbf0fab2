"""Text and multiple-choice tasks, input fine-tuning, language-model loading and its cache."""
import json
import os

import pytest
import torch
from torch import nn
from tta_bench.tasks import lm as lm_module
from tta_bench.tasks.lm import LanguageModel, last_token_logits
from tta_bench.tasks.mc import LETTERS, build_prompt, shuffled
from tta_bench.tasks.text import windows

import tta_bench
from tta_bench import Protocol, RunOptions, TTAError
from tta_bench.data import cache


@pytest.fixture(scope="session")
def smol() -> LanguageModel:
    """The real embedded SmolLM2-135M-Instruct (cached as safetensors after the first build)."""
    return lm_module.load_language_model(lm_module.EMBEDDED)


def with_lm(task, lm):
    task.__dict__["lm"] = lm  # the task's cached language model
    return task


def test_windows_are_non_overlapping_and_drop_the_remainder():
    assert list(windows(list(range(10)), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert list(windows([1, 2], 4)) == []


def test_text_samples_align_input_and_label(tmp_path, tiny):
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"word{i}" for i in range(400)))
    task = with_lm(tta_bench.get_task("text", data_files=str(doc), window=16), tiny)
    ids = tiny.tokenizer(doc.read_text(), add_special_tokens=False)["input_ids"]
    samples = list(task.samples())
    assert len(samples) == len(ids) // 16
    for k, s in enumerate(samples):
        assert s.raw.tolist() == ids[16 * k:16 * k + 15] and s.label == ids[16 * k + 15]


class Recorder(nn.Module):
    """Wraps a causal LM and records the input ids of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, input_ids, **kwargs):
        self.calls.append(input_ids.clone())
        return self.model(input_ids=input_ids, **kwargs)


def test_input_ft_predicts_the_inputs_own_tokens_never_the_target(tiny):
    model = Recorder(tiny.model)
    x = torch.arange(100, 115)[None]  # a window's 15 input tokens; its label is not in x
    method = tta_bench.get_method("input-ft")
    step = tta_bench.Step(model, x, last_token_logits)
    loss = method.loss(step)
    assert model.calls[-1].tolist() == [list(range(100, 114))]  # tokens 1..n−1 in
    logits = tiny.model(input_ids=x[:, :-1]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits, x[0, 1:])  # tokens 2..n predicted
    torch.testing.assert_close(loss, expected)


def test_input_ft_is_refused_on_image_tasks():
    with pytest.raises(TTAError, match="input-ft does not support image tasks"):
        tta_bench.get_method("input-ft").supports(tta_bench.get_task("cifar10"))


def test_mc_prompt_text():
    prompt = build_prompt("What is 2+2?", ["3", "4", "5"])
    assert prompt == ("Answer the multiple-choice question. State only the letter (A, B, C). "
                      "Question: What is 2+2?\n Choices: A) 3\nB) 4\nC) 5\n Answer:")


def test_mc_shuffle_is_deterministic_and_the_answer_follows():
    record = {"question": "q", "choices": ["right", "w1", "w2", "w3"], "answer": 0}
    a, b = shuffled(record, 0, 5), shuffled(record, 0, 5)
    assert a == b and a["choices"][a["answer"]] == "right"
    positions = {shuffled(record, 0, i)["answer"] for i in range(40)}
    assert len(positions) == 4  # the right answer is not always first


@pytest.mark.parametrize("chat", ["on", "off"])
def test_mc_class_logits_are_the_letter_logits(tiny, chat):
    task = with_lm(tta_bench.get_task("mc", dataset="general-knowledge", chat_template=chat), tiny)
    letters = [t if chat == "on" else " " + t for t in LETTERS[:len(task.letter_ids)]]
    assert task.letter_ids == [tiny.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in letters]
    samples = [s for s in task.samples()][:3]
    batch = task.collate([s.raw for s in samples])
    with torch.no_grad():
        z = task.class_logits(tiny.model, batch)
        for i, s in enumerate(samples):
            ids, n = s.raw
            full = tiny.model(input_ids=ids[None]).logits[0, -1]
            torch.testing.assert_close(z[i, :n], full[task.letter_ids[:n]], atol=1e-4, rtol=1e-4)
            assert (torch.softmax(z[i], -1)[n:] == 0).all()  # absent choices have probability 0
    text = tiny.tokenizer.decode(samples[0].raw[0])
    assert ("<|im_start|>assistant" in text) == (chat == "on") and "State only the letter" in text


def test_ifo_focuses_on_the_two_most_likely_choices(tiny):
    task = with_lm(tta_bench.get_task("mc", dataset="physical-intuition"), tiny)
    s = next(task.samples())
    inputs = task.collate([s.raw])
    step = tta_bench.Step(tiny.model, inputs, task.class_logits)
    loss = tta_bench.get_method("ifo").loss(step)
    z, p = step.logits, step.source.probs
    top2 = torch.argsort(p, descending=True)[:2]
    assert step.logits.shape == (len(task.letter_ids),) and set(top2.tolist()) <= set(range(s.raw[1]))
    torch.testing.assert_close(loss, -(p[top2] * z[top2]).sum())


@pytest.mark.parametrize("name", ["ifo", "dofo"])
def test_questions_with_every_choice_in_focus_are_left_unadapted(tiny, tmp_path, name):
    """Multiple choice with 2 to 4 choices: top-2 focus holds every choice of a 2-choice question,
    which is left unadapted (prediction = source); the others adapt. Only a set whose every
    question has <= n_focus choices is refused."""
    questions = [{"question": f"q{i}", "choices": ["a", "b", "c", "d"][:n], "answer": 0}
                 for i, n in enumerate([2, 4, 3, 2])]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(questions))
    task = with_lm(tta_bench.get_task("mc", data_files=str(path)), tiny)
    r = tta_bench.run(task, tta_bench.get_method(name), Protocol((1e-1,), threshold=None), RunOptions(progress=False))
    rows = r.rows.set_index("index")
    assert list(rows["updated"]) == [False, True, True, False] and not rows["nonfinite"].any()
    assert (rows.loc[[0, 3], "pred"] == rows.loc[[0, 3], "pred_source"]).all()
    path.write_text(json.dumps([q for q in questions if len(q["choices"]) == 2]))
    with pytest.raises(TTAError, match="n_focus=2 puts every class of task mc in focus"):
        tta_bench.run(with_lm(tta_bench.get_task("mc", data_files=str(path)), tiny), tta_bench.get_method(name),
                      Protocol((1e-1,)), RunOptions(progress=False))


def test_multi_token_letters_are_refused(tiny, monkeypatch):
    task = with_lm(tta_bench.get_task("mc", dataset="mmlu-dev", chat_template="off"), tiny)
    monkeypatch.setattr("tta_bench.tasks.mc.LETTERS", "ÆØÅ€")
    with pytest.raises(TTAError, match="letters must be single tokens"):
        task.letter_ids


def test_offline_hub_ids_are_clear_errors(monkeypatch):
    monkeypatch.setenv("TTA_BENCH_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(TTAError, match=r"model 'no-such/model' is not available locally"):
        lm_module.load_language_model("no-such/model")
    with pytest.raises(TTAError, match=r"corpus no-such/corpus .* is not available locally"):
        tta_bench.get_task("text", corpus="no-such/corpus").check()
    with pytest.raises(TTAError, match="unknown corpus 'novels'"):
        tta_bench.get_task("text", corpus="novels").check()
    with pytest.raises(TTAError, match="unknown dataset 'quiz'"):
        tta_bench.get_task("mc", dataset="quiz").check()


@pytest.mark.slow
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("TTA_BENCH_CACHE", str(tmp_path))
    folder = lm_module.embedded_folder()
    weights = folder / "model.safetensors"
    manifest = json.loads((folder / cache.MANIFEST).read_text())
    with open(weights, "r+b") as f:  # flip bytes in the middle of the weights
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00\x01\x02\x03")
    assert not cache.cache_is_valid(folder, manifest["source_sha256"])
    assert lm_module.embedded_folder() == folder
    assert cache.cache_is_valid(folder, manifest["source_sha256"])
    os.truncate(weights, 100)  # a partial write
    lm = lm_module.load_language_model(lm_module.EMBEDDED)
    assert cache.cache_is_valid(folder, manifest["source_sha256"])
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert lm.tokenizer.decode(last_token_logits(lm.model, ids)[0].argmax()) == " Paris"


@pytest.mark.slow
def test_real_smollm2_text_and_mc_runs(smol, tmp_path):
    text = with_lm(tta_bench.get_task("text", corpus="shakespeare"), smol)
    r = tta_bench.run(text, tta_bench.get_method("ifo"), Protocol((1e-2, 4e-2)), RunOptions(max_uncertain=2, progress=False))
    assert r.summary[0]["n_uncertain"] == 2 and r.rows[r.rows.uncertain].updated.all()
    assert r.metadata["task"]["documents_read"] == 1 and r.metadata["task"]["corpus_sha256"]
    mc = with_lm(tta_bench.get_task("mc", dataset="truthfulqa-mc"), smol)
    r = tta_bench.run(mc, tta_bench.get_method("input-ft"), Protocol((1e-2,)), RunOptions(limit=3, progress=False))
    meta = r.metadata["task"]
    assert len(r.rows) == 3 and meta["chat_template"] is True and len(meta["prompt_sha256"]) == 64
    assert set(meta["letter_token_ids"]) >= {"A", "B"}
    r.save(tmp_path)
    assert (tmp_path / "samples.parquet").exists()


def test_cache_folder_filled_by_two_processes_at_once_keeps_the_first(tmp_path):
    """Two sweep workers building one cache: the loser's rename fails, it keeps the winner's copy
    (which a reader may already hold) and leaves no temporary folder; a stale copy is replaced."""
    folder = tmp_path / "cache" / "space"

    def fill_while_another_wins(tmp):
        (tmp / "who").write_text("loser")
        folder.mkdir(parents=True)  # the other process renames its copy into place meanwhile
        (folder / "who").write_text("winner")

    cache.replace_folder(folder, fill_while_another_wins)
    assert (folder / "who").read_text() == "winner"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["space"]

    cache.replace_folder(folder, lambda tmp: (tmp / "who").write_text("fresh"))  # stale copy
    assert (folder / "who").read_text() == "fresh"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["space"]


def test_corpora_read_from_the_machine_carry_their_data_identity(monkeypatch):
    """A checkpoint of a run on this machine's python-stdlib or licenses must not resume on
    another machine's copy: their documents' hash is part of its fingerprint; the shipped
    corpora (shakespeare, the pinned snapshots) need none."""
    from tta_bench.tasks import text
    identity = tta_bench.get_task("text", corpus="machine:licenses").data_identity()
    assert identity is not None
    for shipped in ("shakespeare", "licenses", "python-stdlib"):
        assert tta_bench.get_task("text", corpus=shipped).data_identity() is None
    monkeypatch.setattr(text, "licenses", lambda: iter([("LICENSE", "another machine's licence")]))
    assert tta_bench.get_task("text", corpus="machine:licenses").data_identity() not in (None, identity)
    assert list(tta_bench.get_task("text", corpus="machine:licenses").documents()) == [
        ("LICENSE", "another machine's licence")]
    assert next(tta_bench.get_task("text", corpus="licenses").documents())[0].startswith("/")  # the snapshot


def test_the_shipped_snapshots_are_pinned_and_a_changed_one_is_refused(tmp_path, monkeypatch, capsys):
    """python-stdlib and licenses read the shipped snapshots (what the published runs scored,
    whatever this machine has); a snapshot whose sha256 is not the pinned one is refused in one
    line that says how to read this machine's copy instead."""
    from tta_bench.tasks import text

    from tta_bench.cli import main
    for corpus, sha in text.SNAPSHOTS.items():
        assert cache.file_sha256(text.snapshot_path(corpus)) == sha
    docs = list(text.snapshot("licenses"))
    assert len(docs) > 100 and all(isinstance(n, str) and isinstance(t, str) for n, t in docs)
    copy = tmp_path / "licenses.jsonl.gz"
    assert text.write_snapshot("licenses", copy)  # a snapshot of this machine's copy, rebuilt
    changed = tmp_path / "data" / "licenses.jsonl.gz"
    changed.parent.mkdir()
    changed.write_bytes(text.snapshot_path("licenses").read_bytes()[:-10] + b"0123456789")
    monkeypatch.setattr(text, "snapshot_path", lambda corpus: changed)
    with pytest.raises(TTAError, match="snapshot of corpus licenses .* is changed .*--corpus machine:licenses"):
        tta_bench.get_task("text", corpus="licenses").check()
    assert main(["run", "--task", "text", "--corpus", "licenses", "--method", "ifo", "--lr", "0.01", "--no-track",
                 "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is changed" in err[0] and "Traceback" not in err[0]
    tta_bench.get_task("text", corpus="machine:licenses").check()  # asked for: this machine's copy
