"""Trained heads: fit on all labelled cells of a category, save with a hash, predict later."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdm.classify.grid import evaluate
from scdm.classify.heads import get_head
from scdm.classify.trained_heads import (
    HeadArtifactError,
    SpaceMismatchError,
    load_head,
    predict,
    train_head,
    trained_heads,
)
from scdm.store import Store, example_data
from scdm.store.errors import EmbeddingNotFoundError, InputDataError


def _scores(adata: ad.AnnData, dim: int) -> np.ndarray:
    x = np.asarray(adata.X, dtype=np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return (x @ vt[:dim].T).astype(np.float32)


def write_embedding(st: Store, name: str, values: np.ndarray, *, model: str = "pca-test", params: dict | None = None) -> str:
    emb = st.create_embedding(name, model=model, params=params or {"n_components": values.shape[1]}, dim=values.shape[1])
    for chunk in range(emb.n_chunks):
        lo, hi = emb.chunk_bounds(chunk)
        emb.write_chunk(chunk, values[lo:hi])
    emb.finalize()
    return emb.embedding_id


def a375_store(path: Path) -> Store:
    """A store holding the bundled A375 cells as dataset a375, with their metadata."""
    store = Store(path)
    store.ingest(ad.read_h5ad(example_data("A375")), name="a375", label_key="response_PLX4720", study="GSE108383",
                 tissue="skin", cancer_type="melanoma", drug_type="targeted", regimen="PLX4720")
    return store


@pytest.fixture()
def st(tmp_path: Path) -> Store:
    return a375_store(tmp_path / "store")


@pytest.fixture()
def a375_values() -> np.ndarray:
    return _scores(ad.read_h5ad(example_data("A375")), 8)


def test_train_saves_artifact_and_catalog_row_and_predict_matches_direct_fit(st: Store, a375_values: np.ndarray, tmp_path: Path) -> None:
    emb_id = write_embedding(st, "a375", a375_values)
    head_id = train_head(st, dataset="a375", model="pca-test", head="ridge", alpha=2.0)
    row = trained_heads(st).set_index("head_id").loc[head_id]
    assert row["head"] == "ridge" and json.loads(row["head_params"]) == {"alpha": 2.0, "standardize": "global"}
    assert row["model"] == "pca-test" and row["variant"] == "frozen" and json.loads(row["embedding_ids"]) == [emb_id]
    assert row["n_train"] == 108 and row["n_train_pos"] == 62 and row["dim"] == 8
    assert (st.root / row["path"]).is_file() and row["path"].startswith(f"artifacts/heads/{head_id}/")
    assert (st.root / "artifacts" / "heads" / head_id / "head.json").is_file()
    assert pd.isna(row["train_metrics"])  # no evaluation of this configuration yet

    frame = predict(st, head_id, "a375", out=tmp_path / "pred.csv")
    y = st.cells(["a375"]).sort_values("row")["response"].to_numpy(np.int64)
    expected = get_head("ridge", alpha=2.0).fit(a375_values, y).proba_sensitive(a375_values)
    np.testing.assert_allclose(frame["proba"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    assert (frame["label"].to_numpy() == (expected >= 0.5)).all()
    stored = st.query("SELECT * FROM predictions WHERE head_id = ? ORDER BY row", [head_id])
    assert len(stored) == 108 and (stored["embedding_id"] == emb_id).all()
    np.testing.assert_allclose(stored["proba"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    csv = pd.read_csv(tmp_path / "pred.csv")
    assert list(csv["cell_id"]) == list(frame["cell_id"]) and len(csv) == 108
    # predicting again replaces the rows instead of duplicating them
    predict(st, head_id, "a375")
    assert len(st.query("SELECT * FROM predictions WHERE head_id = ?", [head_id])) == 108
    # training the same configuration again is a no-op
    assert train_head(st, [emb_id], head="ridge", alpha=2.0) == head_id
    assert len(trained_heads(st)) == 1


def test_stored_labels_follow_the_stored_probabilities_at_the_threshold(st: Store, a375_values: np.ndarray,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.5 - 1e-9 is below the threshold in float64 but was 0.5 once stored as REAL (and labelled 1 from
    # that): the stored label must be the one the stored (and returned) probability gives
    write_embedding(st, "a375", a375_values)
    head_id = train_head(st, dataset="a375", model="pca-test", head="ridge")
    below = np.full(108, 0.5 - 1e-9)
    below[::2] = 0.25
    monkeypatch.setattr(type(get_head("ridge")), "proba_sensitive", lambda self, X: below[: len(X)])
    frame = predict(st, head_id, "a375")
    assert frame["proba"].dtype == np.float64
    assert (frame["label"] == (frame["proba"] >= 0.5)).all() and frame["label"].sum() == 0  # as REAL: 54
    stored = st.query("SELECT proba, label FROM predictions WHERE head_id = ? ORDER BY row", [head_id])
    assert (stored["proba"].to_numpy() == below).all()
    assert (stored["label"] == (stored["proba"].astype(np.float64) >= 0.5)).all()


def test_predict_returns_and_stores_the_float64_probabilities_float32_would_round_to_one(
        st: Store, a375_values: np.ndarray, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Probabilities between 1 - 6e-8 and 1 (a logit past ~16.6) were rounded to float32 before labelling and
    stored as REAL: all read 1.0, every cell was sensitive at a threshold of 1 - 1e-12, and the ranking was gone."""
    write_embedding(st, "a375", a375_values)
    threshold = 1.0 - 1e-12
    head_id = train_head(st, dataset="a375", model="pca-test", head="ridge", threshold=threshold)
    near_one = 1.0 - 10.0 ** -np.linspace(8.0, 15.0, 108)  # distinct in float64, all 1.0 in float32
    assert (near_one.astype(np.float32) == 1.0).all() and len(np.unique(near_one)) == 108
    monkeypatch.setattr(type(get_head("ridge")), "proba_sensitive", lambda self, X: near_one[: len(X)])
    frame = predict(st, head_id, "a375", out=tmp_path / "pred.csv")
    assert frame["proba"].dtype == np.float64
    np.testing.assert_array_equal(frame["proba"].to_numpy(), near_one)
    np.testing.assert_array_equal(frame["label"].to_numpy(), (near_one >= threshold).astype(np.int8))
    assert 0 < frame["label"].sum() < 108  # all 108 from the float32 values
    stored = st.query("SELECT proba, label FROM predictions WHERE head_id = ? ORDER BY row", [head_id])
    assert stored["proba"].dtype == np.float64
    np.testing.assert_array_equal(stored["proba"].to_numpy(), near_one)
    np.testing.assert_array_equal(stored["label"].to_numpy(), (stored["proba"].to_numpy() >= threshold).astype(np.int8))
    written = pd.read_csv(tmp_path / "pred.csv", float_precision="round_trip").sort_values("row")
    np.testing.assert_array_equal(written["proba"].to_numpy(), near_one)


def test_mlp_round_trips_through_safetensors(st: Store, a375_values: np.ndarray, tmp_path: Path) -> None:
    write_embedding(st, "a375", a375_values)
    params = {"hidden": 16, "epochs": 3, "batch_size": 32, "min_steps": 10}
    head_id = train_head(st, dataset="a375", model="pca-test", head="mlp", **params)
    row = trained_heads(st).iloc[0]
    assert row["artifact_format"] == "safetensors" and row["path"].endswith("head.safetensors")
    y = st.cells(["a375"]).sort_values("row")["response"].to_numpy(np.int64)
    direct = get_head("mlp", **params).fit(a375_values, y).proba_sensitive(a375_values)
    frame = predict(st, head_id, "a375", out=tmp_path / "copy.h5ad")
    np.testing.assert_allclose(frame["proba"].to_numpy(), direct, rtol=1e-4, atol=1e-5)
    copy = ad.read_h5ad(tmp_path / "copy.h5ad")
    np.testing.assert_allclose(copy.obs["scdm_proba"].to_numpy(), direct, rtol=1e-4, atol=1e-5)
    assert copy.uns["scdm_prediction"]["head_id"] == head_id
    assert set(copy.obs["scdm_label"].unique()) <= {0, 1}
    stored = [c for c in copy.obs.columns if c.startswith("scdm_response_")]  # the store's labels, named as such
    assert len(stored) == 1 and (copy.obs[stored[0]] == "sensitive").sum() == int(y.sum())


def test_training_metrics_copied_from_evaluation_of_same_configuration(st: Store, a375_values: np.ndarray) -> None:
    write_embedding(st, "a375", a375_values)
    evaluate(st, scenarios=["pooled"], by=["all"], heads=["logreg"], folds=3, silent=True,
             head_params={"logreg": {"C": 0.5}})
    head_id = train_head(st, dataset="a375", model="pca-test", head="logreg", C=0.5)
    metrics = json.loads(trained_heads(st).iloc[0]["train_metrics"])
    auroc = [m for m in metrics if m["metric"] == "auroc"]
    assert len(auroc) == 1 and auroc[0]["scenario"] == "pooled" and auroc[0]["n_folds"] == 3
    expected = st.query("SELECT avg(value) AS v FROM eval_results WHERE metric = 'auroc'")["v"].iloc[0]
    assert auroc[0]["mean"] == pytest.approx(expected)
    # another parameter setting did not run in the grid: no metrics
    train_head(st, dataset="a375", model="pca-test", head="logreg", C=2.0)
    rows = trained_heads(st).set_index("head_id")
    assert rows.loc[head_id, "train_metrics"] is not None and rows.drop(head_id)["train_metrics"].isna().all()


JHU006 = Path(__file__).resolve().parents[1] / "data" / "JHU006_HNSCC_Kinker2020.h5ad"


def _split_means(st: Store, head: str, metric: str) -> dict[str, float]:
    frame = st.query("SELECT split_id, avg(value) AS v FROM eval_results WHERE head = ? AND metric = ? GROUP BY split_id",
                     [head, metric])
    return dict(zip(frame["split_id"], frame["v"]))


def test_training_metrics_come_only_from_splits_of_the_training_cells_one_entry_per_split(
        st: Store, a375_values: np.ndarray) -> None:
    st.ingest(JHU006, name="jhu006", label_key="response_Gefitinib", drug="Gefitinib", study="Kinker2020",
              tissue="head and neck", cancer_type="HNSCC", drug_type="targeted", regimen="EGFR inhibitor")
    a375 = write_embedding(st, "a375", a375_values)
    jhu = write_embedding(st, "jhu006", _scores(ad.read_h5ad(JHU006), 8))
    common = {"by": ["all"], "heads": ["ridge"], "silent": True}
    evaluate(st, [a375, jhu], scenarios=["pooled"], folds=5, **common)
    evaluate(st, [a375, jhu], scenarios=["pooled"], folds=3, **common)
    evaluate(st, [a375, jhu], scenarios=["cross"], **common)
    evaluate(st, [a375], scenarios=["pooled"], folds=3, **common)
    st.ingest(JHU006, label_key="response_Vorinostat", drug="Vorinostat")  # a second label set of the same cells
    evaluate(st, [jhu], scenarios=["pooled"], folds=3, label_set="Vorinostat", **common)
    evaluate(st, [jhu], scenarios=["pooled"], folds=3, **common)
    means = _split_means(st, "ridge", "auroc")
    splits = st.query("SELECT split_id, scenario, n_folds, datasets, label_set FROM splits").set_index("split_id")

    def auroc_entries(head_id: str) -> list[dict]:
        row = trained_heads(st).set_index("head_id").loc[head_id]
        return [m for m in json.loads(row["train_metrics"]) if m["metric"] == "auroc"]

    # a head on A375 alone: only the A375-only split, none of the pooled-with-JHU006 ones
    (only,) = auroc_entries(train_head(st, [a375], head="ridge"))
    assert splits.loc[only["split_id"], "datasets"] == "a375"
    assert (only["scenario"], only["scheme"], only["k"], only["seed"], only["n_folds"]) == ("pooled", "cell", 3, 0, 3)
    assert only["mean"] == pytest.approx(means[only["split_id"]])
    # a head on both: one entry per split of both datasets (5 folds, 3 folds, leave-one-study-out), never averaged
    both = auroc_entries(train_head(st, [a375, jhu], head="ridge"))
    assert sorted((m["scenario"], m["k"]) for m in both) == [("cross", 2), ("pooled", 3), ("pooled", 5)]
    assert len({m["split_id"] for m in both}) == 3
    assert all(splits.loc[m["split_id"], "datasets"] == "a375,jhu006" for m in both)
    for m in both:
        assert m["mean"] == pytest.approx(means[m["split_id"]])
    assert next(m for m in both if m["scenario"] == "cross")["seed"] is None
    # a head on JHU006's default labels (Gefitinib): the Vorinostat split of the same cells is left out
    (gef,) = auroc_entries(train_head(st, [jhu], head="ridge"))
    assert splits.loc[gef["split_id"], "label_set"] == "Gefitinib" and gef["mean"] == pytest.approx(means[gef["split_id"]])


def test_tampered_artifact_is_refused(st: Store, a375_values: np.ndarray) -> None:
    write_embedding(st, "a375", a375_values)
    head_id = train_head(st, dataset="a375", model="pca-test", head="logreg")
    path = st.root / trained_heads(st).iloc[0]["path"]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(HeadArtifactError, match="hash .* but the catalog recorded"):
        load_head(st, head_id)
    path.unlink()
    with pytest.raises(HeadArtifactError, match="missing"):
        predict(st, head_id, "a375")


def test_predict_refuses_dataset_of_another_model_or_space(st: Store, a375_values: np.ndarray) -> None:
    write_embedding(st, "a375", a375_values)
    head_id = train_head(st, dataset="a375", model="pca-test", head="ridge")
    other = ad.read_h5ad(example_data("A375"))[:40].copy()
    st.ingest(other, name="batch2", label_key="response_PLX4720", study="GSE108383")
    with pytest.raises(EmbeddingNotFoundError, match="has no embedding.*scdm embed batch2 --model pca-test"):
        predict(st, head_id, "batch2")
    write_embedding(st, "batch2", a375_values[:40], model="hvg-test")
    with pytest.raises(SpaceMismatchError, match="embedded as hvg-test .*expects pca-test"):
        predict(st, head_id, "batch2")
    write_embedding(st, "batch2", a375_values[:40], params={"n_components": 8, "fit_datasets": ["batch2"]})
    with pytest.raises(SpaceMismatchError, match="same model but other parameters"):
        predict(st, head_id, "batch2")
    # the same space (same model and params) is accepted
    write_embedding(st, "batch2", a375_values[:40])
    frame = predict(st, head_id, "batch2")
    assert len(frame) == 40


def test_bad_requests_have_clear_errors(st: Store, a375_values: np.ndarray) -> None:
    write_embedding(st, "a375", a375_values)
    with pytest.raises(InputDataError, match="cannot be trained for later use"):
        train_head(st, dataset="a375", model="pca-test", head="shuffled-label")
    with pytest.raises(InputDataError, match="categories present: skin"):
        train_head(st, dataset="a375", model="pca-test", category_type="tissue", category="lung")
    with pytest.raises(InputDataError, match="Unknown category type"):
        train_head(st, dataset="a375", model="pca-test", category_type="organ", category="skin")
    with pytest.raises(InputDataError, match="pass embeddings"):
        train_head(st, head="ridge")
    head_id = train_head(st, dataset="a375", model="pca-test", category_type="tissue", category="skin", head="ridge")
    with pytest.raises(InputDataError, match=r"\.csv or \.h5ad"):
        predict(st, head_id, "a375", out="pred.parquet")


def test_relabelled_cells_train_a_head_of_their_own(st: Store, a375_values: np.ndarray, tmp_path: Path) -> None:
    write_embedding(st, "a375", a375_values)
    first = train_head(st, dataset="a375", model="pca-test", head="logreg")
    adata = ad.read_h5ad(example_data("A375"))
    flipped = adata.obs["response_PLX4720"].astype(str).map({"sensitive": "resistant", "resistant": "sensitive"})
    adata.obs["response_PLX4720"] = flipped.to_numpy()
    st.ingest(adata, label_key="response_PLX4720", update=True)  # the labels were inverted: corrected
    second = train_head(st, dataset="a375", model="pca-test", head="logreg")
    assert second != first  # never the head fitted on the old labels
    row = trained_heads(st).set_index("head_id").loc[second]
    assert row["n_train_pos"] == 46
    y = st.cells(["a375"]).sort_values("row")["response"].to_numpy(np.int64)
    proba = predict(st, second, "a375")["proba"].to_numpy()
    assert ((proba >= 0.5) == y).mean() > 0.9  # fitted on the current labels


def test_predictions_mark_the_cells_the_head_was_fitted_on(st: Store, a375_values: np.ndarray, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Predictions on a head's own training cells are fitted values: marked, and a warning says how many."""
    write_embedding(st, "a375", a375_values)
    later = ad.read_h5ad(example_data("A375"))[:50].copy()
    later.obs_names = [f"later-{c}" for c in later.obs_names]  # other cells (a copy of training cells is tested below)
    st.ingest(later, name="later", label_key="response_PLX4720", study="later")
    write_embedding(st, "later", a375_values[:50])
    head_id = train_head(st, dataset="a375", model="pca-test", head="ridge")
    with caplog.at_level("WARNING", logger="scdm.classify.trained_heads"):
        own = predict(st, head_id, "a375", out=tmp_path / "own.csv")
    assert own["trained_on"].all() and "108 of the 108 cells of a375 trained head" in caplog.text
    # the advice names a command that exists (there is no `scdm heads`)
    assert f"scdm sql \"SELECT train_metrics FROM trained_heads WHERE head_id = '{head_id}'\"" in caplog.text
    assert pd.read_csv(tmp_path / "own.csv")["trained_on"].all()
    caplog.clear()
    with caplog.at_level("WARNING", logger="scdm.classify.trained_heads"):
        new = predict(st, head_id, "later")
    assert not new["trained_on"].any() and "trained head" not in caplog.text


def test_training_cells_ingested_again_under_another_name_are_marked_trained_on(
        st: Store, a375_values: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    # 50 training cells of a375 ingested again as "copy" (same cell ids, same values; a subset is another
    # dataset) were scored held-out: trained_on all False, no warning
    adata = ad.read_h5ad(example_data("A375"))
    write_embedding(st, "a375", a375_values)
    head_id = train_head(st, dataset="a375", model="pca-test", head="ridge")
    copy = adata[:50].copy()
    copy.X[:10] = copy.X[:10] * 2 + 1  # 10 cells keep their ids but not their values: other cells (reused barcodes)
    st.ingest(copy, name="copy", label_key="response_PLX4720", study="copy")
    write_embedding(st, "copy", a375_values[:50])
    with caplog.at_level("WARNING", logger="scdm.classify.trained_heads"):
        frame = predict(st, head_id, "copy")
    assert frame["trained_on"].tolist() == [False] * 10 + [True] * 40
    assert "40 of the 50 cells of copy have the cell id and the expression values of a cell that trained head" in caplog.text


def test_a_head_whose_training_labels_changed_claims_none_of_its_cells_held_out(
        st: Store, a375_values: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    # trained_on followed today's labels: after 20 training cells became unknown, the old head's
    # predictions on them were marked held-out although it had been fitted on them
    write_embedding(st, "a375", a375_values)
    head_id = train_head(st, dataset="a375", model="pca-test", head="logreg")
    adata = ad.read_h5ad(example_data("A375"))
    labels = adata.obs["response_PLX4720"].astype(object).to_numpy()
    labels[:20] = None  # no label
    adata.obs["response_PLX4720"] = labels
    st.ingest(adata, label_key="response_PLX4720", update=True)
    assert st.cells(["a375"])["response"].notna().sum() == 88
    with caplog.at_level("WARNING", logger="scdm.classify.trained_heads"):
        frame = predict(st, head_id, "a375")
    assert frame["trained_on"].all() and "changed since it was fitted" in caplog.text


def test_a_baseline_heads_refusal_gives_the_joint_fit_that_predicts(tmp_path: Path) -> None:
    """pca fitted on a new dataset alone is never the head's space: the advice is the joint fit, and it works."""
    import re
    import shlex

    from scdm.embedding.runner import embed_baseline

    st = Store(tmp_path / "store")
    cells = ad.read_h5ad(example_data("A375"))
    st.ingest(cells[:70].copy(), name="train", label_key="response_PLX4720", study="GSE108383")
    new = cells[70:].copy()
    st.ingest(new, name="new", study="GSE108383")
    (space,) = embed_baseline(st, ["train"], model="pca", n_comps=4, progress=False)
    head_id = train_head(st, [space.embedding_id], head="ridge")
    with pytest.raises(EmbeddingNotFoundError, match="embedding 'new' alone makes another space") as refused:
        predict(st, head_id, "new")
    command = re.search(r"\(`scdm embed (.*?)`\)", str(refused.value))
    assert command is not None and command.group(1) == "train new --model pca --joint --n-comps 4 --n-hvg 2000"
    embed_baseline(st, ["new"], model="pca", n_comps=4, progress=False)  # what the old advice said: another space
    with pytest.raises(SpaceMismatchError, match=re.escape(command.group(0))):
        predict(st, head_id, "new")
    words = shlex.split(command.group(1))
    joint = embed_baseline(st, words[:2], model="pca", n_comps=4, n_hvg=2000, progress=False)
    again = train_head(st, [joint[0].embedding_id], head="ridge")
    assert len(predict(st, again, "new")) == new.n_obs


def test_predictions_show_the_labels_of_the_label_set_the_head_learned(st: Store, a375_values: np.ndarray,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A dataset whose default label set is another drug's shows the head's drug beside its predictions."""
    write_embedding(st, "a375", a375_values)
    later = ad.read_h5ad(example_data("A375"))[:50].copy()
    flipped = later.obs["response_PLX4720"].astype(str).map({"sensitive": "resistant", "resistant": "sensitive"})
    later.obs["response_other"] = flipped.to_numpy()
    st.ingest(later, name="later", label_key="response_other", drug="other", study="later")  # default: another drug
    st.ingest(later, name="later", label_key="response_PLX4720")
    write_embedding(st, "later", a375_values[:50])
    head_id = train_head(st, dataset="a375", model="pca-test", head="ridge")
    frame = predict(st, head_id, "later")
    truth = later.obs["response_PLX4720"].astype(str).eq("sensitive").to_numpy()
    assert (frame["label_set"] == "response_PLX4720").all()
    assert (frame["response"].to_numpy(np.int64) == truth).all()  # the default set would be inverted
    st.ingest(ad.read_h5ad(example_data("A375"))[:20].copy(), name="other_only", label_key="response_PLX4720",
              drug="other", study="x")
    write_embedding(st, "other_only", a375_values[:20])
    with caplog.at_level("WARNING", logger="scdm.classify.trained_heads"):
        frame = predict(st, head_id, "other_only")
    assert (frame["label_set"] == "other").all() and "has no label set response_PLX4720" in caplog.text


def _fold_scores_at(st: Store, threshold: float) -> dict[str, list[float]]:
    """Recall and accuracy of each stored fold, recomputed by hand from eval_predictions at ``threshold``."""
    preds = st.query("SELECT task_id, y_true, proba FROM eval_predictions")
    out: dict[str, list[float]] = {"recall": [], "accuracy": []}
    for _, fold in preds.groupby("task_id"):
        y = fold["y_true"].to_numpy()
        label = fold["proba"].to_numpy(np.float32).astype(np.float64) >= threshold
        out["recall"].append(float(label[y == 1].mean()))
        out["accuracy"].append(float((label == y).mean()))
    return out


def test_training_metrics_of_a_head_with_another_threshold_are_recomputed_at_it_from_the_stored_predictions(
        st: Store, a375_values: np.ndarray) -> None:
    # the grid labels cells at 0.5: its recall (1.0 here) is not the recall of a head labelling at 0.9
    write_embedding(st, "a375", a375_values)
    evaluate(st, scenarios=["pooled"], by=["all"], heads=["logreg"], folds=3, silent=True)
    strict = train_head(st, dataset="a375", model="pca-test", head="logreg", threshold=0.9)
    usual = train_head(st, dataset="a375", model="pca-test", head="logreg")
    rows = trained_heads(st).set_index("head_id")
    strict_metrics = {m["metric"]: m for m in json.loads(rows.loc[strict, "train_metrics"])}
    usual_metrics = {m["metric"]: m for m in json.loads(rows.loc[usual, "train_metrics"])}
    assert set(strict_metrics) == set(usual_metrics)
    hand = _fold_scores_at(st, 0.9)
    for metric in ("recall", "accuracy"):
        entry = strict_metrics[metric]
        assert entry["recomputed_at_threshold"] == 0.9 and entry["n_folds"] == 3
        assert entry["mean"] - float(np.mean(hand[metric])) == 0
        assert entry["sd"] - float(np.std(hand[metric], ddof=1)) == 0
        assert "recomputed_at_threshold" not in usual_metrics[metric]
    assert strict_metrics["recall"]["mean"] < usual_metrics["recall"]["mean"]
    # threshold-free scores are the grid's own, unmarked
    assert "recomputed_at_threshold" not in strict_metrics["auroc"]
    assert strict_metrics["auroc"]["mean"] == usual_metrics["auroc"]["mean"]
    # at 0.5 the recomputation gives the grid's stored scores: the same rule, the same folds
    for metric in ("recall", "accuracy"):
        assert usual_metrics[metric]["mean"] == pytest.approx(float(np.mean(_fold_scores_at(st, 0.5)[metric])), abs=1e-15)


def test_training_metrics_of_a_head_with_another_threshold_without_stored_predictions_are_threshold_free(
        st: Store, a375_values: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    write_embedding(st, "a375", a375_values)
    evaluate(st, scenarios=["pooled"], by=["all"], heads=["logreg"], folds=3, silent=True, save_predictions=False)
    strict = train_head(st, dataset="a375", model="pca-test", head="logreg", threshold=0.9)
    metrics = {m["metric"] for m in json.loads(trained_heads(st).set_index("head_id").loc[strict, "train_metrics"])}
    assert sorted(metrics) == ["ap", "auroc"]
    assert "without per-cell predictions" in caplog.text and "--no-predictions" in caplog.text


def test_predicting_a_dataset_with_far_fewer_model_known_genes_warns(st: Store, a375_values: np.ndarray,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    # a 1000-gene panel embedded by a model trained on 10776 genes: every gene matched (fraction 1.0), the
    # predictions of the same cells agreed with the full-gene ones on 65% of them (toy model, PC9) and nothing said so
    st.ingest(JHU006, name="jhu006", label_key="response_Gefitinib", study="Kinker2020")
    a375 = write_embedding(st, "a375", a375_values)
    jhu = write_embedding(st, "jhu006", _scores(ad.read_h5ad(JHU006), 8))
    st.embedding(a375).set_audit({"n_input_genes": 10776, "n_matched": 10776, "fraction_matched": 1.0})
    head_id = train_head(st, [a375], head="logreg")
    for n_matched, warned in ((9000, False), (1000, True)):
        st.embedding(jhu).set_audit({"n_input_genes": n_matched, "n_matched": n_matched, "fraction_matched": 1.0})
        caplog.clear()
        with caplog.at_level("WARNING", logger="scdm"):
            predict(st, head_id, "jhu006")
        assert ("jhu006 has 1000 genes the pca-test model knows" in caplog.text) is warned
        assert ("at least 10776" in caplog.text) is warned


def test_predicting_cells_with_an_all_zero_embedding_warns(st: Store, a375_values: np.ndarray,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    # cells kept by allow_empty_cells got an all-zero vector; the head labelled them all alike, silently
    st.ingest(JHU006, name="jhu006", label_key="response_Gefitinib", study="Kinker2020")
    a375 = write_embedding(st, "a375", a375_values)
    values = _scores(ad.read_h5ad(JHU006), 8)
    values[[3, 10, 11]] = 0.0
    write_embedding(st, "jhu006", values)
    head_id = train_head(st, [a375], head="logreg")
    with caplog.at_level("WARNING", logger="scdm"):
        frame = predict(st, head_id, "jhu006")
    assert frame["proba"].iloc[[3, 10, 11]].nunique() == 1
    assert f"3 of the {len(frame)} cells of jhu006 have an all-zero pca-test embedding" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="scdm"):
        predict(st, head_id, "a375")
    assert "all-zero" not in caplog.text


def test_a_head_on_an_older_gene_tables_space_says_no_new_embedding_can_enter_it(st: Store, a375_values: np.ndarray) -> None:
    """A head trained by an older scdm (another gene table) refuses a dataset this scdm embedded, and says why.

    The refusal said 'embed it with the exact parameters of the head's embeddings', which no embedding this scdm
    makes can do: the gene table is part of every embedding's identity. It says to train the head again instead.
    """
    from scdm.store.genes import gene_table_version

    write_embedding(st, "a375", a375_values, model="gf-test", params={"layer": -2, "gene_table": "0ld0ld0ld0ld"})
    head_id = train_head(st, dataset="a375", model="gf-test", head="logreg")
    cells = ad.read_h5ad(example_data("A375"))
    cells.obs_names = [f"new_{c}" for c in cells.obs_names]
    st.ingest(cells, name="new", study="GSE108383")
    write_embedding(st, "new", a375_values, model="gf-test", params={"layer": -2, "gene_table": gene_table_version()})
    with pytest.raises(SpaceMismatchError) as refused:
        predict(st, head_id, "new")
    text = str(refused.value)
    assert f"gene table 0ld0ld0ld0ld (an older scdm); this scdm maps gene ids with gene table {gene_table_version()}" in text
    assert "`scdm embed a375 new --model gf-test --checkpoint CHECKPOINT`" in text and "train the head again" in text
    assert "exact parameters" not in text
    assert not st.query("SELECT * FROM predictions").shape[0]  # nothing stored for the refused prediction


def test_heads_trained_on_an_older_gene_table_are_listed_as_such(st: Store, a375_values: np.ndarray, monkeypatch) -> None:
    """trained_heads and every head listing of the API said nothing of a head an older scdm's gene table made the
    space of (it predicts on no dataset this scdm embeds); GET /api/heads/{id} and a model's page also gave no
    revision_note where GET /api/heads did."""
    from fastapi.testclient import TestClient

    from scdm.classify.heads import LogRegHead
    from scdm.server import create_app
    from scdm.store.genes import gene_table_version
    from tests.server.conftest import TOKEN

    write_embedding(st, "a375", a375_values, model="gf-test", params={"layer": -2, "gene_table": "0ld0ld0ld0ld"})
    with monkeypatch.context() as older_scdm:
        older_scdm.setattr(LogRegHead, "revision", lambda self: 1, raising=False)
        old = train_head(st, dataset="a375", model="gf-test", head="logreg")
    current = write_embedding(st, "a375", a375_values, model="gf-test", params={"layer": -2, "gene_table": gene_table_version()})
    new = train_head(st, [current], head="ridge")
    listed = trained_heads(st).set_index("head_id")
    expected = f"older gene table (0ld0ld0ld0ld; this scdm: {gene_table_version()})"
    assert listed.loc[old, "note"] == expected and listed.loc[new, "note"] == ""
    assert listed.loc[old, "revision_note"].startswith("fitted by revision 1 of logreg")
    with TestClient(create_app(st, token=TOKEN), base_url="http://127.0.0.1:8000",
                    headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        every = {h["head_id"]: h for h in client.get("/api/heads").json()}
        one = {h: client.get(f"/api/heads/{h}").json() for h in (old, new)}
        page = {h["head_id"]: h for h in client.get("/api/models/gf-test").json()["trained_heads"]}
    for answer in (every, one, page):
        assert {h: (answer[h]["note"], answer[h]["revision_note"]) for h in (old, new)} == {
            h: (listed.loc[h, "note"], listed.loc[h, "revision_note"]) for h in (old, new)}


def test_a_tuned_head_on_an_older_gene_table_says_to_tune_again(st: Store, a375_values: np.ndarray) -> None:
    """A LoRA head of an older gene table: embedding through its adapter with this scdm makes another space too."""
    emb = st.create_embedding("a375", model="gf-test", params={"layer": -2, "gene_table": "0ld0ld0ld0ld"},
                              dim=a375_values.shape[1], variant="lora:0123456789abcdef", adapter_hash="0123456789abcdef")
    for chunk in range(emb.n_chunks):
        lo, hi = emb.chunk_bounds(chunk)
        emb.write_chunk(chunk, a375_values[lo:hi])
    emb.finalize()
    head_id = train_head(st, [emb.embedding_id], head="logreg")
    cells = ad.read_h5ad(example_data("A375"))
    cells.obs_names = [f"new_{c}" for c in cells.obs_names]
    st.ingest(cells, name="new", study="GSE108383")
    with pytest.raises(EmbeddingNotFoundError) as refused:
        predict(st, head_id, "new")
    assert "made with gene table 0ld0ld0ld0ld (an older scdm)" in str(refused.value)
    assert "tuned by LoRA adapter 0123456789abcdef, also of the older table: tune again with `scdm finetune`" in str(refused.value)


def test_a_baseline_heads_refusal_keeps_the_value_handling_of_its_space(tmp_path: Path, pc9_counts_path: Path) -> None:
    """A pca head fitted on counts used as they are (--normalized) was advised `scdm embed train new --model pca
    --joint --n-comps 4 --n-hvg 2000`, which detects counts and normalises and log-transforms them: the head that
    advice trains reads another preprocessing than the one it replaces (input 'normalize_total+log1p' for
    'as-is'). The command keeps --normalized (or --counts where that is not what the values say)."""
    import re
    import shlex

    from scdm.embedding.runner import embed_baseline

    st = Store(tmp_path / "store")
    cells = ad.read_h5ad(pc9_counts_path)[:, :300].copy()
    cells.obs["response"] = np.where(np.arange(cells.n_obs) % 2 == 0, "sensitive", "resistant")
    st.ingest(cells[:150].copy(), name="train", label_key="response", study="a")
    st.ingest(cells[150:].copy(), name="new", study="b")
    (space,) = embed_baseline(st, ["train"], model="pca", n_comps=4, normalized=True, progress=False)
    head_id = train_head(st, [space.embedding_id], head="ridge")
    with pytest.raises(EmbeddingNotFoundError) as refused:
        predict(st, head_id, "new")
    command = re.search(r"\(`scdm embed (.*?)`\)", str(refused.value))
    assert command is not None and command.group(1) == "train new --model pca --joint --n-comps 4 --n-hvg 2000 --normalized"
    words = shlex.split(command.group(1))
    joint = embed_baseline(st, words[:2], model="pca", n_comps=4, normalized="--normalized" in words, progress=False)
    assert st.embedding(joint[0].embedding_id).params["normalized"] is True
    (cleared,) = embed_baseline(st, ["train"], model="pca", n_comps=4, normalized=False, progress=False)
    head_id = train_head(st, [cleared.embedding_id], head="ridge")
    # counts normalised, as the default does on counts: the default's space, whose refit detects each dataset's kind
    with pytest.raises(SpaceMismatchError, match=re.escape("--n-hvg 2000`")):
        predict(st, head_id, "new")
    (scaled,) = embed_baseline(st, ["train"], model="pca", n_comps=4, normalized=True, target_sum=5000, progress=False)
    assert scaled.embedding_id == space.embedding_id  # target_sum never met values used as they are


def test_an_interrupted_embedding_in_the_heads_space_is_named_with_how_to_finish_it(tmp_path: Path) -> None:
    """A dataset whose embedding in the head's own space was interrupted (status pending) was refused with 'embedded
    with the same model but other parameters, checkpoint or fit ... embed it jointly with the head's training
    datasets and train the head in that space' (for a pca head: a joint fit and a new head), although its space is
    the head's: finishing the embedding is all it needs. The refusal names it and the command that resumes it."""
    st = Store(tmp_path / "store")
    cells = ad.read_h5ad(example_data("A375"))
    st.ingest(cells[:70].copy(), name="train", label_key="response_PLX4720", study="GSE108383")
    st.ingest(cells[70:].copy(), name="new", study="GSE108383")
    rng = np.random.default_rng(0)
    hashes = sorted(st.dataset(n).content_hash for n in ("train", "new"))
    for model, params in (("gf-test", {"layer": -2}),
                          ("pca", {"fit_datasets": hashes, "n_comps_requested": 4, "n_hvg_requested": 2000,
                                   "gene_match": "gene"})):  # a joint fit of this scdm: `scdm embed --joint` resumes it
        train = write_embedding(st, "train", rng.standard_normal((70, 4)).astype(np.float32), model=model, params=params)
        head_id = train_head(st, [train], head="logreg")
        new = st.create_embedding("new", model=model, params=params, dim=4, chunk_rows=16)
        new.write_chunk(0, rng.standard_normal((16, 4)).astype(np.float32))  # interrupted after its first chunk
        with pytest.raises(InputDataError) as refused:
            predict(st, head_id, "new")
        text = str(refused.value)
        assert f"an embedding in head {head_id}'s space, {new.embedding_id}, but it is not complete" in text
        assert "other parameters" not in text and "train the head" not in text
        resume = "`scdm embed new --model gf-test` that started it again" if model == "gf-test" else \
            "`scdm embed train new --model pca --joint --n-comps 4`"
        assert resume in text


def test_an_unlabelled_dataset_among_the_training_embeddings_is_predicted_held_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A head trained on every embedding of a joint pca, one of them an unlabelled dataset (its row lists only the
    labelled one), read its training cells again with its label set, which the unlabelled dataset lacks: that read
    as 'the labels changed since it was fitted', so all 38 cells of the unlabelled dataset, which the head never saw,
    were marked trained_on (fitted values, not held-out), and copies of its training cells under another name were
    no longer found. Only the datasets that held its training cells count, also once the other one gets labels."""
    from scdm.embedding.runner import embed_baseline

    st = Store(tmp_path / "store")
    cells = ad.read_h5ad(example_data("A375"))
    st.ingest(cells[:70].copy(), name="lab", label_key="response_PLX4720", study="GSE108383")
    st.ingest(cells[70:].copy(), name="unl", study="other")
    st.ingest(cells[:50].copy(), name="copy", study="again")  # 50 training cells under another name
    spaces = embed_baseline(st, ["lab", "unl", "copy"], model="pca", n_comps=4, progress=False)
    head_id = train_head(st, [s.embedding_id for s in spaces[:2]], head="logreg")
    assert trained_heads(st).set_index("head_id").loc[head_id, "datasets"] == '["lab"]'
    with caplog.at_level("WARNING", logger="scdm.classify.trained_heads"):
        unlabelled = predict(st, head_id, "unl")
        labelled = predict(st, head_id, "lab")
        copy = predict(st, head_id, "copy")
    assert unlabelled["trained_on"].sum() == 0
    assert labelled["trained_on"].sum() == 70 and copy["trained_on"].sum() == 50
    assert "changed since it was fitted" not in caplog.text
    st.ingest(cells[70:].copy(), name="unl", label_key="response_PLX4720")  # labelled later: still never seen
    assert predict(st, head_id, "unl")["trained_on"].sum() == 0


def test_a_head_whose_fit_diverged_is_refused_with_why(st: Store, a375_values: np.ndarray) -> None:
    """An mlp that diverged (NaN weights) was refused as "The saved mlp head predicts differently from the fitted
    one (max |diff| nan); this is a bug in scdm, please report it": the reason and the fix were the user's."""
    write_embedding(st, "a375", a375_values * 1e6)
    with pytest.raises(InputDataError, match=r"Head 'mlp' scored \d+ of \d+ cells NaN: its fit diverged"):
        train_head(st, dataset="a375", model="pca-test", head="mlp", lr=1e6, epochs=3, min_steps=0, standardize=False)
    assert trained_heads(st).empty  # nothing saved
