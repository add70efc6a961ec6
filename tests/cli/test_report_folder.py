"""``scdm report`` deletes and overwrites only files a report wrote into its folder.

Before the report kept a manifest it removed every ``tables/*.csv`` and ``*.sql`` of its folder: a
``tables/`` (or ``--out``) linked to a user's folder of CSVs lost them. Only the server refused such
links; the command line and ``write_report`` did not.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from scdm.classify.report import MANIFEST, write_report
from scdm.cli import main
from scdm.store import Store

USER_CSV = "gene,n\nTP53,3\n"


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    """One ingested dataset: the report writes its datasets and label_sets tables."""
    st = Store(tmp_path / "store")
    X = np.random.default_rng(0).poisson(2.0, size=(12, 5)).astype(np.float32)
    obs = pd.DataFrame({"response": ["sensitive", "resistant"] * 6}, index=[f"c{i}" for i in range(12)])
    st.ingest(ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(5)])), name="d1",
              label_key="response")
    return st.root


def _report(store: Path, out: Path) -> Result:
    return CliRunner().invoke(main, ["--store", str(store), "report", "--out", str(out)])


def _project_folder(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "counts.csv").write_text(USER_CSV)
    (project / "query.sql").write_text("SELECT 1;\n")
    return project


def test_a_linked_tables_folder_keeps_the_users_files(store: Path, tmp_path: Path) -> None:
    project = _project_folder(tmp_path)
    out = tmp_path / "report"
    out.mkdir()
    os.symlink(project, out / "tables")
    for _ in range(2):  # the second report removes the first one's tables, and only those
        result = _report(store, out)
        assert result.exit_code == 0, result.output
        assert (project / "counts.csv").read_text() == USER_CSV
        assert (project / "query.sql").read_text() == "SELECT 1;\n"
    assert sorted(p.name for p in project.iterdir()) == ["counts.csv", "datasets.csv", "datasets.sql",
                                                         "label_sets.csv", "label_sets.sql", "query.sql"]


def test_an_out_folder_linked_to_a_project_keeps_its_tables(store: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "tables").mkdir(parents=True)
    (project / "tables" / "counts.csv").write_text(USER_CSV)
    os.symlink(project, tmp_path / "report")
    for _ in range(2):
        result = _report(store, tmp_path / "report")
        assert result.exit_code == 0, result.output
    assert (project / "tables" / "counts.csv").read_text() == USER_CSV
    assert (project / "index.html").is_file() and (project / "tables" / "datasets.csv").is_file()


def test_a_users_file_of_a_name_the_report_writes_is_not_overwritten(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    (out / "tables").mkdir(parents=True)
    (out / "tables" / "datasets.csv").write_text(USER_CSV)
    result = _report(store, out)
    assert result.exit_code == 1
    assert "holds tables/datasets.csv, which no earlier report wrote there" in result.output
    assert "--out" in result.output and "Traceback" not in result.output
    assert (out / "tables" / "datasets.csv").read_text() == USER_CSV
    assert not (out / "index.html").exists()


def test_a_report_file_the_user_edited_is_kept(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert _report(store, out).exit_code == 0
    (out / "tables" / "datasets.csv").write_text("my notes\n")
    result = _report(store, out)
    assert result.exit_code == 1 and "tables/datasets.csv" in result.output
    assert (out / "tables" / "datasets.csv").read_text() == "my notes\n"
    (out / "tables" / "datasets.csv").unlink()  # as the message says: move it away, and the report is written
    assert _report(store, out).exit_code == 0


def test_files_of_the_earlier_report_are_replaced(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    write_report(store, out, projection="none", progress=False)
    written = json.loads((out / MANIFEST).read_text())["files"]
    assert set(written) == {"index.html", "tables/datasets.csv", "tables/datasets.sql", "tables/label_sets.csv",
                            "tables/label_sets.sql", "report_state.json"}
    (out / "tables" / "counts.csv").write_text(USER_CSV)
    write_report(store, out, projection="none", progress=False)
    assert (out / "tables" / "counts.csv").read_text() == USER_CSV
    assert json.loads((out / MANIFEST).read_text())["files"].keys() == written.keys()


def test_a_manifest_naming_files_a_report_never_writes_deletes_none(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    write_report(store, out, projection="none", progress=False)
    (tmp_path / "notes.csv").write_text(USER_CSV)
    digest = hashlib.sha256(USER_CSV.encode()).hexdigest()
    (out / MANIFEST).write_text(json.dumps({"files": {"../notes.csv": digest, "tables/../../notes.csv": digest}}))
    (out / "index.html").unlink()
    (out / "report_state.json").unlink()
    for name in ("datasets", "label_sets"):
        for suffix in ("csv", "sql"):
            (out / "tables" / f"{name}.{suffix}").unlink()
    write_report(store, out, projection="none", progress=False)
    assert (tmp_path / "notes.csv").read_text() == USER_CSV


def test_a_report_written_before_the_manifest_is_replaced(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    write_report(store, out, projection="none", progress=False)
    (out / MANIFEST).unlink()  # as an older scdm left its folder
    write_report(store, out, projection="none", progress=False)
    assert (out / MANIFEST).is_file() and (out / "tables" / "datasets.csv").is_file()
