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
