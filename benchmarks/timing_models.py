"""Models for timing only (issue 14): what a TTA paper's table would run, without downloads.

- `tv:NAME`: a torchvision classifier (resnet50, vit_b_16, …) with seeded random weights on the
  CIFAR-10 task (inputs at 224 px, classes by ImageNet groups as for EfficientNet-Lite0).
- `llama:135m` / `llama:1b`: a randomly initialised Llama-architecture causal LM with
  SmolLM2-135M's config or a ~1.2B config (Llama-3.2-1B's shape), on seeded random 128-token
  windows (127 input tokens, the next one the label).

Random weights make a classifier over-confident (no sample gated uncertain at d = 0.16) and an LM
near-uniform: benchmarks/gpu.py runs them ungated, every sample adapted, the worst case for time.
Nothing here is a statement about accuracy."""
from __future__ import annotations

from functools import cached_property
from typing import Iterator

import torch
from torch import nn

import tta_bench
from tta_bench import Sample, Task

LLAMA_CONFIGS = {  # hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                 max_position_embeddings=8192, rms_norm_eps=1e-5),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
               max_position_embeddings=8192, rms_norm_eps=1e-5),
}
WINDOW = 128


def timing_task(model: str, device: torch.device) -> Task:
    """The task for a model name: the registered cifar10 task for its own model, else a timing one."""
    if model in ("efficientnet-lite0", "default"):
        return tta_bench.get_task("cifar10")
    if model.startswith("tv:"):
        return _torchvision_task(model[3:])
    if model.startswith("llama:"):
        return RandomLlamaText(model[6:], device)
    raise SystemExit(f"unknown timing model {model!r}: use efficientnet-lite0, tv:NAME or llama:135m|1b")


def _torchvision_task(name: str) -> Task:
    import torchvision

    base = type(tta_bench.get_task("cifar10"))

    class TorchvisionCifar(base):  # type: ignore[misc, valid-type]
        def load_model(self) -> nn.Module:
            torch.manual_seed(0)
            return torchvision.models.get_model(name, weights=None).eval()

        def metadata(self) -> dict:
            return {**super().metadata(), "weights": f"torchvision {name}, random (seed 0)"}

    return TorchvisionCifar()


class RandomLlamaText(Task):
    name = "text"
    kind = "text"

    def __init__(self, size: str, device: torch.device, n: int = 512):
        super().__init__()
        self.size, self.device, self.n = size, device, n

    @cached_property
    def model(self) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with torch.device(self.device):  # initialised where it runs: seconds, not minutes, for 1B
            return LlamaForCausalLM(LlamaConfig(**LLAMA_CONFIGS[self.size])).eval()

    def load_model(self) -> nn.Module:
        return self.model

    def samples(self) -> Iterator[Sample]:
        g = torch.Generator().manual_seed(1)
        vocab = LLAMA_CONFIGS[self.size]["vocab_size"]
        for i in range(self.n):
            w = torch.randint(0, vocab, (WINDOW,), generator=g)
            yield Sample(i, w[:-1], int(w[-1]))

    def num_samples(self) -> int:
        return self.n

    def class_logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(input_ids=inputs, logits_to_keep=1).logits[:, -1]

    def metadata(self) -> dict:
        return {"model": f"random Llama ({self.size} config)", "window": WINDOW,
                "parameters": sum(p.numel() for p in self.model.parameters())}
