"""Each run setting is declared once (tta_bench.core.settings); the CLI flags, the sweep keys, the
Protocol/RunOptions defaults and the tracking defaults are views of it and must agree."""
from __future__ import annotations

import dataclasses

import pytest

from tta_bench import Protocol, RunOptions
from tta_bench.cli import build_parser
from tta_bench.core.settings import PROTOCOL_DEFAULTS, SETTINGS
from tta_bench.storage.tracking import method_label
from tta_bench.sweeps.spec import RUN_SETTINGS, jobs_from_spec

SPEC = {"name": "s", "tasks": [{"name": "cifar10"}], "methods": [{"name": "tent"}]}


def test_cli_flags_take_the_declared_defaults():
    args = build_parser().parse_args(["run"])
    assert {k: getattr(args, k) for k in SETTINGS} == {k: s.unset for k, s in SETTINGS.items()}


@pytest.mark.parametrize("name", [k for k, s in SETTINGS.items() if s.type in (int, float) and k != "lr"])
def test_cli_flags_parse_to_the_declared_type(name):
    value = "3" if SETTINGS[name].type is int else "0.5"
    args = build_parser().parse_args(["run", f"--{name.replace('_', '-')}", value])
    assert getattr(args, name) == SETTINGS[name].type(value)


def test_sweep_keys_are_the_settings_and_a_job_gets_their_defaults():
    assert RUN_SETTINGS.keys() == SETTINGS.keys()
    (job,), _ = jobs_from_spec(SPEC)
    protocol, options = job.config["protocol"], job.config["options"]
    from tta_bench import get_method
    tent = get_method("tent")
    assert protocol["lrs"] == [tent.default_lr] and protocol["optimizer"] == tent.default_optimizer
    expected = {k: s.default for k, s in SETTINGS.items() if s.kind == "protocol" and not s.by_method and k != "lr_grid"}
    assert {k: protocol[k] for k in expected} == expected
    assert options == {k: s.default for k, s in SETTINGS.items() if s.kind == "scan"}


def test_dataclass_defaults_are_the_settings():
    protocol = {f.name: f.default for f in dataclasses.fields(Protocol) if f.name != "lrs"}
    assert protocol == {k: s.default for k, s in SETTINGS.items() if s.kind == "protocol" and k not in ("lr", "lr_grid")}
    scan = {f.name: f.default for f in dataclasses.fields(RunOptions)}
    for name, setting in SETTINGS.items():
        if setting.kind == "scan":
            assert scan[name] == setting.default, name


def test_tracking_names_no_setting_of_a_default_run():
    (job,), _ = jobs_from_spec(SPEC)
    assert set(PROTOCOL_DEFAULTS) <= set(job.config["protocol"])
    assert method_label(job.config) == "tent"
    (changed,), _ = jobs_from_spec({**SPEC, "momentum": 0.9, "clip": "none"})
    assert method_label(changed.config) == "tent[clip=None, momentum=0.9]"
