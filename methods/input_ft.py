"""Fine-tuning on the input (paper Experiment 7): one step on the next-token loss of the input's
own tokens — tokens 2..n of the input predicted from 1..n−1 — never the target."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tta_bench.core.method import Method, Step

MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


class InputFineTuning(Method):
    name = "input-ft"
    description = "next-token loss on the input's own tokens (text and MC tasks)"
    default_lr = 1.02e-2
    task_kinds = frozenset({"text", "mc"})

    def loss(self, step: Step) -> Tensor:
        inputs = step.inputs if isinstance(step.inputs, dict) else {"input_ids": step.inputs}
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        prefix = {k: v[:, :-1] for k, v in inputs.items() if k in MODEL_KEYS}
        step.count_forward()
        logits = step.model(**prefix).logits  # [1, n−1, V]
        targets = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
