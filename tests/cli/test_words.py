"""What the help texts, messages and README's SQL cookbook say is what the code does.

tests/cli/test_examples.py checks that every example *runs*; these check that the words are true:
an option a message tells the user to type exists, a default a help text states is the code's,
and the cookbook's per-result queries aggregate one result's folds, never several splits' or
several head settings'.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from click.testing import CliRunner

from scdm.cli import main
from scdm.embedding.chunks import MODEL_CHUNK_ROWS_MAX
from scdm.store import example_data
from scdm.store._constants import TARGET_CHUNK_BYTES

ROOT = Path(__file__).resolve().parents[2]

FOREIGN_OPTIONS = {"--revision"}
"""Options of other tools that scdm's messages quote (`hf download REPO --revision REV`)."""


def _scdm_options() -> set[str]:
    known = {o for p in main.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    for command in main.commands.values():
        known |= {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    return known


def _message_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings (messages, help texts, printed hints)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_every_option_a_message_names_exists() -> None:
    known = _scdm_options() | FOREIGN_OPTIONS
    unknown = [
        f"{path.relative_to(ROOT)}:{line}: {option}"
        for path in sorted((ROOT / "src" / "scdm").rglob("*.py"))
        for line, text in _message_strings(path)
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)
        if option not in known
    ]
    assert not unknown, unknown


def test_counts_on_scaled_values_says_which_option_to_drop(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    runner = CliRunner()
    refused = runner.invoke(
        main, ["--store", store, "-q", "embed", str(example_data("A375")), "--model", "pca", "--n-comps", "5", "--counts"]
    )
    assert refused.exit_code == 1 and "cannot be normalised as counts. Drop --counts" in refused.output
    done = runner.invoke(main, ["--store", store, "-q", "embed", "A375_melanoma_GSE108383", "--model", "pca", "--n-comps", "5"])
    assert done.exit_code == 0, done.output


def test_chunk_rows_help_states_the_code_default() -> None:
    option = next(p for p in main.commands["embed"].params if p.name == "chunk_rows")
    assert f"{TARGET_CHUNK_BYTES // 2**20} MiB" in option.help
    assert f"at most {MODEL_CHUNK_ROWS_MAX:,} for a foundation model" in option.help
