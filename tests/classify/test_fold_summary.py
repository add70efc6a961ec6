"""The mean, sd and n of a metric over a result's folds have one owner (:mod:`scdm.store.metrics`).

They were written by hand in the leaderboard (``classify.results``), the report's tables and figure data
(``classify.report``), a trained head's ``train_metrics`` (``classify.trained_heads``) and, in numpy, the metrics it
recomputes at another threshold. These tests hold every reader to the same numbers on a result with a fold whose
metric is undefined (NULL), and keep the aggregate from being spelled again elsewhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pytest

from scdm.classify.grid import evaluate
from scdm.classify.report import _figure_data_sql, _Filters, _leaderboard_sql
from scdm.classify.results import leaderboard, stale_sql
from scdm.classify.trained_heads import train_head, trained_heads
from scdm.store.metrics import fold_summary, fold_summary_sql
from tests.jhu006 import jhu006_store

SOURCE = Path(__file__).resolve().parents[2] / "src" / "scdm"


def test_every_reader_gives_the_same_mean_sd_and_n_over_folds_with_a_null_one(tmp_path: Path) -> None:
    st = jhu006_store(tmp_path / "store")
    evaluate(st, heads=["ridge"], by=["all"], folds=5, scenarios=["pooled"], label_set="Gefitinib", silent=True)
    with st.catalog.transaction() as con:  # fold 2's AUROC undefined there (as on a one-class test fold)
        con.execute("UPDATE eval_results SET value = NULL WHERE metric = 'auroc' AND fold = 2")
    folds = st.query("SELECT fold, value FROM eval_results WHERE metric = 'auroc' ORDER BY fold")
    assert len(folds) == 5 and folds["value"].isna().sum() == 1
    mean, sd, n = fold_summary(None if v != v else float(v) for v in folds["value"])
    assert n == 4 and sd is not None and mean is not None
    readers = {}
    (row,) = leaderboard(st, metrics=["auroc"]).to_dict("records")
    readers["leaderboard"] = (row["mean"], row["sd"], row["n_folds"])
    filters = _Filters(stale=stale_sql(st, "x"))
    (row,) = st.sql(_leaderboard_sql(filters, ["auroc"], scenario="pooled", category_type="all")).to_dict("records")
    readers["report table"] = (row["auroc_mean"], row["auroc_sd"], row["auroc_n"])
    (row,) = st.sql(_figure_data_sql(filters, ["auroc"])).to_dict("records")
    readers["report figure data"] = (row["mean"], row["sd"], row["n"])
    train_head(st, dataset="JHU006", model="pca", head="ridge", label_set="Gefitinib")
    (entry,) = [m for m in json.loads(trained_heads(st).iloc[0]["train_metrics"]) if m["metric"] == "auroc"]
    readers["train_metrics"] = (entry["mean"], entry["sd"], entry["n_folds"])
    for reader, (got_mean, got_sd, got_n) in readers.items():
        assert (got_mean, got_sd, int(got_n)) == (pytest.approx(mean, abs=1e-12), pytest.approx(sd, abs=1e-12), n), reader


@pytest.mark.parametrize("values", [[0.5, None, 0.7, 0.9], [0.6], [None, None], [], [0.25, float("nan"), 0.75]])
def test_the_numpy_summary_is_the_catalogs(values: list[float | None]) -> None:
    """NULL folds dropped, ddof 1, no sd below two values and no mean without any: as stddev_samp/avg/count."""
    con = duckdb.connect()
    nulls = [None if v is None or v != v else v for v in values]  # NaN: pandas' spelling of a NULL it read
    con.execute("CREATE TABLE f (value DOUBLE)")
    if nulls:
        con.executemany("INSERT INTO f (value) VALUES (?)", [[v] for v in nulls])
    (sql,) = con.execute(f"SELECT {fold_summary_sql('value')} FROM f").fetchall()
    got = fold_summary(values)
    assert got[2] == sql[2]
    for a, b in zip(got[:2], sql[:2]):
        assert (a is None and b is None) or a == pytest.approx(b, abs=1e-12)


def test_the_fold_aggregate_is_written_once_in_src() -> None:
    """A reader writing its own stddev (stddev_pop, or an sd over the NULL folds as zeros) would disagree with the rest."""
    spelled = sorted(str(path.relative_to(SOURCE)) for path in SOURCE.rglob("*.py")
                     if re.search(r"\bstddev(_samp|_pop)?\s*\(|\bstd\(ddof", path.read_text(encoding="utf-8"), re.I))
    assert spelled == ["store/metrics.py"]
