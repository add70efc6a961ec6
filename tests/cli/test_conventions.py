"""One set of conventions across commands: --store anywhere, one list syntax, renamed options, quiet, plain warnings."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from scdm.cli import RENAMED, AliasOption, main
from scdm.store import Store, example_data
from scdm.store.errors import ScdmWarning
from scdm.store.progress import no_progress, plain_warnings, progress_bar, progress_enabled
from scdm.store.splits import CATEGORY_TYPES, SCENARIOS


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("conv") / "st"
    st = Store(root)
    st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", study="GSE108383")
    return root


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("where", ["before", "after"])
def test_store_goes_before_or_after_the_command(store: Path, where: str) -> None:
    args = ["--store", str(store), "ls", "--format", "json"] if where == "before" else ["ls", "--store", str(store), "--format", "json"]
    doc = json.loads(run(*args))  # one JSON document
    assert [d["name"] for d in doc["datasets"]] == ["a375"]


def test_read_only_after_the_command_refuses_writes(store: Path) -> None:
    result = CliRunner().invoke(main, ["ingest", example_data("A375"), "--store", str(store), "--read-only"])
    assert result.exit_code != 0 and "read-only" in result.output.lower()


def test_renamed_options_still_work_and_are_hidden(store: Path) -> None:
    for command in main.commands.values():
        for param in command.params:
            if isinstance(param, AliasOption):
                assert all(RENAMED[a] in param.opts for a in param.aliases), (command.name, param.opts)
                record = param.get_help_record(click.Context(command))
                assert record is not None and not any(a in record[0] for a in param.aliases)
    seen = {a for c in main.commands.values() for p in c.params if isinstance(p, AliasOption) for a in p.aliases}
    assert seen == set(RENAMED)
    new = run("results", "--store", str(store), "--head", "logreg", "--split-scheme", "cell", "--format", "csv")
    old = run("results", "--store", str(store), "--heads", "logreg", "--scheme", "cell", "--format", "csv")
    assert new == old


def test_list_options_take_repeats_commas_or_both() -> None:
    command = main.commands["evaluate"]
    ctx = command.make_context("evaluate", ["--head", "ridge", "--head", "logreg,mlp", "--by", "all,tissue"],
                               parent=click.Context(main, obj=None))
    assert ctx.params["heads"] == ("ridge", "logreg", "mlp") and ctx.params["by"] == ("all", "tissue")
    default = command.make_context("evaluate", [], parent=click.Context(main, obj=None))
    assert default.params["heads"] == ("mlp", "logreg") and default.params["split_scheme"] == "auto"


def test_models_fits_100_columns_and_long_has_the_details() -> None:
    short = run("models")
    assert max(map(len, short.splitlines())) <= 100 and "pca" in short and "geneformer" in short
    long = run("models", "--long")
    assert "checkpoint files:" in long and "token_dictionary" in long


def test_an_unknown_model_lists_the_baselines_too(store: Path) -> None:
    result = CliRunner().invoke(main, ["--store", str(store), "embed", "a375", "--model", "genformer"])
    assert result.exit_code == 1
    assert "pca, hvg" in result.output and "Did you mean 'geneformer'" in result.output


@pytest.mark.parametrize(("option", "value", "allowed"), [
    ("--scenario", "poooled", SCENARIOS), ("--by", "nosuch", CATEGORY_TYPES), ("--by", "all,tisue", CATEGORY_TYPES)])
def test_results_refuses_a_misspelled_scenario_or_category_type(store: Path, option: str, value: str,
                                                                  allowed: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, ["--store", str(store), "results", option, value])  # was '(no rows)', exit 0
    bad = value.split(",")[-1]
    assert result.exit_code == 2 and f"Invalid value for '{option}': '{bad}' is not one of" in result.output
    assert all(repr(choice) in result.output for choice in allowed)
    help_text = " ".join(run("results", "--help").split())  # the help names the same choices
    assert all(choice in help_text for choice in (*SCENARIOS, *CATEGORY_TYPES))


def test_report_progress_bar_follows_q_and_scdm_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from scdm.classify import report
    from scdm.embedding.runner import embed_baseline

    st = Store(tmp_path / "st")
    st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", study="GSE108383")
    embed_baseline(st, ["a375"], model="pca", n_comps=4, n_hvg=100, progress=False)  # an embedding: the report has sections
    monkeypatch.setattr(report, "write_report", functools.partial(report.write_report, projection="none"))  # no UMAP: fast
    monkeypatch.setenv("SCDM_PROGRESS", "1")
    shown = CliRunner().invoke(main, ["--store", str(st.root), "report", "--out", str(tmp_path / "r0")])
    assert shown.exit_code == 0 and "section" in shown.stderr  # forced on: the bar shows, so its absence below means something
    for env, args in (("1", ["-q", "report"]), ("1", ["report", "-q"]), ("0", ["report"])):
        monkeypatch.setenv("SCDM_PROGRESS", env)
        result = CliRunner().invoke(main, ["--store", str(st.root), *args, "--out", str(tmp_path / "r1")])
        assert result.exit_code == 0 and result.stdout.startswith("wrote ")
        assert "section" not in result.stderr and "%|" not in result.stderr, (env, args)


def test_scdm_warnings_print_once_as_one_plain_line(capsys: pytest.CaptureFixture[str]) -> None:
    with plain_warnings():
        for _ in range(8):
            warnings.warn("labels are constant\n   within each sample", ScdmWarning, stacklevel=1)
        warnings.warn("another one", ScdmWarning, stacklevel=1)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: labels are constant within each sample", "warning: another one"]


def test_the_cli_prints_the_leakage_warning_once_without_python_noise(tmp_path: Path) -> None:
    st = Store(tmp_path / "st")
    st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", sample_key="condition")
    done = subprocess.run([sys.executable, "-m", "scdm", "--store", str(tmp_path / "st"), "-q", "embed", "a375", "--model", "pca"],
                          capture_output=True, text=True, check=True)
    done = subprocess.run([sys.executable, "-m", "scdm", "--store", str(tmp_path / "st"), "evaluate", "-q", "--head", "majority",
                           "--head", "ridge", "--by", "all", "--folds", "3", "--split-scheme", "cell"],
                          capture_output=True, text=True, check=True)
    lines = [line for line in done.stderr.splitlines() if "confounded" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ")
    assert "SampleLeakageWarning" not in done.stderr and "warnings.warn" not in done.stderr


def test_progress_shows_in_jupyter_and_q_silences_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCDM_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not progress_enabled()

    class ZMQInteractiveShell:  # the class name Jupyter's kernel shell has
        pass

    fake_ipython = type(sys)("IPython")
    fake_ipython.get_ipython = ZMQInteractiveShell  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake_ipython)
    assert progress_enabled()
    with no_progress():
        assert not progress_enabled() and progress_bar(3).disable
    monkeypatch.setenv("SCDM_PROGRESS", "0")
    assert not progress_enabled()


@pytest.mark.parametrize("fdr", ["5", "0", "-0.1"])
def test_genes_refuses_an_fdr_that_is_not_a_fraction(fdr: str, tmp_path: Path) -> None:
    """`--fdr 5` (meaning 5 %) called every gene with an effect critical; it is refused before any work."""
    result = CliRunner().invoke(main, ["--store", str(tmp_path / "store"), "genes", "--run", "any", "--fdr", fdr])
    assert result.exit_code == 2 and "Invalid value for '--fdr'" in result.output and "0<x<=1" in result.output


def test_python_dash_m_takes_the_options_every_command_takes(tmp_path) -> None:
    # `python -m scdm.cli report --out X -q` said "No such option '-q'": the module ran main() before the
    # options every command takes after its name were added
    out = subprocess.run([sys.executable, "-m", "scdm.cli", "ls", "-q", "--store", str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
