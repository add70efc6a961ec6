"""The revision of its head that fitted a stored task has one owner in ``store/``.

It was spelled three times: ``store.evaluation._STORED_REVISION`` (eval_tasks rows), ``classify.results._stored_revision``
(``results`` rows, and through ``stale_sql`` the ``eval_results`` rows of ``trained_heads`` and ``report``) and the
``results`` view of migration 0018. The first two are now :func:`scdm.store.evaluation.stored_revision_sql`; the view
(a shipped migration, compared as written against every store's own) keeps its SQL, and these tests hold the two
to the same value for every shape of a run's ``head_revisions``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from scdm.store._catalog import _migrated_memory_catalog
from scdm.store.evaluation import stored_revision_sql

SOURCE = Path(__file__).resolve().parents[2] / "src" / "scdm"

RUNS = {  # run id -> config.head_revisions as the run recorded it (absent: an scdm that recorded none)
    "r-none": None,
    "r-int": {"logreg": 2, "lora-mlp": 3},
    "r-text": {"logreg": "4"},
    "r-junk": {"logreg": "two", "mlp": None},
    "r-empty": {},
}
EXPECTED = {  # (run id, head) -> revision
    ("r-none", "logreg"): 1, ("r-int", "logreg"): 2, ("r-int", "lora-mlp"): 3, ("r-int", "mlp"): 1,
    ("r-text", "logreg"): 4, ("r-junk", "logreg"): 1, ("r-junk", "mlp"): 1, ("r-empty", "logreg"): 1,
    ("r-gone", "logreg"): 1,  # a row whose run is not stored
}


def test_the_results_view_and_the_stores_helper_agree_on_every_row() -> None:
    with contextlib.closing(_migrated_memory_catalog()) as con:
        for run_id, revisions in RUNS.items():
            config = {"heads": ["logreg"]} if revisions is None else {"heads": ["logreg"], "head_revisions": revisions}
            con.execute("INSERT INTO eval_runs (run_id, created_at, status, config) VALUES (?, now(), 'complete', ?)",
                        [run_id, json.dumps(config)])
        for i, (run_id, head) in enumerate(EXPECTED):
            con.execute(
                "INSERT INTO eval_results (task_id, run_id, space_id, model, variant, split_id, scenario, category_type, "
                "category, scheme, fold, head, metric, value, n_train, n_test, label_set, head_params) "
                "VALUES (?, ?, 's', 'm', 'frozen', 'sp', 'pooled', 'all', 'all', 'kfold', 0, ?, 'auroc', 0.5, 10, 5, 'l', '{}')",
                [f"t{i}", run_id, head])
        view = con.execute(f"SELECT run_id, head, revision, {stored_revision_sql('x')} FROM results x").fetchall()
        table = con.execute(f"SELECT run_id, head, {stored_revision_sql('x')} FROM eval_results x").fetchall()
    assert {(run, head): (a, b) for run, head, a, b in view} == {key: (r, r) for key, r in EXPECTED.items()}
    assert {(run, head): r for run, head, r in table} == EXPECTED


@pytest.mark.parametrize("alias", ["e", "t", "x"])
def test_the_helper_reads_the_row_it_is_given_whatever_its_alias(alias: str) -> None:
    """Its subquery names eval_runs with an alias of its own: a row aliased ``e`` (a common name for a run) is read
    as the outer row, not as the run."""
    with contextlib.closing(_migrated_memory_catalog()) as con:
        con.execute("INSERT INTO eval_runs (run_id, created_at, status, config) VALUES "
                    "('r1', now(), 'complete', '{\"head_revisions\": {\"logreg\": 5}}')")
        got = con.execute(f"SELECT {stored_revision_sql(alias)} FROM (SELECT 'r1' AS run_id, 'logreg' AS head) {alias}").fetchall()
    assert got == [(5,)]


def test_the_revision_sql_is_written_once_outside_the_migrations() -> None:
    spelled = sorted(str(path.relative_to(SOURCE)) for path in SOURCE.rglob("*.py")
                     if "'/head_revisions/'" in path.read_text(encoding="utf-8"))
    assert spelled == ["store/evaluation.py"]
