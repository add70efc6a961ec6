"""A SQL macro planted in a shared store's catalog is refused when the store is opened.

A macro named like a built-in (``now()``) replaces it in every statement on the file, so one
added by anyone who may write the store would run inside other users' scdm writes, with their
file (and network) access, and would change the numbers their reads show.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from scdm.store import Store
from scdm.store.errors import StoreFormatError


def _plant(store: Path, secret: Path) -> None:
    st = Store(store)
    with st.catalog.connect() as con:  # a colleague's write, as any DuckDB client could do it
        con.execute(f"CREATE MACRO now() AS (SELECT TIMESTAMP '2000-01-01' + INTERVAL (length(content)) SECOND "
                    f"FROM read_text('{secret}'))")


@pytest.mark.parametrize("read_only", [False, True])
def test_a_store_whose_catalog_holds_a_macro_is_refused(tmp_path: Path, read_only: bool) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("x" * 77)
    _plant(tmp_path / "store", secret)
    with pytest.raises(StoreFormatError, match=r"holds SQL macros \(main\.now\).*DROP MACRO"):
        Store(tmp_path / "store", read_only=read_only)


def test_a_store_without_macros_opens(tmp_path: Path) -> None:
    Store(tmp_path / "store")
    assert Store(tmp_path / "store").sql("SELECT count(*) AS n FROM datasets").iloc[0, 0] == 0


@pytest.mark.parametrize("read_only", [False, True])
def test_a_store_whose_catalog_holds_a_view_scdm_never_creates_is_refused(tmp_path: Path, read_only: bool) -> None:
    st = Store(tmp_path / "store")
    with st.catalog.connect() as con:  # a table scdm reads, replaced by a view of someone's choosing
        con.execute("ALTER TABLE datasets RENAME TO datasets_kept")
        con.execute("CREATE VIEW datasets AS SELECT * FROM datasets_kept")
    with pytest.raises(StoreFormatError, match=r"views that scdm never creates \(main\.datasets\).*DROP VIEW"):
        Store(tmp_path / "store", read_only=read_only)


def _redefine_results(store: Path) -> None:
    with Store(store).catalog.connect() as con:  # every AUROC read through the view becomes 0.99
        sql = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'results'").fetchone()[0]
        con.execute(sql.replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1).replace("SELECT ", "SELECT 0.99 AS planted, ", 1))


def test_a_results_view_edited_in_the_catalog_is_refused_read_only_and_restored_by_a_writable_open(tmp_path: Path) -> None:
    store = tmp_path / "store"
    Store(store)
    _redefine_results(store)
    with pytest.raises(StoreFormatError, match=r"defines the view\(s\) main\.results otherwise.*write access"):
        Store(store, read_only=True)
    columns = list(Store(store).sql("SELECT * FROM results LIMIT 0").columns)  # a writable open restores it
    assert "planted" not in columns
    Store(store, read_only=True)  # and the read-only open is fine again


def test_a_results_view_worded_otherwise_by_another_duckdb_is_scdms_own() -> None:
    from scdm.store._catalog import _expected_views, _same_view

    expected = _expected_views()["main.results"]
    reworded = expected.replace("CREATE VIEW", "create   view", 1).replace(" FROM ", "\n  FROM ")
    assert reworded != expected and _same_view("main.results", reworded)
    assert not _same_view("main.results", expected.replace("SELECT ", "SELECT 0.99 AS planted, ", 1))


def _catalog_of_an_older_scdm(store: Path, schema: int) -> None:
    """A catalog as an scdm of schema version ``schema`` left it: its migrations applied and recorded."""
    import duckdb

    from scdm.store._catalog import _MIGRATIONS

    store.mkdir()
    with duckdb.connect(str(store / "catalog.duckdb")) as con:
        con.execute("CREATE TABLE migrations (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP, "
                    "scdm_version VARCHAR)")
        for version, name, sql in _MIGRATIONS[:schema]:
            con.execute(sql)
            con.execute("INSERT INTO migrations VALUES (?, ?, now(), 'old')", [version, name])


def test_an_older_scdms_results_view_read_only_is_the_pending_migration_not_an_edit(tmp_path: Path) -> None:
    # schema 11 holds results as migration 6 defined it (migration 12 replaces it): the store of an
    # older scdm, to be migrated, not a catalog someone edited
    from scdm.store.errors import StoreReadOnlyError

    _catalog_of_an_older_scdm(tmp_path / "store", 11)
    with pytest.raises(StoreReadOnlyError, match=r"schema version 11 and lacks migration\(s\) 0012_result_key"):
        Store(tmp_path / "store", read_only=True)
    Store(tmp_path / "store")  # migrates it, with no word of an edited view
    assert Store(tmp_path / "store", read_only=True).sql("SELECT count(*) AS n FROM results").iloc[0, 0] == 0


@pytest.mark.parametrize("read_only", [False, True])
def test_a_newer_scdms_view_is_refused_as_a_newer_catalog(tmp_path: Path, read_only: bool) -> None:
    from scdm.store._catalog import SCHEMA_VERSION

    _catalog_of_an_older_scdm(tmp_path / "store", SCHEMA_VERSION)
    import duckdb

    with duckdb.connect(str(tmp_path / "store" / "catalog.duckdb")) as con:  # what a later scdm's migration may do
        con.execute("CREATE VIEW leaderboard AS SELECT * FROM results")
        con.execute("INSERT INTO migrations VALUES (?, 'leaderboard', now(), '9.9')", [SCHEMA_VERSION + 1])
    with pytest.raises(StoreFormatError, match=r"written by scdm 9\.9.*Upgrade scdm"):
        Store(tmp_path / "store", read_only=read_only)


@pytest.mark.parametrize("read_only", [False, True])
def test_a_table_put_in_place_of_the_results_view_is_refused(tmp_path: Path, read_only: bool) -> None:
    store = tmp_path / "store"
    with Store(store).catalog.connect() as con:  # results dropped, a table of that name given other rows
        con.execute("DROP VIEW results")
        con.execute("CREATE TABLE results AS SELECT * FROM eval_results")
    with pytest.raises(StoreFormatError, match=r"holds the table\(s\) main\.results where scdm defines a view"):
        Store(store, read_only=read_only)


def test_a_dropped_results_view_is_refused_read_only_and_defined_again_by_a_writable_open(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with Store(store).catalog.connect() as con:
        con.execute("DROP VIEW results")
    with pytest.raises(StoreFormatError, match=r"main\.results otherwise.*write access"):
        Store(store, read_only=True)
    assert "result_key" in Store(store).sql("SELECT * FROM results LIMIT 0").columns
    Store(store, read_only=True)
