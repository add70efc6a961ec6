"""Relabelled, re-annotated or removed cells take the splits and results made from them along.

Found by attacking the store as a user: a relabelled file was silently ignored, metadata rewritten
with --update left splits (and results) of the old grouping to be reused, and a removed dataset's
results printed beside those of its re-ingested successor with the same identity.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scdm.classify.grid import evaluate
from scdm.classify.results import leaderboard
from scdm.embedding.runner import embed
from scdm.store import Store, example_data
from scdm.store.errors import InputDataError
from scdm.store.labels import label_sets


def _a375(tmp_path: Path, name: str, flip: int = 0) -> Path:
    """The A375 example with two candidate study groupings and ``flip`` labels inverted."""
    adata = ad.read_h5ad(example_data())
    n = adata.n_obs
    adata.obs["study_a"] = np.where(np.arange(n) % 2 == 0, "s1", "s2")
    adata.obs["study_b"] = np.where(np.arange(n) < n // 2, "s1", "s2")
    adata.obs["sample_a"] = [f"p{i % 6}" for i in range(n)]
    adata.obs["sample_b"] = [f"p{i // 18}" for i in range(n)]
    if flip:
        y = adata.obs["response_PLX4720"].astype(str).to_numpy().copy()
        y[:flip] = np.where(y[:flip] == "sensitive", "resistant", "sensitive")
        adata.obs["response_PLX4720"] = y
    path = tmp_path / f"{name}.h5ad"
    adata.write_h5ad(path)
    return path


def _sensitive(path: Path) -> list[int]:
    return (ad.read_h5ad(path).obs["response_PLX4720"] == "sensitive").astype(int).tolist()


def _store(tmp_path: Path) -> tuple[Store, Path]:
    st = Store(tmp_path / "store")
    path = _a375(tmp_path, "a375")
    st.ingest(path, name="A375", label_key="response_PLX4720", study_key="study_a", sample_key="sample_a")
    embed(st, "A375", "pca", n_comps=8, progress=False)
    return st, path


def _evaluate(st: Store, **kw) -> None:
    evaluate(st, heads=["ridge"], by=["all"], folds=3, silent=True, **kw)


def _counts(st: Store) -> tuple[int, int, int]:
    return tuple(int(st.query(f"SELECT count(*) AS n FROM {t}")["n"].iloc[0])  # type: ignore[return-value]
                 for t in ("splits", "eval_tasks", "eval_predictions"))


def test_a_relabelled_file_is_refused_unless_update_which_replaces_labels_and_results(tmp_path):
    st, _ = _store(tmp_path)
    _evaluate(st, scenarios=["pooled"], split_scheme="cell")
    before = leaderboard(st, metrics=["auroc"])
    relabelled = _a375(tmp_path, "relabelled", flip=20)
    with pytest.raises(InputDataError, match=r"other labels: 20 of 108 cells differ.*--update.*--label-set"):
        st.ingest(relabelled, label_key="response_PLX4720")
    assert st.cells("A375")["response"].tolist() == _sensitive(example_data())
    assert leaderboard(st, metrics=["auroc"]).equals(before)  # the refusal changed nothing

    st.ingest(relabelled, label_key="response_PLX4720", update=True)
    want = _sensitive(relabelled)
    assert st.cells("A375")["response"].tolist() == want  # the default label set's cells.response follows
    (ls,) = label_sets(st, "A375")
    assert ls.name == "response_PLX4720" and ls.is_default and ls.n_sensitive == sum(want)
    assert _counts(st) == (0, 0, 0)  # no result of the old labels is left to be read as a new one
    _evaluate(st, scenarios=["pooled"], split_scheme="cell")
    after = leaderboard(st, metrics=["auroc"])
    assert len(after) == 1 and after["split_id"].iloc[0] != before["split_id"].iloc[0]


def test_rewritten_study_or_sample_metadata_removes_the_splits_made_from_the_old(tmp_path):
    st, path = _store(tmp_path)
    _evaluate(st, scenarios=["pooled", "cross"], split_scheme="sample")
    assert _counts(st)[0] == 2

    st.ingest(path, study_key="study_b", sample_key="sample_b", update=True)
    assert _counts(st) == (0, 0, 0)
    _evaluate(st, scenarios=["pooled", "cross"], split_scheme="sample")
    cells = st.cells("A375").set_index("row")
    for split_id, scenario in st.query("SELECT split_id, scenario FROM splits").itertuples(index=False):
        folds = st.query('SELECT "row", fold FROM split_assignments WHERE split_id = ?', [split_id]).set_index("row")["fold"]
        groups = cells.loc[folds.index, "study" if scenario == "cross" else "sample"]
        assert (groups.groupby(folds.to_numpy()).nunique() == 1).all() if scenario == "cross" else True
        assert (folds.groupby(groups.to_numpy()).nunique() == 1).all()  # no study/sample on both sides


def test_a_sample_only_rewrite_keeps_cell_level_splits(tmp_path):
    st, path = _store(tmp_path)
    _evaluate(st, scenarios=["pooled"], split_scheme="cell")
    kept = _counts(st)
    st.ingest(path, sample_key="sample_b", update=True)  # cell folds do not depend on sample ids
    assert _counts(st) == kept


def test_a_removed_dataset_takes_its_results_along(tmp_path):
    st, path = _store(tmp_path)
    _evaluate(st, scenarios=["pooled"], split_scheme="cell")
    st.remove_dataset("A375")
    assert _counts(st) == (0, 0, 0)
    assert st.query("SELECT count(*) AS n FROM split_assignments")["n"].iloc[0] == 0
    relabelled = _a375(tmp_path, "relabelled", flip=20)
    st.ingest(relabelled, name="A375", label_key="response_PLX4720", study_key="study_a", sample_key="sample_a")
    embed(st, "A375", "pca", n_comps=8, progress=False)
    _evaluate(st, scenarios=["pooled"], split_scheme="cell")
    assert len(leaderboard(st, metrics=["auroc"])) == 1  # only the current data's result


def _change_during_first_task(st: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """Relabel or remove the dataset right after the run stored its first task (another process would)."""
    from scdm.store import evaluation

    real_add, seen = evaluation.ResultWriter.add, []

    def add(writer: evaluation.ResultWriter, out: evaluation.TaskOutcome) -> None:
        real_add(writer, out)
        seen.append(out)
        if len(seen) == 1:
            writer.flush()
            if change == "remove":
                st.remove_dataset("A375")
            else:
                st.ingest(_a375(tmp_path, "relabelled", flip=60), name="A375", label_key="response_PLX4720", update=True)

    monkeypatch.setattr(evaluation.ResultWriter, "add", add)


@pytest.mark.parametrize("change", ["relabel", "remove"])
def test_a_run_stores_no_result_of_cells_changed_while_it_fitted(tmp_path, monkeypatch, change):
    st, _ = _store(tmp_path)
    _change_during_first_task(st, tmp_path, monkeypatch, change)
    summary = evaluate(st, heads=["ridge", "logreg"], by=["all"], folds=3, scenarios=["pooled"], split_scheme="cell",
                       silent=True)
    # fitted on the old labels after the cleanup: stored, they would print beside the new results
    assert _counts(st) == (0, 0, 0)
    assert summary.results.empty
    # one task stored before the change (which then removed it); the five fitted after are not counted
    assert summary.n_done == 1 == int(st.query("SELECT n_done FROM eval_runs")["n_done"].iloc[0])


def test_a_run_stops_before_the_next_space_when_its_cells_changed(tmp_path, monkeypatch):
    st, _ = _store(tmp_path)
    embed(st, "A375", "pca", n_comps=4, progress=False)  # a second space, evaluated after the change
    _change_during_first_task(st, tmp_path, monkeypatch, "relabel")
    with pytest.raises(InputDataError, match="changed .* while this run evaluated them.*again"):
        evaluate(st, heads=["ridge"], by=["all"], folds=3, scenarios=["pooled"], split_scheme="cell", silent=True)
    # the second space's splits were planned on the old labels: neither they nor their results are stored
    assert _counts(st) == (0, 0, 0)
    assert st.query("SELECT status FROM eval_runs")["status"].tolist() == ["failed"]
