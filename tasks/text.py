"""Pile-style next-token prediction (docs/DESIGN.md §4): documents tokenized and cut into non-overlapping
windows of `window` tokens; input = the first window−1 tokens, label = the last. Class logits are
the vocabulary logits at the last input position."""
from __future__ import annotations

import glob
import gzip
import hashlib
import itertools
import json
import math
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tta_bench.core.errors import TTAError, first_line
from tta_bench.core.hparams import HParam
from tta_bench.core.task import Sample
from tta_bench.data.cache import file_sha256, hf_datasets, offline
from tta_bench.data.dataspace import (
    DEFAULT_EMBEDDER,
    DataSpace,
    Embedder,
    build,
    hf_embedder,
    in_data_space,
    self_embedder,
    sequences_of,
)

from .lm import EMBEDDED, SUBSET_SALT, SUBSETS, LanguageTask, last_token_logits, subset_of

SHAKESPEARE = Path(__file__).parent / "data" / "text" / "shakespeare.jsonl.gz"
# Snapshots of the two machine-read corpora, shipped so that every machine scores the same text
# (the published leaderboard's); their sha256 is pinned: a changed file is refused. `machine:NAME`
# reads this machine's own copy instead (hashed and recorded with each run).
SNAPSHOTS = {
    "python-stdlib": "a81f4ceed7993a76b5327261fd3297759656799baef601e13471bc60fac56281",
    "licenses": "a9acfce4a573b37d66e7967ba61d9cbd08c12dd0af2eb3d213c0a5adeb5f78c8",
}
MACHINE = "machine:"  # prefix of a corpus read from this machine
# The paper's corpora on the Hugging Face hub: (dataset id, config, text field)
HUB_CORPORA = {
    "openwebtext": ("Skylion007/openwebtext", None, "text"),
    "legal-contracts": ("albertvillanova/legal_contracts", None, "text"),
    "arxiv-10": ("effectiveML/ArXiv-10", None, "abstract"),
    "bookcorpus": ("rojagtap/bookcorpus", None, "text"),
    "cnn-dailymail": ("abisee/cnn_dailymail", "3.0.0", "article"),
    "simple-wikipedia": ("wikimedia/wikipedia", "20231101.simple", "text"),
    "pile-uncopyrighted": ("monology/pile-uncopyrighted", None, "text"),
}
EMBEDDED_CORPORA = ("shakespeare", "python-stdlib", "licenses")
MACHINE_CORPORA = {"python-stdlib": lambda: python_stdlib(), "licenses": lambda: licenses()}
# Split by document (never by window), on the text so that copies of a document stay on one side
_SIDE = f"sha256({SUBSET_SALT!r} + document text), first 8 bytes big-endian"
_OUTSIDE = "; with data_space=split only documents outside the data space"
SUBSET_RULE = {"val": f"documents whose {_SIDE} < 2**63" + _OUTSIDE,
               "test": f"documents whose {_SIDE} >= 2**63 (disjoint from val)" + _OUTSIDE,
               "all": "every document" + _OUTSIDE}


def shakespeare() -> Iterator[tuple[str, str]]:
    """42 plays (Project Gutenberg texts, public domain), in the file's order."""
    with gzip.open(SHAKESPEARE, "rt", encoding="utf-8") as f:
        for line in f:
            play = json.loads(line)
            yield play["title"], play["text"]


def snapshot_path(corpus: str) -> Path:
    return SHAKESPEARE.with_name(f"{corpus}.jsonl.gz")


def snapshot(corpus: str) -> Iterator[tuple[str, str]]:
    """The shipped snapshot of a machine-read corpus (python-stdlib, licenses), checked against its
    pinned sha256 first: the text every published run of it scored."""
    path = snapshot_path(corpus)
    digest = file_sha256(path) if path.is_file() else "missing"
    if digest != SNAPSHOTS[corpus]:
        raise TTAError(f"the shipped snapshot of corpus {corpus} ({path}) is {'missing' if digest == 'missing' else 'changed'} "
                       f"(sha256 {digest[:12]}, published {SNAPSHOTS[corpus][:12]}): restore it (reinstall tta-bench), "
                       f"or read this machine's copy with --corpus {MACHINE}{corpus}")
    return _read_snapshot(path)


def _read_snapshot(path: Path) -> Iterator[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            yield doc["name"], doc["text"]


def write_snapshot(corpus: str, path: Path) -> str:
    """Snapshot this machine's copy of `corpus` into `path` (reproducibly: no time stamp in the
    gzip header); its sha256, to pin in SNAPSHOTS."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as out:
        for name, text in MACHINE_CORPORA[corpus]():
            out.write((json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n").encode())
    return file_sha256(path)


def python_stdlib() -> Iterator[tuple[str, str]]:
    """The running interpreter's standard-library sources (code), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if "site-packages" not in path.parts:
            yield str(path.relative_to(root)), path.read_text(encoding="utf-8", errors="replace")


def licenses() -> Iterator[tuple[str, str]]:
    """Licence texts on this machine (legal): Debian's common licences and the licence files of
    installed Python packages, sorted by path (the set depends on the machine: it is hashed)."""
    paths = sorted(glob.glob("/usr/share/common-licenses/*"))
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        paths += sorted(glob.glob(f"{site}/*.dist-info/LICENSE*") + glob.glob(f"{site}/*.dist-info/licenses/*"))
    for path in paths:
        if Path(path).is_file():
            yield path, Path(path).read_text(encoding="utf-8", errors="replace")


def local_files(files: list[str], field: str) -> Iterator[tuple[str, str]]:
    """.txt files (one document each), .jsonl/.json/.parquet (one document per record)."""
    paths = [Path(name).expanduser() for name in files]
    for path in paths:  # checked now, not when the scan reaches the file
        if not path.is_file():
            raise TTAError(f"data file {path} does not exist (--data-files takes comma-separated paths)")
        if path.suffix not in (".txt", ".jsonl", ".json", ".parquet"):
            raise TTAError(f"unsupported data file {path.name}: use .txt, .jsonl, .json or .parquet")
        _check_file(path, field)
    return _read_files(paths, field)


def _check_file(path: Path, field: str) -> None:
    """A cheap look at the head of a data file, so that a wrong file fails before the model loads."""
    expected = {".txt": "UTF-8 text", ".jsonl": f"one JSON object per line with a {field!r} field",
                ".json": f"a JSON list of objects with a {field!r} field",
                ".parquet": f"a Parquet table with a {field!r} column"}[path.suffix]
    def bad(what: str) -> TTAError:
        return TTAError(f"data file {path} {what}; expected {expected}")
    if path.stat().st_size == 0:
        raise bad("is empty")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        try:
            names = pq.read_schema(path).names
        except (OSError, pa.ArrowException) as err:
            raise bad(f"is not a readable Parquet file ({str(err)[:80]})") from None
        if field not in names:
            raise bad(f"has no {field!r} column (columns: {', '.join(names)}); pass --text-field")
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        text = head.decode("utf-8") if b"\0" not in head else None
    except UnicodeDecodeError as err:  # a cut multi-byte character at the end is fine
        text = head[:err.start].decode("utf-8") if err.start > len(head) - 4 else None
    if text is None:
        raise bad("is binary, not UTF-8 text")
    if path.suffix == ".txt":
        return
    try:
        if path.suffix == ".jsonl":
            first = json.loads(next(line for line in text.splitlines() if line.strip()))
        else:
            records = json.loads(path.read_text(encoding="utf-8"))
            first = records[0] if isinstance(records, list) and records else records
    except (ValueError, StopIteration) as err:
        raise bad(f"is not valid JSON ({str(err)[:80]})") from None
    if not isinstance(first, dict) or field not in first:
        keys = ", ".join(first) if isinstance(first, dict) else type(first).__name__
        raise bad(f"has no {field!r} field in its first record ({keys}); pass --text-field")


def _read_files(paths: list[Path], field: str) -> Iterator[tuple[str, str]]:
    for path in paths:
        if path.suffix == ".txt":
            yield str(path), path.read_text(encoding="utf-8", errors="replace")
            continue
        kind = "parquet" if path.suffix == ".parquet" else "json"
        try:
            records = hf_datasets().load_dataset(kind, data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types for a malformed file
            raise TTAError(f"data file {path} cannot be read as {kind} ({first_line(err, 120)})") from None
        yield from _records(iter(records), field, str(path))


def hub_corpus(dataset_id: str, config: str | None, field: str, split: str) -> Iterator[tuple[str, str]]:
    """Streams when online (only what the scan needs); offline, only a cached copy can serve."""
    try:
        records = iter(hf_datasets().load_dataset(dataset_id, config, split=split, streaming=not offline()))
        first = next(records, None)
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ...)
        raise TTAError(f"corpus {dataset_id} ({config or 'default'}, {split}) is not available locally "
                       f"and cannot be downloaded ({first_line(err)}); download it "
                       "where there is internet and set HF_HOME, or pass local files with --data-files") from None
    return _records(itertools.chain([first] if first is not None else [], records), field, dataset_id)


def _records(records: Iterator[dict], field: str, name: str) -> Iterator[tuple[str, str]]:
    for i, record in enumerate(records):
        yield from _field(record, field, f"{name}#{i}")


def _field(record: dict, field: str, name: str) -> Iterator[tuple[str, str]]:
    if field not in record:
        raise TTAError(f"{name} has no field {field!r} (fields: {', '.join(record)}); pass --text-field")
    if record[field]:
        yield name, record[field]


def windows(ids: list[int], size: int) -> Iterator[list[int]]:
    """Non-overlapping windows of `size` tokens; a shorter remainder is dropped."""
    for start in range(0, len(ids) - size + 1, size):
        yield ids[start:start + size]


def token_byte_lengths(tokenizer: Any) -> list[int] | None:
    """Per token id, the UTF-8 bytes it stands for, exact for byte-level BPE tokenizers (GPT-2,
    Llama 3, Qwen, SmolLM, StableLM: a token's symbols are its bytes; added tokens: their text);
    None for the others."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ != "ByteLevel":
        return None
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = set(ByteLevel.alphabet())  # the 256 symbols of the byte-level alphabet, one per byte
    added = {i: len(t.content.encode()) for i, t in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [added[i] if i in added else len(p) if set(p) <= alphabet else len(p.encode())
            for i, p in enumerate(piece or "" for piece in pieces)]


def covered_bytes(tokenizer: Any, window: list[int], lengths: list[int] | None = None) -> int:
    """UTF-8 bytes that a window's predicted tokens (2..n) stand for: the sum of their byte
    `lengths` (token_byte_lengths) where known, else the window's decoded text minus its first
    token's (decoding tokens 2..n alone would drop a SentencePiece leading space), which is a few
    bytes off where a character straddles the window's first or last token boundary."""
    if lengths is not None:
        return sum(lengths[t] for t in window[1:])
    return len(exact_text(tokenizer, window).encode()) - len(exact_text(tokenizer, window[:1]).encode())


def exact_text(tokenizer: Any, ids: Sequence[int] | np.ndarray) -> str:
    """The text of token ids as they are: no clean-up of spaces before punctuation."""
    return tokenizer.decode(list(map(int, ids)), clean_up_tokenization_spaces=False)


class Text(LanguageTask):
    name = "text"
    kind = "text"
    description = "next-token prediction on 128-token windows (Pile-style) with a causal LM"
    _data_space: DataSpace | None = None
    subset_documents: dict[str, int] | None = None  # documents per side (test, val), set by the scan
    metrics = ("bpb",)  # bits per byte of the window (docs/DESIGN.md §2), at θ0 and after adaptation
    options = {
        **LanguageTask.options,
        "corpus": HParam("shakespeare", str, "shakespeare | python-stdlib | licenses (shipped snapshots) | "
                         "machine:python-stdlib | machine:licenses (this machine's copy) | "
                         + " | ".join(HUB_CORPORA) + " | any hub dataset id | files (with --data-files)"),
        "data_files": HParam(None, str, "comma-separated .txt/.jsonl/.json/.parquet files", nullable=True),
        "text_field": HParam(None, str, "record field holding the text (default: text)", nullable=True),
        "corpus_config": HParam(None, str, "hub dataset config", nullable=True),
        "split": HParam("train", str, "hub dataset split"),
        "window": HParam(128, int, "tokens per window (input = window − 1)", check=lambda n: n >= 2,
                         check_msg="must be >= 2"),
        # the data space of the retrieval methods (nn, nn-f, sift, random); tta_bench/data/dataspace.py
        "data_space": HParam(None, str, "split (the corpus's documents divided by a hash of their id into "
                             "data space and test windows) | another corpus name or hub id | files (.txt, "
                             ".jsonl, ...); retrieval methods need it, every method then sees the same windows",
                             nullable=True),
        "data_space_fraction": HParam(0.5, float, "share of the documents in the data space with --data-space split",
                                      check=lambda f: 0 < f < 1, check_msg="must be in (0, 1)"),
        "data_space_size": HParam(None, int, "at most this many data-space sequences (the first ones)",
                                  nullable=True, check=lambda n: n >= 1, check_msg="must be >= 1"),
        "seq_len": HParam(128, int, "tokens per data-space sequence", check=lambda n: n >= 2,
                          check_msg="must be >= 2"),
        "subset": HParam("all", str, "split by document for fair hyperparameter selection: val (held out to "
                         "choose hyperparameters) = the documents whose salted sha256 of their text is in the lower "
                         "half, test (scored) = the others, all = every document; with --data-space split, of the "
                         "documents outside the data space", choices=SUBSETS),
        "embedding_model": HParam(DEFAULT_EMBEDDER, str, f"embedder of the data space: {DEFAULT_EMBEDDER} "
                                  "(offline, PyPI) | self (the LM's mean-pooled last hidden state) | any HF "
                                  "encoder id or folder"),
    }

    @classmethod
    def models(cls) -> list[str]:
        return [EMBEDDED, "gpt2", "meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-1.5B", "google/gemma-3-1b-pt",
                "stabilityai/stablelm-2-1_6b", "tensoropera/Fox-1-1.6B", "(any HF causal LM id or folder)"]

    @classmethod
    def corpora(cls) -> list[str]:
        return (list(EMBEDDED_CORPORA) + [MACHINE + k for k in MACHINE_CORPORA]
                + [f"{k} ({v[0]})" for k, v in HUB_CORPORA.items()])

    def documents(self) -> Iterator[tuple[str, str]]:
        """The corpus's documents (with --data-space split: all of them, test and data space)."""
        o = self.opts
        if o.data_files:
            return local_files(o.data_files.split(","), o.text_field or "text")
        return self._corpus(o.corpus)

    def _corpus(self, corpus: str) -> Iterator[tuple[str, str]]:
        o = self.opts
        if corpus == "shakespeare":
            return shakespeare()
        if corpus in SNAPSHOTS:
            return snapshot(corpus)
        if corpus.startswith(MACHINE) and corpus.removeprefix(MACHINE) in MACHINE_CORPORA:
            return MACHINE_CORPORA[corpus.removeprefix(MACHINE)]()
        dataset_id, config, field = HUB_CORPORA.get(corpus, (corpus, None, "text"))
        if "/" not in dataset_id:
            raise TTAError(f"unknown corpus {corpus!r}; choose one of: {', '.join(self.corpora())}, "
                           "a hub dataset id (owner/name), or --data-files")
        return hub_corpus(dataset_id, o.corpus_config or config, o.text_field or field, o.split)

    def _split(self) -> bool:
        return self.opts.data_space == "split"

    def data_space_documents(self) -> Iterator[tuple[str, str]]:
        """The data space's documents: the corpus's held-out part (split), or another corpus."""
        space = self.opts.data_space
        if self._split():
            return ((n, t) for n, t in self.documents() if in_data_space(n, self.opts.data_space_fraction))
        try:
            if any(part.endswith((".txt", ".jsonl", ".json", ".parquet")) for part in space.split(",")):
                return local_files(space.split(","), self.opts.text_field or "text")
            return self._corpus(space)
        except TTAError as err:
            raise TTAError(f"--data-space {space}: {err} (or: split)") from None

    def check(self) -> None:
        self.documents()  # unknown corpus names fail here, before the model loads
        if self.opts.data_space is not None:
            self.data_space_documents()

    def data_space(self, progress: bool = True) -> DataSpace | None:
        """Built (or loaded from its cache) on first use, after the model is on its device."""
        if self.opts.data_space is None:
            return None
        if self._data_space is None:
            o = self.opts
            tokens, offsets = self.data_space_sequences()
            self._data_space = build(tokens, offsets, self.embedder(o.embedding_model),
                                     {"model": o.model, "seq_len": o.seq_len}, progress)
        return self._data_space

    def data_space_sequences(self) -> tuple[np.ndarray, np.ndarray]:
        """The data space's documents cut into sequences of up to `seq_len` tokens (tokens, offsets)."""
        o, tokenizer = self.opts, self.lm.tokenizer
        return sequences_of(self.data_space_documents(),
                            lambda t: tokenizer(t, add_special_tokens=False)["input_ids"], o.seq_len, o.data_space_size)

    def embedder(self, name: str) -> Embedder:
        """`self` (the LM at θ0) or an HF encoder, on the LM's device."""
        lm = self.lm
        if name == "self":
            return self_embedder(lm.model, f"{self.opts.model}:{lm.info.get('source_sha256') or lm.info.get('revision')}")
        return hf_embedder(name, lambda ids: exact_text(lm.tokenizer, ids), next(lm.model.parameters()).device)

    def data_identity(self) -> str | None:
        """The documents' hash for the corpora read from this machine (machine:python-stdlib,
        machine:licenses, --data-files), which differ between machines; the shipped (pinned) and
        hub corpora are fixed by name."""
        if not self.opts.data_files and not self.opts.corpus.startswith(MACHINE):
            return None
        digest = hashlib.sha256()
        for name, text in self.documents():
            digest.update(name.encode() + b"\0" + text.encode() + b"\0")
        return digest.hexdigest()

    def scanned_documents(self) -> Iterator[tuple[str, str]]:
        """The documents whose windows this run scans: outside the data space (split), in `subset`."""
        self.subset_documents = {"test": 0, "val": 0}  # per side, of the documents the scan went through
        for name, text in self.documents():
            if self._split() and in_data_space(name, self.opts.data_space_fraction):
                continue  # a data-space document: never a test window
            side = subset_of(text)
            self.subset_documents[side] += 1
            if self.opts.subset in ("all", side):
                yield name, text

    def samples(self) -> Iterator[Sample]:
        tokenizer, size, index = self.lm.tokenizer, self.opts.window, 0
        lengths = token_byte_lengths(tokenizer)  # bytes per token, for bpb
        digest = hashlib.sha256()
        self.n_documents = 0
        for name, text in self.scanned_documents():
            digest.update(name.encode() + b"\0" + text.encode())
            self.n_documents += 1
            self.corpus_sha256 = digest.hexdigest()
            for w in windows(tokenizer(text, add_special_tokens=False)["input_ids"], size):
                # extra: the bytes bpb divides by (the label stays out of the inputs, see evaluate)
                yield Sample(index, torch.tensor(w[:-1]), w[-1], covered_bytes(tokenizer, w, lengths))
                index += 1

    def class_logits(self, model: nn.Module, inputs: Tensor) -> Tensor:
        return last_token_logits(model, inputs)

    def evaluate(self, model: nn.Module, inputs: Tensor, sample: Sample) -> tuple[Tensor, dict[str, float]]:
        """One forward over the whole window (the inputs, then the label from `sample`, which the
        methods' losses never see): the class logits are those predicting the label (position −2);
        bpb = −Σ log2 p(token) over tokens 2..n ÷ the UTF-8 bytes they cover (`sample.extra`)."""
        window = torch.cat([inputs, inputs.new_tensor([[sample.label]])], dim=1)  # [1, n]
        logits = model(input_ids=window).logits[0]  # [n, V]: position i predicts token i + 1
        logp = torch.log_softmax(logits[:-1].float(), dim=-1).gather(-1, window[0, 1:, None])
        bits = float(-logp.double().sum()) / math.log(2)
        return logits[-2], {"bpb": bits / sample.extra if sample.extra > 0 else math.nan}

    def metadata(self) -> dict:
        return {**self.lm.info, "corpus": self.opts.data_files or self.opts.corpus, "window": self.opts.window,
                "documents_read": getattr(self, "n_documents", 0),
                "corpus_sha256": getattr(self, "corpus_sha256", None),
                "subset": self.opts.subset, "subset_rule": SUBSET_RULE[self.opts.subset],
                "subset_documents": self.subset_documents,
                "data_space": self._data_space.info if self._data_space is not None else None}
