"""Read-only stores serve every read and refuse writes; a damaged catalog says what is damaged."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from scdm.store import Store, StoreFormatError
from scdm.store.errors import CatalogDamagedError, ScdmError, StoreReadOnlyError
from tests.store.conftest import make_counts_adata

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"


def unpack_v5(into: Path) -> Path:
    """The schema-5 store committed as a migration fixture (40 A375 cells, a pca embedding, results)."""
    with tarfile.open(DATA / "stores" / "store_schema5.tar.gz") as tar:
        tar.extractall(into, filter="data")
    return into / "store_v5"


@pytest.fixture(scope="module")
def migrated(tmp_path_factory) -> Path:
    root = unpack_v5(tmp_path_factory.mktemp("ro"))
    Store(root)  # migrates it to this scdm's schema
    return root


@pytest.fixture()
def store_dir(migrated, tmp_path) -> Path:
    shutil.copytree(migrated, tmp_path / "store")
    return tmp_path / "store"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file of a store with its size and mtime (claim lock folders aside)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and "claims" not in p.parts}


def test_a_read_only_store_serves_reads_and_writes_nothing(store_dir, tmp_path):
    before = snapshot(store_dir)
    st = Store(store_dir, read_only=True)
    assert st.read_only
    eid = str(st.embeddings()["embedding_id"].iloc[0])
    assert st.read_embedding(eid).shape == (40, 8)
    assert st.sql("SELECT count(*) AS n FROM cells")["n"].item() == 40
    assert st.query("DESCRIBE cells").shape[0] > 5  # reads that are not SELECTs go through too
    assert st.verify().ok
    st.export_embedding(eid, tmp_path / "x.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), st.read_embedding(eid))
    assert snapshot(store_dir) == before


def test_every_write_to_a_read_only_store_is_refused_with_a_clear_message(store_dir):
    before = snapshot(store_dir)
    st = Store(store_dir, read_only=True)
    eid = str(st.embeddings()["embedding_id"].iloc[0])
    writes = {
        "execute": lambda: st.execute("DELETE FROM cells"),
        "query": lambda: st.query("DELETE FROM cells"),
        "ingest": lambda: st.ingest(make_counts_adata(), name="new"),
        "create_embedding": lambda: st.create_embedding("a375", model="x", params={}, dim=2),
        "remove_embedding": lambda: st.remove_embedding(eid),
        "mark_chunks_pending": lambda: st.mark_chunks_pending(eid, [0]),
        "verify(repair)": lambda: st.verify(repair=True),
    }
    for name, write in writes.items():
        with pytest.raises(StoreReadOnlyError, match="open read-only") as info:
            write()
        assert str(store_dir) in str(info.value), name
    assert snapshot(store_dir) == before
    assert Store(store_dir).cells("a375").shape[0] == 40  # nothing was deleted


def test_read_only_mode_is_switched_on_by_the_environment_or_missing_permission(store_dir, monkeypatch):
    monkeypatch.setenv("SCDM_READ_ONLY", "1")
    assert Store(store_dir).read_only
    monkeypatch.setenv("SCDM_READ_ONLY", "0")
    assert not Store(store_dir).read_only
    monkeypatch.delenv("SCDM_READ_ONLY")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: mode != os.W_OK and real_access(path, mode, **kw))
    st = Store(store_dir)
    assert st.read_only
    with pytest.raises(StoreReadOnlyError, match="may not write"):
        st.execute("DELETE FROM cells")


def test_a_missing_store_is_not_created_read_only(tmp_path):
    with pytest.raises(ScdmError, match="not an scdm store"):
        Store(tmp_path / "nowhere", read_only=True)
    assert not (tmp_path / "nowhere").exists()


def test_a_store_that_needs_a_migration_cannot_be_opened_read_only(tmp_path):
    root = unpack_v5(tmp_path)
    with pytest.raises(StoreReadOnlyError, match="open the store once with write access|Open it once with write access"):
        Store(root, read_only=True)
    Store(root)  # with write access it migrates
    assert Store(root, read_only=True).datasets().shape[0] == 1


def test_a_newer_catalog_is_refused_read_only_too(store_dir):
    Store(store_dir).execute("INSERT INTO migrations VALUES (999, 'future', now(), '99.0')")
    with pytest.raises(StoreFormatError, match="schema version 999"):
        Store(store_dir, read_only=True)


def test_the_server_answers_read_routes_from_a_read_only_store(store_dir):
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    before = snapshot(store_dir)
    with TestClient(create_app(Store(store_dir, read_only=True)), base_url="http://localhost") as client:
        for route in ("/api/health", "/api/datasets", "/api/embeddings", "/api/models", "/api/heads"):
            assert client.get(route).status_code == 200, route
        response = client.post("/api/sql", json={"query": "SELECT count(*) AS n FROM cells"})
        assert response.status_code == 200 and response.json()["rows"] == [{"n": 40}]
    assert snapshot(store_dir) == before


# ---- real permissions --------------------------------------------------------------------------
_DROP_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search,-fowner",
             "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def _unprivileged_prefix() -> list[str] | None:
    """How to run a process that permission bits apply to; None when this test cannot."""
    if os.geteuid() != 0:
        return []
    # root ignores permission bits; without its override capabilities it does not
    if shutil.which("setpriv") and subprocess.run([*_DROP_DAC, "true"], capture_output=True).returncode == 0:
        return _DROP_DAC
    return None


@pytest.mark.skipif(_unprivileged_prefix() is None, reason="runs as root without setpriv: permission bits do not apply")
def test_a_store_the_user_may_not_write_is_detected_and_served_read_only(store_dir):
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from scdm.store import Store\n"
        "from scdm.store.errors import StoreReadOnlyError\n"
        "st = Store(sys.argv[2])\n"
        "eid = st.embeddings()['embedding_id'].iloc[0]\n"
        "print('read_only', st.read_only, st.read_embedding(eid).shape, st.verify().ok)\n"
        "try:\n"
        "    st.execute('DELETE FROM cells')\n"
        "except StoreReadOnlyError as err:\n"
        "    print('refused:', err)\n"
    )
    before = snapshot(store_dir)
    subprocess.run(["chmod", "-R", "a-w", str(store_dir)], check=True)
    try:
        done = subprocess.run([*_unprivileged_prefix(), sys.executable, "-c", script, str(ROOT), str(store_dir)],
                              capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store_dir)], check=True)
    assert done.returncode == 0, done.stderr
    assert "read_only True (40, 8) True" in done.stdout
    assert "refused:" in done.stdout and "this user may not write to it" in done.stdout
    assert snapshot(store_dir) == before


# ---- damaged catalogs --------------------------------------------------------------------------
def _damage_catalog(path: Path, how: str) -> None:
    if how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def _read_every_table(root: Path, read_only: bool) -> None:
    st = Store(root, read_only=read_only)
    for table in st.query("SELECT table_name FROM information_schema.tables")["table_name"]:
        st.query(f'SELECT * FROM "{table}"')


@pytest.mark.parametrize("read_only", [False, True])
@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_catalog_says_what_is_damaged_and_what_to_do(store_dir, how, read_only):
    catalog = store_dir / "catalog.duckdb"
    _damage_catalog(catalog, how)
    with pytest.raises(CatalogDamagedError) as info:
        _read_every_table(store_dir, read_only)
    text = str(info.value)
    assert str(catalog) in text and "damaged" in text and "backup" in text
