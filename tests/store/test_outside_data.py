"""An .h5ad that takes data from other files (HDF5 external links, external storage, virtual
datasets) is refused at ingest: anndata follows them silently, so an upload to ``scdm serve``
could read any file of the server into the catalog (where SQL shows it), and the store's copy
would not hold its own data."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdm.store import Store
from scdm.store.errors import InputDataError

N_CELLS = 20


def _h5ad(path: Path) -> Path:
    rng = np.random.default_rng(0)
    adata = ad.AnnData(X=sp.csr_matrix(rng.poisson(1.0, (N_CELLS, 12)).astype(np.float32)),
                       obs=pd.DataFrame({"response": ["sensitive", "resistant"] * (N_CELLS // 2)},
                                        index=[f"c{i}" for i in range(N_CELLS)]),
                       var=pd.DataFrame(index=[f"G{i}" for i in range(12)]))
    adata.write_h5ad(path)
    return path


def _replace_obs_names(path: Path, make: str, secret: Path) -> None:
    """obs names read from ``secret`` (a file of the machine that reads the .h5ad)."""
    width = secret.stat().st_size // N_CELLS
    with h5py.File(path, "r+") as f:
        attrs = dict(f["obs/_index"].attrs)
        del f["obs/_index"]
        if make == "external storage":
            made = f["obs"].create_dataset("_index", shape=(N_CELLS,), dtype=f"S{width}",
                                           external=[(str(secret), 0, N_CELLS * width)])
        else:
            other = secret.with_suffix(".h5")
            with h5py.File(other, "w") as g:
                g.create_dataset("names", data=np.array([secret.read_bytes()[i * width:(i + 1) * width]
                                                         for i in range(N_CELLS)]))
            if make == "external link":
                f["obs"]["_index"] = h5py.ExternalLink(str(other), "/names")
                made = f["obs/_index"]
            else:
                layout = h5py.VirtualLayout(shape=(N_CELLS,), dtype=f"S{width}")
                layout[:] = h5py.VirtualSource(str(other), "names", shape=(N_CELLS,))
                made = f["obs"].create_virtual_dataset("_index", layout)
        for key, value in attrs.items():
            made.attrs[key] = value


@pytest.mark.parametrize("make", ["external storage", "external link", "virtual dataset"])
def test_an_h5ad_reading_other_files_is_refused(tmp_path: Path, make: str) -> None:
    secret = tmp_path / "server_secret.txt"
    secret.write_bytes(b"".join(b"SECRET%04d" % i for i in range(N_CELLS)))
    path = _h5ad(tmp_path / "crafted.h5ad")
    _replace_obs_names(path, make, secret)
    assert "SECRET0003" in "".join(ad.read_h5ad(path).obs_names)  # anndata follows it without a word
    st = Store(tmp_path / "store")
    with pytest.raises(InputDataError, match="reads data from outside itself.*self-contained copy"):
        st.ingest(str(path), name="crafted", label_key="response")
    assert st.datasets().empty and not list((tmp_path / "store").rglob("*.h5ad"))
    assert st.sql("SELECT count(*) AS n FROM cells").iloc[0, 0] == 0


def test_a_plain_h5ad_with_internal_links_is_ingested(tmp_path: Path) -> None:
    path = _h5ad(tmp_path / "plain.h5ad")
    with h5py.File(path, "r+") as f:
        f["uns_alias"] = h5py.SoftLink("/obs")  # a link inside the file reads nothing from outside
    info = Store(tmp_path / "store").ingest(str(path), name="plain", label_key="response")
    assert info.n_cells == N_CELLS
