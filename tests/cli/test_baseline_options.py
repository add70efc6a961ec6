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
