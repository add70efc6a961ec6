"""Label sets with identical labels share a partition but report under their own names; a grid
that can evaluate nothing says why."""

from __future__ import annotations

from pathlib import Path

import pytest

from scdm.classify.grid import evaluate
from scdm.classify.results import leaderboard
from scdm.embedding.runner import embed, embed_baseline
from scdm.store import Store, _catalog
from scdm.store.errors import StoreReadOnlyError

DATA = Path(__file__).resolve().parents[1] / "data"


def test_identical_label_sets_report_under_the_name_asked_for(tmp_path):
    st = Store(tmp_path / "store")
    jhu = DATA / "JHU006_HNSCC_Kinker2020.h5ad"
    st.ingest(jhu, name="JHU006", label_key="response_Vorinostat", drug="Vorinostat", study="Kinker2020")
    st.ingest(jhu, label_key="response_AR-42", drug="AR-42")  # the exact same labels (PROVENANCE.md)
    embed(st, "JHU006", "pca", n_comps=8, progress=False)
    kw = {"heads": ["ridge"], "scenarios": ["pooled"], "by": ["all"], "folds": 3, "split_scheme": "cell", "silent": True}
    evaluate(st, label_set="Vorinostat", **kw)
    ar42 = evaluate(st, label_set="AR-42", **kw)
    assert ar42.n_done == 3 and set(ar42.results["label_set"]) == {"AR-42"}
    board = leaderboard(st, metrics=["auroc"], label_sets=["AR-42"])
    assert len(board) == 1 and board["n_folds"].iloc[0] == 3
    both = leaderboard(st, metrics=["auroc"]).set_index("label_set")
    assert both.loc["AR-42", "split_id"] == both.loc["Vorinostat", "split_id"]  # one partition
    assert both.loc["AR-42", "mean"] == pytest.approx(both.loc["Vorinostat", "mean"])  # the same fits
    again = evaluate(st, label_set="Vorinostat", **kw)
    assert again.n_done == 0 and again.n_reused == 3


def test_a_grid_that_evaluates_nothing_says_why(tmp_path, caplog):
    st = Store(tmp_path / "store")
    with caplog.at_level("WARNING", logger="scdm"):
        st.ingest(DATA / "PC9_erlotinib_subsample300.h5ad", name="PC9", label_key="scDEAL_GSE149383_label",
                  unknown_values=["not_in_scDEAL_set"])
    assert "holds one class only (170 labelled cells, all resistant" in caplog.text
    embed(st, "PC9", "pca", n_comps=5, progress=False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="scdm"):
        summary = evaluate(st, heads=["ridge"], scenarios=["pooled"], by=["all"], folds=3, silent=True)
    assert summary.n_done == 0 and summary.n_skipped == 1
    assert "nothing could be evaluated: category holds one class only" in caplog.text


def test_replacing_one_of_two_identical_label_sets_removes_its_results_on_the_shared_partition(tmp_path):
    import anndata as ad

    st = Store(tmp_path / "store")
    jhu = DATA / "JHU006_HNSCC_Kinker2020.h5ad"
    st.ingest(jhu, name="JHU006", label_key="response_Vorinostat", drug="Vorinostat", study="Kinker2020")
    st.ingest(jhu, label_key="response_AR-42", drug="AR-42")
    embed(st, "JHU006", "pca", n_comps=8, progress=False)
    kw = {"heads": ["ridge"], "scenarios": ["pooled"], "by": ["all"], "folds": 3, "split_scheme": "cell", "silent": True}
    evaluate(st, label_set="Vorinostat", **kw)
    evaluate(st, label_set="AR-42", **kw)
    relabelled = ad.read_h5ad(jhu)
    flipped = relabelled.obs["response_AR-42"].astype(str).to_numpy().copy()
    flipped[:10] = ["resistant" if v == "sensitive" else "sensitive" for v in flipped[:10]]
    relabelled.obs["response_AR-42"] = flipped
    st.ingest(relabelled, label_key="response_AR-42", drug="AR-42", update=True)
    tasks = st.query("SELECT label_set, count(*) AS n FROM eval_tasks GROUP BY label_set")
    assert tasks.set_index("label_set")["n"].to_dict() == {"Vorinostat": 3}  # AR-42's old results gone, Vorinostat's kept
    evaluate(st, label_set="AR-42", **kw)
    board = leaderboard(st, metrics=["auroc"], label_sets=["AR-42"])
    assert len(board) == 1  # one AR-42 result: on its current labels


def test_paired_folds_over_differently_labelled_cells_say_the_pairing_is_approximate(tmp_path, caplog):
    import anndata as ad

    adata = ad.read_h5ad(DATA / "JHU006_HNSCC_Kinker2020.h5ad")
    partial = adata.obs["response_Vorinostat"].astype(str).to_numpy().copy()
    partial[:20] = "unknown"
    adata.obs["partial"] = partial
    st = Store(tmp_path / "store")
    st.ingest(adata, name="JHU006", label_key="response_Gefitinib", drug="Gefitinib", study="Kinker2020")
    st.ingest(adata, label_key="partial", label_set="partial", unknown_values=["unknown"])
    embed(st, "JHU006", "pca", n_comps=8, progress=False)
    kw = {"heads": ["ridge"], "scenarios": ["pooled"], "by": ["all"], "folds": 3, "split_scheme": "cell", "silent": True}
    with caplog.at_level("WARNING", logger="scdm"):
        evaluate(st, label_set="partial", pair_folds_with="Gefitinib", **kw)
    assert "label different cells (0 only in the first, 20 only in Gefitinib)" in caplog.text


def _a375_and_jhu006_in_one_space(tmp_path: Path) -> tuple[Store, dict]:
    """A375 (PLX-4720, Melanoma) and JHU006 (Gefitinib, head and neck) in one joint PCA, and evaluate's options."""
    from scdm.store import example_data

    st = Store(tmp_path / "store")
    st.ingest(example_data("A375"), name="A375", label_key="response_PLX4720", drug="PLX-4720", study="GSE108383",
              cancer_type="Melanoma")
    st.ingest(DATA / "JHU006_HNSCC_Kinker2020.h5ad", name="JHU006", label_key="response_Gefitinib", drug="Gefitinib",
              study="Kinker2020", cancer_type="Head and neck cancer")
    embed_baseline(st, ["A375", "JHU006"], model="pca", n_comps=8, progress=False)
    kw = {"heads": ["ridge"], "scenarios": ["pooled"], "by": ["all", "cancer_type"], "folds": 3, "split_scheme": "cell",
          "silent": True}
    return st, kw


def test_a_category_of_one_dataset_names_only_that_datasets_label_set(tmp_path):
    # A375 (PLX-4720) and JHU006 (Gefitinib) pooled in one joint PCA: the Melanoma category holds
    # A375's cells only, so its results used PLX-4720 labels and nothing else; naming the label sets
    # of the whole space there reads as "A375 evaluated with Gefitinib labels"
    st, kw = _a375_and_jhu006_in_one_space(tmp_path)
    out = evaluate(st, **kw).results.drop_duplicates(["datasets", "label_set"])
    assert dict(zip(out["datasets"], out["label_set"])) == {
        "A375": "PLX-4720", "JHU006": "Gefitinib", "A375,JHU006": "Gefitinib,PLX-4720"}
    stored = st.query("SELECT datasets, label_set FROM splits").drop_duplicates()
    assert dict(zip(stored["datasets"], stored["label_set"])) == {
        "A375": "PLX-4720", "JHU006": "Gefitinib", "A375,JHU006": "Gefitinib,PLX-4720"}
    again = evaluate(st, **kw)  # the stored splits are found again under their own names
    assert again.n_done == 0 and again.n_reused == 9
    # a head trained on that category names the same label set and finds its cross-validated scores
    from scdm.classify.trained_heads import train_head

    ids = list(st.embeddings()["embedding_id"])
    head_id = train_head(st, ids, "cancer_type", "Melanoma", "ridge")
    row = st.query("SELECT label_set, train_metrics FROM trained_heads WHERE head_id = ?", [head_id]).iloc[0]
    assert row["label_set"] == "PLX-4720" and row["train_metrics"] is not None


def test_splits_named_with_the_whole_spaces_label_sets_before_schema_10_are_renamed_and_reused(tmp_path):
    """A store written before splits named their own label sets: migration 10 renames them and their
    results, so evaluating again reuses every task instead of fitting it again under a second name."""
    st, kw = _a375_and_jhu006_in_one_space(tmp_path)
    first = evaluate(st, **kw)
    board = leaderboard(st, metrics=["auroc"]).sort_values(["datasets", "label_set"]).reset_index(drop=True)
    for table in ("splits", "eval_tasks", "eval_results", "skipped_tasks"):  # as the code before schema 10 named them
        st.execute(f"UPDATE {table} SET label_set = 'Gefitinib,PLX-4720' WHERE label_set IS NOT NULL")
    st.execute("DELETE FROM migrations WHERE version >= 10")
    st = Store(tmp_path / "store")  # migrates
    stored = st.query("SELECT datasets, label_set FROM splits").drop_duplicates()
    assert dict(zip(stored["datasets"], stored["label_set"])) == {
        "A375": "PLX-4720", "JHU006": "Gefitinib", "A375,JHU006": "Gefitinib,PLX-4720"}
    again = evaluate(st, **kw)
    assert again.n_done == 0 and again.n_reused == first.n_done
    after = leaderboard(st, metrics=["auroc"]).sort_values(["datasets", "label_set"]).reset_index(drop=True)
    assert after[["datasets", "label_set", "mean", "n_folds"]].equals(board[["datasets", "label_set", "mean", "n_folds"]])


def test_a_store_that_recorded_one_fit_per_task_as_migration_10_still_gets_its_splits_renamed(tmp_path):
    """0011_one_fit_per_task shipped as 0010 before 0010_split_label_sets was put ahead of it: a store an
    scdm of that time opened has (10, 'one_fit_per_task') recorded, and was taken as done with version 10
    (8 of 30 splits of an A375/JHU006 store kept 'Gefitinib,PLX-4720', shown beside their refits)."""
    st, kw = _a375_and_jhu006_in_one_space(tmp_path)
    first = evaluate(st, **kw)
    board = leaderboard(st, metrics=["auroc"]).sort_values(["datasets", "label_set"]).reset_index(drop=True)
    for table in ("splits", "eval_tasks", "eval_results", "skipped_tasks"):  # as the code before schema 10 named them
        st.execute(f"UPDATE {table} SET label_set = 'Gefitinib,PLX-4720' WHERE label_set IS NOT NULL")
    st.execute("DELETE FROM migrations WHERE version >= 10")  # as that scdm recorded its migration 10
    st.execute("INSERT INTO migrations VALUES (10, 'one_fit_per_task', now(), '0.1.0')")
    with pytest.raises(StoreReadOnlyError, match="0010_split_label_sets"):
        Store(tmp_path / "store", read_only=True)  # needs the migration it cannot apply
    st = Store(tmp_path / "store")  # migrates
    stored = st.query("SELECT datasets, label_set FROM splits").drop_duplicates()
    assert dict(zip(stored["datasets"], stored["label_set"])) == {
        "A375": "PLX-4720", "JHU006": "Gefitinib", "A375,JHU006": "Gefitinib,PLX-4720"}
    recorded = st.query("SELECT version, name FROM migrations WHERE version >= 10 ORDER BY version")
    assert list(recorded["name"])[:2] == ["split_label_sets", "one_fit_per_task"]
    again = evaluate(st, **kw)
    assert again.n_done == 0 and again.n_reused == first.n_done
    after = leaderboard(st, metrics=["auroc"]).sort_values(["datasets", "label_set"]).reset_index(drop=True)
    assert after[["datasets", "label_set", "mean", "n_folds"]].equals(board[["datasets", "label_set", "mean", "n_folds"]])


def test_result_key_keeps_label_sets_that_share_a_partition_apart(tmp_path):
    st = Store(tmp_path / "store")
    jhu = DATA / "JHU006_HNSCC_Kinker2020.h5ad"
    st.ingest(jhu, name="JHU006", label_key="response_Vorinostat", drug="Vorinostat", study="Kinker2020")
    st.ingest(jhu, label_key="response_AR-42", drug="AR-42")  # the same labels: one partition
    embed(st, "JHU006", "pca", n_comps=8, progress=False)
    kw = {"heads": ["ridge"], "scenarios": ["pooled"], "by": ["all"], "folds": 3, "split_scheme": "cell", "silent": True}
    evaluate(st, label_set="Vorinostat", **kw)
    evaluate(st, label_set="AR-42", **kw)
    groups = st.sql("SELECT result_key, count(value) AS n FROM results WHERE metric = 'auroc' GROUP BY result_key")
    assert sorted(groups["n"]) == [3, 3]  # one key per label set, not n = 6


def test_only_a_renumbered_migration_makes_the_later_ones_run_again():
    """A version recorded under another name re-runs it and every later one (10 to 12 run twice safely);
    a version merely missing runs alone, as before (0008 would fail on its existing tables)."""
    shipped = {version: name for version, name, _ in _catalog._MIGRATIONS}
    missing_7 = {v: n for v, n in shipped.items() if v != 7}
    assert [v for v, _, _ in _catalog._pending_migrations(missing_7)] == [7]
    old_10 = {**{v: n for v, n in shipped.items() if v < 10}, 10: "one_fit_per_task"}
    assert [v for v, _, _ in _catalog._pending_migrations(old_10)] == [v for v in shipped if v >= 10]
    assert _catalog._pending_migrations(shipped) == []
