import copy
import os
import tempfile
from typing import Iterator

import pytest
import torch
from torch import nn

from tta_bench import Sample, Task

torch.set_num_threads(1)  # 2 cores: oversubscription makes forward passes ~20x slower
# Every run logs to MLflow: keep the suite's runs in one throwaway store, never in the checkout.
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp(prefix='tta-bench-tests-')}/mlflow.db"


def small_cnn(n_classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(24, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, n_classes))
    with torch.no_grad():  # non-trivial running statistics, and a spread of confidences
        bn = model[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
        bn.num_batches_tracked.fill_(7)
        model[-1].weight.mul_(10)
    return model.eval()


class ToyTask(Task):
    """Random 8x8 images on a small CNN: fast, deterministic, with certain and uncertain samples."""

    name = "toy"
    kind = "image"

    def __init__(self, n: int = 40, **options):
        super().__init__(**options)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 5, (n,), generator=g)
        self.model = small_cnn()

    def load_model(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def samples(self) -> Iterator[Sample]:
        for i in range(len(self.y)):
            yield Sample(i, self.x[i], int(self.y[i]))

    def num_samples(self) -> int:
        return len(self.y)


@pytest.fixture(scope="session")
def tiny():
    """A tiny randomly initialised Llama with SmolLM2's real (byte-level BPE) tokenizer: fast
    language-model tests (the engine restores its weights after every sample)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from tta_bench.tasks import lm
    tokenizer = AutoTokenizer.from_pretrained(lm.embedded_folder())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    return lm.LanguageModel(LlamaForCausalLM(config).eval(), tokenizer, {"model": "tiny-llama"})


@pytest.fixture
def toy_task() -> ToyTask:
    return ToyTask()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == reference.keys()
    for k, v in reference.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"{k} changed"
