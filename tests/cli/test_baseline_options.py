"""Options a baseline (pca, hvg) does not read are refused or named, never silently dropped."""

from __future__ import annotations

import anndata as ad
import pytest
from click.testing import CliRunner

import scdm
from scdm.cli import main
from scdm.store import InputDataError, example_data


def test_a_checkpoint_for_pca_is_refused_and_model_options_are_named(tmp_path):
    store = str(tmp_path / "store")
    runner = CliRunner()
    refused = runner.invoke(main, ["--store", store, "embed", str(example_data()), "--model", "pca", "-c", str(tmp_path)])
    assert refused.exit_code == 2 and "pca is fitted from the data and takes no --checkpoint" in refused.output
    out = runner.invoke(main, ["--store", store, "embed", str(example_data()), "--model", "pca", "--n-comps", "5",
                               "--layer", "-2", "--batch-size", "3", "--param", "version=V2", "-q"])
    assert out.exit_code == 0, out.output
    assert "pca is fitted from the data on the CPU and ignores --batch-size, --layer, --param" in out.output


def test_a_misspelt_baseline_parameter_is_a_clear_error(tmp_path):
    adata = ad.read_h5ad(example_data())
    with pytest.raises(InputDataError, match=r"pca takes the parameters n_comps.*not 'n_comp' \(did you mean 'n_comps'\?\)"):
        scdm.embed(adata, model="pca", store=tmp_path / "store", n_comp=10)


@pytest.mark.parametrize(("given", "named"), [(["--n-comps", "20"], "--n-comps"), (["--n-hvg", "500", "--counts"],
                                                                                    "--n-hvg, --normalized/--counts")])
def test_baseline_options_given_to_a_foundation_model_are_named(tmp_path, given, named):
    # `scdm embed pc9 --model geneformer --n-comps 20` dropped --n-comps without a word (embed(..., n_comps=20) refuses
    # it in Python); it is named before any work, as a baseline names the foundation-model options
    args = ["--store", str(tmp_path / "store"), "embed", "nosuch", "--model", "geneformer"]
    out = CliRunner().invoke(main, [*args, *given])
    assert f"geneformer ignores {named}: options of the pca/hvg baselines" in out.output
    assert out.exit_code == 1 and "Dataset 'nosuch' is not in the store" in out.output  # the warning came first
    assert "ignores" not in CliRunner().invoke(main, args).output


def test_the_python_embed_of_a_baseline_refuses_an_adapter_and_names_unread_options(tmp_path, caplog):
    # `scdm embed a375 --model pca --lora X` is refused and --seed named; runner.embed(..., "pca", lora_dir=X, seed=3)
    # returned the frozen pca embedding without a word
    from scdm.embedding.runner import embed
    from scdm.store import Store

    st = Store(tmp_path / "store")
    st.ingest(example_data(), name="a375", label_key="response_PLX4720")
    with pytest.raises(InputDataError, match="lora_dir applies to foundation models tuned by scdm finetune; pca has no adapter"):
        embed(st, "a375", "pca", lora_dir=tmp_path, n_comps=5, n_hvg=300, progress=False)
    with caplog.at_level("WARNING", logger="scdm.embedding"):
        embed(st, "a375", "pca", seed=3, batch_size=8, n_comps=5, n_hvg=300, progress=False)
    assert "pca is fitted from the data on the CPU and ignores batch_size, seed (foundation-model options)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="scdm.embedding"):
        embed(st, "a375", "pca", n_comps=5, n_hvg=300, progress=False)
    assert "ignores" not in caplog.text
