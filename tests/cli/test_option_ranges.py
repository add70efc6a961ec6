"""Bad option values get a message naming the option to fix, never a traceback or a silently wrong answer.

`scdm transfer --param alpha=2` ended in a Python TypeError (alpha passed twice); `scdm genes --top -1`
printed every row but the last two; `scdm evaluate --folds 1` named the Python argument `n_folds`;
`--mlp-profile` without an mlp head and `--pair-folds-with` without a pooled split were dropped without a word.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from scdm.cli import main
from scdm.store.errors import InputDataError
from tests.jhu006 import jhu006_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return jhu006_store(tmp_path_factory.mktemp("ranges") / "store").root


def invoke(*args: str, store: Path | None = None) -> tuple[int, str, str]:
    root = ["--store", str(store)] if store is not None else []
    result = CliRunner().invoke(main, [*root, *args])
    assert not isinstance(result.exception, TypeError), result.exception  # no Python traceback
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(("param", "option"), [("alpha=2", "--alpha"), ("n_hvg=10", "--n-hvg"),
                                               ("adapt=false", "--no-adapt"), ("source=x", "--source")])
def test_transfer_refuses_a_param_its_own_option_sets(tmp_path: Path, param: str, option: str) -> None:
    code, _, err = invoke("transfer", "--source", "a", "--target", "b", "--param", param, store=tmp_path / "st")
    assert code == 2, err
    key = param.split("=")[0]
    assert f"--param {key}=... is set with {option}" in err and "use that option instead" in err


@pytest.mark.parametrize(("args", "param", "option"), [
    (("embed", "x", "--model", "geneformer"), "batch_size=3", "--batch-size"),
    (("embed", "x", "--model", "geneformer"), "device=cpu", "--device"),
    (("embed", "x", "--model", "geneformer"), "lora_dir=/a", "--lora"),
    (("embed", "x", "--model", "geneformer", "--layer", "-1"), "layer=-2", "--layer"),
    (("embed", "x", "--model", "pca"), "n_comps=5", "--n-comps"),
    (("finetune", "-m", "geneformer", "-c", "ck", "--dataset", "x", "--all-folds"), "epochs=1", "--epochs"),
    (("finetune", "-m", "geneformer", "-c", "ck", "--dataset", "x", "--all-folds"), "scheme=cell", "--split-scheme"),
])
def test_embed_and_finetune_refuse_a_param_their_own_option_sets(tmp_path: Path, args: tuple[str, ...], param: str,
                                                                  option: str) -> None:
    # was a TypeError traceback ("got multiple values for keyword argument"), or the --param silently won
    code, _, err = invoke(*args, "--param", param, store=tmp_path / "st")
    assert code == 2, err
    assert f"--param {param.split('=')[0]}=... is set with {option}" in err and "use that option instead" in err


def test_an_embed_option_given_only_as_a_param_still_reaches_the_model(tmp_path: Path) -> None:
    # scdm verify prints re-embed commands with --param max_genes=N; without --layer, --param layer=... is the way
    code, _, err = invoke("embed", "x", "--model", "geneformer", "--param", "layer=-1", "--param", "max_genes=7",
                          store=tmp_path / "st")
    assert code != 0 and "is not in the store" in err and "--param" not in err, err


def test_the_keywords_embed_and_finetune_guard_are_their_functions_arguments() -> None:
    import inspect

    from scdm import cli
    from scdm.embedding.finetune import finetune
    from scdm.embedding.runner import embed, embed_baseline

    taken = set(inspect.signature(embed).parameters) | set(inspect.signature(embed_baseline).parameters)
    assert set(cli._EMBED_OPTION_KEYWORDS) <= taken
    assert set(cli._FINETUNE_OPTION_KEYWORDS) <= set(inspect.signature(finetune).parameters)


TRANSFER = ("transfer", "--source", "a", "--target", "b")


@pytest.mark.parametrize(("args", "option"), [
    (("prompt", "--dataset", "x", "--seed", "-1"), "--seed"),
    (("prompt", "--dataset", "x", "--folds", "1"), "--folds"),
    (("demo", "--folds", "1"), "--folds"),
    (("demo", "--cells", "0"), "--cells"),
    (("demo", "--seed", "-1"), "--seed"),
    (("genes", "--run", "r", "--top", "-1"), "--top"),
    (("genes", "--run", "r", "--n-steps", "0"), "--n-steps"),
    (("genes", "--run", "r", "--max-cells", "-5"), "--max-cells"),
    (("genes", "--run", "r", "--seed", "-1"), "--seed"),
    ((*TRANSFER, "--epochs", "0"), "--epochs"),
    ((*TRANSFER, "--pretrain-epochs", "-1"), "--pretrain-epochs"),
    ((*TRANSFER, "--batch-size", "0"), "--batch-size"),
    ((*TRANSFER, "--n-hvg", "-1"), "--n-hvg"),
    ((*TRANSFER, "--seed", "-1"), "--seed"),
])
def test_out_of_range_ints_are_refused_naming_the_option(tmp_path: Path, args: tuple[str, ...], option: str) -> None:
    code, _, err = invoke(*args, store=tmp_path / "st")
    assert code == 2 and f"Invalid value for '{option}'" in err, err


def test_the_python_functions_refuse_the_same_values(tmp_path: Path) -> None:
    from scdm.classify.transfer import critical_genes, transfer
    from scdm.demo import run_demo
    from scdm.prompt import prompt

    with pytest.raises(InputDataError, match=r"top=-1: pass a whole number of genes >= 1"):
        critical_genes(tmp_path / "st", "r", top=-1)
    with pytest.raises(InputDataError, match=r"seed=-1: pass a whole number >= 0"):
        critical_genes(tmp_path / "st", "r", seed=-1)
    with pytest.raises(InputDataError, match=r"seed=-1 \(a whole number >= 0\)"):
        transfer(tmp_path / "st", source="a", target="b", seed=-1)
    with pytest.raises(InputDataError, match=r"n_cells=0 \(a whole number >= 1\); folds=1 \(a whole number >= 2\)"):
        run_demo(tmp_path / "st", n_cells=0, folds=1, report_dir=None, progress=False, echo=lambda _: None)
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st" / "artifacts").glob("demo/*"))
    with pytest.raises(InputDataError, match=r"seed=-1 must be an integer >= 0"):
        prompt(tmp_path / "st", ["x"], seed=-1, dry_run=True)


def test_evaluate_folds_names_the_option_not_the_python_argument(store: Path) -> None:
    from scdm.classify.grid import evaluate

    code, _, err = invoke("evaluate", "--scenario", "pooled", "--by", "all", "--folds", "1", "--head", "ridge", "-q",
                          store=store)
    assert code == 2 and "'--folds'" in err and "n_folds" not in err, err
    with pytest.raises(InputDataError, match=r"^--folds 1 must be an integer >= 2"):  # the split builder's own check
        evaluate(store, scenarios=["pooled"], by=["all"], heads=["ridge"], folds=1, silent=True)


def test_num_ctx_help_reads_the_ollama_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import scdm.prompt.ollama

    monkeypatch.setattr(scdm.prompt.ollama, "DEFAULT_NUM_CTX", 12345)
    code, out, _ = invoke("prompt", "--help")
    assert code == 0 and "[default: 12345" in " ".join(out.split()), out


def test_evaluate_warns_of_mlp_profile_and_pair_folds_with_that_nothing_reads(store: Path) -> None:
    base = ("evaluate", "--by", "all", "-q", "--head", "ridge")
    code, _, err = invoke(*base, "--scenario", "pooled", "--folds", "3", "--mlp-profile", "fast", store=store)
    assert code == 0 and "warning: --mlp-profile fast is ignored: no mlp head is asked for (--head ridge)." in err, err
    code, _, err = invoke(*base, "--scenario", "cross", "--pair-folds-with", "Vorinostat", store=store)
    assert code == 0 and "warning: --pair-folds-with Vorinostat is ignored: no pooled split is asked for" in err, err
    code, _, err = invoke(*base, "--scenario", "pooled", "--folds", "3", "--pair-folds-with", "Vorinostat", store=store)
    assert code == 0 and "ignored" not in err, err


def test_prompt_hf_names_the_endpoint_options_it_ignores(tmp_path: Path) -> None:
    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    hf = ("prompt", "--dataset", "x", "--backend", "hf", "--checkpoint", str(folder), "--dry-run")
    code, _, err = invoke(*hf, "--temperature", "0.7", store=tmp_path / "st")
    assert code == 2 and "--backend hf decodes greedily" in err and "--temperature 0.7" in err, err
    _, _, err = invoke(*hf, "--max-tokens", "64", "--no-logprobs", "--response-format", "text", store=tmp_path / "st")
    assert "warning: --backend hf ignores --max-tokens, --response-format, --no-logprobs:" in err, err
    _, _, err = invoke(*hf, "--timeout", "5", "--concurrency", "8", "--base-url", "http://h:8000/v1", "--rpm", "30",
                       store=tmp_path / "st")
    assert "warning: --backend hf ignores --base-url, --timeout, --concurrency: it runs the model in this process" in err, err
    _, _, err = invoke(*hf, store=tmp_path / "st")
    assert "ignores" not in err, err
