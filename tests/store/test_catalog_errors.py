"""A statement that fails inside a write transaction raises its own error, not DuckDB's refusal to clean up after it."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest

from scdm.store._catalog import Catalog, registered


def test_a_failed_insert_raises_its_own_error(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "catalog.duckdb", retry_seconds=30)
    cat.execute("CREATE TABLE t (i INTEGER PRIMARY KEY)")
    cat.insert_df("t", pd.DataFrame({"i": [1]}))
    # was: TransactionException "Current transaction is aborted" from unregistering the frame
    with pytest.raises(duckdb.ConstraintException), cat.transaction() as con:
        cat.insert_df("t", pd.DataFrame({"i": [1]}), con)
    assert cat.query("SELECT i FROM t")["i"].tolist() == [1]


class _AbortedAfterCtrlC:
    """A connection whose query was interrupted: DuckDB then refuses every other call in the transaction."""

    def register(self, name: str, frame: pd.DataFrame) -> None:
        pass

    def execute(self, sql: str) -> None:
        raise KeyboardInterrupt

    def unregister(self, name: str) -> None:
        raise duckdb.TransactionException("Current transaction is aborted (please ROLLBACK)")


def test_ctrl_c_during_a_statement_stays_a_keyboard_interrupt() -> None:
    con = _AbortedAfterCtrlC()
    with pytest.raises(KeyboardInterrupt), registered(con, "_frame", pd.DataFrame({"i": [1]})):  # type: ignore[arg-type]
        con.execute("INSERT INTO t SELECT * FROM _frame")
