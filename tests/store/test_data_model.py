"""The data model: label sets, result identity, fold-count checks, migration of an older store."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
from click.testing import CliRunner

from scdm.classify.grid import evaluate
from scdm.classify.results import format_leaderboard, leaderboard, wide_leaderboard
from scdm.cli import main
from scdm.embedding.runner import embed
from scdm.store import Store, example_data
from scdm.store.errors import InputDataError
from scdm.store.labels import label_sets
from scdm.store.splits import load_split

DATA = Path(__file__).resolve().parents[1] / "data"
JHU006 = DATA / "JHU006_HNSCC_Kinker2020.h5ad"


def _jhu_store(tmp_path: Path) -> Store:
    st = Store(tmp_path / "store")
    st.ingest(JHU006, name="JHU006", label_key="response_Gefitinib", drug="Gefitinib", study="Kinker2020")
    return st


# ---- label sets ------------------------------------------------------------------------------
def test_a_second_label_column_adds_a_label_set_instead_of_being_dropped(tmp_path):
    st = _jhu_store(tmp_path)
    again = st.ingest(JHU006, label_key="response_Vorinostat", drug="Vorinostat")
    assert not again.created and again.label_set == "Vorinostat" and again.label_set_created
    same = st.ingest(JHU006, label_key="response_Vorinostat", drug="Vorinostat")
    assert same.label_set == "Vorinostat" and not same.label_set_created  # the same labels again: a no-op
    sets = {ls.name: ls for ls in label_sets(st, "JHU006")}
    assert set(sets) == {"Gefitinib", "Vorinostat"} and sets["Gefitinib"].is_default and not sets["Vorinostat"].is_default
    assert sets["Vorinostat"].drug == "Vorinostat" and sets["Vorinostat"].label_key == "response_Vorinostat"

    obs = ad.read_h5ad(JHU006).obs
    gef = st.cells("JHU006")  # the default label set
    vor = st.cells("JHU006", label_set="Vorinostat")
    assert (gef["response"].to_numpy() == (obs["response_Gefitinib"] == "sensitive").to_numpy()).all()
    assert (vor["response"].to_numpy() == (obs["response_Vorinostat"] == "sensitive").to_numpy()).all()
    assert (vor["response"] != gef["response"]).all()  # the proxy labels are exact inverses (PROVENANCE.md)
    assert set(vor["label_set"]) == {"Vorinostat"} and set(gef["label_set"]) == {"Gefitinib"}


def test_a_label_set_name_is_never_reused_for_other_labels(tmp_path):
    st = _jhu_store(tmp_path)
    with pytest.raises(InputDataError, match="already has a label set 'Gefitinib'.*--label-set"):
        st.ingest(JHU006, label_key="response_Vorinostat", drug="Gefitinib")
    st.ingest(JHU006, label_key="response_Vorinostat", drug="Gefitinib", label_set="Gefitinib-inverse")
    with pytest.raises(InputDataError, match="no label set 'nope'.*Gefitinib, Gefitinib-inverse"):
        st.cells("JHU006", label_set="nope")


def test_changed_metadata_is_an_error_unless_update(tmp_path):
    st = _jhu_store(tmp_path)
    with pytest.raises(InputDataError, match="study: stored 'Kinker2020', given 'other'.*--update"):
        st.ingest(JHU006, study="other")
    assert set(st.cells("JHU006")["study"]) == {"Kinker2020"}  # nothing changed
    st.ingest(JHU006, study="other", tissue="head and neck", update=True)
    cells = st.cells("JHU006")
    assert set(cells["study"]) == {"other"} and set(cells["tissue"]) == {"head and neck"}
    assert st.dataset("JHU006").options["study"] == "other"
    st.ingest(JHU006)  # no options: the stored dataset as it is
    assert set(st.cells("JHU006")["study"]) == {"other"}


def test_anonymous_in_memory_datasets_get_content_names(tmp_path):
    st = Store(tmp_path / "store")
    a = ad.read_h5ad(example_data())
    first = st.ingest(a[:50].copy(), label_key="response_PLX4720")
    second = st.ingest(a[50:].copy(), label_key="response_PLX4720")
    assert first.name != second.name and first.name.startswith("dataset-") and second.name.startswith("dataset-")


# ---- result identity -------------------------------------------------------------------------
def test_two_label_sets_evaluate_to_separate_rows(tmp_path):
    st = _jhu_store(tmp_path)
    st.ingest(JHU006, label_key="response_Vorinostat", drug="Vorinostat")
    embed(st, "JHU006", "pca", n_comps=10, progress=False)
    evaluate(st, heads=["ridge"], by=["all"], folds=5, scenarios=["pooled"], silent=True)
    evaluate(st, heads=["ridge"], by=["all"], folds=5, scenarios=["pooled"], label_set="Vorinostat", silent=True)
    board = leaderboard(st, metrics=["auroc"])
    assert sorted(board["label_set"]) == ["Gefitinib", "Vorinostat"]
    assert (board["n_folds"] == 5).all() and board["complete"].all()
    # splits remember the labels they were made with, whichever label set is the default later
    for split_id, name in zip(board["split_id"], board["label_set"]):
        split = load_split(st, split_id)
        assert split.label_set == name
        expected = st.cells("JHU006", label_set=name).set_index("row")["response"]
        assert (split.cells["response"].to_numpy() == expected.loc[split.cells["row"]].to_numpy()).all()

    out = CliRunner().invoke(main, ["--store", str(st.root), "results", "--metric", "auroc"])
    assert out.exit_code == 0, out.output
    lines = [line for line in out.output.splitlines() if "JHU006" in line]
    assert len(lines) == 2 and any("Gefitinib" in line for line in lines) and any("Vorinostat" in line for line in lines)


def test_results_of_different_splits_or_datasets_are_never_averaged(tmp_path):
    st = _jhu_store(tmp_path)
    st.ingest(example_data(), name="A375", label_key="response_PLX4720", study="GSE108383")
    for name in ("JHU006", "A375"):
        embed(st, name, "pca", n_comps=10, progress=False)  # two pca spaces: one per dataset
    evaluate(st, heads=["ridge"], by=["all"], folds=5, scenarios=["pooled"], silent=True)
    evaluate(st, heads=["ridge"], by=["all"], folds=3, scenarios=["pooled"], silent=True)
    board = leaderboard(st, metrics=["auroc"])
    rows = board[["datasets", "k"]].apply(tuple, axis=1).tolist()
    assert sorted(rows) == [("A375", 3), ("A375", 5), ("JHU006", 3), ("JHU006", 5)]
    assert (board["n_folds"] == board["k"]).all()  # no merged 5-fold + 3-fold rows ("folds=8")
    wide = wide_leaderboard(board, metrics=["auroc"])
    assert len(wide) == 4 and wide["auroc"].dtype.kind == "f" and wide["auroc_n"].tolist() == wide["k"].tolist()
    text = format_leaderboard(board, metrics=["auroc"])
    assert set(text["model"]) == {f"pca [{s[:8]}]" for s in board["space_id"]}  # one model name, two spaces

    out = CliRunner().invoke(main, ["--store", str(st.root), "results", "--format", "csv"])
    assert out.exit_code == 0, out.output
    csv = pd.read_csv(pd.io.common.StringIO(out.stdout))  # the notes go to stderr
    assert csv["auroc"].dtype.kind == "f" and csv["auroc_sd"].dtype.kind == "f" and len(csv) == 4


def test_incomplete_results_are_marked(tmp_path):
    st = _jhu_store(tmp_path)
    embed(st, "JHU006", "pca", n_comps=10, progress=False)
    evaluate(st, heads=["ridge"], by=["all"], folds=5, scenarios=["pooled"], silent=True)
    lost = st.query("SELECT task_id FROM eval_tasks ORDER BY task_id LIMIT 2")["task_id"].tolist()
    st.execute("DELETE FROM eval_results WHERE list_contains(?, task_id)", [lost])  # a run killed before these
    st.execute("DELETE FROM eval_tasks WHERE list_contains(?, task_id)", [lost])
    board = leaderboard(st, metrics=["auroc"])
    assert board["folds_done"].tolist() == [3] and board["folds_expected"].tolist() == [5] and not board["complete"].any()
    assert format_leaderboard(board, metrics=["auroc"])["folds"].tolist() == ["3/5 incomplete"]
    evaluate(st, heads=["ridge"], by=["all"], folds=5, scenarios=["pooled"], silent=True)  # resumes the missing folds
    assert leaderboard(st, metrics=["auroc"])["complete"].all()


@pytest.mark.parametrize("folds", [0, 1, 34, 100000])
def test_impossible_fold_counts_are_refused_before_any_run(tmp_path, folds):
    st = _jhu_store(tmp_path)  # 33 sensitive and 33 resistant cells
    embed(st, "JHU006", "pca", n_comps=10, progress=False)
    with pytest.raises(InputDataError, match=r"folds|n_folds"):
        evaluate(st, heads=["ridge"], by=["all"], folds=folds, scenarios=["pooled"], silent=True)
    assert st.query("SELECT count(*) AS n FROM eval_runs")["n"].item() == 0
    assert st.query("SELECT count(*) AS n FROM splits")["n"].item() == 0


def test_two_identical_evaluations_at_once_both_finish(tmp_path):
    import threading

    st = _jhu_store(tmp_path)
    embed(st, "JHU006", "pca", n_comps=10, progress=False)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            evaluate(Store(st.root), heads=["ridge", "logreg"], by=["all"], folds=5, scenarios=["pooled"], silent=True)
        except BaseException as err:  # noqa: BLE001 - the test reports any failure
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    counts = st.query("SELECT count(*) AS n, count(DISTINCT task_id) AS d FROM eval_tasks").iloc[0]
    assert counts["n"] == counts["d"] == 10  # every task once
    assert st.query("SELECT count(*) AS n FROM splits")["n"].item() == 1


# ---- migration -------------------------------------------------------------------------------
def test_a_store_of_the_previous_release_migrates_and_reads(tmp_path, monkeypatch):
    with tarfile.open(DATA / "stores" / "store_schema5.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    st = Store(tmp_path / "store_v5")
    (ls,) = label_sets(st, "a375")
    assert ls.is_default and ls.name == "response_PLX4720" and ls.n_labelled == 40
    labels = st.cells("a375", label_set="response_PLX4720")
    assert (labels["response"] == st.cells("a375")["response"]).all()
    from scdm.classify.heads import LogRegHead, RidgeHead

    # its logreg and ridge results were scored on float32 probabilities by revision 1 of both heads: this
    # scdm (revision 4) leaves them out until they are fitted again ...
    assert leaderboard(st, metrics=["auroc"]).empty
    with monkeypatch.context() as m:  # ... and they read as they were under the revisions that fitted them
        m.setattr(LogRegHead, "revision", lambda self: 1)
        m.setattr(RidgeHead, "revision", lambda self: 1)
        board = leaderboard(st, metrics=["auroc"])
    assert set(board["datasets"]) == {"a375"} and set(board["label_set"]) == {"response_PLX4720"}
    assert set(board["k"]) == {3} and board["complete"].all()
    split = load_split(st, board["split_id"].iloc[0])
    assert split.label_set == "response_PLX4720" and split.cells["response"].notna().all()
    head = st.query("SELECT label_set FROM trained_heads")
    assert head["label_set"].tolist() == ["response_PLX4720"]
    assert len(st.query("SELECT * FROM results")) == len(st.query("SELECT * FROM eval_results"))
    # the old evaluation, rerun with the old head parameters (ridge's standardisation default changed
    # since) and the old ridge revision (its grid and float64 fixes since: revision 4), finds every task
    # done: split and task identities did not change
    old_splits = set(st.query("SELECT split_id FROM splits")["split_id"])
    with monkeypatch.context() as m:
        m.setattr(RidgeHead, "revision", lambda self: 1)
        summary = evaluate(st, heads=["ridge"], by=["all", "tissue"], folds=3, silent=True,
                           head_params={"ridge": {"standardize": True}})
    assert summary.n_done == 0 and summary.n_reused > 0
    # this scdm's ridge fits them again (revision 4), on the same splits
    summary = evaluate(st, heads=["ridge"], by=["all", "tissue"], folds=3, silent=True,
                       head_params={"ridge": {"standardize": True}})
    assert summary.n_done > 0 and summary.n_reused == 0
    assert set(st.query("SELECT split_id FROM splits")["split_id"]) == old_splits


def test_migration_15_keeps_the_evaluation_probabilities_of_an_older_store_exactly(tmp_path):
    """eval_predictions.proba was REAL: migration 15 makes it DOUBLE, old rows keep their float32 values
    bit for bit (so their stored metrics are still those of their stored predictions), and it runs twice safely."""
    import duckdb
    import numpy as np

    from scdm.store import _catalog
    from scdm.store.metrics import METRICS, compute_metrics

    with tarfile.open(DATA / "stores" / "store_schema5.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    catalog = tmp_path / "store_v5" / "catalog.duckdb"
    order = 'SELECT task_id, y_true, proba FROM eval_predictions ORDER BY task_id, dataset_id, "row"'
    with duckdb.connect(str(catalog), read_only=True) as con:
        assert con.execute("SELECT data_type FROM information_schema.columns WHERE table_name = 'eval_predictions' "
                           "AND column_name = 'proba'").fetchone() == ("FLOAT",)
        before = con.execute(order).df()
    assert before["proba"].dtype == np.float32 and len(before) > 0
    st = Store(tmp_path / "store_v5")
    after = st.query(order)
    assert after["proba"].dtype == np.float64
    assert (after["proba"].to_numpy() == before["proba"].to_numpy(np.float64)).all()  # exactly
    assert st.query("SELECT name FROM migrations WHERE version = 15")["name"].tolist() == ["eval_proba_double"]
    stored = st.query("SELECT task_id, metric, value FROM eval_results").set_index(["task_id", "metric"])["value"]
    for task_id, fold in after.groupby("task_id"):
        recomputed = compute_metrics(fold["y_true"].to_numpy(), fold["proba"].to_numpy())
        for metric in METRICS:
            value = stored[(task_id, metric)]
            # this store's AMI came from sklearn; scdm's closed form (c6a64c7) sums the same terms in another order
            same = value == pytest.approx(recomputed[metric], rel=1e-12, abs=1e-15) if metric == "ami" else value == recomputed[metric]
            assert same or pd.isna(value), metric
    # a renumbered migration below it makes it run again on the DOUBLE column: nothing changes
    ((sql,),) = [(q,) for v, _, q in _catalog._MIGRATIONS if v == 15]
    st.execute(sql)
    assert (st.query(order)["proba"].to_numpy() == after["proba"].to_numpy()).all()


def test_migration_16_keeps_the_transfer_and_head_probabilities_of_an_older_store_exactly(tmp_path):
    """transfer_predictions.proba and predictions.proba were REAL: migration 16 makes them DOUBLE, old rows keep
    their float32 values bit for bit (so their stored labels still follow them), and it runs twice safely."""
    import duckdb
    import numpy as np

    from scdm.store import _catalog

    with tarfile.open(DATA / "stores" / "store_schema5.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    catalog = tmp_path / "store_v5" / "catalog.duckdb"
    # the fixture has head predictions but no transfer run: two rows as a schema-5 transfer wrote them
    old_transfer = np.array([np.float32(0.7), np.float32(1 - 3e-8)], np.float32)
    columns = "SELECT data_type FROM information_schema.columns WHERE table_name = ? AND column_name = 'proba'"
    transfer_order = 'SELECT proba, label FROM transfer_predictions ORDER BY "row"'
    head_order = 'SELECT p.proba, p.label, h.threshold FROM predictions p JOIN trained_heads h USING (head_id) ORDER BY p."row"'
    with duckdb.connect(str(catalog)) as con:
        assert [con.execute(columns, [t]).fetchone() for t in ("transfer_predictions", "predictions")] == [("FLOAT",)] * 2
        for row, value in enumerate(old_transfer.tolist()):
            con.execute("INSERT INTO transfer_predictions VALUES ('r1', 'd1', ?, ?, ?, 0)", [row, value, int(value >= 0.7)])
        before = (con.execute(transfer_order).df(), con.execute(head_order).df())
    assert before[0]["proba"].dtype == before[1]["proba"].dtype == np.float32 and len(before[1]) > 0
    st = Store(tmp_path / "store_v5")
    after = (st.query(transfer_order), st.query(head_order))
    for old, new in zip(before, after, strict=True):
        assert new["proba"].dtype == np.float64
        assert (new["proba"].to_numpy() == old["proba"].to_numpy(np.float64)).all()  # exactly
        assert (new["label"].to_numpy() == old["label"].to_numpy()).all()
    assert after[0]["label"].tolist() == [0, 1]  # float32(0.7) < 0.7, as the old run labelled it
    assert (after[1]["label"] == (after[1]["proba"] >= after[1]["threshold"])).all()
    assert st.query("SELECT name FROM migrations WHERE version = 16")["name"].tolist() == ["prediction_proba_double"]
    # a renumbered migration below it makes it run again on the DOUBLE columns: nothing changes
    ((sql,),) = [(q,) for v, _, q in _catalog._MIGRATIONS if v == 16]
    st.execute(sql)
    assert all((st.query(q)["proba"] == a["proba"]).all() for q, a in zip((transfer_order, head_order), after, strict=True))


def test_label_set_ids_agree_between_sql_migration_and_python(tmp_path):
    from scdm.store.labels import label_set_id_of, labels_hash

    with tarfile.open(DATA / "stores" / "store_schema5.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    st = Store(tmp_path / "store_v5")
    (ls,) = label_sets(st, "a375")
    assert ls.label_set_id == label_set_id_of(ls.dataset_id, ls.name)
    cells = st.cells("a375")
    known = cells["response"].notna()
    assert ls.labels_hash == labels_hash(cells.loc[known, "row"].to_numpy(), cells.loc[known, "response"].to_numpy())


def test_json_output_is_one_document(tmp_path):
    st = _jhu_store(tmp_path)
    out = CliRunner().invoke(main, ["--store", str(st.root), "ls", "--format", "json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert set(doc) == {"datasets", "label_sets", "embeddings"} and doc["label_sets"][0]["name"] == "Gefitinib"


def test_ingest_warns_when_an_obs_column_splits_the_labels_without_sample_ids(tmp_path):
    """A375's 'condition' is parental (every sensitive cell) or BRAFi_resistant (every resistant cell): the labels
    restated, not a sample key. The warning advised --sample-key condition, with which --split-scheme sample skips
    every fold ("training cells hold one class only"); a column of two samples per class is still advised."""
    import anndata as ad

    from scdm.store.splits import SampleLeakageWarning

    st = Store(tmp_path / "store")
    with pytest.warns(SampleLeakageWarning) as caught:
        st.ingest(example_data(), name="a375", label_key="response_PLX4720")
    said = " ".join(str(w.message) for w in caught if issubclass(w.category, SampleLeakageWarning))
    assert "--sample-key condition" not in said  # grouped by it, every fold is skipped
    assert ("'condition' ('parental': every sensitive cell; 'BRAFi_resistant': every resistant cell) restate the labels"
            in said) and "no sample key" in said
    adata = ad.read_h5ad(example_data())
    half = adata.obs.groupby("condition", observed=True).cumcount() % 2
    adata.obs["culture"] = adata.obs["condition"].astype(str) + "_" + half.astype(str)  # two per class
    with pytest.warns(SampleLeakageWarning) as caught:
        Store(tmp_path / "store3").ingest(adata, name="a375", label_key="response_PLX4720")
    said = " ".join(str(w.message) for w in caught if issubclass(w.category, SampleLeakageWarning))
    assert "obs column(s) 'culture'. If these are samples or conditions, ingest with --sample-key culture" in said
    assert "'condition' (" in said and "--sample-key condition" not in said
    st2 = Store(tmp_path / "store2")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleLeakageWarning)
        st2.ingest(example_data(), name="a375", label_key="response_PLX4720", sample_key="condition")


def test_ami_ari_come_with_mcc_and_a_caveat(tmp_path):
    from scdm.classify.results import leaderboard_notes, with_signed_partner

    assert with_signed_partner(["auroc", "ami", "ari"]) == ["auroc", "mcc", "ami", "ari"]
    assert with_signed_partner(["auroc", "f1"]) == ["auroc", "f1"]
    st = _jhu_store(tmp_path)
    embed(st, "JHU006", "pca", n_comps=10, progress=False)
    evaluate(st, heads=["ridge", "shuffled-label"], by=["all"], folds=3, scenarios=["pooled"], silent=True)
    board = leaderboard(st)
    notes = leaderboard_notes(board, ["auroc", "ami"])
    assert any("inverted classifier" in n for n in notes) and any("negative bias" in n for n in notes)
    out = CliRunner().invoke(main, ["--store", str(st.root), "results", "--metric", "auroc,ari"])
    assert out.exit_code == 0 and "mcc" in out.output.splitlines()[0] and "note: AMI and ARI" in out.output


def test_two_label_sets_can_share_one_partition(tmp_path):
    st = _jhu_store(tmp_path)
    st.ingest(JHU006, label_key="response_Vorinostat", drug="Vorinostat")
    embed(st, "JHU006", "pca", n_comps=10, progress=False)
    common = {"heads": ["ridge"], "by": ["all"], "folds": 5, "scenarios": ["pooled"], "silent": True}
    evaluate(st, **common)
    evaluate(st, label_set="Vorinostat", **common)
    evaluate(st, label_set="Vorinostat", pair_folds_with="Gefitinib", **common)
    board = leaderboard(st, metrics=["auroc"])
    assert len(board) == 3 and len(set(board["split_id"])) == 3
    splits = {sid: load_split(st, sid) for sid in board["split_id"]}
    gef = next(s for s in splits.values() if s.label_set == "Gefitinib")
    vor = [s for s in splits.values() if s.label_set == "Vorinostat"]
    paired = next(s for s in vor if s.definition.get("folds_from") == "Gefitinib")
    unpaired = next(s for s in vor if "folds_from" not in s.definition)
    fold = lambda s: s.cells.set_index("row")["fold"]  # noqa: E731
    assert (fold(paired) == fold(gef)).all()  # the same partition, fold by fold
    assert not (fold(unpaired) == fold(gef)).all()  # stratified by its own labels it differs


def test_report_lists_confounded_studies_and_metric_caveats(tmp_path):
    import warnings

    from scdm.classify.report import write_report
    from scdm.store.splits import SampleLeakageWarning

    st = Store(tmp_path / "store")
    st.ingest(example_data(), name="A375", label_key="response_PLX4720", sample_key="condition")
    embed(st, "A375", "pca", n_comps=5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        evaluate(st, heads=["ridge"], by=["all"], folds=3, scenarios=["pooled"], silent=True)
    page = write_report(st, tmp_path / "report", projection="none", formats=["png"]).read_text()
    assert "confounded-studies" in page and "<b>A375</b>: labels constant within each of its 2 samples" in page
    assert "Reading the metrics" in page and "negative bias" in page


def test_names_that_would_read_as_several_in_result_rows_are_refused_or_joined_otherwise(tmp_path):
    st = Store(tmp_path / "store")
    with pytest.raises(InputDataError, match=r"Dataset name 'jhu006,scc47' cannot be used.*'jhu006\+scc47'"):
        st.ingest(JHU006, name="jhu006,scc47", label_key="response_Gefitinib")
    with pytest.raises(InputDataError, match=r"Label set name 'a,b' holds a comma"):
        st.ingest(JHU006, name="JHU006", label_key="response_Gefitinib", label_set="a,b")
    assert st.datasets().empty  # refused before anything was written
    info = st.ingest(JHU006, name="JHU006", label_key="response_Gefitinib", drug="5-FU,Cisplatin")
    assert info.label_set == "5-FU+Cisplatin"


def test_timestamps_duckdb_writes_are_utc_as_those_python_writes(tmp_path: Path) -> None:
    """On a machine in Tokyo a dataset's created_at (DuckDB's now()) said 21:50 beside its run's 12:50 (UTC)."""
    import os
    import subprocess
    import sys

    code = ("import sys, pandas as pd; from scdm.store import Store; st = Store(sys.argv[1]); "
            "st.ingest(sys.argv[2], name='JHU006', label_key='response_Gefitinib', drug='Gefitinib', study='Kinker2020'); "
            "made = st.query('SELECT created_at FROM datasets')['created_at'].iloc[0]; "
            "print((made - pd.Timestamp.now(tz='UTC').tz_localize(None)).total_seconds())")
    env = {**os.environ, "TZ": "Asia/Tokyo", "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store"), str(JHU006)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert abs(float(done.stdout.split()[-1])) < 600  # seconds: not the 9 hours of Tokyo's offset
