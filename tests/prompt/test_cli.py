"""`scdm prompt` on the bundled real data (A375, z-scored) against the loopback server."""

from __future__ import annotations

import re

from click.testing import CliRunner

from scdm.cli import main
from scdm.store import Store, example_data


def test_help_teaches_with_a_local_endpoint() -> None:
    out = CliRunner().invoke(main, ["prompt", "--help"])
    assert out.exit_code == 0
    assert "--backend ollama -m llama3.1:8b" in out.output and "--num-ctx" in out.output and "--dry-run" in out.output
    assert "--no-logprobs" in out.output and "--max-requests" in out.output
    # the ollama backend's default server is Ollama's, not OpenAI's (as --help said of every backend)
    assert "Default: OpenAI's; with --backend ollama, http://localhost:11434." in " ".join(out.output.split())


def test_dry_run_then_run_on_real_data(tmp_path, llm) -> None:
    store = str(tmp_path / "store")
    runner = CliRunner()
    ingest = runner.invoke(main, ["--store", store, "ingest", example_data("A375"), "--name", "a375", "--label-key",
                                  "response_PLX4720", "--drug", "PLX4720", "--study", "GSE108383", "--tissue", "skin",
                                  "--cancer-type", "melanoma"], catch_exceptions=False)
    assert ingest.exit_code == 0, ingest.output
    common = ["--store", store, "prompt", "--dataset", "a375", "--base-url", llm.url, "-m", "fake-llm", "--by", "all",
              "--scenario", "pooled", "--folds", "3", "-q"]
    dry = runner.invoke(main, [*common, "--dry-run", "--price-input", "0.15", "--price-output", "0.6"], catch_exceptions=False)
    assert dry.exit_code == 0, dry.output
    assert "Data source: study: GSE108383; tissue: skin; cancer type: melanoma; drug: PLX4720" in dry.output
    n = int(re.search(r"dry run: (\d+) requests for 108 cells", dry.output).group(1))
    assert n == 11 and "0 already answered, 11 to send" in dry.output and "estimated cost:" in dry.output
    assert llm.behaviour.bodies == []
    out = runner.invoke(main, [*common], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert len(llm.behaviour.bodies) == 11  # 108 cells of one source: 10 per request
    assert "fake-llm" in out.stdout and "prompt-zero-shot" in out.stdout
    assert "11 requests sent" in out.stderr and "3 folds scored" in out.stderr
    st = Store(store)
    assert st.query("SELECT count(*) AS n FROM eval_tasks WHERE head = 'prompt-zero-shot'")["n"].iloc[0] == 3
    results = runner.invoke(main, ["--store", store, "results", "--head", "prompt-zero-shot"], catch_exceptions=False)
    assert results.exit_code == 0 and "fake-llm" in results.stdout
    by_tissue = [a if a != "all" else "tissue" for a in common]  # the same cells, asked again: nothing is sent
    out = runner.invoke(main, [*by_tissue, "--format", "csv"], catch_exceptions=False)
    assert out.exit_code == 0 and len(llm.behaviour.bodies) == 11
    shown = out.stdout.splitlines()
    assert len(shown) == 2 and ",tissue,skin," in shown[1]  # the result it asked for: was '(no rows)'


def test_a_run_that_scores_nothing_says_why(tmp_path, llm) -> None:
    import anndata as ad

    one_class = ad.read_h5ad(example_data("A375"))
    one_class.obs["response"] = "resistant"
    path = tmp_path / "resistant.h5ad"
    one_class.write_h5ad(path)
    store = str(tmp_path / "store")
    runner = CliRunner()
    runner.invoke(main, ["--store", store, "ingest", str(path), "--name", "r", "--label-key", "response"], catch_exceptions=False)
    common = ["--store", store, "prompt", "--dataset", "r", "--base-url", llm.url, "-m", "fake-llm", "--folds", "2", "-q"]
    out = runner.invoke(main, [*common, "--by", "all"], catch_exceptions=False)
    assert out.exit_code == 0 and "nothing could be scored: category holds one class only (108 cells, all resistant)" in out.stderr
    out = runner.invoke(main, [*common, "--by", "tissue"], catch_exceptions=False)  # no cell has a tissue
    assert out.exit_code == 0 and "nothing could be scored: no category of the chosen --by has cells to test" in out.stderr
    assert llm.behaviour.bodies == []
