"""Every default a command shows is the default of the Python function it calls.

The command line copies its defaults into click options (importing the library to read them would make
`scdm --help` load torch); a copy that drifts from the function's signature makes the same experiment give
other numbers (another seed, other folds, another split id) from Python than from the shell. This test
reads both and fails on the first difference. The notebook's ``scdm.evaluate`` has documented defaults
of its own (pooled, by="all", 5 folds) and is not compared here.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import click
import pytest

from scdm.cli import main

TARGETS: dict[str, list[str]] = {
    "embed": ["scdm.embedding.runner:embed", "scdm.embedding.runner:embed_baseline"],
    "finetune": ["scdm.embedding.finetune:finetune"],
    "evaluate": ["scdm.classify.grid:evaluate"],
    "results": ["scdm.api:results"],  # the metrics shown; the filters go to leaderboard() as given
    "prompt": ["scdm.prompt.evaluate:prompt"],
    "transfer": ["scdm.classify.transfer:transfer"],
    "genes": ["scdm.classify.transfer:critical_genes"],
    "train-head": ["scdm.classify.trained_heads:train_head"],
    "predict": ["scdm.classify.trained_heads:predict"],
    "synth": ["scdm.classify.synth:synthesize"],
    "demo": ["scdm.demo:run_demo"],
    "serve": ["scdm.server.app:serve", "scdm.server.config:ServerConfig"],
    "rm": ["scdm.store:Store.remove_dataset"],
    "export": ["scdm.store:Store.find_embedding"],
}
"""Each command and the function(s) it passes its options to (the api module's table names the same)."""

RENAMED: dict[tuple[str, str], str] = {
    ("evaluate", "scenario"): "scenarios", ("prompt", "scenario"): "scenarios", ("finetune", "datasets"): "dataset",
    ("serve", "sql_timeout"): "sql_timeout_s", ("serve", "max_upload_mb"): "max_upload_bytes",
}
"""Options whose function parameter has another name."""

AS_PASSED: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("transfer", "alpha"): float, ("transfer", "beta"): float,  # comma lists of floats, one value by default
    ("serve", "max_upload_mb"): lambda mb: round(mb * 1024 * 1024),
}
"""How a command turns an option's default into the value it passes."""

COMPARED = 60
"""At least this many defaults are compared (a renamed function parameter must not shrink the test silently)."""


def _function(target: str) -> Any:
    module, attr = target.split(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _pairs() -> list[tuple[str, str, Any, str, Any]]:
    """(command, option, default as passed, function, default in its signature) for every shared parameter."""
    out = []
    for name, targets in TARGETS.items():
        command = main.commands[name]
        for target in targets:
            signature = inspect.signature(_function(target))
            for param in command.params:
                if param.name is None or not param.expose_value:
                    continue
                api_name = RENAMED.get((name, param.name), param.name)
                api_param = signature.parameters.get(api_name)
                default = param.default
                if api_param is None or api_param.default is inspect.Parameter.empty or default is None \
                        or type(default).__name__ == "Sentinel" or (isinstance(param, click.Option) and param.is_flag):
                    continue  # no default on one side (required, or None: "not given"), or a flag (off)
                if isinstance(default, list):  # multiple=True options
                    default = tuple(default)
                default = AS_PASSED.get((name, param.name), lambda v: v)(default)
                out.append((name, param.name, default, target, api_param.default))
    return out


PAIRS = _pairs()


def test_enough_defaults_are_compared() -> None:
    assert len(PAIRS) >= COMPARED, [p[:2] for p in PAIRS]
    assert {("evaluate", "folds"), ("evaluate", "seed"), ("evaluate", "heads"), ("train-head", "threshold"),
            ("embed", "n_comps"), ("prompt", "folds"), ("finetune", "rank")} <= {p[:2] for p in PAIRS}


@pytest.mark.parametrize(("command", "option", "cli_default", "function", "api_default"), PAIRS,
                         ids=[f"{p[0]}-{p[1]}-{p[3].rsplit(':', 1)[1]}" for p in PAIRS])
def test_a_commands_default_is_its_functions(command: str, option: str, cli_default: Any, function: str,
                                             api_default: Any) -> None:
    if isinstance(api_default, (list, tuple)) or isinstance(cli_default, tuple):
        api_default = tuple(api_default)
    assert cli_default == api_default and type(cli_default) is type(api_default) or (
        isinstance(cli_default, (int, float)) and not isinstance(cli_default, bool) and cli_default == api_default), (
        f"`scdm {command}` --{option.replace('_', '-')} defaults to {cli_default!r}, {function} to {api_default!r}")
