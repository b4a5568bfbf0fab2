"""MMLU-style multiple choice (docs/DESIGN.md §4, paper Experiment 11): the paper's prompt, the model's
chat template on or off, class logits = the answer-letter logits at the answer position."""
from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from tta_bench.core.errors import TTAError, first_line
from tta_bench.core.hparams import HParam
from tta_bench.core.task import Sample
from tta_bench.data.cache import hf_datasets

from .lm import EMBEDDED, SUBSET_SALT, SUBSETS, LanguageTask, last_token_logits, subset_of

TEMPLATE = ("Answer the multiple-choice question. State only the letter ({letters}). "
            "Question: {question}\n Choices: {options}\n Answer:")
LETTERS = "ABCDEFGHIJKLMNOP"
DATA = Path(__file__).parent / "data" / "mc"
EMBEDDED_DATASETS = ("mmlu-dev", "truthfulqa-mc", "general-knowledge", "physical-intuition")
# Split by question: its text and choices in the source order (before the shuffle), one per line
_SIDE = f"sha256({SUBSET_SALT!r} + question + '\\n' + '\\n'.join(choices)), first 8 bytes big-endian"
SUBSET_RULE = {"val": f"questions whose {_SIDE} < 2**63",
               "test": f"questions whose {_SIDE} >= 2**63 (disjoint from val)",
               "all": "every question"}


def question_key(record: dict) -> str:
    """What the subset split hashes: the question and its choices in the source order."""
    return "\n".join([record["question"], *record["choices"]])


def _letter_index(labels: list[str], key: str) -> int:
    return labels.index(key)


# hub id -> (config, split, adapter record -> {question, choices, answer})
HUB_DATASETS: dict[str, tuple[str | None, str, Callable[[dict], dict]]] = {
    "cais/mmlu": ("all", "test", lambda r: dict(question=r["question"], choices=r["choices"], answer=r["answer"])),
    "allenai/ai2_arc": ("ARC-Challenge", "test", lambda r: dict(
        question=r["question"], choices=r["choices"]["text"],
        answer=_letter_index(r["choices"]["label"], r["answerKey"]))),
    "allenai/openbookqa": ("main", "test", lambda r: dict(
        question=r["question_stem"], choices=r["choices"]["text"],
        answer=_letter_index(r["choices"]["label"], r["answerKey"]))),
    "EleutherAI/truthful_qa_mc": ("multiple_choice", "validation", lambda r: dict(
        question=r["question"], choices=r["choices"], answer=r["label"])),
    "allenai/winogrande": ("winogrande_xl", "validation", lambda r: dict(
        question=r["sentence"], choices=[r["option1"], r["option2"]], answer=int(r["answer"]) - 1)),
    "Rowan/hellaswag": (None, "validation", lambda r: dict(
        question=r["ctx"], choices=r["endings"], answer=int(r["label"]))),
    "tau/commonsense_qa": (None, "validation", lambda r: dict(
        question=r["question"], choices=r["choices"]["text"],
        answer=_letter_index(r["choices"]["label"], r["answerKey"]))),
}


def build_prompt(question: str, choices: list[str]) -> str:
    letters = LETTERS[:len(choices)]
    options = "\n".join(f"{letter}) {choice}" for letter, choice in zip(letters, choices, strict=True))
    return TEMPLATE.format(letters=", ".join(letters), question=question, options=options)


def shuffled(record: dict, seed: int, index: int) -> dict:
    """Choices in a fixed random order per (seed, question index); the answer follows."""
    order = np.random.default_rng([seed, index]).permutation(len(record["choices"]))
    return {**record, "choices": [record["choices"][i] for i in order],
            "answer": int(np.flatnonzero(order == record["answer"])[0])}


def load_questions(dataset: str, data_files: str | None, split: str | None) -> list[dict]:
    if data_files:
        records = [r for name in data_files.split(",") for r in _read_records(Path(name).expanduser())]
    elif dataset in EMBEDDED_DATASETS:
        records = json.loads((DATA / f"{dataset}.json").read_text())
    elif dataset in HUB_DATASETS:
        config, default_split, adapt = HUB_DATASETS[dataset]
        try:
            rows = hf_datasets().load_dataset(dataset, config, split=split or default_split)
        except Exception as err:
            raise TTAError(f"dataset {dataset} is not available locally and cannot be downloaded "
                           f"({first_line(err)}); download it where there is internet "
                           "and set HF_HOME, or pass a local json/jsonl with --data-files") from None
        records = [adapt(r) for r in rows]
    else:
        raise TTAError(f"unknown dataset {dataset!r}; choose one of: {', '.join(EMBEDDED_DATASETS + tuple(HUB_DATASETS))}"
                       ", or pass --data-files with question/choices/answer records")
    source = data_files or dataset
    if not records:
        raise TTAError(f"{source} holds no questions; expected {RECORD}")
    return [_checked(r, f"{source} record {i}") for i, r in enumerate(records)]


RECORD = ('records {"question": str, "choices": [2..16 str], "answer": index from 0 or letter "A".."P"}')


def _read_records(path: Path) -> list:
    """Records of a .json list or a .jsonl file, with one clear error for a malformed file."""
    if not path.is_file():
        raise TTAError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is fine
        if not text.strip():
            raise TTAError(f"data file {path} is empty; expected {RECORD}")
        if path.suffix == ".json":
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise TTAError(f"data file {path} is binary, not UTF-8 JSON; expected {RECORD}") from None
    except ValueError as err:
        raise TTAError(f"data file {path} is not valid JSON ({err}); expected {RECORD}") from None
    if not isinstance(records, list) or not records:
        raise TTAError(f"data file {path} holds no list of questions; expected {RECORD}")
    return records


def _checked(r: Any, where: str) -> dict:
    """A record with a str question, 2..16 str choices and an int answer (a letter is accepted)."""
    ok = isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("choices"), list)
    choices = r["choices"] if ok else []
    if not ok or not 2 <= len(choices) <= len(LETTERS) or not all(isinstance(c, str) for c in choices):
        raise TTAError(f"{where} is not a question; expected {RECORD}")
    answer = r.get("answer")
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise TTAError(f"{where}: answer {r.get('answer')!r} is not an index from 0 or a letter among its "
                       f"{len(choices)} choices ({', '.join(LETTERS[:len(choices)])})")
    return {**r, "answer": answer}


class MultipleChoice(LanguageTask):
    name = "mc"
    kind = "mc"
    description = "multiple-choice questions (MMLU-style); logits of the answer letters"
    options = {
        **LanguageTask.options,
        "dataset": HParam("mmlu-dev", str, " | ".join(EMBEDDED_DATASETS + tuple(HUB_DATASETS))),
        "data_files": HParam(None, str, "json/jsonl files with question, choices, answer", nullable=True),
        "split": HParam(None, str, "hub dataset split (default per dataset)", nullable=True),
        "chat_template": HParam("auto", str, "use the tokenizer's chat template (auto: if it has one)",
                                choices=("auto", "on", "off")),
        "shuffle_seed": HParam(0, int, "seed of the per-question choice shuffle; -1: keep the source order"),
        "subset": HParam("all", str, "split by question for fair hyperparameter selection: val (held out to "
                         "choose hyperparameters) = the questions whose salted sha256 of their text and choices is "
                         "in the lower half, test (scored) = the others, all = every question; each side is about "
                         "half (general-knowledge: 32 val, 37 test)", choices=SUBSETS),
    }
    subset_questions: dict[str, int] | None = None  # questions per side (test, val) in the source
    question_indices: list[int] | None = None  # this run's questions' indices in the source

    @classmethod
    def models(cls) -> list[str]:
        return [EMBEDDED, "(any instruction-tuned HF causal LM id or folder)"]

    @classmethod
    def datasets(cls) -> list[str]:
        return list(EMBEDDED_DATASETS) + list(HUB_DATASETS)

    @cached_property
    def questions(self) -> list[dict]:
        """This run's questions (`subset`), choices shuffled by the question's index in the source
        (so a question reads the same in `all` and in its side)."""
        records = load_questions(self.opts.dataset, self.opts.data_files, self.opts.split)
        sides = [subset_of(question_key(r)) for r in records]
        self.subset_questions = {side: sides.count(side) for side in ("test", "val")}
        self.question_indices = [i for i, side in enumerate(sides) if self.opts.subset in ("all", side)]
        seed = self.opts.shuffle_seed
        return [shuffled(records[i], seed, i) if seed >= 0 else records[i] for i in self.question_indices]

    def data_identity(self) -> str | None:
        """The contents' hash of --data-files (the embedded and hub sets are fixed by name)."""
        if not self.opts.data_files:
            return None
        digest = hashlib.sha256()
        for name in self.opts.data_files.split(","):
            digest.update(Path(name).expanduser().read_bytes() + b"\0")
        return digest.hexdigest()

    @property
    def use_chat(self) -> bool:
        has = getattr(self.lm.tokenizer, "chat_template", None) is not None
        if self.opts.chat_template == "on" and not has:
            raise TTAError(f"{self.opts.model} has no chat template; pass --chat-template off")
        return has if self.opts.chat_template == "auto" else self.opts.chat_template == "on"

    @cached_property
    def letter_ids(self) -> list[int]:
        """One token per letter: ' A' after 'Answer:' in plain text, 'A' opening an assistant turn."""
        n = max(len(q["choices"]) for q in self.questions)
        ids = []
        for letter in LETTERS[:n]:
            text = letter if self.use_chat else " " + letter
            tokens = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                raise TTAError(f"the answer letter {text!r} is {len(tokens)} tokens for {self.opts.model}; "
                               "letters must be single tokens (try --chat-template on/off)")
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise TTAError(f"answer letters share tokens for {self.opts.model}: {ids}")
        return ids

    def prompt(self, q: dict) -> str:
        text = build_prompt(q["question"], q["choices"])
        if self.use_chat:
            text = self.lm.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                         tokenize=False, add_generation_prompt=True)
        return text

    def check(self) -> None:
        self.questions

    def num_samples(self) -> int:
        return len(self.questions)

    def num_classes(self) -> int | None:
        """Known once `check` has loaded the questions (a sweep's expansion does not load them)."""
        if "questions" not in self.__dict__:
            return None
        return max(len(q["choices"]) for q in self.questions)

    def samples(self) -> Iterator[Sample]:
        _ = self.letter_ids  # checked before the scan
        questions = self.questions  # sets question_indices
        for i, q in zip(self.question_indices or [], questions, strict=True):  # i: the index in the source
            ids = self.lm.tokenizer(self.prompt(q), add_special_tokens=False)["input_ids"]
            yield Sample(i, (torch.tensor(ids), len(q["choices"])), int(q["answer"]))

    def collate(self, raws: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
        """Left-padded batch; position ids count real tokens only, so padding changes nothing."""
        width = max(len(ids) for ids, _ in raws)
        pad = self.lm.tokenizer.pad_token_id
        pad = pad if pad is not None else 0
        input_ids = torch.full((len(raws), width), pad, dtype=torch.long)
        mask = torch.zeros((len(raws), width), dtype=torch.long)
        for i, (ids, _) in enumerate(raws):
            input_ids[i, width - len(ids):] = ids
            mask[i, width - len(ids):] = 1
        return {"input_ids": input_ids, "attention_mask": mask,
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                "n_choices": torch.tensor([n for _, n in raws])}

    def class_logits(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        z = last_token_logits(model, {k: v for k, v in inputs.items() if k != "n_choices"})
        z = z[:, self.letter_ids]
        valid = torch.arange(z.shape[-1], device=z.device) < inputs["n_choices"][:, None]
        return z.masked_fill(~valid, torch.finfo(z.dtype).min / 2)  # absent choices: probability 0

    def metadata(self) -> dict[str, Any]:
        template = TEMPLATE + (getattr(self.lm.tokenizer, "chat_template", "") or "" if self.use_chat else "")
        return {**self.lm.info, "dataset": self.opts.data_files or self.opts.dataset,
                "n_questions": len(self.questions), "chat_template": self.use_chat,
                "prompt_sha256": hashlib.sha256(template.encode()).hexdigest(),
                "letter_token_ids": dict(zip(LETTERS, self.letter_ids)), "shuffle_seed": self.opts.shuffle_seed,
                "subset": self.opts.subset, "subset_rule": SUBSET_RULE[self.opts.subset],
                "subset_questions": self.subset_questions}
