"""A path edited into a shared catalog never makes scdm delete or write files outside the store.

Anyone who may write a shared store's catalog could point an embedding's ``array_path`` or a
dataset's ``stored_path`` at another folder; removing or repairing the embedding, or removing the
dataset, then deleted that folder or file with the permissions of whoever ran it.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdm.store import Store
from scdm.store.errors import StoreDamagedError


def _store_with_an_embedding(tmp_path: Path) -> tuple[Store, str]:
    cells = ad.AnnData(np.ones((6, 5), dtype=np.float32), obs=pd.DataFrame({"response": ["1", "0"] * 3}, index=[f"c{i}" for i in range(6)]),
                       var=pd.DataFrame(index=[f"G{i}" for i in range(5)]))
    st = Store(tmp_path / "store")
    st.ingest(cells, name="d", label_key="response", positive="1")
    return st, st.create_embedding("d", model="toy", params={}, dim=4).embedding_id


def _edit(st: Store, sql: str) -> Store:
    with st.catalog.connect() as con:  # a colleague's write, as any DuckDB client could make it
        con.execute(sql)
    return Store(st.root)


@pytest.fixture
def thesis(tmp_path: Path) -> Path:
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("years of work")
    return folder


@pytest.mark.parametrize("array_path", ["../thesis", "{thesis}", "file://{thesis}", "embeddings/../../thesis"])
def test_removing_an_embedding_leaves_a_folder_outside_the_store(tmp_path: Path, thesis: Path, array_path: str) -> None:
    st, embedding_id = _store_with_an_embedding(tmp_path)
    st = _edit(st, f"UPDATE embeddings SET array_path = '{array_path.format(thesis=thesis)}'")
    st.remove_embedding(embedding_id)
    assert (thesis / "chapter1.tex").read_text() == "years of work"
    assert st.query("SELECT count(*) FROM embeddings").iloc[0, 0] == 0


def test_removing_a_dataset_leaves_a_file_outside_the_store(tmp_path: Path, thesis: Path) -> None:
    st, _ = _store_with_an_embedding(tmp_path)
    st = _edit(st, "UPDATE datasets SET stored_path = 'datasets/../../thesis/chapter1.tex'")
    st.remove_dataset("d")
    assert (thesis / "chapter1.tex").read_text() == "years of work"
    assert st.query("SELECT count(*) FROM datasets").iloc[0, 0] == 0


def test_an_embedding_whose_array_is_elsewhere_is_not_renewed_there(tmp_path: Path, thesis: Path) -> None:
    st, embedding_id = _store_with_an_embedding(tmp_path)
    st = _edit(st, "UPDATE embeddings SET array_path = '../thesis'")
    with pytest.raises(StoreDamagedError, match=rf"names the array '\.\./thesis', where scdm never writes one.*Nothing was "
                                                rf"removed.*scdm rm --embedding {embedding_id}"):
        st.create_embedding("d", model="toy", params={}, dim=4)  # resuming it: its array is not whole
    assert sorted(p.name for p in thesis.iterdir()) == ["chapter1.tex"]


def test_the_store_own_copies_and_arrays_are_still_removed(tmp_path: Path) -> None:
    st, embedding_id = _store_with_an_embedding(tmp_path)
    array = st.root / "embeddings" / f"{embedding_id}.zarr"
    (copy,) = (st.root / "datasets").glob("*.h5ad")
    assert array.is_dir()
    st.remove_dataset("d")
    assert not array.exists() and not copy.exists()


def test_an_embedding_whose_array_is_another_whole_array_is_not_written_there(tmp_path: Path) -> None:
    st, embedding_id = _store_with_an_embedding(tmp_path)
    other = tmp_path / "other.zarr"
    (st.root / "embeddings" / f"{embedding_id}.zarr").rename(other)  # a whole array outside the store
    before = (other / "zarr.json").read_bytes()
    st = _edit(st, f"UPDATE embeddings SET array_path = '{other}', dim = 5")  # its metadata would be rewritten
    with pytest.raises(StoreDamagedError, match="where scdm never writes one"):
        st.create_embedding("d", model="toy", params={}, dim=4)
    assert (other / "zarr.json").read_bytes() == before


def test_an_embedding_id_that_is_a_path_removes_no_folder_elsewhere(tmp_path: Path) -> None:
    # its lock folder was claims/../../docs, every file of which removing the embedding deleted
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    st, _ = _store_with_an_embedding(tmp_path)
    st = _edit(st, "DELETE FROM embedding_chunks; UPDATE embeddings SET embedding_id = '../../docs'")
    with pytest.raises(StoreDamagedError, match=r"names an embedding '\.\./\.\./docs', an id scdm never makes.*Nothing was"):
        st.remove_dataset("d")
    assert sorted(p.name for p in docs.iterdir()) == ["notes.txt"]
    assert st.query("SELECT count(*) FROM datasets").iloc[0, 0] == 1
