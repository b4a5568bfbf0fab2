"""The `subset` option of the text and multiple-choice tasks (issue 26): val (held out to choose
hyperparameters) and test (scored) are disjoint halves of `all`, by document or by question."""
import hashlib
import json
from collections import Counter

import pytest
from tta_bench.tasks.mc import EMBEDDED_DATASETS, question_key
from tta_bench.tasks.text import windows

import tta_bench
from tta_bench import TTAError

SIDES = ("test", "val")


def documented_side(key: str) -> str:
    """The rule as the README and run.json state it, computed here independently."""
    h = int.from_bytes(hashlib.sha256(("tta-bench-subset:" + key).encode()).digest()[:8], "big")
    return "val" if h < 2**63 else "test"


def with_lm(task, lm):
    task.__dict__["lm"] = lm  # the task's cached language model
    return task


# --- multiple choice: by question ---------------------------------------------------------------

def mc(subset: str, dataset: str = "general-knowledge", **options):
    task = tta_bench.get_task("mc", dataset=dataset, subset=subset, **options)
    return task, task.questions


@pytest.mark.parametrize("dataset", EMBEDDED_DATASETS)
def test_mc_test_and_val_are_disjoint_halves_of_all(dataset):
    every, all_questions = mc("all", dataset)
    (test, test_q), (val, val_q) = mc("test", dataset), mc("val", dataset)
    assert set(test.question_indices).isdisjoint(val.question_indices)
    assert sorted(test.question_indices + val.question_indices) == every.question_indices
    assert {question_key(q) for q in test_q}.isdisjoint(question_key(q) for q in val_q)
    # a question reads the same (same shuffled choices) in `all` and in its side
    for task, questions in ((test, test_q), (val, val_q)):
        assert questions == [all_questions[i] for i in task.question_indices]
    n = len(all_questions)
    assert 0.35 * n < len(val_q) < 0.65 * n
    assert test.subset_questions == val.subset_questions == {"test": len(test_q), "val": len(val_q)}


def test_mc_split_follows_the_stated_rule_on_the_source_order():
    unshuffled = tta_bench.get_task("mc", dataset="general-knowledge", shuffle_seed=-1).questions
    _, val_q = mc("val", shuffle_seed=-1)
    assert [i for i, q in enumerate(unshuffled) if documented_side(question_key(q)) == "val"] \
        == mc("val")[0].question_indices
    assert val_q == [q for q in unshuffled if documented_side(question_key(q)) == "val"]
    # the choices' source order decides, not the shuffle: the split is the same for every seed
    assert mc("val", shuffle_seed=7)[0].question_indices == mc("val")[0].question_indices
    # pinned: the same on every machine and Python (no salted built-in hash())
    assert mc("val")[0].question_indices == [3, 6, 10, 12, 13, 18, 19, 20, 22, 25, 29, 31, 33, 36, 38, 39, 40,
                                              41, 42, 43, 44, 50, 51, 52, 54, 55, 56, 58, 60, 61, 64, 65]


def test_mc_samples_and_metadata_of_a_side(tiny):
    task = with_lm(tta_bench.get_task("mc", dataset="physical-intuition", subset="val"), tiny)
    samples = list(task.samples())
    assert [s.index for s in samples] == task.question_indices  # indices in the source, as in `all`
    assert task.num_samples() == len(samples) < 81
    meta = task.metadata()
    assert meta["subset"] == "val" and meta["n_questions"] == len(samples)
    assert "tta-bench-subset:" in meta["subset_rule"] and "\n" not in meta["subset_rule"]
    assert meta["subset_questions"]["val"] == len(samples) and sum(meta["subset_questions"].values()) == 81


# --- text: by document --------------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path):
    """40 short documents, each with its own words (distinct texts)."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(f"d{d}w{i}" for i in range(60 + d))}) + "\n"
                            for d in range(40)))
    return str(path)


def text(subset: str, **options):
    return tta_bench.get_task("text", subset=subset, **options)


def names(task) -> list[str]:
    return [name for name, _ in task.scanned_documents()]


def test_text_test_and_val_are_disjoint_documents_that_make_all(corpus):
    every, test, val = (names(text(s, data_files=corpus)) for s in ("all", "test", "val"))
    assert set(test).isdisjoint(val) and sorted(test + val) == sorted(every) and len(every) == 40
    assert test and val
    docs = dict(tta_bench.get_task("text", data_files=corpus).documents())
    assert val == [n for n in every if documented_side(docs[n]) == "val"]


def test_text_windows_of_a_document_stay_on_its_side(corpus, tiny):
    """The windows a run scans are exactly those of its side's documents: no document is cut."""
    docs = dict(tta_bench.get_task("text", data_files=corpus).documents())
    tokenize = lambda t: tiny.tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    scanned = {}
    for subset in ("all", *SIDES):
        task = with_lm(text(subset, data_files=corpus, window=16), tiny)
        scanned[subset] = [tuple(s.raw.tolist()) + (s.label,) for s in task.samples()]
        expected = [tuple(w) for n in docs if subset in ("all", documented_side(docs[n]))
                    for w in windows(tokenize(docs[n]), 16)]
        assert scanned[subset] == expected
        meta = task.metadata()
        assert meta["subset"] == subset and meta["documents_read"] == len(names(text(subset, data_files=corpus)))
        assert sum(meta["subset_documents"].values()) == 40 and "\n" not in meta["subset_rule"]
    assert scanned["test"] and scanned["val"]
    assert Counter(scanned["test"]) + Counter(scanned["val"]) == Counter(scanned["all"])


def test_text_subset_splits_only_the_documents_outside_the_data_space(corpus):
    options = dict(data_files=corpus, data_space="split")
    space = [n for n, _ in text("all", **options).data_space_documents()]
    outside, test, val = (names(text(s, **options)) for s in ("all", "test", "val"))
    assert space and test and val
    assert set(space).isdisjoint(test) and set(space).isdisjoint(val) and set(test).isdisjoint(val)
    assert sorted(space + test + val) == sorted(names(text("all", data_files=corpus)))
    assert sorted(test + val) == sorted(outside)
    # the side of a document does not depend on the data space: the same rule, fewer documents
    assert set(val) <= set(names(text("val", data_files=corpus)))


def test_text_split_is_deterministic():
    first, again = names(text("val")), names(text("val"))
    assert first == again and len(first) == 15  # shakespeare: 15 of 42 plays (pinned)
    assert {"coriolanus", "lear", "tempest", "winters tale"} <= set(first)
    assert set(first).isdisjoint(names(text("test")))


# --- options ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["text", "mc"])
def test_default_is_all_and_a_bad_subset_is_one_clear_line(task):
    assert tta_bench.get_task(task).opts.subset == "all"  # runs and labels made before the option
    with pytest.raises(TTAError) as err:
        tta_bench.get_task(task, subset="train")
    assert str(err.value) == f"task {task}: subset='train' is not allowed; choose one of: all, test, val"
