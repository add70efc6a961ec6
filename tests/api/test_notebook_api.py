"""`import scdm`: AnnData in, obsm and numeric DataFrames out, cached in a store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from sklearn.neighbors import NearestNeighbors

import scdm
from scdm.store import Store
from scdm.store.errors import InputDataError

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def pc9(pc9_counts_path: Path) -> ad.AnnData:
    return ad.read_h5ad(pc9_counts_path)


def test_embed_writes_obsm_and_neighbors_use_it(pc9: ad.AnnData, tmp_path: Path) -> None:
    matrix = scdm.embed(pc9, model="pca", store=tmp_path / "st", n_comps=20, progress=False)

    assert matrix.shape == (pc9.n_obs, 20) and matrix.dtype == np.float32
    assert pc9.obsm["X_pca"] is matrix
    record = pc9.uns["scdm"]["X_pca"]
    assert record["cached"] is False and record["model"] == "pca"
    stored = Store(tmp_path / "st").read_embedding(record["embedding_id"])
    np.testing.assert_array_equal(stored, matrix)  # rows in the AnnData's order

    sc.pp.neighbors(pc9, use_rep="X_pca", n_neighbors=10, random_state=0)
    direct = NearestNeighbors(n_neighbors=10).fit(matrix).kneighbors(matrix, return_distance=False)
    graph = pc9.obsp["distances"].tolil()
    agree = np.mean([set(direct[i][1:]) <= set(graph.rows[i]) | {i} for i in range(pc9.n_obs)])
    assert agree > 0.95  # scanpy's neighbours were computed on the scdm matrix


def test_embedding_again_is_a_cache_hit_even_for_a_copy(pc9: ad.AnnData, tmp_path: Path) -> None:
    first = scdm.embed(pc9, model="pca", store=tmp_path / "st", n_comps=10, progress=False)
    again = pc9.copy()
    del again.obsm["X_pca"], again.uns["scdm"]
    second = scdm.embed(again, model="pca", store=tmp_path / "st", n_comps=10, key_added="X_again", progress=False)

    np.testing.assert_array_equal(first, second)
    assert again.uns["scdm"]["X_again"]["cached"] is True
    assert len(Store(tmp_path / "st").embeddings()) == 1


def test_anonymous_datasets_get_content_names_and_never_collide(pc9: ad.AnnData, tmp_path: Path) -> None:
    scdm.embed(pc9, model="pca", store=tmp_path / "st", n_comps=5, progress=False)
    half = pc9[:150].copy()
    scdm.embed(half, model="pca", store=tmp_path / "st", n_comps=5, progress=False)

    names = sorted(Store(tmp_path / "st").datasets()["name"])
    assert len(names) == 2 and all(n.startswith("dataset-") for n in names)
    assert pc9.uns["scdm"]["X_pca"]["dataset"] != half.uns["scdm"]["X_pca"]["dataset"]


def test_default_store_is_scdm_store_env_else_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SCDM_STORE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert scdm.default_store_path() == tmp_path / "cache" / "scdm" / "store"
    monkeypatch.setenv("SCDM_STORE", str(tmp_path / "mine"))
    assert scdm.open_store().root == tmp_path / "mine"


def test_evaluate_and_results_return_numeric_frames(tmp_path: Path) -> None:
    jhu = ad.read_h5ad(DATA / "JHU006_HNSCC_Kinker2020.h5ad")
    jhu.obs["sample"] = [f"s{i % 6}" for i in range(jhu.n_obs)]  # six samples, both classes in each
    scdm.embed(jhu, model="pca", store=tmp_path / "st", n_comps=10, progress=False,
               ingest={"label_key": "response_Gefitinib", "sample_key": "sample"})

    board = scdm.evaluate(jhu, heads=["logreg", "majority"], folds=3, progress=False)

    assert set(board["head"]) == {"logreg", "majority"} and len(board) == 2
    for metric in ("auroc", "ap", "f1", "accuracy"):
        assert pd.api.types.is_float_dtype(board[metric]) and pd.api.types.is_float_dtype(board[f"{metric}_sd"])
        assert pd.api.types.is_integer_dtype(board[f"{metric}_n"])
    logreg = board.set_index("head").loc["logreg"]
    assert 0.5 < logreg["auroc"] <= 1.0 and logreg["auroc_n"] == 3
    assert set(board["scheme"]) == {"sample"}  # every cell has a sample id: grouped folds by default

    everything = scdm.results(tmp_path / "st")
    assert len(everything) == 2 and pd.api.types.is_float_dtype(everything["auroc"])
    long = scdm.results(tmp_path / "st", long=True, metrics=["auroc"])
    assert set(long["metric"]) == {"auroc"} and {"mean", "sd", "n_folds"} <= set(long.columns)

    # one name as a plain string is that name, not its letters (was: 'Unknown head 'm'', and 0 rows for models="pca")
    again = scdm.evaluate(jhu, heads="majority", scenarios="pooled", by="all", folds=3, metrics="auroc", progress=False)
    assert list(again["head"]) == ["majority"] and "auroc" in again.columns and "ap" not in again.columns
    assert len(scdm.results(tmp_path / "st", models="pca", heads="logreg")) == 1


def test_evaluate_names_what_is_missing(pc9: ad.AnnData, tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match=r"scdm.embed\(adata"):
        scdm.evaluate(pc9, store=tmp_path / "st")
    with pytest.raises(InputDataError, match="takes no checkpoint"):
        scdm.embed(pc9, model="pca", checkpoint="some/model", store=tmp_path / "st", progress=False)


def test_evaluate_refuses_an_anndata_subset_after_embed(tmp_path: Path) -> None:
    """adata[mask].copy() keeps uns["scdm"]: a 22-cell subset was scored as its 66-cell dataset, under no warning."""
    jhu = ad.read_h5ad(DATA / "JHU006_HNSCC_Kinker2020.h5ad")
    jhu.obs["sample"] = [f"s{i % 6}" for i in range(jhu.n_obs)]
    scdm.embed(jhu, model="pca", store=tmp_path / "st", n_comps=10, progress=False,
               ingest={"label_key": "response_Gefitinib", "sample_key": "sample"})
    subset = jhu[: jhu.n_obs // 3].copy()
    with pytest.raises(InputDataError, match=r"22 cells.*66 cells.*scdm.embed\(adata"):
        scdm.evaluate(subset, heads=["majority"], folds=3, progress=False)
    shuffled = jhu[np.random.default_rng(0).permutation(jhu.n_obs)].copy()  # the same cells: its dataset's scores
    assert len(scdm.evaluate(shuffled, heads=["majority"], folds=3, progress=False)) == 1


def test_results_refuses_misspelled_filters_instead_of_an_empty_frame(tmp_path: Path) -> None:
    """scheme="samples" matched nothing (an empty table reads as "no results"); model="pca" was a TypeError."""
    with pytest.raises(InputDataError, match="did you mean 'models'"):
        scdm.results(tmp_path / "st", model="pca")
    for filters in ({"scheme": "samples"}, {"scenarios": "poled"}, {"category_types": ["tisue"]}):
        with pytest.raises(InputDataError, match="choose from"):
            scdm.results(tmp_path / "st", **filters)
    assert scdm.results(tmp_path / "st", scheme="sample", scenarios="pooled", category_types=["all"]).empty


def test_evaluate_names_the_stores_when_embeddings_are_in_several(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It read the default store instead: 'Dataset ... is not in the store. Datasets: (none)'."""
    monkeypatch.setenv("SCDM_STORE", str(tmp_path / "default"))
    jhu = ad.read_h5ad(DATA / "JHU006_HNSCC_Kinker2020.h5ad")
    scdm.embed(jhu, model="pca", store=tmp_path / "a", n_comps=5, progress=False)
    scdm.embed(jhu, model="hvg", store=tmp_path / "b", progress=False)
    with pytest.raises(InputDataError, match=r"several stores.*X_pca.*X_hvg.*Pass store="):
        scdm.evaluate(jhu, heads=["majority"], folds=3, progress=False)


def test_import_scdm_is_light() -> None:
    code = "import sys, scdm; heavy = {'torch', 'duckdb', 'anndata', 'scdm.store'} & set(sys.modules); assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_readme_notebook_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in readme.split("```python\n")[1:] if "import scdm" in b).split("```")[0]
    monkeypatch.setenv("SCDM_STORE", str(tmp_path / "st"))
    monkeypatch.setenv("SCDM_PROGRESS", "0")
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)
    board = namespace["board"]
    assert isinstance(board, pd.DataFrame) and set(board["head"]) == {"logreg", "ridge"}
    assert pd.api.types.is_float_dtype(board["auroc"])
    assert "connectivities" in namespace["adata"].obsp  # type: ignore[attr-defined]


def test_every_command_has_its_python_call_listed_and_the_calls_exist() -> None:
    import importlib
    import re

    import scdm.api
    from scdm.cli import main

    doc = scdm.api.__doc__ or ""
    listed = dict(re.findall(r"^``([a-z-]+)``\s+(.+)$", doc, flags=re.MULTILINE))
    assert set(listed) == set(main.commands), "scdm.api's table of commands is out of date"
    for dotted in re.findall(r"``((?:scdm|st)\.[A-Za-z_.]+)\(", doc):
        owner, _, attr = dotted.rpartition(".")
        if owner == "st":
            assert hasattr(Store, attr), dotted
            continue
        try:
            target = importlib.import_module(owner)
        except ModuleNotFoundError:  # a function of a module: scdm.classify.transfer.critical_genes
            target = importlib.import_module(owner.rpartition(".")[0])
            target = getattr(target, owner.rpartition(".")[2])
        assert callable(getattr(target, attr)), dotted
