"""Test-time fine-tuning on retrieved data (SIFT paper, 003_dbb22bf818bc4483.txt): select N
sequences of the task's data space for the test window, take one next-token gradient step on each,
in selection order (T = N; default Adam, lr 5e-5, as transformers' default), then predict.

nn: the N nearest neighbours (cosine similarity of unit-length embeddings), most to least similar.
nn-f: the nearest neighbour N times (the paper's failure mode of redundant data).
sift: SIFT(λ′) through the authors' library `activeft` (Retriever over the faiss index; 200
      candidates pre-selected by nearest-neighbour search, as in the paper).
random: N uniform data-space sequences (a control).
A sequence sharing a 32-token n-gram with the test window is never selected (tta_bench/data/dataspace.py)."""
from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from tta_bench.core.errors import TTAError
from tta_bench.core.hparams import SEEDS, HParam
from tta_bench.core.method import Method, Step
from tta_bench.core.task import Task


class Retrieval(Method):
    """Base of the retrieval methods: `choose` picks data-space indices for a test window."""

    name: ClassVar[str]
    default_lr = 5e-5
    default_optimizer = "adam"
    task_kinds = frozenset({"text"})
    hparams = {
        "n_select": HParam(50, int, "sequences selected and stepped on (N; the paper: 50)",
                           interval="[1, 100000]"),
    }

    def supports(self, task: Task) -> None:
        super().supports(task)
        if getattr(task.opts, "data_space", None) is None:
            raise TTAError(f"method {self.name} fine-tunes on data retrieved from a data space, and task "
                           f"{task.name} has none: pass --data-space split (held-out documents of the corpus) "
                           "or another corpus (--data-space licenses, a hub id, or files)")

    def step_inputs(self, step: Step) -> list[Tensor]:
        space = step.data_space
        window = step.inputs if isinstance(step.inputs, Tensor) else step.inputs["input_ids"]
        exclude = space.leaking(window)
        chosen = self.choose(space, window, exclude, step.index)
        self.last_selection = [int(i) for i in chosen]  # for inspection and tests
        return [space.sequence(int(i), window.device) for i in chosen]

    def choose(self, space, window: Tensor, exclude: np.ndarray, index: int) -> np.ndarray:
        raise NotImplementedError

    def loss(self, step: Step) -> Tensor:
        """Next-token cross-entropy over the whole selected sequence."""
        ids = step.inputs
        step.count_forward()
        logits = step.model(input_ids=ids[:, :-1]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


class NearestNeighbours(Retrieval):
    name = "nn"
    description = "fine-tune on the N nearest data-space sequences (text)"

    def choose(self, space, window, exclude, index):
        return space.nearest(space.query(window), self.hp.n_select, exclude)


class NearestNeighbourRepeated(Retrieval):
    name = "nn-f"
    description = "fine-tune N times on the single nearest data-space sequence (NN's failure mode; text)"

    def choose(self, space, window, exclude, index):
        return np.repeat(space.nearest(space.query(window), 1, exclude), self.hp.n_select)


class Sift(Retrieval):
    name = "sift"
    description = "fine-tune on N data-space sequences selected by SIFT(λ′) via activeft (text)"
    hparams = {
        **Retrieval.hparams,
        "llambda": HParam(0.01, float, "SIFT's λ′ (relevance vs diversity; the paper: 0.01)",
                          interval="(0, inf)"),
        "candidates": HParam(200, int, "nearest neighbours pre-selected for SIFT (the paper: 200)",
                             interval="[1, 1000000]"),
    }

    def choose(self, space, window, exclude, index):
        from activeft.sift import Retriever

        retriever = Retriever(space.searchable(exclude), llambda=self.hp.llambda, device=window.device)
        k = max(self.hp.candidates, self.hp.n_select)
        _, chosen, _, _ = retriever.search(space.query(window)[None], N=self.hp.n_select, K=k)
        return np.asarray(chosen)


class Random(Retrieval):
    name = "random"
    description = "fine-tune on N uniform data-space sequences (a control; text)"
    hparams = {**Retrieval.hparams,
               "seed": HParam(0, int, "seed of the draw (combined with the sample index)",
                               interval=SEEDS)}

    def choose(self, space, window, exclude, index):
        allowed = np.setdiff1d(np.arange(len(space)), exclude)
        rng = np.random.default_rng([self.hp.seed, index])
        return rng.choice(allowed, size=self.hp.n_select, replace=len(allowed) < self.hp.n_select)
