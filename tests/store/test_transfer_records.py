"""store.transfer: a transfer run's rows are written and read through typed records, atomically."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scdm.store import Store
from scdm.store.errors import InputDataError
from scdm.store.transfer import (
    CRITICAL_GENE_COLUMNS,
    CriticalGenes,
    TransferMetrics,
    TransferOutputs,
    TransferRunNotFoundError,
    TransferRunResult,
    TransferRunStart,
    complete_transfer_run,
    critical_genes_table,
    fail_transfer_run,
    replace_critical_genes,
    start_transfer_run,
    transfer_artifacts_dir,
    transfer_predictions,
    transfer_run,
)
from tests.store.conftest import make_counts_adata


def _start(st: Store, run_id: str = "run1") -> None:
    start_transfer_run(st, TransferRunStart(
        run_id=run_id, drug="drugX", source_kind="bulk-csv", source={"path": "expr.csv"}, target_dataset_id="ds1",
        features="expr", source_features=None, adapt=True, selection="source_val", config={"alpha": 1.0},
        scdm_version="0.test"))


def _outputs(n: int = 5, metrics: bool = True) -> TransferOutputs:
    return TransferOutputs(
        dataset_id="ds1", proba=np.linspace(0, 1, n), label=(np.linspace(0, 1, n) >= 0.5).astype(np.int8),
        cluster=np.arange(n) % 2, features=["G1", "G2", "G3"],
        history=[{"stage": "pretrain_source_ae", "epoch": 0, "rec": 0.5}, {"stage": "joint", "epoch": 0, "ce": 0.7,
                                                                        "mmd": 0.1, "val_ce": 0.6}],
        metrics=TransferMetrics({"accuracy": 0.8, "auroc": None}, n=n, n_pos=2) if metrics else None)


def _result(flags: tuple[str, ...] | None = ()) -> TransferRunResult:
    return TransferRunResult(
        selection="source_val", selected_epoch=3, val_score=0.61, cluster_method="kmeans", n_clusters=2,
        waterfall={"cutoff": 1.5}, n_source=40, n_target=5, n_features=3, config={"alpha": 1.0, "grid": []},
        metric_flags=flags, artifacts_path="artifacts/transfer/run1", seconds=1.25)


def test_a_run_starts_running_and_completes_with_its_outputs(tmp_path) -> None:
    st = Store(tmp_path / "store")
    _start(st)
    running = transfer_run(st, "run1")
    assert running.status == "running" and running.source == {"path": "expr.csv"} and running.adapt
    with pytest.raises(InputDataError, match="running"):
        transfer_run(st, "run1", complete=True)
    assert transfer_predictions(st, "run1").empty
    complete_transfer_run(st, "run1", _result(("single_class_test",)), _outputs())
    run = transfer_run(st, "run1", complete=True)
    assert (run.selected_epoch, run.val_score, run.n_target, run.waterfall) == (3, 0.61, 5, {"cutoff": 1.5})
    assert run.metric_flags == "single_class_test" and run.config["grid"] == []
    preds = transfer_predictions(st, "run1")
    assert preds["row"].tolist() == [0, 1, 2, 3, 4] and preds["label"].tolist() == [0, 0, 1, 1, 1]
    metrics = st.query("SELECT metric, value, n, n_pos FROM transfer_metrics WHERE run_id = 'run1' ORDER BY metric")
    assert metrics["metric"].tolist() == ["accuracy", "auroc"] and pd.isna(metrics["value"].iloc[1])
    history = st.query("SELECT * FROM transfer_history WHERE run_id = 'run1' ORDER BY stage")
    assert len(history) == 2 and pd.isna(history["ce"].iloc[1]) and history["val_ce"].iloc[0] == 0.6
    assert st.query("SELECT feature FROM transfer_features WHERE run_id = 'run1' ORDER BY idx")["feature"].tolist() == \
        ["G1", "G2", "G3"]
    assert transfer_artifacts_dir(st, "run1") == st.root / "artifacts" / "transfer" / "run1"


def test_outputs_that_do_not_fit_leave_the_run_running(tmp_path) -> None:
    st = Store(tmp_path / "store")
    _start(st)
    bad = TransferOutputs(dataset_id="ds1", proba=np.zeros(4), label=np.zeros(3, np.int8), cluster=np.zeros(4),
                          history=[], features=["G1"])
    with pytest.raises(InputDataError, match="one label"):
        complete_transfer_run(st, "run1", _result(), bad)
    assert transfer_run(st, "run1").status == "running"
    assert st.query("SELECT count(*) AS n FROM transfer_features")["n"].iloc[0] == 0


def test_a_failed_run_records_its_error_and_unknown_runs_are_named(tmp_path) -> None:
    st = Store(tmp_path / "store")
    _start(st, "run1")
    fail_transfer_run(st, "run1", "ValueError: " + "x" * 5000)
    run = transfer_run(st, "run1")
    assert run.status == "failed" and run.error.startswith("ValueError") and len(run.error) == 2000
    with pytest.raises(TransferRunNotFoundError, match="recent runs: run1"):
        transfer_run(st, "nope")


def test_a_run_whose_process_was_killed_reads_as_stopped_not_running(tmp_path) -> None:
    """A killed transfer cannot record failing; `scdm genes` on it must not say it is still running."""
    import subprocess
    import sys
    import textwrap

    st = Store(tmp_path / "store")
    _start(st, "alive")
    with pytest.raises(InputDataError, match="is running"):  # this process: still alive
        transfer_run(st, "alive", complete=True)
    killed = textwrap.dedent(f"""
        import os
        from scdm.store import Store
        from tests.store.test_transfer_records import _start
        _start(Store({str(tmp_path / "store")!r}), "killed")
        os._exit(9)  # like SIGKILL: no cleanup runs
    """)
    subprocess.run([sys.executable, "-c", killed], check=False, cwd=Path(__file__).parents[2])
    assert transfer_run(st, "killed").status == "running"
    with pytest.raises(InputDataError, match="never finished: its process is gone.*scdm transfer"):
        transfer_run(st, "killed", complete=True)


def test_critical_genes_are_replaced_as_a_whole(tmp_path) -> None:
    st = Store(tmp_path / "store")
    _start(st)
    genes = pd.DataFrame({c: np.arange(3, dtype=float) for c in CRITICAL_GENE_COLUMNS})
    genes["gene"], genes["rank"], genes["direction"], genes["critical"] = ["A", "B", "C"], [1, 2, 3], "sensitive", True
    replace_critical_genes(st, CriticalGenes("run1", genes, {"correction": "bh"}))
    replace_critical_genes(st, CriticalGenes("run1", genes.iloc[:2], {"correction": "bonferroni"}))
    stored = critical_genes_table(st, "run1")
    assert stored["gene"].tolist() == ["A", "B"] and json.loads(stored["params"].iloc[0]) == {"correction": "bonferroni"}
    assert stored["detect_resistant"].tolist() == [0.0, 1.0]
    with pytest.raises(InputDataError, match="lacks the columns effect_size"):
        replace_critical_genes(st, CriticalGenes("run1", genes.drop(columns=["effect_size"])))
    assert len(critical_genes_table(st, "run1")) == 2


def _two_label_sets(st: Store, name: str, seed: int) -> str:
    cells = make_counts_adata(n_cells=30, n_genes=20, seed=seed)
    cells.obs["other"] = cells.obs["label"].iloc[::-1].to_numpy()
    st.ingest(cells, name=name, label_key="label", drug="drugA", sample_key="patient")
    st.ingest(cells, label_key="other", drug="drugB")
    return st.dataset(name).dataset_id


def test_a_run_records_the_label_sets_it_read(tmp_path) -> None:
    st = Store(tmp_path / "store")
    start_transfer_run(st, TransferRunStart(
        run_id="run1", drug="drugB", source_kind="store", source={"datasets": ["s1"], "names": ["src"]},
        target_dataset_id="ds1", features="expr", source_features=None, adapt=True, selection="target_val", config={},
        source_label_set="drugB", target_label_set="drugB", validation_label_set="drugB"))
    complete_transfer_run(st, "run1", _result(), _outputs())
    run = transfer_run(st, "run1", complete=True)
    assert (run.source_label_set, run.target_label_set, run.validation_label_set) == ("drugB", "drugB", "drugB")
    _start(st, "bulk")
    assert transfer_run(st, "bulk").source_label_set is None


def test_runs_of_an_older_store_get_the_default_label_sets_they_read(tmp_path) -> None:
    st = Store(tmp_path / "store")
    src, tgt, _ = (_two_label_sets(st, name, seed) for seed, name in enumerate(("src", "tgt", "val")))
    for run_id, metrics in (("scored", True), ("unscored", False)):
        start_transfer_run(st, TransferRunStart(
            run_id=run_id, drug=None, source_kind="store", source={"datasets": [src], "names": ["src"]},
            target_dataset_id=tgt, features="expr", source_features=None, adapt=True, selection="target_val",
            config={"validation": "val"}))
        complete_transfer_run(st, run_id, replace(_result(), config={"validation": "val"}), _outputs(metrics=metrics))
    _start(st, "bulk")
    # the catalog as schema 8 left it: no label-set columns, migration 9 not applied
    for column in ("source_label_set", "target_label_set", "validation_label_set"):
        st.execute(f"ALTER TABLE transfer_runs DROP COLUMN {column}")
    st.execute("DELETE FROM migrations WHERE version = 9")
    st = Store(tmp_path / "store")
    scored, unscored, bulk = (transfer_run(st, r) for r in ("scored", "unscored", "bulk"))
    assert (scored.source_label_set, scored.target_label_set, scored.validation_label_set) == ("drugA", "drugA", "drugA")
    assert unscored.source_label_set == "drugA" and unscored.target_label_set is None  # no labels were read
    assert (bulk.source_label_set, bulk.target_label_set, bulk.validation_label_set) == (None, None, None)


def test_read_back_probabilities_give_the_stored_labels_at_a_float32_threshold(tmp_path) -> None:
    """A probability stored as REAL (float32(0.7) = 0.69999999) is below a 0.7 threshold: its label is 0.
    transfer_predictions returned the float32 column, and numpy compares it with 0.7 in float32 (0.7
    rounds onto the value): ``proba >= threshold`` read 1 where the stored label is 0."""
    st = Store(tmp_path / "store")
    _start(st)
    proba = np.array([np.float32(0.7), np.float32(0.7) + 1e-6, 0.2, 0.9], np.float32).astype(np.float64)
    label = (proba >= 0.7).astype(np.int8)
    assert label.tolist() == [0, 1, 0, 1]
    outputs = replace(_outputs(4), proba=proba, label=label, cluster=np.zeros(4))
    complete_transfer_run(st, "run1", _result(), outputs)
    preds = transfer_predictions(st, "run1")
    assert preds["proba"].dtype == np.float64
    np.testing.assert_array_equal((preds["proba"] >= 0.7).astype(np.int8), preds["label"])


def test_transfer_predictions_keep_their_float64_probabilities(tmp_path) -> None:
    """transfer_predictions.proba was REAL: 1 - 1e-9 and 1 - 1e-12 were both stored as 1.0 (tied in the AUROC),
    and 0.5 - 1e-9 as 0.5 beside its label 0."""
    st = Store(tmp_path / "store")
    _start(st)
    proba = np.array([1 - 1e-9, 1 - 1e-12, 0.5 - 1e-9, 0.2])
    label = (proba >= 0.5).astype(np.int8)
    complete_transfer_run(st, "run1", _result(), replace(_outputs(4), proba=proba, label=label, cluster=np.zeros(4)))
    preds = transfer_predictions(st, "run1")
    np.testing.assert_array_equal(preds["proba"].to_numpy(), proba)  # exactly
    np.testing.assert_array_equal((preds["proba"] >= 0.5).astype(np.int8), preds["label"])
