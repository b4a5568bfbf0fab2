"""The README's plugin example is real code: run it and use the method it registers."""
import re
from pathlib import Path

import torch
from conftest import small_cnn

import tta_bench

README = Path(__file__).resolve().parent.parent / "README.md"


def test_plugin_example_runs_and_widens_the_margin():
    text = README.read_text()
    code = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README plugin example", "exec"), {})
    method = tta_bench.get_method("margin", scale=2.0)
    model = small_cnn()
    x = torch.randn(1, 3, 8, 8)
    res = tta_bench.adapt(model, x, method, threshold=None)
    def gap(z):
        return (z.topk(2).values[0] - z.topk(2).values[1]).item()

    assert res.updated and gap(res.adapted_logits) > gap(res.source_logits)
    assert "margin" in tta_bench.list_methods()
