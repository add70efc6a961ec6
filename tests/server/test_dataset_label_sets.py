"""/api/datasets names the label set its counts come from and gives every label set's counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata as ad
from click.testing import CliRunner

from scdm.cli import main
from scdm.store import Store, example_data


def test_a_dataset_with_two_label_sets_names_each_and_its_counts(tmp_path: Path) -> None:
    """A375 with PLX4720 labels (default, 108 labelled) and a second label set leaving 30 cells unknown (78
    labelled): /api/datasets gave 108/… with no name, so the second label set's counts were nowhere and the
    numbers read as the dataset's whatever label set one meant."""
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    adata = ad.read_h5ad(example_data("A375"))
    other = adata.obs["response_PLX4720"].astype(object)
    other.iloc[:30] = None
    adata.obs["response_other"] = other.astype("category")
    path = tmp_path / "a375.h5ad"
    adata.write_h5ad(path)
    st = Store(tmp_path / "store")
    st.ingest(path, name="A375", label_key="response_PLX4720", drug="PLX4720", sample_key="condition")
    st.ingest(path, label_key="response_other", drug="Other")
    expected = {r["name"]: (r["n_labelled"], r["n_sensitive"], r["is_default"]) for r in st.label_sets().to_dict("records")}
    assert expected["PLX4720"][0] == 108 and expected["Other"][0] == 78  # otherwise the test tells nothing
    with TestClient(create_app(Store(st.root), token=None), base_url="http://127.0.0.1:8000") as client:
        (row,) = client.get("/api/datasets").json()
    # the keys of before stay, and say which label set they count
    assert row["label_set"] == "PLX4720"
    assert (row["n_labelled"], row["n_sensitive"]) == expected["PLX4720"][:2]
    got: dict[str, Any] = {ls["name"]: (ls["n_labelled"], ls["n_sensitive"], ls["is_default"]) for ls in row["label_sets"]}
    assert got == expected
    assert [ls["drug"] for ls in row["label_sets"]] == ["PLX4720", "Other"]  # default first
    # scdm ls names it too
    shown = CliRunner().invoke(main, ["--store", str(st.root), "ls", "--what", "datasets", "--format", "json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)[0]["label_set"] == "PLX4720"


def test_an_unlabelled_dataset_has_no_label_set(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    st = Store(tmp_path / "store")
    st.ingest(example_data("A375"), name="A375")
    with TestClient(create_app(Store(st.root), token=None), base_url="http://127.0.0.1:8000") as client:
        (row,) = client.get("/api/datasets").json()
    assert row["label_set"] is None and row["label_sets"] == [] and row["n_labelled"] == 0
