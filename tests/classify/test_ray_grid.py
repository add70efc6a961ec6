"""The evaluation grid on a local Ray cluster: same results as local, resume across executors, retries."""

from __future__ import annotations

import functools
import json
import logging
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdm.classify import _ray_grid
from scdm.classify.grid import evaluate
from scdm.classify.metrics import METRICS
from scdm.store import Store
from tests.ray_fixtures import RETRY_A_RAY_CRASH, ray_local  # noqa: F401

pytestmark = [pytest.mark.usefixtures("ray_local"), RETRY_A_RAY_CRASH]

# name, study, tissue, cancer type: two studies per cancer type, so cross-data splits have folds
DATASETS = [("d1", "S1", "lung", "NSCLC"), ("d2", "S2", "lung", "NSCLC"),
            ("d3", "S3", "skin", "melanoma"), ("d4", "S4", "skin", "melanoma")]
HEADS = ["majority", "logreg", "ridge", "mlp"]
HEAD_PARAMS = {"mlp": {"hidden": 16, "epochs": 2}}
DIM = 8


@pytest.fixture()
def st(tmp_path: Path) -> Store:
    """Four small labelled datasets with a planted response direction, one embedding space."""
    from scdm.store.genes import gene_table

    store = Store(tmp_path / "store")
    rng = np.random.default_rng(0)
    genes = gene_table()["symbol"].drop_duplicates().iloc[:12].tolist()
    direction = rng.standard_normal(DIM).astype(np.float32)
    for i, (name, study, tissue, cancer) in enumerate(DATASETS):
        n = 40 + 8 * i
        response = np.where(np.arange(n) % 3 == 0, "sensitive", "resistant")
        obs = pd.DataFrame({"response": response, "sample": [f"{name}{r[0]}{k % 2}" for k, r in enumerate(response)]},
                           index=[f"{name}_c{k}" for k in range(n)])
        counts = rng.integers(0, 5, (n, len(genes))).astype(np.float32)
        store.ingest(ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes)), name=name, label_key="response",
                     positive="sensitive", sample_key="sample", study=study, tissue=tissue, cancer_type=cancer,
                     drug_type="targeted", regimen="drug A")
        emb = store.create_embedding(name, model="synthetic", params={"dim": DIM}, dim=DIM)
        y = (response == "sensitive").astype(np.float32)
        matrix = rng.standard_normal((n, DIM), dtype=np.float32) + np.outer(y - 0.5, direction)
        for chunk in range(emb.n_chunks):
            lo, hi = emb.chunk_bounds(chunk)
            emb.write_chunk(chunk, matrix[lo:hi])
        emb.finalize()
    return store


def run_grid(st: Store, **kwargs):
    """The grid of these tests; keyword arguments override its options."""
    options = {"heads": HEADS, "head_params": HEAD_PARAMS, "folds": 3, "by": ["all", "cancer_type"], "silent": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return evaluate(st, **{**options, **kwargs})


def grid_tables(st: Store) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metrics per (task, metric) and test probabilities per (task, cell), in a fixed order."""
    results = st.query("SELECT task_id, head, metric, value, n_train, n_test FROM eval_results ORDER BY task_id, metric")
    preds = st.query('SELECT task_id, dataset_id, "row", y_true, proba FROM eval_predictions '
                     'ORDER BY task_id, dataset_id, "row"')
    return results, preds


def clear_results(st: Store) -> None:
    for table in ("eval_predictions", "eval_results", "eval_tasks"):
        st.execute(f"DELETE FROM {table}")


def assert_same_grid(got: tuple[pd.DataFrame, pd.DataFrame], expected: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    (results, preds), (results_ref, preds_ref) = got, expected
    pd.testing.assert_frame_equal(results.drop(columns="value"), results_ref.drop(columns="value"))
    np.testing.assert_allclose(results["value"].to_numpy(float), results_ref["value"].to_numpy(float),
                               rtol=0, atol=1e-12, equal_nan=True)
    pd.testing.assert_frame_equal(preds.drop(columns="proba"), preds_ref.drop(columns="proba"))
    np.testing.assert_allclose(preds["proba"].to_numpy(), preds_ref["proba"].to_numpy(), rtol=0, atol=1e-12)


def test_ray_executor_gives_the_local_results(st: Store) -> None:
    local = run_grid(st)
    expected = grid_tables(st)
    assert local.n_done == local.n_tasks > 0
    assert set(expected[0]["head"]) == set(HEADS)
    clear_results(st)
    distributed = run_grid(st, executor="ray")
    assert (distributed.n_tasks, distributed.n_done, distributed.n_reused) == (local.n_tasks, local.n_tasks, 0)
    assert_same_grid(grid_tables(st), expected)
    assert st.query("SELECT count(*) AS n FROM eval_tasks")["n"].iloc[0] == local.n_tasks
    runs = st.query("SELECT config, status FROM eval_runs ORDER BY created_at")
    assert list(runs["status"]) == ["complete", "complete"] and '"executor": "ray"' in runs["config"].iloc[1]


def test_resume_crosses_executors(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    run = functools.partial(run_grid, heads=["majority", "logreg", "ridge"])  # mlp's equality: the test above
    first = run(st)
    fresh = grid_tables(st)
    # A local run killed half-way: half of its tasks never reached the catalog. The reference is
    # the local executor resuming it: logreg solves the pending folds of a split together in one
    # float32 product whose rounding depends on its width, so a resumed split's log-odds can differ
    # from a fresh one's (up to 1.2e-3 measured at 3000 x 200, AUROC 1e-5); the executors must not.
    lost = st.query("SELECT task_id FROM eval_tasks ORDER BY task_id")["task_id"].tolist()[::2]
    st.execute("DELETE FROM eval_tasks WHERE list_contains(?, task_id)", [lost])
    run(st)
    expected = grid_tables(st)
    st.execute("DELETE FROM eval_tasks WHERE list_contains(?, task_id)", [lost])
    resumed = run(st, executor="ray")
    assert (resumed.n_done, resumed.n_reused) == (len(lost), first.n_tasks - len(lost))
    assert_same_grid(grid_tables(st), expected)  # the interrupted tasks' leftovers were replaced, not duplicated

    # a Ray run whose driver dies after a few results: a local rerun completes the same grid
    clear_results(st)
    from scdm.store.evaluation import ResultWriter

    add, seen = ResultWriter.add, []

    def dying_add(self, out):  # the driver process is killed after its fifth result
        if len(seen) == 5:
            raise KeyboardInterrupt
        seen.append(out.key.task_id)
        add(self, out)

    monkeypatch.setattr(ResultWriter, "add", dying_add)
    with pytest.raises(KeyboardInterrupt):
        run(st, executor="ray")
    monkeypatch.setattr(ResultWriter, "add", add)
    assert st.query("SELECT status FROM eval_runs ORDER BY created_at")["status"].iloc[-1] == "failed"
    finished = st.query("SELECT count(*) AS n FROM eval_tasks")["n"].iloc[0]
    assert 0 < finished <= 5
    rerun = run(st)
    assert (rerun.n_done, rerun.n_reused) == (first.n_tasks - finished, finished)
    results, preds = grid_tables(st)
    pd.testing.assert_frame_equal(results.drop(columns="value"), fresh[0].drop(columns="value"))
    np.testing.assert_allclose(results["value"], fresh[0]["value"], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(preds["proba"], fresh[1]["proba"], atol=1e-6)


def test_failed_attempts_are_retried_and_recorded_once(st: Store, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    run_grid(st, heads=["majority", "logreg"])
    expected = grid_tables(st)
    tasks = st.query("SELECT task_id, head FROM eval_tasks ORDER BY task_id")
    killed = tasks.loc[tasks["head"] == "majority", "task_id"].iloc[0]  # worker process dies mid-batch
    raised = tasks.loc[tasks["head"] == "logreg", "task_id"].iloc[0]  # batch raises
    monkeypatch.setattr(_ray_grid, "_crash_on_first_attempt", {killed: "exit", raised: "raise"})
    clear_results(st)
    with caplog.at_level(logging.INFO, logger="scdm.classify._ray_grid"):
        summary = run_grid(st, heads=["majority", "logreg"], executor="ray")
    assert summary.n_done == len(tasks) and summary.n_skipped == 0
    counts = st.query("SELECT task_id, count(*) AS n FROM eval_results GROUP BY task_id")
    assert len(counts) == len(tasks) and (counts["n"] == len(METRICS)).all()  # no task missing or doubled
    assert_same_grid(grid_tables(st), expected)
    assert any("2 retried, 0 failed" in r.getMessage() for r in caplog.records)


@pytest.mark.filterwarnings("ignore")
def test_cli_runs_the_grid_on_ray(st: Store) -> None:
    from click.testing import CliRunner

    from scdm.cli import main

    args = ["--store", str(st.root), "evaluate", "--heads", "majority,logreg", "--folds", "3", "--by", "all",
            "--executor", "ray", "-q", "--format", "csv"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "logreg" in result.output and "majority" in result.output
    assert '"executor": "ray"' in st.query("SELECT config FROM eval_runs")["config"].iloc[0]


def test_bad_executor_options(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from scdm.store.errors import InputDataError

    with pytest.raises(InputDataError, match="executor='dask' is not one of"):
        run_grid(st, executor="dask")
    with pytest.raises(InputDataError, match="needs executor='ray'"):
        run_grid(st, ray_address="auto")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(InputDataError, match=r"--executor ray needs Ray: pip install 'scdm\[ray\]'"):
        run_grid(st, executor="ray")
    assert st.query("SELECT count(*) AS n FROM eval_runs")["n"].iloc[0] == 0  # refused before any run is recorded


def test_auto_head_settings_are_fitted_as_the_driver_resolved_them(st: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """mlp precision='auto' enters the task id as the driver resolved it; a worker whose CPU resolves it otherwise
    fitted with its own (a bf16 fit stored as fp32). Here the driver's CPU is made to differ from the workers'."""
    from scdm.classify import heads

    on_workers = heads.bf16_supported()
    monkeypatch.setattr(heads, "bf16_supported", lambda: not on_workers)  # the driver (and local fits) only
    options = {"heads": ["mlp"], "head_params": {"mlp": {"profile": "fast", "hidden": 16, "epochs": 2}},
               "scenarios": ["pooled"], "by": ["all"]}
    run_grid(st, **options)
    expected = grid_tables(st)
    params = st.query("SELECT DISTINCT head_params FROM eval_tasks")["head_params"]
    assert [json.loads(p)["precision"] for p in params] == ["fp32" if on_workers else "bf16"]
    clear_results(st)
    summary = run_grid(st, executor="ray", **options)
    assert summary.n_done == summary.n_tasks > 0
    assert_same_grid(grid_tables(st), expected)


def test_a_worker_that_would_fit_another_head_than_the_task_id_says_refuses() -> None:
    from scdm.classify.heads import get_head

    key = json.loads(get_head("mlp", profile="fast").params_key())
    key["precision"] = "bf16" if key["precision"] == "fp32" else "fp32"  # what the driver resolved 'auto' to
    item = _ray_grid._Item("t", "s", 0, "mlp", {"profile": "fast"}, json.dumps(key, sort_keys=True))
    assert "resolves the mlp head's settings to" in (_ray_grid._identity_differs(item) or "")
    pinned = _ray_grid._resolved_params("mlp", {"profile": "fast"}, item.params_key)
    assert pinned["precision"] == key["precision"]
    assert _ray_grid._identity_differs(_ray_grid._Item("t", "s", 0, "mlp", pinned, item.params_key)) is None


def test_warnings_of_the_fits_reach_the_driver_as_locally(st: Store) -> None:
    # logreg stopping at max_iter warns that its scores may be off: locally the user saw it, while on Ray
    # it went to the worker's log (a new local cluster and this fixture keep worker output off the driver)
    from scdm.classify.heads import HeadConvergenceWarning

    seen = {}
    for executor in ("local", "ray"):
        clear_results(st)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluate(st, heads=["logreg"], head_params={"logreg": {"max_iter": 1}}, folds=3, by=["all"], silent=True,
                     executor=executor)
        seen[executor] = {str(w.message) for w in caught if issubclass(w.category, HeadConvergenceWarning)}
    assert seen["local"] and seen["ray"] == seen["local"]


def test_a_dann_head_fits_on_ray_as_locally(st: Store) -> None:
    # its hidden layers are a tuple, which the task id's JSON spells as a list: every Ray fit of dann, its
    # defaults included, was recorded as skipped with 'parameter hidden=[256] is invalid; expected tuple'
    options = {"heads": ["dann"], "head_params": {"dann": {"epochs": 1, "pretrain_epochs": 1, "hidden": (8,),
                                                           "latent_dim": 4, "cluster_method": "kmeans"}},
               "scenarios": ["cross"], "by": ["cancer_type"]}
    local = run_grid(st, **options)
    expected = grid_tables(st)
    assert local.n_done == local.n_tasks == 4
    clear_results(st)
    distributed = run_grid(st, executor="ray", **options)
    assert (distributed.n_done, distributed.n_skipped) == (local.n_tasks, 0)
    assert_same_grid(grid_tables(st), expected)
