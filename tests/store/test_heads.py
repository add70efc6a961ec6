"""store.heads: trained-head records and predictions, written and read only through the store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from scdm.store import Store
from scdm.store.errors import InputDataError
from scdm.store.heads import (
    HeadNotFoundError,
    Predictions,
    TrainedHeadRecord,
    add_trained_head,
    has_trained_head,
    replace_predictions,
    set_head_artifact,
    trained_head,
    trained_head_table,
)


def _record(head_id: str = "abcdef0123456789", **changes: object) -> TrainedHeadRecord:
    record = TrainedHeadRecord(
        head_id=head_id, head="ridge", head_params='{"alpha": 1.0, "standardize": true}', space_id="s1", model="pca",
        variant="frozen", checkpoint_hash=None, adapter_hash=None, embedding_params='{"n_comps": 8}', dim=8,
        embedding_ids=("e1", "e2"), datasets=("a", "b"), category_type="all", category="all", n_train=40,
        n_train_pos=18, threshold=0.5, train_metrics=None, fit_seconds=0.01, artifact_format="json-npz",
        path=f"artifacts/heads/{head_id}/head.npz", file_hash="0" * 32, scdm_version="1.0", label_set="drugX",
    )
    return dataclasses.replace(record, **changes)


def test_a_record_round_trips_and_is_found_by_prefix(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    add_trained_head(st, _record())
    add_trained_head(st, _record("abcdef9999999999"))
    got = trained_head(st, "abcdef0123456789")
    assert dataclasses.replace(got, created_at=None) == _record()
    assert got.params == {"alpha": 1.0, "standardize": True} and not got.is_legacy
    assert trained_head(st, "abcdef01").head_id == "abcdef0123456789"
    with pytest.raises(HeadNotFoundError, match="matches several"):
        trained_head(st, "abcdef")
    with pytest.raises(HeadNotFoundError, match="does not exist"):
        trained_head(st, "ffffff")
    assert has_trained_head(st, "abcdef0123456789") and not has_trained_head(st, "abcdef01")
    assert len(trained_head_table(st)) == 2


def test_only_safe_artifact_formats_are_written(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    with pytest.raises(InputDataError, match="'joblib' is not one scdm writes"):
        add_trained_head(st, _record(artifact_format="joblib"))
    add_trained_head(st, _record())
    with pytest.raises(InputDataError, match="'torch' is not one scdm writes"):
        set_head_artifact(st, "abcdef0123456789", artifact_format="torch", path="x", file_hash="1", scdm_version="2")
    set_head_artifact(st, "abcdef0123456789", artifact_format="safetensors", path="p/head.safetensors", file_hash="1",
                      scdm_version="2")
    got = trained_head(st, "abcdef0123456789")
    assert (got.artifact_format, got.path, got.file_hash, got.scdm_version, got.fit_seconds) == (
        "safetensors", "p/head.safetensors", "1", "2", 0.01)


def test_predictions_keep_their_float64_probabilities(tmp_path: Path) -> None:
    """predictions.proba was REAL: 1 - 1e-9 and 1 - 1e-12 were both stored as 1.0 beside labels 1 and 0."""
    st = Store(tmp_path / "store")
    proba = np.array([1 - 1e-9, 1 - 1e-12, 0.7, np.nextafter(0.5, 0)])
    replace_predictions(st, Predictions("h1", "d1", "e1", np.arange(4), proba, (proba >= 1 - 1e-10).astype(np.int8)))
    rows = st.query('SELECT proba, label FROM predictions ORDER BY "row"')
    assert rows["proba"].dtype == np.float64
    np.testing.assert_array_equal(rows["proba"].to_numpy(), proba)  # exactly


def test_predictions_replace_the_heads_earlier_ones_on_that_dataset(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    first = Predictions("h1", "d1", "e1", np.arange(5), np.linspace(0, 1, 5), np.array([0, 0, 1, 1, 1]))
    replace_predictions(st, first)
    replace_predictions(st, Predictions("h1", "d2", "e9", np.arange(2), np.zeros(2), np.zeros(2)))
    replace_predictions(st, dataclasses.replace(first, rows=np.arange(3), proba=np.ones(3), label=np.ones(3)))
    rows = st.query('SELECT dataset_id, "row", proba, label FROM predictions ORDER BY dataset_id, "row"')
    assert rows["dataset_id"].tolist() == ["d1"] * 3 + ["d2"] * 2
    assert rows["proba"].tolist()[:3] == [1.0, 1.0, 1.0]
    with pytest.raises(InputDataError, match="one proba and one label per row"):
        replace_predictions(st, Predictions("h1", "d1", "e1", np.arange(3), np.ones(2), np.ones(3)))
    assert len(st.query("SELECT * FROM predictions WHERE dataset_id = 'd1'")) == 3  # the failed write changed nothing
