"""Results and trained heads of an earlier revision of a head (an older scdm) are not reused or shown as current.

Until 2026-12-07 logreg and mlp with standardize="global" counted dead (constant) columns as scale 1
in the shared scale: on an embedding in small units with dead dimensions the fit differed (a store's
hvg space of 120 cells with 15 dead genes: AUROC 0.856 then, 0.789 now; its trained head called
40 cells sensitive then, 61 now). The task and trained-head ids did not change, so an upgraded scdm
reused the old numbers and the old head. The head's revision is part of both identities now.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdm.classify.grid import evaluate
from scdm.classify.heads import LogRegHead
from scdm.classify.results import leaderboard
from scdm.classify.trained_heads import train_head
from scdm.store import Store, example_data
from tests.classify.test_trained_heads import _scores, a375_store, write_embedding


@pytest.fixture()
def st(tmp_path: Path) -> Store:
    store = a375_store(tmp_path / "store")
    values = _scores(ad.read_h5ad(example_data("A375")), 6) * 0.01  # small units, with dead dimensions
    write_embedding(store, "a375", np.hstack([values, np.zeros((len(values), 6), np.float32)]))
    return store


def run(st: Store) -> str:
    return evaluate(st, heads=["logreg"], scenarios=["pooled"], by=["all"], folds=3, seed=0).run_id


def test_an_older_revisions_tasks_are_fitted_again_and_left_out_until_then(st: Store, monkeypatch, caplog) -> None:
    with monkeypatch.context() as m:  # the older scdm: revision 1, no head_revisions in its run config
        m.setattr(LogRegHead, "revision", lambda self: 1, raising=False)
        run(st)
    with st.catalog.transaction() as con:
        con.execute("UPDATE eval_runs SET config = json_object('heads', ['logreg'])")
    assert st.query("SELECT count(*) AS n FROM eval_tasks")["n"][0] == 3

    with caplog.at_level("WARNING"):
        assert leaderboard(st).empty
    assert "3 logreg tasks were fitted by an older scdm" in caplog.text
    from scdm.classify.report import write_report

    page = write_report(st, st.root.parent / "report", projection="none", progress=False).read_text()
    assert 'class="warn left-out">3 logreg tasks were fitted by an older scdm' in page  # the page says so too

    run_id = run(st)
    done = st.query("SELECT n_done, n_reused FROM eval_runs WHERE run_id = ?", [run_id]).iloc[0]
    assert (done["n_done"], done["n_reused"]) == (3, 0)
    # the replaced folds are gone: one result identity holds this revision's 3 folds only
    assert st.query("SELECT count(*) AS n FROM eval_tasks")["n"][0] == 3
    caplog.clear()
    with caplog.at_level("WARNING"):
        board = leaderboard(st, metrics=["auroc"])
    assert board["folds_done"].tolist() == [3] and "older scdm" not in caplog.text


def test_a_head_trained_by_an_older_revision_is_not_reused(st: Store, monkeypatch) -> None:
    with monkeypatch.context() as m:
        m.setattr(LogRegHead, "revision", lambda self: 1, raising=False)
        old = train_head(st, dataset="a375", model="pca-test", head="logreg")
    assert train_head(st, dataset="a375", model="pca-test", head="logreg") != old


@pytest.mark.parametrize(("head", "params", "previous"), [
    ("logreg", {}, 2), ("logreg", {"standardize": True}, 1), ("ridge", {}, 2), ("lightgbm", {"n_estimators": 5}, 1),
    ("shuffled-label", {"base": "ridge"}, 1), ("shuffled-label", {"base": "logreg"}, 2)])
def test_results_scored_on_float32_probabilities_are_fitted_again(st: Store, monkeypatch, head, params, previous) -> None:
    # migration 15 scores every head's probabilities in float64 (before: rounded to float32, which tied the most
    # confident cells: a line with four far cells stored AUROC 5/9 for 4/9); only the mlp and dann revisions
    # were raised, so the other heads' results of the float32 scoring were reused as current
    from scdm.classify.heads import HEADS

    def grid(store: Store) -> str:
        return evaluate(store, heads=[head], head_params={head: params}, scenarios=["pooled"], by=["all"], folds=3,
                        seed=0).run_id

    with monkeypatch.context() as m:
        m.setattr(HEADS[head], "revision", lambda self: previous, raising=False)
        grid(st)
    run_id = grid(st)
    assert st.query("SELECT n_done, n_reused FROM eval_runs WHERE run_id = ?", [run_id]).iloc[0].tolist() == [3, 0]


def test_ridge_results_of_the_grid_before_its_per_split_mean_are_fitted_again(st: Store, monkeypatch, caplog) -> None:
    # ridge's grid once summed every split's float32 statistics about the whole space's mean (up to 3e-2 off
    # in probability where datasets sit apart); its stored results kept their ids and were reused as current
    from scdm.classify.heads import RidgeHead

    def ridge(store: Store) -> str:
        return evaluate(store, heads=["ridge"], scenarios=["pooled"], by=["all"], folds=3, seed=0).run_id

    with monkeypatch.context() as m:
        m.setattr(RidgeHead, "revision", lambda self: 1, raising=False)
        ridge(st)
    with st.catalog.transaction() as con:
        con.execute("UPDATE eval_runs SET config = json_object('heads', ['ridge'])")
    with caplog.at_level("WARNING"):
        assert leaderboard(st).empty
    assert "3 ridge tasks were fitted by an older scdm (X @ coef was summed in float32" in caplog.text
    run_id = ridge(st)
    assert st.query("SELECT n_done, n_reused FROM eval_runs WHERE run_id = ?", [run_id]).iloc[0].tolist() == [3, 0]
    assert leaderboard(st, metrics=["auroc"])["folds_done"].tolist() == [3]


def test_a_head_an_older_revision_fitted_is_listed_as_such(st: Store, monkeypatch) -> None:
    # the revision was only hashed into the head id, so `trained_heads` and GET /api/heads listed a head an
    # older revision fitted like a current one
    from fastapi.testclient import TestClient

    from scdm.classify.trained_heads import trained_heads
    from scdm.server import create_app
    from tests.server.conftest import TOKEN

    with monkeypatch.context() as m:
        m.setattr(LogRegHead, "revision", lambda self: 1, raising=False)
        old = train_head(st, dataset="a375", model="pca-test", head="logreg")
    new = train_head(st, dataset="a375", model="pca-test", head="logreg")
    unrecorded = train_head(st, dataset="a375", model="pca-test", head="ridge")
    with st.catalog.transaction() as con:  # as an scdm before the revision column wrote it
        con.execute("UPDATE trained_heads SET revision = NULL WHERE head_id = ?", [unrecorded])
    listed = trained_heads(st).set_index("head_id")
    assert listed.loc[old, "revision"] == 1 and listed.loc[new, "revision"] == 4
    assert listed.loc[old, "revision_note"].startswith("fitted by revision 1 of logreg, now 4 (the lbfgs of scikit-learn ran in float32")
    assert "; and its probabilities were scored" in listed.loc[old, "revision_note"]
    assert "; and standardize='global' counted constant" in listed.loc[old, "revision_note"]
    assert listed.loc[new, "revision_note"] == ""
    assert listed.loc[unrecorded, "revision_note"].startswith("trained before scdm recorded head revisions; ridge is at "
                                                              "revision 4 now")
    with TestClient(create_app(st, token=TOKEN), base_url="http://127.0.0.1:8000",
                    headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        api = {h["head_id"]: h for h in client.get("/api/heads").json()}
    assert {k: (api[k]["revision"], api[k]["revision_note"]) for k in api} == {
        k: (None if pd.isna(listed.loc[k, "revision"]) else int(listed.loc[k, "revision"]), listed.loc[k, "revision_note"])
        for k in listed.index}


def test_the_results_view_keeps_an_interrupted_runs_new_revision_apart_from_the_older_folds(st: Store, monkeypatch) -> None:
    # until a run of the new revision finishes, both revisions' folds are stored; the view's result_key
    # left the revision out, so grouping by it averaged 3 old folds and 1 new one as n 4 of a 3-fold split
    from scdm.store import evaluation

    with monkeypatch.context() as m:
        m.setattr(LogRegHead, "revision", lambda self: 1, raising=False)
        run(st)
    with st.catalog.transaction() as con:
        con.execute("UPDATE eval_runs SET config = json_object('heads', ['logreg'])")
    real_add, added = evaluation.ResultWriter.add, []

    def add_one_then_interrupt(writer: evaluation.ResultWriter, out: evaluation.TaskOutcome) -> None:
        if added:
            raise KeyboardInterrupt  # Ctrl-C after the new revision's first fold
        real_add(writer, out)
        added.append(out)

    monkeypatch.setattr(evaluation.ResultWriter, "add", add_one_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(st)
    per_key = st.sql("SELECT count(value) AS n FROM results WHERE metric = 'auroc' GROUP BY result_key ORDER BY n")
    assert per_key["n"].tolist() == [1, 3]  # each revision's folds under a key of their own
    groups = st.sql("SELECT result_key, revision, count(value) AS n, count(DISTINCT fold) AS folds FROM results "
                    "WHERE metric = 'auroc' GROUP BY result_key, revision ORDER BY revision")
    assert groups[["revision", "n", "folds"]].to_numpy().tolist() == [[1, 3, 3], [4, 1, 1]]
    assert groups["result_key"].nunique() == 2
    from tests.cli.test_words import _cookbook

    per_cell = _cookbook()["per-cell test predictions joined with the cell metadata, per result"]
    rows = st.sql(per_cell.replace("t.scenario = 'cross'", "t.scenario = 'pooled'"))  # this store has one study
    fold_0 = st.query("SELECT n_test FROM split_folds WHERE fold = 0")["n_test"][0]
    assert rows.groupby("revision")["n"].sum().to_dict() == {1: 108, 4: fold_0}  # each cell once per result


def test_a_newer_revisions_results_are_left_out_with_a_note_not_averaged_with_this_ones(st: Store, monkeypatch,
                                                                                      caplog) -> None:
    # a lab shares one store: a newer scdm (logreg one revision on) fitted the same tasks; this scdm
    # averaged its 3 folds with the newer scdm's 3 as one result of n 6 over a 3-fold split
    this = LogRegHead().revision()
    with monkeypatch.context() as m:
        m.setattr(LogRegHead, "revision", lambda self: this + 1, raising=False)
        run(st)
    with caplog.at_level("WARNING"):
        assert leaderboard(st).empty
    assert f"3 logreg tasks were fitted by a newer scdm (revision {this + 1} of logreg; this scdm has {this})" in caplog.text
    run(st)
    caplog.clear()
    with caplog.at_level("WARNING"):
        board = leaderboard(st, metrics=["auroc"])
    assert board["folds_done"].tolist() == [3] and board["n_folds"].tolist() == [3]
    assert "newer scdm" in caplog.text  # still stored, still said to be left out


def test_a_result_has_the_same_identity_columns_under_any_filter(st: Store) -> None:
    # the display name of a head carries its parameters only where the rows shown have several, so
    # one result was 'logreg' in one export and 'logreg {"C": 1.0, ...}' in another: a join by name missed it
    from scdm.classify.results import wide_leaderboard

    first = run(st)
    evaluate(st, heads=["logreg"], head_params={"logreg": {"C": 0.1}}, scenarios=["pooled"], by=["all"], folds=3, seed=0)
    identity = ["space_id", "split_id", "label_set", "model_name", "head_name", "head_params", "revision"]
    alone = wide_leaderboard(leaderboard(st, run_id=first, metrics=["auroc"]), metrics=["auroc"])
    both = wide_leaderboard(leaderboard(st, metrics=["auroc"]), metrics=["auroc"])
    assert len(alone) == 1 and len(both) == 2
    assert alone["head"].iloc[0] not in set(both["head"])  # the display names differ between the filters
    matched = both.merge(alone[identity], on=identity)
    assert len(matched) == 1 and matched["auroc"].iloc[0] == alone["auroc"].iloc[0]
    assert alone["revision"].iloc[0] == LogRegHead().revision() and alone["head_name"].iloc[0] == "logreg"
