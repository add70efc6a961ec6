"""The evaluation grid on real data (A375 real labels; JHU006/SCC47 proxy labels) and resume."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdm.classify.grid import evaluate
from scdm.classify.metrics import METRICS
from scdm.classify.results import format_leaderboard, leaderboard
from scdm.classify.splits import SampleLeakageWarning, load_split
from scdm.store import Store, example_data
from scdm.store.errors import EmbeddingNotFoundError, InputDataError

DATA = Path(__file__).resolve().parents[1] / "data"
DATASETS = [
    # name, path, label, study, tissue, cancer type, drug type, regimen
    ("a375", example_data("A375"), "response_PLX4720", "GSE108383", "skin", "melanoma", "targeted", "PLX4720"),
    ("jhu006", str(DATA / "JHU006_HNSCC_Kinker2020.h5ad"), "response_Gefitinib", "JHU006", "head and neck",
     "HNSCC", "targeted", "EGFR inhibitor"),
    ("scc47", str(DATA / "SCC47_HNSCC_Kinker2020.h5ad"), "response_Afatinib", "SCC47", "head and neck", "HNSCC",
     "targeted", "EGFR inhibitor"),
]
HEADS = ["ridge", "logreg", "majority"]


def write_pca(st: Store, model: str, dim: int, seed: int = 0) -> list[str]:
    """A joint PCA of the three datasets on their common genes, written through the store API."""
    frames = {name: ad.read_h5ad(path) for name, path, *_ in DATASETS}
    common = sorted(set.intersection(*(set(a.var_names) for a in frames.values())))
    blocks = [np.asarray(frames[name][:, common].X, dtype=np.float64) for name, *_ in DATASETS]
    joint = np.vstack(blocks)
    joint -= joint.mean(axis=0)
    rng = np.random.default_rng(seed)
    _, _, vt = np.linalg.svd(joint[rng.permutation(len(joint))], full_matrices=False)
    ids, start = [], 0
    for (name, *_), block in zip(DATASETS, blocks):
        scores = (joint[start:start + len(block)] @ vt[:dim].T).astype(np.float32)
        start += len(block)
        emb = st.create_embedding(name, model=model, params={"n_components": dim, "genes": len(common)}, dim=dim)
        for chunk in range(emb.n_chunks):
            lo, hi = emb.chunk_bounds(chunk)
            emb.write_chunk(chunk, scores[lo:hi])
        emb.finalize()
        ids.append(emb.embedding_id)
    return ids


@pytest.fixture()
def st(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    for name, path, label, study, tissue, cancer, drug, regimen in DATASETS:
        store.ingest(path, name=name, label_key=label, study=study, tissue=tissue, cancer_type=cancer,
                     drug_type=drug, regimen=regimen)
    return store


def run(st: Store, **kwargs):
    options = {"heads": HEADS, "folds": 3, "by": ["all", "cancer_type"], "silent": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        return evaluate(st, **{**options, **kwargs})


def test_pooled_and_cross_results_in_long_format_with_predictions(st: Store) -> None:
    write_pca(st, "pca-joint", 10)
    summary = run(st)
    assert summary.n_done == summary.n_tasks > 0 and summary.split_scheme == "cell"
    tasks = st.query("SELECT * FROM eval_tasks")
    results = st.query("SELECT * FROM eval_results")
    assert len(results) == len(tasks) * len(METRICS)
    for column in ("run_id", "space_id", "split_id", "fold", "head", "metric", "value", "n_train", "n_test", "fit_seconds"):
        assert column in results.columns
    # pooled: every labelled cell is predicted exactly once per (category, head)
    preds = st.query("SELECT p.*, t.head, t.split_id, t.scenario FROM eval_predictions p JOIN eval_tasks t USING (task_id)")
    pooled = preds[preds["scenario"] == "pooled"]
    assert not pooled.duplicated(["split_id", "head", "dataset_id", "row"]).any()
    n_labelled = int(st.cells()["response"].notna().sum())
    assert len(pooled[(pooled["head"] == "ridge")].drop_duplicates(["dataset_id", "row"])) == n_labelled
    assert len(preds) == int(tasks["n_test"].sum())
    # cross: HNSCC has two studies (JHU006, SCC47); melanoma has one and is recorded as skipped
    cross = tasks[tasks["scenario"] == "cross"]
    assert set(cross["category"]) == {"all", "HNSCC"}
    skipped = summary.skipped
    assert (skipped["category"] == "melanoma").any()
    assert skipped.loc[skipped["category"] == "melanoma", "reason"].str.contains("one study").all()
    # real signal: the PCA separates A375's parental from BRAF-inhibitor-resistant cells
    board = leaderboard(st, metrics=["auroc"], heads=["ridge"], scenarios=["pooled"])
    melanoma = board[board["category"] == "melanoma"].iloc[0]
    assert melanoma["mean"] > 0.8 and melanoma["n_folds"] == 3
    majority = leaderboard(st, metrics=["auroc"], heads=["majority"])
    assert np.allclose(majority["mean"], 0.5)


def test_resume_skips_finished_tasks(st: Store) -> None:
    write_pca(st, "pca-joint", 8)
    first = run(st)
    again = run(st)
    assert again.n_done == 0 and again.n_reused == first.n_tasks
    # lose some finished tasks (as if the first run had been killed): only those are refitted
    lost = st.query("SELECT task_id FROM eval_tasks WHERE head = 'logreg' ORDER BY task_id LIMIT 4")["task_id"].tolist()
    st.execute("DELETE FROM eval_tasks WHERE list_contains(?, task_id)", [lost])
    resumed = run(st)
    assert resumed.n_done == 4 and resumed.n_reused == first.n_tasks - 4
    counts = st.query("SELECT task_id, count(*) AS n FROM eval_results GROUP BY task_id")
    assert (counts["n"] == len(METRICS)).all()  # no duplicate rows from the interrupted tasks
    # a new head only adds its own tasks
    more = run(st, heads=[*HEADS, "shuffled-label"])
    assert more.n_done == first.n_tasks // len(HEADS) and more.n_reused == first.n_tasks


def test_tasks_stored_without_predictions_are_fitted_again_when_predictions_are_asked(
        st: Store, caplog: pytest.LogCaptureFixture) -> None:
    """A run with --no-predictions must not leave a later run that asks for predictions without them."""
    write_pca(st, "pca-joint", 8)
    first = run(st, save_predictions=False)
    assert st.query("SELECT count(*) AS n FROM eval_predictions")["n"][0] == 0
    assert run(st, save_predictions=False).n_reused == first.n_tasks  # nothing asked that is missing
    with caplog.at_level("WARNING", logger="scdm.classify.grid"):
        second = run(st)
    assert second.n_done == first.n_tasks and f"{first.n_tasks} tasks were stored without test predictions" in caplog.text
    tasks = st.query("SELECT task_id, n_test, run_id FROM eval_tasks")
    assert len(tasks) == first.n_tasks and (tasks["run_id"] == second.run_id).all()
    stored = st.query("SELECT task_id, count(*) AS n FROM eval_predictions GROUP BY task_id")
    assert dict(zip(stored["task_id"], stored["n"])) == dict(zip(tasks["task_id"], tasks["n_test"]))
    counts = st.query("SELECT task_id, count(*) AS n FROM eval_results GROUP BY task_id")
    assert (counts["n"] == len(METRICS)).all()  # replaced, not doubled
    assert run(st).n_reused == first.n_tasks


def test_a_split_evaluated_with_more_of_its_space_selected_is_reused_not_counted_twice(tmp_path: Path) -> None:
    """A task's id names every embedding selected, but its fit reads only its split's cells: the melanoma
    split (a375's cells only) evaluated again with all three datasets selected is the same result. It was
    fitted again under another id and the leaderboard averaged both copies: n = 6 folds of a 3-fold split."""
    st = Store(tmp_path / "store")
    for name, path, label, study, tissue, cancer, drug, regimen in DATASETS:  # one label-set name for all three
        st.ingest(path, name=name, label_key=label, label_set="response", study=study, tissue=tissue,
                  cancer_type=cancer, drug_type=drug, regimen=regimen)
    ids = write_pca(st, "pca-joint", 8)
    first = run(st, embeddings=[ids[0]], heads=["logreg"])
    both = run(st, heads=["logreg"])
    melanoma = first.results[first.results["category"] == "melanoma"]
    assert len(melanoma) and set(melanoma["task_id"]) <= set(both.results["task_id"])  # the stored result, reused
    assert both.n_reused == melanoma["task_id"].nunique() and both.n_done == both.n_tasks - both.n_reused
    board = leaderboard(st, metrics=["auroc"])
    assert (board["n_folds"] <= board["k"]).all() and (board["folds_done"] <= board["k"]).all()
    n_stored = st.query("SELECT count(*) AS n FROM eval_tasks")["n"][0]
    assert n_stored == first.n_tasks + both.n_done
    again = run(st, heads=["logreg"])
    assert again.n_done == 0 and again.n_reused == both.n_tasks
    assert st.query("SELECT count(*) AS n FROM eval_tasks")["n"][0] == n_stored


def test_the_same_fit_stored_without_predictions_under_another_id_is_fitted_again_for_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The HNSCC split (jhu006 + scc47) evaluated with --no-predictions, then with a375 selected too and
    predictions asked: its 3 stored fits were reused under their other ids, and the run stored no prediction
    of them (0 rows, no word said)."""
    st = Store(tmp_path / "store")
    for name, path, label, study, tissue, cancer, drug, regimen in DATASETS:
        st.ingest(path, name=name, label_key=label, label_set="response", study=study, tissue=tissue,
                  cancer_type=cancer, drug_type=drug, regimen=regimen)
    ids = write_pca(st, "pca-joint", 8)
    options = {"heads": ["logreg"], "by": ["cancer_type"], "scenarios": ["pooled"]}
    first = run(st, embeddings=ids[1:], save_predictions=False, **options)
    with caplog.at_level("WARNING", logger="scdm.classify.grid"):
        both = run(st, **options)
    assert f"{first.n_tasks} tasks were stored without test predictions" in caplog.text
    assert (both.n_done, both.n_reused) == (both.n_tasks, 0)
    tasks = st.query("SELECT task_id, category, n_test FROM eval_tasks")
    assert len(tasks) == both.n_tasks and set(tasks["task_id"]) == set(both.results["task_id"])  # replaced, not doubled
    stored = st.query("SELECT task_id, count(*) AS n FROM eval_predictions GROUP BY task_id")
    assert dict(zip(stored["task_id"], stored["n"])) == dict(zip(tasks["task_id"], tasks["n_test"]))
    board = leaderboard(st, metrics=["auroc"])
    assert (board["n_folds"] <= board["k"]).all()


def test_copies_of_one_fit_stored_before_schema_11_are_removed_by_its_migration(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stores written before runs reused the same fit hold it twice; migration 11 keeps the first copy."""
    from scdm.store import evaluation as records

    st = Store(tmp_path / "store")
    for name, path, label, study, tissue, cancer, drug, regimen in DATASETS:
        st.ingest(path, name=name, label_key=label, label_set="response", study=study, tissue=tissue,
                  cancer_type=cancer, drug_type=drug, regimen=regimen)
    ids = write_pca(st, "pca-joint", 8)
    with monkeypatch.context() as old_code:
        old_code.setattr(records, "same_fits", lambda _st, _keys: {})
        first = run(st, embeddings=[ids[0]], heads=["logreg"])
        run(st, heads=["logreg"])
    assert (leaderboard(st, metrics=["auroc"])["n_folds"] > 3).any()  # the copies, averaged as folds
    st.execute("DELETE FROM migrations WHERE version = 11")
    st = Store(tmp_path / "store")  # migrates
    board = leaderboard(st, metrics=["auroc"])
    assert (board["n_folds"] <= board["k"]).all() and (board["folds_done"] <= board["k"]).all()
    kept = set(st.query("SELECT task_id FROM eval_tasks")["task_id"])
    assert set(first.results["task_id"]) <= kept  # the first copy stays
    counts = st.query("SELECT (SELECT count(*) FROM eval_results) AS r, (SELECT count(*) FROM eval_tasks) AS t, "
                      "(SELECT count(DISTINCT task_id) FROM eval_predictions) AS p").iloc[0]
    assert counts["r"] == counts["t"] * len(METRICS) and counts["p"] == counts["t"]


def test_models_share_partitions_and_spaces_are_never_mixed(st: Store) -> None:
    ids_a = write_pca(st, "pca-a", 6)
    ids_b = write_pca(st, "pca-b", 12)
    summary = run(st, heads=["ridge"])
    assert len(summary.spaces) == 2
    tasks = st.query("SELECT * FROM eval_tasks")
    for _, group in tasks.groupby("space_id"):
        embedded = {e for ids in group["embedding_ids"] for e in json.loads(ids)}
        assert embedded in (set(ids_a), set(ids_b))  # each task pools one space's embeddings only
    split_sets = [set(g["split_id"]) for _, g in tasks.groupby("model")]
    assert split_sets[0] == split_sets[1]  # identical partitions for both models
    assert st.query("SELECT count(*) AS n FROM splits")["n"].iloc[0] == len(split_sets[0]) + 1  # + skipped melanoma
    split = load_split(st, tasks["split_id"].iloc[0])
    assert split.n_cells > 0 and split.cells["fold"].notna().all()
    # only one embedding selected: only its space runs
    only = run(st, embeddings=[ids_a[0]], heads=["majority", "logreg"], jobs=2)
    assert only.spaces == (tasks.loc[tasks["model"] == "pca-a", "space_id"].iloc[0],)


def test_single_class_test_fold_stores_null_and_a_flag(st: Store) -> None:
    write_pca(st, "pca-joint", 6)
    cells = st.cells()
    a375 = st.dataset("a375").dataset_id
    custom = cells[["dataset_id", "row"]].copy()
    # test fold: only the sensitive A375 cells
    custom["fold"] = np.where((cells["dataset_id"] == a375) & (cells["response"] == 1), "test", "train")
    summary = run(st, scenarios=["custom"], custom=custom, by=["all"], heads=["ridge"])
    assert summary.n_done == 1
    values = st.query("SELECT metric, value FROM eval_results").set_index("metric")["value"]
    assert values.isna().all()  # one class in the test fold: no metric, not only the two-class ones
    assert st.query("SELECT flags FROM eval_tasks")["flags"].iloc[0].startswith("single_class_test")
    board = leaderboard(st, metrics=["auroc", "accuracy"])
    assert (board.set_index("metric")["n_null"] == 1).all()
    text = format_leaderboard(board, metrics=["auroc", "accuracy"])
    assert (text["auroc"] == "n/a").all() and (text["accuracy"] == "n/a").all()


def test_grouped_scheme_and_bad_requests(st: Store) -> None:
    ids = write_pca(st, "pca-joint", 6)
    with pytest.raises(InputDataError, match="sample_key"):
        run(st, split_scheme="sample")
    with pytest.raises(EmbeddingNotFoundError, match="No embedding 'nope'"):
        run(st, embeddings=["nope"])
    with pytest.raises(InputDataError, match="Unknown head 'rigde'"):
        run(st, heads=["rigde"])
    assert ids


def test_ridge_downdates_equal_fitting_each_fold(st: Store) -> None:
    """The grid's Gram-downdate ridge gives the predictions of a RidgeHead fitted per fold."""
    from scdm.classify.heads import get_head

    ids = write_pca(st, "pca-joint", 8)
    run(st, heads=["ridge"], by=["all"])
    X = np.vstack([st.read_embedding(e) for e in sorted(ids, key=lambda e: st.query(
        "SELECT dataset_id FROM embeddings WHERE embedding_id = ?", [e])["dataset_id"].iloc[0])])
    cells = st.cells()  # dataset then row order, like the stacked matrix
    key = dict(zip(zip(cells["dataset_id"], cells["row"]), range(len(cells))))
    y = cells["response"].to_numpy(dtype=float)
    tasks = st.query("SELECT task_id, split_id, fold, scenario FROM eval_tasks")
    assert set(tasks["scenario"]) == {"pooled", "cross"}
    for task in tasks.itertuples():
        split = load_split(st, task.split_id)
        rows = np.array([key[k] for k in zip(split.cells["dataset_id"], split.cells["row"])])
        test = split.test_mask(task.fold)
        expected = get_head("ridge").fit(X[rows[~test]], y[rows[~test]].astype(int)).proba_sensitive(X[rows[test]])
        got = st.query('SELECT dataset_id, "row", proba FROM eval_predictions WHERE task_id = ? ORDER BY dataset_id, "row"',
                       [task.task_id])
        np.testing.assert_allclose(got["proba"].to_numpy(), expected, atol=2e-5)


def test_logreg_solves_pooled_and_cross_splits_of_a_category_together(st: Store, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Splits over the same cells (pooled and cross of one category) share their passes; each
    split's numbers equal those of the split evaluated alone."""
    # Tight tolerance: compare the solutions, not where the default stopping rule fell (a wider
    # batch's products round differently, which moves the default-tol stop by ~1e-5 in probability).
    tight = {"logreg": {"tol": 1e-9, "max_iter": 1000}}
    from scdm.classify import grid, tasks

    write_pca(st, "pca-joint", 8)
    groups: list[set[str]] = []
    real = grid.logreg_split

    def spy(space, group, **kwargs):
        groups.append({t.split.scenario for t in group})
        return real(space, group, **kwargs)

    monkeypatch.setattr(grid, "logreg_split", spy)
    run(st, heads=["logreg"], by=["all", "cancer_type"], head_params=tight)
    # all: pooled + cross together; HNSCC: pooled + cross; melanoma: pooled only (one study)
    assert sorted(map(sorted, groups)) == [["cross", "pooled"], ["cross", "pooled"], ["pooled"]]

    alone = Store(tmp_path / "alone")
    for name, path, label, study, tissue, cancer, drug, regimen in DATASETS:
        alone.ingest(path, name=name, label_key=label, study=study, tissue=tissue, cancer_type=cancer,
                     drug_type=drug, regimen=regimen)
    write_pca(alone, "pca-joint", 8)
    run(alone, heads=["logreg"], by=["all", "cancer_type"], scenarios=["cross"], head_params=tight)
    sql = ("SELECT t.category, t.fold, p.dataset_id, p.\"row\", p.proba FROM eval_predictions p JOIN eval_tasks t "
           "USING (task_id) WHERE t.scenario = 'cross' ORDER BY ALL")
    together, by_itself = st.query(sql), alone.query(sql)
    assert len(together) == len(by_itself) > 0
    # Even at tol=1e-9 every fold stops at float32's precision floor (no decrease found along the
    # line, max |gradient| 5e-7 to 2e-5), and where in that flat bottom depends on how the
    # products round: on an AMD EPYC the two runs differ by up to 7.9e-5 in probability (mean
    # 2.8e-6), on the Intel machine of earlier CI runs by under 1e-7. A fold mixed up with another
    # differs by > 1e-2.
    np.testing.assert_allclose(together["proba"].to_numpy(), by_itself["proba"].to_numpy(), atol=3e-4)

    # a group must hold one set of cells: splits of different categories are refused
    pooled = [load_split(st, s) for s in st.query(
        "SELECT DISTINCT split_id FROM eval_tasks WHERE scenario = 'pooled' ORDER BY category")["split_id"]]
    assert tasks.same_cells_key(pooled[0]) != tasks.same_cells_key(pooled[1])


def _stored_results(st: Store) -> list[tuple]:
    frame = st.query("SELECT t.split_id, t.fold, t.head, r.metric, r.value FROM eval_results r "
                     "JOIN eval_tasks t USING (task_id) ORDER BY ALL")
    return list(frame.itertuples(index=False, name=None))


def test_default_jobs_fit_a_small_space_on_every_cpu_with_the_same_results(st: Store, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from scdm.classify import grid

    write_pca(st, "pca-joint", 6)
    other = Store(tmp_path / "other")
    for name, path, label, study, tissue, cancer, drug, regimen in DATASETS:
        other.ingest(path, name=name, label_key=label, study=study, tissue=tissue, cancer_type=cancer,
                     drug_type=drug, regimen=regimen)
    write_pca(other, "pca-joint", 6)
    monkeypatch.setattr(grid, "cpu_budget", lambda: 3)
    asked: list[int] = []
    run_tasks = grid._run_tasks
    monkeypatch.setattr(grid, "_run_tasks", lambda tasks, jobs: (asked.append(jobs), run_tasks(tasks, jobs))[1])
    options = {"heads": ["majority", "mlp"], "by": ["all"], "head_params": {"mlp": {"profile": "fast", "epochs": 2}}}
    run(st, **options)  # default: jobs=None
    assert asked == [3]  # 6-dim PCA of ~1,000 cells: a small matrix, one fit per CPU
    run(other, jobs=1, **options)
    assert asked == [3, 1]
    assert _stored_results(st) == _stored_results(other)  # the same numbers, fitted in parallel or one by one
    config = json.loads(st.query("SELECT config FROM eval_runs")["config"].iloc[0])
    assert config["jobs"] == "auto"


def test_default_jobs_fit_a_large_space_one_at_a_time_on_every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    from scdm.classify import grid

    monkeypatch.setattr(grid, "cpu_budget", lambda: 8)

    class _Space:
        def __init__(self, rows: int, dim: int) -> None:
            self.X = np.zeros((rows, dim), dtype=np.float32)

    small, large = _Space(1_000, 64), _Space(grid.SMALL_MATRIX // 64, 64)
    assert grid._space_jobs(small, None, 20) == 8
    assert grid._space_jobs(small, None, 3) == 3  # no more threads than fits
    assert grid._space_jobs(small, None, 0) == 1
    assert grid._space_jobs(large, None, 20) == 1  # parallel fits would each copy their training cells
    assert grid._space_jobs(large, 4, 20) == 4  # an explicit jobs is kept


def _task_params(st: Store, run_id: str) -> dict[str, dict]:
    frame = st.query("SELECT DISTINCT head, head_params FROM eval_tasks WHERE run_id = ?", [run_id])
    return {h: json.loads(p) for h, p in zip(frame["head"], frame["head_params"])}


def test_the_seed_reaches_every_head_that_takes_one(st: Store) -> None:
    from scdm.classify.heads import get_head

    write_pca(st, "pca-joint", 6)
    mlp = {"profile": "fast", "epochs": 1}
    common = {"heads": ["ridge", "shuffled-label", "mlp"], "scenarios": ["pooled"], "by": ["all"]}
    shuffled_mlp = {"base": "mlp", "base_params": mlp}
    seeded = run(st, seed=3, head_params={"mlp": mlp, "shuffled-label": shuffled_mlp}, **common)
    params = _task_params(st, seeded.run_id)
    assert params["mlp"]["seed"] == 3 and params["shuffled-label"]["seed"] == 3
    base = params["shuffled-label"]["base_params"]  # resolved as the mlp head's own key (profile, precision)
    assert {k: base[k] for k in (*mlp, "seed")} == {**mlp, "seed": 3}  # its base is seeded too
    assert "seed" not in params["ridge"]  # ridge takes no seed: its parameters are as they were
    assert set(seeded.results["seed"]) == {3}  # and the folds
    # a head given its own seed keeps it
    own = run(st, seed=3, head_params={"mlp": {**mlp, "seed": 7}}, **common)
    assert _task_params(st, own.run_id)["mlp"]["seed"] == 7
    # the default seed leaves every head's parameters (and so the task ids of existing stores) as they were
    default = run(st, head_params={"mlp": mlp}, **common)
    params = _task_params(st, default.run_id)
    assert params["mlp"] == json.loads(get_head("mlp", **mlp).params_key())
    assert params["shuffled-label"] == json.loads(get_head("shuffled-label").params_key())


def _line_with_far_cells(st: Store) -> tuple[str, pd.DataFrame, np.ndarray]:
    """A 1-D embedding of a375 equal to the label, except four test cells far out with their labels
    interleaved (7.0 sensitive, 7.1 resistant, 7.2 sensitive, 7.3 resistant): a head that follows
    the line gives them probabilities distinct in float64 and all 1.0 in float32.
    Returns (embedding id, the custom split, the embedding value of each cell)."""
    cells = st.cells(["a375"]).sort_values("row").reset_index(drop=True)
    y = cells["response"].to_numpy(np.int64)
    x = y.astype(np.float32)  # training cells: the score is about the label
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    far = [pos[0], neg[0], pos[1], neg[1]]
    x[far] = [7.0, 7.1, 7.2, 7.3]
    emb = st.create_embedding("a375", model="line", params={"n_components": 1}, dim=1)
    for chunk in range(emb.n_chunks):
        lo, hi = emb.chunk_bounds(chunk)
        emb.write_chunk(chunk, x[lo:hi, None])
    emb.finalize()
    custom = cells[["dataset_id", "row"]].copy()
    custom["fold"] = np.where(np.isin(np.arange(len(cells)), [*far, pos[2], neg[2]]), "test", "train")
    return emb.embedding_id, custom, x


def _force_overconfident_mlp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every mlp fit replaced by the line logit = 4 x - 2: 26 to 27.2 on the far cells of
    :func:`_line_with_far_cells`, +-2 on the others."""
    import torch

    from scdm.classify.heads import MLPHead

    fit_rows = MLPHead._fit_rows

    def overconfident(self: MLPHead, X: np.ndarray, rows: np.ndarray, y: np.ndarray) -> None:
        fit_rows(self, X, rows, y)
        line = torch.nn.Linear(1, 1)
        with torch.no_grad():
            line.weight.fill_(4.0)
            line.bias.fill_(-2.0)
        self.model_, self.output_ = torch.nn.Sequential(line), "logit"

    monkeypatch.setattr(MLPHead, "_fit_rows", overconfident)


def test_stored_metrics_are_those_of_the_stored_predictions(st: Store) -> None:
    """Metrics are scored on the probabilities as stored (float64): recomputing them from eval_predictions
    gives them back, and the far cells are not tied (as REAL they were all 1.0)."""
    from scdm.classify.metrics import compute_metrics

    embedding_id, custom, _ = _line_with_far_cells(st)
    run(st, embeddings=[embedding_id], scenarios=["custom"], custom=custom, by=["all"], heads=["ridge"])
    preds = st.query("SELECT y_true, proba FROM eval_predictions ORDER BY dataset_id, row")
    assert preds["proba"].dtype == np.float64 and (preds["proba"] == 1.0).sum() == 0
    assert (preds["proba"].astype(np.float32) == 1.0).sum() == 4  # what REAL made of them
    recomputed = compute_metrics(preds["y_true"].to_numpy(), preds["proba"].to_numpy())
    stored = st.query("SELECT metric, value FROM eval_results").set_index("metric")["value"]
    for metric in METRICS:
        assert stored[metric] == recomputed[metric], metric  # exactly, not approximately


def test_an_overconfident_mlp_is_scored_on_its_float64_probabilities(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """An mlp whose logits pass 16.6 had a float32 sigmoid of exactly 1.0 there, stored as REAL: its
    sensitive and resistant far cells tied, and the stored AUROC was 5/9 where its own ranking gives 4/9."""
    from sklearn.metrics import roc_auc_score

    from scdm.classify.metrics import compute_metrics

    _force_overconfident_mlp(monkeypatch)
    embedding_id, custom, x = _line_with_far_cells(st)
    mlp = {"profile": "fast", "epochs": 1, "standardize": False, "precision": "fp32"}
    run(st, embeddings=[embedding_id], scenarios=["custom"], custom=custom, by=["all"], heads=["mlp"],
        head_params={"mlp": mlp})
    preds = st.query('SELECT "row", y_true, proba FROM eval_predictions ORDER BY dataset_id, "row"')
    logits = 4.0 * x[preds["row"].to_numpy()].astype(np.float64) - 2.0
    y = preds["y_true"].to_numpy()
    proba64 = 1.0 / (1.0 + np.exp(-logits))
    np.testing.assert_allclose(preds["proba"], proba64, rtol=1e-12)
    assert (proba64.astype(np.float32) == 1.0).sum() == 4  # float32 ties them
    (stored,) = st.query("SELECT value FROM eval_results WHERE metric = 'auroc'")["value"]
    assert stored == compute_metrics(y, proba64)["auroc"]  # was 5/9: the float32 ties
    assert stored == pytest.approx(roc_auc_score(y, logits), abs=1e-12) == pytest.approx(4 / 9, abs=1e-12)


def test_an_mlp_result_its_float32_sigmoid_scored_is_fitted_again(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The float64 link changed the mlp's numbers (5/9 -> 4/9 here) but not its task ids: an evaluate of the
    upgraded scdm reused the result the float32 sigmoid had scored (5/9) and the leaderboard showed it."""

    from scdm.classify.heads import MLPHead

    score_rows = MLPHead._score_rows
    _force_overconfident_mlp(monkeypatch)
    embedding_id, custom, _ = _line_with_far_cells(st)
    mlp = {"profile": "fast", "epochs": 1, "standardize": False, "precision": "fp32"}
    kw = dict(embeddings=[embedding_id], scenarios=["custom"], custom=custom, by=["all"], heads=["mlp"],
              head_params={"mlp": mlp})
    with monkeypatch.context() as m:  # the scdm before the float64 link: its sigmoid in float32, its revision 1
        m.setattr(MLPHead, "_score_rows", lambda self, X, rows: score_rows(self, X, rows).astype(np.float32))
        m.setattr(MLPHead, "revision", lambda self: 1)
        run(st, **kw)
    (old,) = st.query("SELECT value FROM eval_results WHERE metric = 'auroc'")["value"]
    assert old == pytest.approx(5 / 9)

    summary = run(st, **kw)
    assert (summary.n_done, summary.n_reused) == (1, 0)
    (now,) = st.query("SELECT value FROM eval_results WHERE metric = 'auroc'")["value"]
    assert now == pytest.approx(4 / 9, abs=1e-12)
    assert leaderboard(st, metrics=["auroc"])["mean"].tolist() == [pytest.approx(4 / 9, abs=1e-12)]


def test_two_runs_at_once_each_count_the_tasks_they_own(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two identical runs started together both fit every task; the first to store a task owns it and
    the other counts it as reused, so filtering by run shows what each run's counts say."""
    from scdm.store import evaluation as records

    write_pca(st, "pca-joint", 8)
    first = run(st)
    board = leaderboard(st)
    monkeypatch.setattr(records, "finished_tasks", lambda _st, _ids, **_: set())  # it looked before the first one wrote
    second = run(st)
    assert second.n_done == 0 and second.n_reused == first.n_tasks
    owned = st.query("SELECT run_id, count(*) AS n FROM eval_tasks GROUP BY run_id")
    assert dict(zip(owned["run_id"], owned["n"])) == {first.run_id: first.n_done}
    runs = st.query("SELECT run_id, n_done, n_reused FROM eval_runs ORDER BY created_at")
    assert runs["n_done"].tolist() == [first.n_done, 0] and runs["n_reused"].tolist() == [0, first.n_tasks]
    def rows(frame: pd.DataFrame) -> list[tuple]:
        return sorted(map(tuple, frame[["split_id", "head", "metric", "mean", "n_folds"]].astype(str).to_numpy()))

    assert rows(leaderboard(st, run_id=first.run_id)) == rows(leaderboard(st)) == rows(board)
    assert leaderboard(st, run_id=second.run_id).empty
    assert len(second.results) == len(first.results)  # it still prints the results of every task it asked for


def test_the_same_cells_in_two_datasets_of_a_space_are_named(tmp_path: Path) -> None:
    """A study ingested twice (here a subset under another study name) would be trained on and tested: warned."""
    from scdm.classify.grid import DuplicateCellsWarning, duplicate_cells
    from scdm.embedding.runner import embed_baseline

    jhu = ad.read_h5ad(DATASETS[1][1])
    st = Store(tmp_path / "store")
    st.ingest(jhu, name="full", label_key="response_Gefitinib", study="Kinker2020")
    st.ingest(jhu[:40].copy(), name="again", label_key="response_Gefitinib", study="Kinker2020-reprocessed")
    st.ingest(DATASETS[2][1], name="scc47", label_key="response_Afatinib", study="SCC47")
    ids = [r.embedding_id for r in embed_baseline(st, ["full", "again", "scc47"], model="pca", n_comps=5, progress=False)]
    options = {"heads": ["ridge"], "by": ["all"], "folds": 3, "scenarios": ["pooled"], "silent": True}
    with pytest.warns(DuplicateCellsWarning, match=r"in another dataset \(40 of 'again', 40 of 'full'\).*same cells ingested twice"):
        evaluate(st, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateCellsWarning)  # distinct cells only: no warning
        evaluate(st, embeddings=[ids[0], ids[2]], **options)
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert duplicate_cells(np.vstack([X, X[:2]]), np.array(list("aaaabb"))) == {"a": 2, "b": 2}
    assert duplicate_cells(np.vstack([X, X[:2]]), np.array(list("aaaaaa"))) == {}  # within a dataset: not this check
    zeros = np.zeros((2, 3), np.float32)  # cells with nothing in a baseline's genes, in both datasets: no copy
    assert duplicate_cells(np.vstack([X, zeros, X[:1], zeros]), np.array(list("aaaaaabbb"))) == {"a": 1, "b": 1}


@pytest.mark.filterwarnings("ignore:.*that another column maps to as well:UserWarning")
def test_the_same_cells_at_other_rows_are_named_although_a_row_seeded_model_embeds_them_apart(
        tmp_path: Path, pc9_counts_path: Path) -> None:
    """UCE draws each cell's genes with a seed of its row, so a copy of a study at other rows (a reordered
    subset under another study name) had no identical embedding and nothing was said, while a cross-data
    fold trained on one copy and scored the other (PC9 with random labels: logreg AUROC 0.62 on the held-out
    copy, 0.34 without the copies in training). The copies are found by cell id and expression values."""
    from scdm.classify.grid import DuplicateCellsWarning
    from scdm.embedding.models.uce import write_tiny_checkpoint
    from scdm.embedding.runner import embed

    pc9 = ad.read_h5ad(pc9_counts_path)[:90, :400].copy()
    pc9.obs = pd.DataFrame(index=pc9.obs_names)
    pc9.obs["response"] = np.where(np.arange(90) % 2 == 0, "sensitive", "resistant")
    checkpoint = write_tiny_checkpoint(tmp_path / "uce", genes=list(pc9.var_names), seed=4)
    st = Store(tmp_path / "store")
    st.ingest(pc9[:60].copy(), name="full", label_key="response", positive="sensitive", study="PC9")
    st.ingest(pc9[np.arange(59, 29, -1)].copy(), name="again", label_key="response", positive="sensitive", study="PC9-again")
    reads_alike = pc9[60:90].copy()  # another run's cells under the same barcodes: a cell id alone is no copy
    reads_alike.obs_names = pc9.obs_names[:30]
    st.ingest(reads_alike, name="barcodes", label_key="response", positive="sensitive", study="PC9-other-run")
    ids = {name: embed(st, name, "uce", checkpoint, device="cpu", progress=False, sample_size=16, allow_empty_cells=True).embedding_id
           for name in ("full", "again", "barcodes")}
    full, again = st.read_embedding(ids["full"]), st.read_embedding(ids["again"])
    assert not (full[30:60][::-1] == again).all(axis=1).any()  # no copy has its original's vector
    options = {"heads": ["ridge"], "by": ["all"], "scenarios": ["cross"], "silent": True}
    with pytest.warns(DuplicateCellsWarning, match=r"cell id and expression values of a cell, in another dataset "
                                                   r"\(30 of 'again', 30 of 'full'\).*same cells ingested twice"):
        evaluate(st, embeddings=[ids["full"], ids["again"]], **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateCellsWarning)
        evaluate(st, embeddings=[ids["full"], ids["barcodes"]], **options)


def test_a_space_of_datasets_labelled_for_different_drugs_is_said(tmp_path: Path) -> None:
    """JHU006 (Gefitinib) and SCC47 (Afatinib) in one joint PCA: every cross-data fold scored one drug with a
    head trained on the other's labels, and only the joined label set names of the result row showed it."""
    from scdm.classify.grid import MixedDrugsWarning
    from scdm.embedding.runner import embed_baseline

    st = Store(tmp_path / "store")
    st.ingest(DATASETS[1][1], name="jhu006", label_key="response_Gefitinib", drug="Gefitinib", study="JHU006")
    st.ingest(DATASETS[1][1], name="jhu006", label_key="response_Vorinostat", drug="Vorinostat")
    st.ingest(DATASETS[2][1], name="scc47", label_key="response_Afatinib", drug="Afatinib", study="SCC47")
    joint = [r.embedding_id for r in embed_baseline(st, ["jhu006", "scc47"], model="pca", n_comps=5, progress=False)]
    alone = embed_baseline(st, ["jhu006"], model="pca", n_comps=5, progress=False)[0].embedding_id
    options = {"heads": ["ridge"], "by": ["all"], "scenarios": ["cross"], "silent": True}
    with pytest.warns(MixedDrugsWarning, match=r"different drugs \(jhu006: Gefitinib \(drug Gefitinib\); scc47: Afatinib "
                                               r"\(drug Afatinib\)\).*cross-data fold scores a held-out study's drug"):
        evaluate(st, joint, **options)
    with warnings.catch_warnings():  # one drug: nothing to say
        warnings.simplefilter("error", MixedDrugsWarning)
        evaluate(st, [alone], label_set="Vorinostat", heads=["ridge"], by=["all"], folds=3, scenarios=["pooled"], silent=True)
    # a head trained on both learned the two drugs as one response, silently too
    from scdm.classify.trained_heads import train_head

    with pytest.warns(MixedDrugsWarning, match=r"training datasets are labelled with responses to different drugs \(jhu006: "
                                               r"Gefitinib \(drug Gefitinib\); scc47: Afatinib \(drug Afatinib\)\)"):
        train_head(st, joint, head="ridge")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixedDrugsWarning)
        train_head(st, [alone], head="ridge", label_set="Vorinostat")


def test_one_drug_spelled_in_two_cases_is_not_called_different_drugs(tmp_path: Path) -> None:
    """JHU006 split in two studies labelled 'Gefitinib' and 'gefitinib': evaluate and train-head warned of
    'different drugs' and every result row was noted 'labelled for different drugs (a: Gefitinib, b: gefitinib)',
    while scdm transfer (which the warning cites) reads drugs case-insensitively as one."""
    from scdm.classify.grid import MixedDrugsWarning
    from scdm.classify.trained_heads import train_head
    from scdm.embedding.runner import embed_baseline

    adata = ad.read_h5ad(DATASETS[1][1])
    half = adata.n_obs // 2
    st = Store(tmp_path / "store")
    st.ingest(adata[:half].copy(), name="a", label_key="response_Gefitinib", drug="Gefitinib", study="A")
    st.ingest(adata[half:].copy(), name="b", label_key="response_Gefitinib", drug="gefitinib", study="B")
    joint = [r.embedding_id for r in embed_baseline(st, ["a", "b"], model="pca", n_comps=5, progress=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixedDrugsWarning)
        warnings.simplefilter("ignore", SampleLeakageWarning)
        evaluate(st, joint, heads=["ridge"], by=["all"], scenarios=["cross"], silent=True)
        train_head(st, joint, head="ridge")
    board = leaderboard(st, metrics=["auroc"])
    assert len(board) == 1 and "different drugs" not in board["note"].iloc[0]


def _write_embeddings(st: Store, model: str, matrix_of: Callable[[str, np.ndarray], np.ndarray]) -> dict[str, np.ndarray]:
    """A float32 embedding of each of DATASETS made by ``matrix_of(name, responses in row order)``, stored as ``model``."""
    matrices = {}
    for name, *_ in DATASETS:
        y = st.cells(name).sort_values("row")["response"].to_numpy(dtype=float)
        matrices[name] = matrix_of(name, y).astype(np.float32)
        dim = matrices[name].shape[1]
        emb = st.create_embedding(name, model=model, params={"dim": dim}, dim=dim)
        for chunk in range(emb.n_chunks):
            lo, hi = emb.chunk_bounds(chunk)
            emb.write_chunk(chunk, matrices[name][lo:hi])
        emb.finalize()
    return matrices

def test_ridge_downdates_stay_exact_when_datasets_sit_far_apart(st: Store) -> None:
    """Datasets of a space an offset apart (20 units against columns of spread 0.05): the Gram
    statistics of each split and atom are summed about its own rows' mean, or their float32 sums lose
    the spread to the offset. Before, one mean of the whole space was the shift of every split and
    atom: here the melanoma folds' probabilities were 1.3e-3 from a RidgeHead fitted on the same
    cells (3.4e-2 at D=256 with low-variance columns), and a split's numbers depended on which other
    datasets shared the space."""
    from scdm.classify.heads import get_head

    rng = np.random.default_rng(3)
    offsets = {"a375": 0.0, "jhu006": 20.0, "scc47": -20.0}

    def offset(name: str, y: np.ndarray) -> np.ndarray:
        X = 0.05 * rng.standard_normal((len(y), 12)) + offsets[name] * rng.uniform(0.5, 1.5, 12)
        X[:, :2] += 0.05 * y[:, None]
        return X

    matrices = _write_embeddings(st, "offset", offset)
    run(st, heads=["ridge"], folds=3, by=["all", "cancer_type"])
    names = dict(zip(st.datasets()["dataset_id"], st.datasets()["name"]))
    tasks = st.query("SELECT task_id, split_id, fold FROM eval_tasks")
    assert len(tasks) >= 10
    gaps = {}
    for task in tasks.itertuples():
        split = load_split(st, task.split_id)
        X = np.vstack([matrices[names[d]][r] for d, r in zip(split.cells["dataset_id"], split.cells["row"])])
        y = split.cells["response"].to_numpy(int)
        test = split.test_mask(task.fold)
        expected = get_head("ridge").fit(X[~test], y[~test]).proba_sensitive(X[test])
        got = st.query('SELECT proba FROM eval_predictions WHERE task_id = ? ORDER BY dataset_id, "row"', [task.task_id])
        gaps[f"{split.scenario} {split.category} fold {task.fold}"] = float(np.abs(got["proba"].to_numpy() - expected).max())
    assert max(gaps.values()) < 2e-5, sorted(gaps.items(), key=lambda kv: -kv[1])


def test_a_category_type_asked_twice_is_evaluated_once(st: Store) -> None:
    """``--by all,cancer_type,all`` made every split of 'all' twice: the run fitted their tasks twice and
    then failed on the catalog's primary key (a DuckDB ConstraintException), storing none of that batch."""
    write_pca(st, "pca-joint", 4)
    twice = run(st, heads=["majority", "ridge"], by=["all", "cancer_type", "all"])
    once = run(st, heads=["majority", "ridge"], by=["all", "cancer_type"])
    assert twice.n_done == twice.n_tasks == once.n_tasks == once.n_reused > 0
    assert st.query("SELECT count(*) AS n FROM eval_tasks")["n"].iloc[0] == once.n_tasks


def test_parallel_fits_run_on_one_math_thread_each_whatever_the_cpus(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """``jobs`` parallel fits are each on one BLAS and one torch thread, as with jobs=1 and on Ray. Before, on
    a machine with more CPUs than jobs, each fit got cpu_budget // jobs threads (jobs=2 of 4 CPUs: 2 each),
    and an mlp baseline's metrics moved by 9e-5 from the jobs=1 run (D=3400, 900 cells)."""
    import threadpoolctl
    import torch

    from scdm.classify import grid

    write_pca(st, "pca-joint", 6)
    monkeypatch.setattr(grid, "cpu_budget", lambda: 4)
    seen: set[tuple[int, int]] = set()
    fit_task = grid.fit_task

    def spy(task):
        blas = max(int(lib["num_threads"]) for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas")
        seen.add((torch.get_num_threads(), blas))
        return fit_task(task)

    monkeypatch.setattr(grid, "fit_task", spy)
    run(st, heads=["majority", "mlp"], by=["all"], jobs=2, head_params={"mlp": {"profile": "fast", "epochs": 1}})
    assert seen == {(1, 1)}
    # a shuffled-label baseline of the mlp runs torch too (its threads were left at torch's default)
    seen.clear()
    run(st, heads=["shuffled-label"], by=["all"], jobs=2,
        head_params={"shuffled-label": {"base": "mlp", "base_params": {"profile": "fast", "epochs": 1}}})
    assert seen == {(1, 1)}


def test_ridge_scores_of_an_embedding_far_from_the_origin_are_those_of_a_float64_fit(st: Store) -> None:
    """Columns at 1e4 with sd 0.5 (a foundation model's offset dimensions): the grid scored a fold's test
    cells as float32 ``X @ coef``, whose terms near 1e4 x coef cancel to a score of size 1; its probabilities
    were 1.1e-3 from scikit-learn's float64 ridge on the same training cells. They are summed in float64."""
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(5)

    def far(name: str, y: np.ndarray) -> np.ndarray:
        X = 1e4 + 0.5 * rng.standard_normal((len(y), 16))
        X[:, :3] += 0.3 * y[:, None]
        return X

    matrices = _write_embeddings(st, "far", far)
    run(st, heads=["ridge"], folds=3, by=["all"], scenarios=["pooled"])
    names = dict(zip(st.datasets()["dataset_id"], st.datasets()["name"]))
    tasks = st.query("SELECT task_id, split_id, fold FROM eval_tasks")
    assert len(tasks) == 3
    gaps = []
    for task in tasks.itertuples():
        split = load_split(st, task.split_id)
        X = np.vstack([matrices[names[d]][r] for d, r in zip(split.cells["dataset_id"], split.cells["row"])]).astype(float)
        y = split.cells["response"].to_numpy(int)
        test = split.test_mask(task.fold)
        mean = X[~test].mean(axis=0)
        rms = np.sqrt(np.mean(X[~test].var(axis=0)))
        ref = Ridge(alpha=1.0).fit((X[~test] - mean) / rms, y[~test]).predict((X[test] - mean) / rms)
        expected = 1.0 / (1.0 + np.exp(-4.0 * (ref - 0.5)))
        got = st.query('SELECT proba FROM eval_predictions WHERE task_id = ? ORDER BY dataset_id, "row"', [task.task_id])
        gaps.append(float(np.abs(got["proba"].to_numpy() - expected).max()))
    assert max(gaps) < 2e-5, gaps


def test_a_head_whose_fit_diverged_is_a_skipped_task_with_its_reason(tmp_path: Path) -> None:
    """An mlp that diverges scores every test cell NaN: the whole `scdm evaluate` run failed on it ("proba must
    be finite probabilities in [0, 1]; got values outside that range", naming neither the head nor NaN) and
    the other heads' folds of the run were lost with it. Each such fold is now a skipped task that says why."""
    from tests.jhu006 import jhu006_store

    st = jhu006_store(tmp_path / "store")
    diverging = {"lr": 1e6, "epochs": 3, "min_steps": 0, "standardize": False}
    summary = evaluate(st, scenarios=["pooled"], by=["all"], heads=["mlp", "ridge"], folds=3, silent=True,
                       head_params={"mlp": diverging})
    assert st.query("SELECT status FROM eval_runs")["status"].tolist() == ["complete"]
    skipped = st.query("SELECT head, fold, reason FROM skipped_tasks ORDER BY fold")
    assert skipped["head"].tolist() == ["mlp"] * 3 and skipped["fold"].tolist() == [0, 1, 2]
    assert skipped["reason"].str.contains("NaN").all() and skipped["reason"].str.contains("diverged").all()
    board = leaderboard(st, metrics=["auroc"])
    assert board["head"].tolist() == ["ridge"] and board["n_folds"].tolist() == [3]  # no mlp row, no NaN mean
    assert summary.n_skipped == 3
