"""Registry, hyperparameter validation and third-party plugins."""
import sys
import textwrap

import pytest

import tta_bench
from tta_bench import TTAError
from tta_bench.core import registry
from tta_bench.core.hparams import parse_assignments


def test_builtins_are_discovered():
    assert {"none", "ifo", "dofo", "entropy"} <= set(tta_bench.list_methods())
    assert {"cifar10", "imagenet"} <= set(tta_bench.list_tasks())


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(TTAError, match=r"unknown method 'nope'; available: .*dofo.*ifo"):
        tta_bench.get_method("nope")


@pytest.mark.parametrize("hp,match", [
    ({"weighted": "maybe"}, r"weighted='maybe' is not a valid bool"),
    ({"n_focus": 0}, r"n_focus=0 is out of range: it must be an integer in \[1, 100000\]"),
    ({"n_focus": 1.5}, r"not a valid int"),
    ({"loss": "hinge"}, r"loss='hinge' is not allowed; choose one of: logits, xent, entropy"),
    ({"lr": 1}, r"method ifo has no option lr; its options are: n_focus \(default 2\), weighted"),
])
def test_bad_hyperparameters_are_clear_errors(hp, match):
    with pytest.raises(TTAError, match=match):
        tta_bench.get_method("ifo", **hp)


def test_hyperparameters_parse_from_strings():
    m = tta_bench.get_method("ifo", **parse_assignments(["weighted=false,n-focus=3", "loss=xent"]))
    assert (m.hp.weighted, m.hp.n_focus, m.hp.loss) == (False, 3, "xent")
    with pytest.raises(TTAError, match="expected KEY=VALUE"):
        parse_assignments(["weighted"])


def test_method_on_unsupported_task_kind_is_refused_before_work():
    class TextOnly(tta_bench.Method):
        name = "text-only"
        task_kinds = frozenset({"text"})

    with pytest.raises(TTAError, match="does not support image tasks such as cifar10"):
        TextOnly().supports(tta_bench.get_task("cifar10"))


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    (tmp_path / "margin_plugin.py").write_text(textwrap.dedent("""
        from tta_bench import Method

        class Margin(Method):
            name = "margin-ep"

            def loss(self, step):
                a, b = step.source.focus(2)
                return step.logits[b] - step.logits[a]
    """))
    dist = tmp_path / "margin_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: margin-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tta_bench.methods]\nmargin-ep = margin_plugin:Margin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._discover.cache_clear()
    try:
        assert "margin-ep" in tta_bench.list_methods()
        assert tta_bench.get_method("margin-ep").name == "margin-ep"
    finally:
        registry._discover.cache_clear()
        sys.modules.pop("margin_plugin", None)


def test_register_rejects_non_methods():
    with pytest.raises(TTAError, match="not a Method subclass"):
        tta_bench.register_method(object)
