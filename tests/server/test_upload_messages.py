"""What a failed upload tells its user: the upload's own parameters and file name.

The store's ingest errors are shared by ``scdm ingest``, ``Store.ingest`` and the server. An upload
used to answer with command-line advice the endpoint does not take ('Pass --positive VALUE',
'Pass --update (update=True) ... or --label-set NEW_NAME', 'pick another --gene-key') and with the
server's own path of the file ('/srv/store/uploads/3f2a.../x.h5ad' is not an .h5ad file).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest

from scdm.store import Store, example_data
from scdm.store._ingest import IngestOptions
from scdm.store.wording import command_line_option, input_file, option, spoken
from tests.server.jobwait import finished

FLAG = re.compile(r"--[a-z]")


@pytest.fixture(scope="module")
def upload_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Path]]:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    root = tmp_path_factory.mktemp("upload-messages") / "store"
    st = Store(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", study="GSE108383")
    with TestClient(create_app(st), base_url="http://127.0.0.1:8000") as client:
        yield client, root


def _upload(upload_client: tuple[Any, Path], adata: ad.AnnData | bytes, query: str, tmp_path: Path,
            filename: str = "mine.h5ad") -> dict[str, Any]:
    client, _ = upload_client
    if isinstance(adata, bytes):
        body = adata
    else:
        adata.write_h5ad(tmp_path / filename)
        body = (tmp_path / filename).read_bytes()
    answer = client.post(f"/api/upload?filename={filename}{query}", content=body,
                         headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == 202, answer.text
    job = answer.json()
    job = finished(client, job)
    return job


def _a375() -> ad.AnnData:
    return ad.read_h5ad(example_data("A375"))


def _speaks_the_upload(message: str, root: Path) -> None:
    assert not FLAG.search(message), message  # no command-line flag
    assert str(root) not in message and "uploads" not in message, message  # no server path


def test_unknown_labels_advise_the_uploads_positive_and_unknown_value(upload_client: tuple[Any, Path], tmp_path: Path) -> None:
    cells = _a375()
    cells.obs["resp"] = np.where(np.arange(cells.n_obs) % 2, "R", "S")
    job = _upload(upload_client, cells, "&name=rs&label_key=resp", tmp_path)
    assert job["state"] == "failed"
    assert "Pass positive=VALUE" in job["message"] and "unknown_value=VALUE" in job["message"]
    _speaks_the_upload(job["message"], upload_client[1])
    # the advice works: the endpoint takes those parameters
    done = _upload(upload_client, cells, "&name=rs&label_key=resp&positive=S&label_set=rs_labels", tmp_path)
    assert done["state"] == "done", done["message"]
    label_set = upload_client[0].post("/api/sql", json={"query": "SELECT n_labelled, n_sensitive, positive FROM label_sets "
                                                                 "WHERE name = 'rs_labels'"}).json()["rows"]
    assert label_set == [{"n_labelled": 108, "n_sensitive": 54, "positive": "S"}]


def test_relabelled_stored_content_advises_label_set_not_update(upload_client: tuple[Any, Path], tmp_path: Path) -> None:
    cells = _a375()
    cells.obs["response_PLX4720"] = cells.obs["response_PLX4720"].to_numpy()[::-1]
    job = _upload(upload_client, cells, "&name=a375&label_key=response_PLX4720", tmp_path)
    assert job["state"] == "failed" and "other labels" in job["message"]
    assert "label_set=NEW_NAME" in job["message"] and "update" not in job["message"].lower()
    _speaks_the_upload(job["message"], upload_client[1])


def test_other_metadata_for_stored_content_does_not_offer_update(upload_client: tuple[Any, Path], tmp_path: Path) -> None:
    job = _upload(upload_client, _a375(), "&name=copy&study=Other", tmp_path)
    assert job["state"] == "failed" and "study: stored 'GSE108383', given 'Other'" in job["message"]
    assert "update" not in job["message"].lower()
    _speaks_the_upload(job["message"], upload_client[1])


@pytest.mark.parametrize(("change", "query", "advice"), [
    ("duplicate genes", "", "pick another gene_key"),
    ("missing column", "&label_key=nothere", "Column 'nothere' (label_key) is not in obs"),
    ("missing column", "&cancer_type_key=nothere", "Column 'nothere' (cancer_type_key) is not in obs"),
    ("measurements", "&label_key=ic50", "then label_key=response"),
    ("both", "&study_key=condition&study=x", "Both study_key and study were given"),
])
def test_ingest_refusals_name_the_uploads_parameters(upload_client: tuple[Any, Path], tmp_path: Path, change: str, query: str,
                                                     advice: str) -> None:
    cells = _a375()
    cells.obs_names = [f"{change[:4]}_{i}" for i in range(cells.n_obs)]  # other content than the stored a375
    if change == "duplicate genes":
        cells.var_names = ["g"] * cells.n_vars
    cells.obs["ic50"] = np.linspace(0.1, 2.0, cells.n_obs)
    job = _upload(upload_client, cells, f"&name=x{query}", tmp_path)
    assert job["state"] == "failed" and advice in job["message"], job["message"]
    _speaks_the_upload(job["message"], upload_client[1])


@pytest.mark.parametrize("body", [b"this is not an HDF5 file" * 50, b"\x89HDF\r\n\x1a\n" + b"\0" * 600])
def test_an_unreadable_upload_is_named_as_uploaded_not_by_the_servers_path(upload_client: tuple[Any, Path], tmp_path: Path,
                                                                          body: bytes) -> None:
    job = _upload(upload_client, body, "&name=broken", tmp_path, filename="broken.h5ad")
    assert job["state"] == "failed" and "'broken.h5ad'" in job["message"], job["message"]
    _speaks_the_upload(job["message"], upload_client[1])


def test_every_ingest_option_is_an_upload_parameter() -> None:
    """A new ingest option must get a parameter (or the upload's messages would name one it lacks)."""
    from scdm.server.models import UPLOAD_FIELDS, UploadQuery

    assert set(UPLOAD_FIELDS) == {f.name for f in fields(IngestOptions)} | {"name"}
    assert set(UPLOAD_FIELDS.values()) <= set(UploadQuery.model_fields)


def test_the_command_line_wording_is_the_default_and_a_front_end_sets_its_own(tmp_path: Path) -> None:
    assert option("positive", "VALUE") == "--positive VALUE"
    assert option("unknown_values") == "--unknown-value" and option("cancer_key") == "--cancer-type-key"
    assert option("update") == "--update (update=True in Python)"
    assert input_file("/x/y.h5ad") == "'/x/y.h5ad'"
    with spoken(options=lambda name, value: f"<{name}>", files={"/x/y.h5ad": "y.h5ad"}):
        assert option("positive", "V") == "<positive>" and input_file("/x/y.h5ad") == "'y.h5ad'"
    assert option("positive") == command_line_option("positive") == "--positive"
    assert input_file("/x/y.h5ad") == "'/x/y.h5ad'"
