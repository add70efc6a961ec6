"""Hard labels without scores: AUROC/AP are NULL with a flag, the other metrics unchanged (store.metrics)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from scdm.store.errors import InputDataError
from scdm.store.evaluation import TaskKey, TaskOutcome
from scdm.store.metrics import NO_SCORES, SINGLE_CLASS_TEST, compute_metrics
from scdm.store.splits import make_splits


def test_hard_only_nulls_ranking_metrics_and_keeps_the_rest() -> None:
    y = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    pred = np.array([0, 1, 0, 0, 1, 1, 0, 1], dtype=float)
    hard = compute_metrics(y, pred, hard_only=True)
    scored = compute_metrics(y, pred)
    assert hard["auroc"] is None and hard["ap"] is None and NO_SCORES in hard.flags
    assert scored["auroc"] == pytest.approx(skm.roc_auc_score(y, pred))  # what scDrugMap's code reported
    for name in ("accuracy", "precision", "recall", "f1", "mcc", "ami", "ari"):
        assert hard[name] == scored[name]
    assert hard["f1"] == pytest.approx(skm.f1_score(y, pred))
    one_class = compute_metrics([1, 1], [1.0, 0.0], hard_only=True)
    assert one_class.flags[0] == SINGLE_CLASS_TEST and NO_SCORES in one_class.flags
    with pytest.raises(InputDataError, match="hard labels"):
        compute_metrics(y, np.full(8, 0.7), hard_only=True)


def test_task_outcome_passes_hard_only_and_extra_flags(tmp_path) -> None:
    import pandas as pd

    cells = pd.DataFrame({"dataset_id": "d", "row": range(8), "study": "s", "sample": None, "tissue": None,
                          "cancer_type": None, "drug_type": None, "regimen": None, "response": [0, 1] * 4})
    split = make_splits(cells, scenarios=["pooled"], by=["all"], n_folds=2)[0]
    key = TaskKey("space", "llm", "prompt", (), split, "d", 0, "prompt-zero-shot", "{}")
    y = np.array([0, 1, 0, 1])
    out = TaskOutcome(key, y, np.array([0.0, 1.0, 1.0, 1.0]), np.array(["d"] * 4, dtype=object), np.arange(4), 0, 0.0,
                      0.0, hard_only=True, extra_flags=("unanswered=2",))
    m = out.metrics()
    assert m["auroc"] is None and m["accuracy"] == 0.75
    default = TaskOutcome(key, y, np.array([0.1, 0.9, 0.6, 0.8]), np.array(["d"] * 4, dtype=object), np.arange(4), 0,
                          0.0, 0.0)
    assert default.metrics()["auroc"] == 1.0 and not default.hard_only and default.extra_flags == ()
    from scdm.store import Store
    from scdm.store.evaluation import record_tasks
    from scdm.store.splits import save_splits

    st = Store(tmp_path / "store")
    save_splits(st, [split])  # a task is stored on a stored split only
    record_tasks(st, [out], {"test": True}, scdm_version="test", seconds=0.0)
    flags = st.query("SELECT flags FROM eval_tasks")["flags"].iloc[0]
    assert flags.split(",") == [NO_SCORES, "unanswered=2"]
    values = st.query("SELECT metric, value FROM eval_results").set_index("metric")["value"]
    assert np.isnan(values["auroc"]) and np.isnan(values["ap"]) and values["accuracy"] == 0.75
