"""The report escapes what users name: datasets, label sets and heads with markup in their names."""

from __future__ import annotations

import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scdm.classify import heads as heads_module
from scdm.classify.grid import evaluate
from scdm.classify.heads import RidgeHead
from scdm.classify.report import write_report
from scdm.classify.splits import SampleLeakageWarning
from scdm.store import Store
from tests.classify.test_report import _adata, _write_embedding

EVIL_DATASET = 'd<script>alert(1)</script>"&x'
EVIL_LABEL_SET = 'ls<script>"&'
EVIL_HEAD = 'ridge<script>"&'


class _EvilRidge(RidgeHead):
    name = EVIL_HEAD


class _Page(HTMLParser):
    """Text of every table (id -> cell texts) and every data-* attribute value, as a browser reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[str]] = {}
        self.table: str | None = None
        self.cell: list[str] | None = None
        self.attributes: list[str] = []
        self.captions: list[str] = []
        self.caption: list[str] | None = None
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attributes += [v for k, v in attrs if k.startswith("data-") and v]
        self.scripts += tag == "script"
        if tag == "table":
            self.table = dict(attrs).get("id") or ""
            self.tables[self.table] = []
        elif tag in ("td", "th") and self.table is not None:
            self.cell = []
        elif tag == "figcaption":
            self.caption = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None and self.table is not None:
            self.tables[self.table].append("".join(self.cell))
            self.cell = None
        elif tag == "table":
            self.table = None
        elif tag == "figcaption" and self.caption is not None:
            self.captions.append("".join(self.caption))
            self.caption = None

    def handle_data(self, data: str) -> None:
        for part in (self.cell, self.caption):
            if part is not None:
                part.append(data)


@pytest.fixture(scope="module")
def evil_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setitem(heads_module.HEADS, EVIL_HEAD, _EvilRidge)
    try:
        st = Store(tmp_path_factory.mktemp("evil") / "store")
        for i, (name, study, cancer) in enumerate([(EVIL_DATASET, "S1", "melanoma"), ("plain", "S2", "oral cancer")]):
            st.ingest(_adata(i), name=name, label_key="response", label_set=EVIL_LABEL_SET if i == 0 else None,
                      sample_key="sample", study=study, tissue="skin", cancer_type=cancer, drug_type="targeted",
                      regimen="BRAF inhibitor")
            _write_embedding(st, name, "pca", 6, shift=1.0, seed=10 + i,
                             telemetry={"cells": 48, "wall_s": 0.02, "device": "cpu", "precision": "fp64"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SampleLeakageWarning)
            evaluate(st, heads=[EVIL_HEAD, "majority"], folds=2, by=["all", "cancer_type"], split_scheme="cell",
                     silent=True)
        return write_report(st, tmp_path_factory.mktemp("out") / "report", projection="pca", formats=["png"], dpi=40,
                            progress=False)
    finally:
        monkeypatch.undo()


def test_user_names_are_escaped_in_every_table(evil_report: Path) -> None:
    raw = evil_report.read_text()
    assert "<script" not in raw.lower()  # never markup: the page has no script at all
    assert "&lt;script&gt;" in raw and "&amp;" in raw
    page = _Page()
    page.feed(raw)
    assert page.scripts == 0
    # every table that lists datasets, label sets or heads shows the names as text, exactly
    expected = {
        EVIL_DATASET: ["datasets", "label-sets", "lb-all", "lb-pooled-cancer_type", "figure-series", "scalability",
                       "fit-time"],
        EVIL_LABEL_SET: ["label-sets", "split-schemes", "lb-all", "lb-pooled-cancer_type", "figure-series", "fit-time"],
        EVIL_HEAD: ["lb-all", "lb-pooled-cancer_type", "fit-time"],
    }
    for name, table_ids in expected.items():
        for table_id in table_ids:
            assert table_id in page.tables, f"no table {table_id}: {sorted(page.tables)}"
            assert any(name in cell for cell in page.tables[table_id]), f"{name!r} not shown in table {table_id}"
    assert "skipped" in page.tables and any(EVIL_DATASET in c for c in page.tables["skipped"])
    # in data-* attributes (read by scripts and tests) and in figure captions, the names come back whole
    for name in (EVIL_DATASET, EVIL_LABEL_SET, EVIL_HEAD):
        assert any(name in value for value in page.attributes), name
    assert any(EVIL_HEAD in caption for caption in page.captions)  # the radar/bar caption names the head
    assert any(EVIL_DATASET in caption for caption in page.captions)  # the projection caption names the datasets
    # and the CSV next to the page has the names as they are (no HTML escaping there)
    assert EVIL_DATASET in set(pd.read_csv(evil_report.parent / "tables" / "datasets.csv")["name"])


def test_projection_worker_gives_the_coordinates_of_this_process(tmp_path: Path) -> None:
    """The worker process of the projections returns what the report computes in-process."""
    from scdm.classify import _plots, report

    X = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    item = report._ProjectionInput(group=None, label="x", total=60, X=X, cells=None)  # type: ignore[arg-type]
    projections = report._Projections("pca", [item], {}, seed=3, no_umap=False)
    projections.start([(0, item)])
    assert projections.worker is not None and projections.folder is not None
    folder = projections.folder
    try:
        assert projections.worker.wait(timeout=120) == 0, (folder / "stderr.txt").read_text()
        assert (folder / "0.json").exists() and (folder / "0.coords.npy").exists()  # computed there, not here
        coords, axis_name, how = projections.coordinates(0)
    finally:
        projections.close()
    assert not folder.exists()  # the worker's files are removed
    local = _plots.project(X, method="pca", seed=3)
    np.testing.assert_array_equal(coords, local[0])
    assert (axis_name, how) == local[1:]
