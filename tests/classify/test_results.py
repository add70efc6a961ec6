"""Leaderboard frames: the same columns whatever the board holds, and rows that differ only by their split told apart."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pandas as pd
import pytest

import scdm
from scdm.classify.grid import evaluate
from scdm.classify.results import format_leaderboard, leaderboard, split_labels, wide_leaderboard
from scdm.store import Store, example_data
from tests.jhu006 import jhu006_store

COMMON = {"heads": ["ridge"], "by": ["all"], "folds": 5, "scenarios": ["pooled"], "silent": True}
METRICS = ["auroc", "f1", "mcc"]


@pytest.fixture()
def st(tmp_path: Path) -> Store:
    return jhu006_store(tmp_path / "store")


def _same_columns(frame: pd.DataFrame, like: pd.DataFrame) -> None:
    assert list(frame.columns) == list(like.columns)
    for m in METRICS:
        assert frame[m].dtype == like[m].dtype == "float64" and frame[f"{m}_sd"].dtype == "float64", m
        assert frame[f"{m}_n"].dtype == like[f"{m}_n"].dtype == "Int64", m
    for column in ("k", "seed", "folds_done", "folds_expected", "complete"):
        assert frame[column].dtype == like[column].dtype, column


def test_a_board_without_rows_keeps_every_metric_column_and_its_dtype(st: Store) -> None:
    evaluate(st, **COMMON)
    full = wide_leaderboard(leaderboard(st), metrics=METRICS)
    assert len(full) == 1
    for board in (leaderboard(st, heads=["logreg"]), leaderboard(st, label_sets=["nope"]), leaderboard(st).iloc[:0]):
        empty = wide_leaderboard(board, metrics=METRICS)
        assert empty.empty
        _same_columns(empty, full)
    # a metric the board lacks keeps its columns, undefined
    partial = wide_leaderboard(leaderboard(st, metrics=["auroc"]), metrics=METRICS)
    _same_columns(partial, full)
    assert partial["f1"].isna().all() and partial["f1_n"].isna().all() and partial["auroc"].notna().all()
    assert list(format_leaderboard(leaderboard(st, heads=["logreg"]), metrics=METRICS).columns[-3:]) == METRICS
    # the notebook API: a filter that matches nothing
    _same_columns(scdm.results(st, metrics=METRICS, heads=["logreg"]), full)
    # counts are integers in the long board (n_test summed over folds read as 653.0 in --long, CSV and the API)
    long = leaderboard(st)
    for column in ("n_folds", "n_null", "n_test", "folds_done"):
        assert pd.api.types.is_integer_dtype(long[column]), (column, long[column].dtype)


def test_evaluate_where_every_fold_is_skipped_returns_the_metric_columns(tmp_path: Path) -> None:
    adata = ad.read_h5ad(example_data("A375"))  # two samples ('condition'), each one class: 2 sample folds train on one class
    scdm.embed(adata, model="pca", store=tmp_path / "store", ingest={"label_key": "response_PLX4720", "sample_key": "condition"},
               n_comps=5, progress=False)
    board = scdm.evaluate(adata, heads=["ridge"], folds=2, split_scheme="sample", metrics=METRICS, progress=False)
    assert board.empty
    assert [c for c in board.columns if c.startswith(("auroc", "f1", "mcc"))] == [
        "auroc", "auroc_sd", "auroc_n", "f1", "f1_sd", "f1_n", "mcc", "mcc_sd", "mcc_n"]
    assert board["auroc"].dtype == "float64" and board["auroc_n"].dtype == "Int64"


def test_results_differing_only_by_their_split_print_apart(st: Store) -> None:
    evaluate(st, **COMMON)
    evaluate(st, label_set="Vorinostat", **COMMON)
    evaluate(st, label_set="Vorinostat", pair_folds_with="Gefitinib", **COMMON)
    board = leaderboard(st, metrics=["auroc"])
    text = format_leaderboard(board, metrics=["auroc"])
    assert len(text) == 3 and not text.drop(columns=["auroc"]).duplicated().any()
    paired = board.loc[board["folds_from"] == "Gefitinib", "split_id"].iloc[0]
    unpaired = board.loc[(board["label_set"] == "Vorinostat") & board["folds_from"].isna(), "split_id"].iloc[0]
    vorinostat = text[text["label_set"] == "Vorinostat"]
    assert set(vorinostat["split"]) == {f"{paired[:8]} (folds of Gefitinib)", unpaired[:8]}
    assert (text.loc[text["label_set"] == "Gefitinib", "split"] == "").all()  # told apart already: nothing added
    assert list(text.columns).index("split") == list(text.columns).index("seed") + 1
    # nothing printed alike: no split column
    assert "split" not in format_leaderboard(leaderboard(st, label_sets=["Gefitinib"], metrics=["auroc"])).columns


def test_split_labels_use_as_many_digits_as_tell_the_splits_apart() -> None:
    rows = pd.DataFrame({"model": ["pca", "pca", "pca"], "split_id": ["abcdefgh1234", "abcdefgh5678", "0123456789ab"],
                         "k": [5, 5, 3]})
    labels = split_labels(rows, ["model", "k"], folds_from={"abcdefgh5678": "Gefitinib"})
    assert list(labels) == ["abcdefgh1", "abcdefgh5 (folds of Gefitinib)", ""]


def test_transductive_results_say_so() -> None:
    """pca/hvg fitted on the test cells, and dann adapting to them, are named under the leaderboard."""
    from scdm.classify.results import NOTES, leaderboard_notes

    def board(model: str, head: str, variant: str = "frozen") -> pd.DataFrame:
        return pd.DataFrame({"model": [model], "variant": [variant], "head": [head], "complete": [True], "n_null": [0]})

    assert NOTES["transductive-baseline"] in leaderboard_notes(board("pca", "logreg"), ["auroc"])
    assert NOTES["transductive-baseline"] in leaderboard_notes(board("hvg", "ridge"), ["auroc"])
    assert NOTES["transductive-dann"] in leaderboard_notes(board("geneformer", "dann"), ["auroc"])
    assert leaderboard_notes(board("geneformer", "logreg"), ["auroc"]) == []


def test_notes_name_why_a_metric_is_undefined() -> None:
    """AUROC NULL on every fold of a prompting run without log-probabilities is not a one-class test fold."""
    from scdm.classify.results import NOTES, leaderboard_notes

    def board(nulls: dict[str, int]) -> pd.DataFrame:
        return pd.DataFrame({"model": "fake-llm", "variant": "prompt", "space_id": "s1", "split_id": "p1", "head": "prompt-zero-shot",
                             "head_params": "{}", "complete": True, "metric": list(nulls), "n_null": list(nulls.values())})

    hard = board({"auroc": 5, "ap": 5, "f1": 0, "accuracy": 0})  # hard answers, two classes in every fold
    notes = leaderboard_notes(hard, ["auroc", "f1"])
    assert NOTES["no_scores"] in notes and NOTES["single_class"] not in notes
    assert NOTES["no_scores"] not in leaderboard_notes(hard, ["f1", "accuracy"])  # AUROC/AP not shown
    one_class = board({"auroc": 1, "ap": 1, "f1": 1, "accuracy": 1})  # one fold with one class: every metric NULL
    assert NOTES["single_class"] in leaderboard_notes(one_class, ["auroc"])
    assert NOTES["no_scores"] not in leaderboard_notes(one_class, ["auroc"])
    both = board({"auroc": 5, "ap": 5, "f1": 1, "accuracy": 1, "precision": 3})
    notes = leaderboard_notes(both, ["auroc", "precision"])
    assert {NOTES["single_class"], NOTES["no_scores"], NOTES["no_predicted_positive"]} <= set(notes)


def test_evaluate_returns_the_results_of_lora_tuned_spaces(st: Store) -> None:
    """The folds of one tuning (an adapter and a space per fold) are one leaderboard row; evaluate returns it."""
    import numpy as np

    from scdm.store.adapters import AdapterRecord, write_adapter

    evaluate(st, **COMMON)  # the pooled split the adapters were (notionally) tuned on
    (split_id,) = st.query("SELECT split_id FROM splits WHERE scenario = 'pooled'")["split_id"]
    cells = st.cells(["JHU006"])
    ids = []
    for fold in range(COMMON["folds"]):
        X = np.random.default_rng(fold).normal(size=(len(cells), 4)).astype(np.float32)
        X[:, 0] += cells["response"].to_numpy(float)
        emb = st.create_embedding("JHU006", model="geneformer", params={"lora": {"split_id": split_id, "fold": fold}},
                                  dim=4, variant=f"lora:a{fold}", adapter_hash=f"h{fold}")
        for chunk in range(emb.n_chunks):
            lo, hi = emb.chunk_bounds(chunk)
            emb.write_chunk(chunk, X[lo:hi])
        emb.finalize(telemetry={})
        ids.append(emb.embedding_id)
        write_adapter(st, AdapterRecord(
            adapter_id=f"a{fold}", tuning_id="tune1", adapter_hash=f"h{fold}", model="geneformer", checkpoint_hash="c",
            model_params={}, split_id=split_id, fold=fold, scenario="pooled", category_type="all", category="all",
            scheme="cell", label_set="Gefitinib", lora_config={}, train_config={}, n_train=1, train_cells_hash="x",
            train_curve=[], wall_seconds=1.0, device="cpu", telemetry={}, path=f"adapters/a{fold}"))
    out = scdm.evaluate(ids, store=st, heads=["ridge"], scenarios=["pooled"], by=["all"], folds=COMMON["folds"],
                        progress=False)
    (row,) = out.to_dict("records")  # was empty: the run's per-fold spaces never matched the tuning's row
    assert row["variant"] == "lora:tune1" and row["auroc_n"] == COMMON["folds"] and row["complete"]
    assert row["auroc"] == pytest.approx(scdm.results(st, models=["geneformer"])["auroc"].iloc[0])
    from tests.cli.test_words import _cookbook

    # the cookbook grouped by result_key, one per fold's space: each fold of the finished tuning read as 1/3 done
    incomplete = st.sql(_cookbook()["incomplete results"])
    assert incomplete.empty, incomplete
    from scdm.store.evaluation import delete_tasks

    with st.catalog.transaction() as con:  # one fold's task lost: the tuning is incomplete, once
        delete_tasks(con, st.query("SELECT task_id FROM eval_tasks WHERE variant = 'lora:a0'")["task_id"].tolist())
    incomplete = st.sql(_cookbook()["incomplete results"])
    assert incomplete[["variant", "folds_done", "folds_expected"]].to_numpy().tolist() == [["lora:tune1", 4, 5]]


def test_a_held_out_study_left_out_as_one_class_is_named_under_the_board(tmp_path: Path) -> None:
    """Cross-data on three studies of JHU006, one holding sensitive cells only: the row reads 2/2 (complete)
    while its mean covers 2 of its k=3 held-out studies, and a note must say so (none did)."""
    from scdm.classify.results import NOTES, leaderboard_notes
    from scdm.embedding.runner import embed
    from tests.jhu006 import JHU006

    adata = ad.read_h5ad(JHU006)
    third = adata.n_obs // 3
    adata.obs["study"] = ["A"] * third + ["B"] * third + ["C"] * (adata.n_obs - 2 * third)
    keep = (adata.obs["study"] != "C") | (adata.obs["response_Gefitinib"] == "sensitive")
    adata = adata[keep.to_numpy()].copy()
    st = Store(tmp_path / "store")
    st.ingest(adata, name="jhu006_studies", label_key="response_Gefitinib", study_key="study")
    embed(st, "jhu006_studies", "pca", n_comps=5, progress=False)
    evaluate(st, **{**COMMON, "scenarios": ["cross"]})
    board = leaderboard(st)
    assert (board["k"] == 3).all() and (board["folds_expected"] == 2).all() and board["complete"].all()
    assert NOTES["skipped_folds"] in leaderboard_notes(board, ["auroc"])
    # a split whose every fold is scored gets no such note
    pooled = tmp_path / "pooled"
    evaluate(jhu006_store(pooled), **COMMON)
    assert NOTES["skipped_folds"] not in leaderboard_notes(leaderboard(pooled), ["auroc"])


def test_a_result_of_datasets_labelled_for_different_drugs_is_noted_where_it_is_read(tmp_path: Path) -> None:
    """A joint pca of A375 (PLX-4720), JHU006 (Gefitinib) and SCC47 (Afatinib): evaluate warned, but its rows
    (the cross-data AUROC 0.904 of an end-to-end run) read in scdm results, the report and the server with no note."""
    import json
    import warnings

    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from scdm.classify.grid import MixedDrugsWarning
    from scdm.classify.report import write_report
    from scdm.classify.results import NOTES, leaderboard_notes
    from scdm.cli import main
    from scdm.embedding.runner import embed_baseline
    from scdm.server import create_app
    from tests.jhu006 import JHU006

    data = Path(__file__).resolve().parents[1] / "data"
    st = Store(tmp_path / "store")
    st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", drug="PLX-4720", study="A375",
              cancer_type="melanoma")
    st.ingest(JHU006, name="jhu006", label_key="response_Gefitinib", drug="Gefitinib", study="JHU006", cancer_type="HNSCC")
    st.ingest(JHU006, name="jhu006", label_key="response_Vorinostat", drug="Vorinostat")
    st.ingest(data / "SCC47_HNSCC_Kinker2020.h5ad", name="scc47", label_key="response_Afatinib", drug="Afatinib",
              study="SCC47", cancer_type="HNSCC")
    made = embed_baseline(st, ["a375", "jhu006", "scc47"], model="pca", n_comps=5, progress=False)
    joint = [r.embedding_id for r in made]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixedDrugsWarning)
        evaluate(st, joint, heads=["ridge"], by=["all", "cancer_type"], folds=3, scenarios=["pooled", "cross"], silent=True)
    # one drug in the same space: JHU006 alone under Vorinostat
    jhu006 = [r.embedding_id for r in made if r.dataset == "jhu006"]
    evaluate(st, jhu006, label_set="Vorinostat", heads=["ridge"], by=["all"], folds=3,
             scenarios=["pooled"], silent=True)
    board = leaderboard(st, metrics=["auroc"])
    notes = dict(zip(board["category"] + "/" + board["label_set"], board["note"]))
    three = "labelled for different drugs (a375: PLX-4720, jhu006: Gefitinib, scc47: Afatinib)"
    assert notes == {"all/Afatinib,Gefitinib,PLX-4720": three,  # pooled and cross
                     "HNSCC/Afatinib,Gefitinib": "labelled for different drugs (jhu006: Gefitinib, scc47: Afatinib)",
                     "melanoma/PLX-4720": "",  # A375's cells alone: one drug, though its space has three
                     "all/Vorinostat": ""}
    assert set(board.loc[board["category"] == "all", "scenario"]) == {"pooled", "cross"}
    assert NOTES["mixed_drugs"] in leaderboard_notes(board, ["auroc"])
    one_drug = leaderboard(st, metrics=["auroc"], label_sets=["Vorinostat"])
    assert NOTES["mixed_drugs"] not in leaderboard_notes(one_drug, ["auroc"])
    cli = CliRunner().invoke(main, ["--store", str(st.root), "results", "--dataset", "a375,jhu006,scc47", "--format", "json"])
    assert cli.exit_code == 0 and {r["note"] for r in json.loads(cli.stdout)} == {three}
    assert f"note: {NOTES['mixed_drugs']}" in cli.stderr
    with TestClient(create_app(st, token="t" * 32), base_url="http://127.0.0.1:8000",
                    headers={"Authorization": "Bearer " + "t" * 32}) as client:
        notes = client.get("/api/leaderboard/notes", params={"dataset": "a375,jhu006,scc47"}).json()["notes"]
        folds = client.get("/api/results", params={"dataset": "a375,jhu006,scc47", "metric": "auroc"}).json()
    assert NOTES["mixed_drugs"] in notes and folds and {r["note"] for r in folds} == {three}
    # the report reads its own SQL: the row is marked there too
    out = write_report(st, tmp_path / "report", projection="none", formats=["png"], metrics=["auroc"])
    page = out.read_text()
    assert three in page


def test_each_dataset_of_a_result_is_paired_with_the_label_set_it_was_evaluated_with(tmp_path: Path) -> None:
    """The comma-joined label_set 'Gefitinib,shared' does not say which is whose: JHU006 has both names (its default
    Gefitinib, and Vorinostat labels named 'shared'), SCC47 has 'shared' (drug Gefitinib here). Evaluated with the
    defaults both are Gefitinib's (no note); with --label-set shared, JHU006 is Vorinostat's."""
    import warnings

    from scdm.embedding.runner import embed_baseline
    from tests.jhu006 import JHU006

    st = Store(tmp_path / "store")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st.ingest(JHU006, name="jhu006", label_key="response_Gefitinib", drug="Gefitinib", study="JHU006")
        st.ingest(JHU006, name="jhu006", label_key="response_Vorinostat", drug="Vorinostat", label_set="shared")
        st.ingest(Path(__file__).resolve().parents[1] / "data" / "SCC47_HNSCC_Kinker2020.h5ad", name="scc47",
                  label_key="response_Afatinib", drug="Gefitinib", label_set="shared", study="SCC47")
        ids = [r.embedding_id for r in embed_baseline(st, ["jhu006", "scc47"], model="pca", n_comps=5, progress=False)]
        for label_set in (None, "shared"):
            evaluate(st, ids, label_set=label_set, **COMMON)
    board = leaderboard(st, metrics=["auroc"])
    assert dict(zip(board["label_set"], board["note"])) == {
        "Gefitinib,shared": "", "shared": "labelled for different drugs (jhu006: Vorinostat, scc47: Gefitinib)"}


def test_cross_data_means_are_said_to_be_over_held_out_studies() -> None:
    """A cross-data row's folds are held-out studies (one each, weighted alike): `scdm results` and the server
    printed its mean, sd and n as "over folds" with nothing saying what a fold is there."""
    from scdm.classify.results import NOTES, leaderboard_notes

    def board(scenario: str) -> pd.DataFrame:
        return pd.DataFrame({"model": "pca", "variant": "frozen-x", "space_id": "s1", "split_id": "p1", "head": "ridge",
                             "head_params": "{}", "complete": True, "scenario": scenario, "metric": ["auroc"], "n_null": [0]})

    assert NOTES["held_out_studies"] in leaderboard_notes(board("cross"), ["auroc"])
    assert NOTES["held_out_studies"] not in leaderboard_notes(board("pooled"), ["auroc"])


def test_folds_skipped_because_the_head_failed_are_named_with_their_reason_not_sent_to_a_rerun(st: Store) -> None:
    """A fold whose head diverged is a skipped_tasks row with its reason; running scdm evaluate again diverges again."""
    from scdm.classify.results import NOTES, leaderboard_notes
    from scdm.store.evaluation import delete_tasks

    for label_set in ("Gefitinib", "Vorinostat"):
        evaluate(st, label_set=label_set, **COMMON)
    tasks = st.query("SELECT DISTINCT task_id, run_id, space_id, split_id, scenario, category_type, category, head, "
                     "label_set, fold FROM eval_results WHERE fold = 3 ORDER BY label_set")
    diverged = "head error: the fit diverged (loss NaN at step 40); " + "x" * 300  # a long traceback-like reason
    gefitinib = tasks.iloc[0]
    with st.catalog.transaction() as con:
        delete_tasks(con, list(tasks["task_id"]))  # Vorinostat's fold 3 is missing without a reason (an interrupted run)
        con.execute("INSERT INTO skipped_tasks (run_id, space_id, split_id, scenario, category_type, category, fold, head, "
                    "label_set, reason, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                    [gefitinib[c] for c in ("run_id", "space_id", "split_id", "scenario", "category_type", "category")]
                    + [3, gefitinib["head"], "Gefitinib", diverged])
    board = leaderboard(st, metrics=METRICS)
    skipped_note = [n for n in leaderboard_notes(board[board["label_set"] == "Gefitinib"], METRICS) if "skipped" in n]
    assert len(skipped_note) == 1, leaderboard_notes(board, METRICS)
    assert "fit diverged (loss NaN at step 40)" in skipped_note[0] and "x" * 300 not in skipped_note[0]  # shortened
    assert 'scdm sql "SELECT * FROM skipped_tasks' in skipped_note[0]
    assert NOTES["incomplete"] not in leaderboard_notes(board[board["label_set"] == "Gefitinib"], METRICS)
    text = format_leaderboard(board, metrics=METRICS).set_index("label_set")["folds"]
    assert text["Gefitinib"] == "4/5 skipped" and text["Vorinostat"] == "4/5 incomplete"
    # a fold missing without a skip row is still an interrupted run: finish it with scdm evaluate
    assert NOTES["incomplete"] in leaderboard_notes(board[board["label_set"] == "Vorinostat"], METRICS)
    assert not [n for n in leaderboard_notes(board[board["label_set"] == "Vorinostat"], METRICS) if "skipped_tasks" in n]
