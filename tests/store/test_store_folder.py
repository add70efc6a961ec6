"""Which folders a store opens in: a store, a new or empty folder, never a folder of other files."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from scdm.cli import main
from scdm.store import Store
from scdm.store.errors import ScdmError, StoreDamagedError


def test_a_folder_of_other_files_is_not_turned_into_a_store(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    with pytest.raises(ScdmError, match=r"is not an scdm store .*holds 'notes.txt'.*new or empty folder"):
        Store(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # no catalog, no sub-folders left behind


def test_scdm_ls_on_a_folder_of_other_files_refuses_and_writes_nothing(tmp_path):
    folder = tmp_path / "home"
    (folder / "projects").mkdir(parents=True)
    result = CliRunner().invoke(main, ["--store", str(folder), "ls"])
    assert result.exit_code == 1
    assert "is not an scdm store" in result.output and "--store" in result.output
    assert sorted(p.name for p in folder.iterdir()) == ["projects"]


def test_new_empty_and_existing_stores_open_as_before(tmp_path):
    new = tmp_path / "new"
    Store(new)
    assert (new / "catalog.duckdb").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"")  # what a Finder view leaves in an empty folder
    Store(empty)
    assert (empty / "catalog.duckdb").is_file()
    (new / "notes.txt").write_text("a file beside the catalog is the user's business")
    Store(new)
    Store(new, read_only=True)


def test_a_store_whose_creation_stopped_before_its_catalog_is_finished(tmp_path):
    root = tmp_path / "store"
    for sub in ("embeddings", "datasets", "artifacts"):
        (root / sub).mkdir(parents=True)
    Store(root)
    assert (root / "catalog.duckdb").is_file()


def test_a_store_that_lost_its_catalog_is_not_given_a_new_empty_one(tmp_path):
    root = tmp_path / "store"
    Store(root)
    (root / "datasets" / "0123456789abcdef.h5ad").write_bytes(b"data")
    (root / "catalog.duckdb").unlink()
    with pytest.raises(StoreDamagedError, match=r"holds datasets/ of an scdm store but no catalog.duckdb.*Put catalog.duckdb back"):
        Store(root)
    assert not (root / "catalog.duckdb").exists()


def test_a_file_given_as_the_store_is_named_as_a_file(tmp_path):
    path = tmp_path / "a375.h5ad"
    path.write_bytes(b"not a folder")
    with pytest.raises(ScdmError, match="is a file, not a folder"):
        Store(path)


def test_read_only_on_a_folder_of_other_files_says_it_is_not_a_store(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(ScdmError, match=r"not an scdm store\. Point --store"):
        Store(folder, read_only=True)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
