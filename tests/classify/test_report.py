"""The HTML report: files and figures exist, numbers on the page are the catalog's, edge cases."""

from __future__ import annotations

import html
import io
import re
import struct
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from scdm.classify._plots import Palette
from scdm.classify.grid import evaluate
from scdm.classify.report import write_report
from scdm.classify.splits import SampleLeakageWarning
from scdm.store import Store, example_data
from scdm.store.errors import InputDataError

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"

# name, study, tissue, cancer type, drug type, regimen: three studies, three cancer types (a radar),
# two tissues (a bar chart: a radar needs three axes), one drug type.
DATASETS = [
    ("d1", "S1", "skin", "melanoma", "targeted", "BRAF inhibitor"),
    ("d2", "S2", "head and neck", "head and neck squamous cell carcinoma", "targeted", "EGFR inhibitor"),
    ("d3", "S3", "head and neck", "oral cancer", "targeted", "EGFR inhibitor"),
]
N_CELLS = 48


def _adata(seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.poisson(2.0, size=(N_CELLS, 20)).astype(np.float32)
    obs = pd.DataFrame({"response": np.where(np.arange(N_CELLS) % 2 == 0, "sensitive", "resistant"),
                        "sample": [f"s{seed}_{i % 4}" for i in range(N_CELLS)]},
                       index=[f"cell{seed}_{i}" for i in range(N_CELLS)])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"GENE{j}" for j in range(20)]))


def _write_embedding(st: Store, name: str, model: str, dim: int, *, shift: float, seed: int,
                     variant: str = "frozen", telemetry: dict | None = None) -> str:
    """An embedding whose first dims carry the response (so metrics are not trivial)."""
    cells = st.cells([name])
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(len(cells), dim)).astype(np.float32)
    X[:, :2] += shift * cells["response"].to_numpy(float)[:, None]
    emb = st.create_embedding(name, model=model, params={"test": True}, dim=dim, variant=variant,
                              adapter_hash=None if variant == "frozen" else variant.split(":")[1])
    for chunk in range(emb.n_chunks):
        lo, hi = emb.chunk_bounds(chunk)
        emb.write_chunk(chunk, X[lo:hi])
    emb.finalize(telemetry=telemetry)
    return emb.embedding_id


def _ingested(path: Path) -> Store:
    st = Store(path)
    for i, (name, study, tissue, cancer, drug, regimen) in enumerate(DATASETS):
        st.ingest(_adata(i), name=name, label_key="response", sample_key="sample", study=study, tissue=tissue,
                  cancer_type=cancer, drug_type=drug, regimen=regimen)
    return st


def _evaluate(st: Store, **kwargs) -> None:
    # cell-level folds (not the "auto" default): the page must show the warning that goes with them
    options = {"heads": ["logreg", "majority"], "folds": 3, "by": ["all", "tissue", "cancer_type"], "silent": True,
               "split_scheme": "cell"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        evaluate(st, **{**options, **kwargs})


GPU_TELEMETRY = {"cells": 48, "wall_s": 0.5, "cells_per_s": 96.0, "device": "cuda", "gpu": "NVIDIA H100",
                 "precision": "bf16", "n_parameters": 1_234_567, "peak_gpu_mem_bytes": 3 * 2**30}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Three datasets, two models (one with a LoRA variant), evaluated by the real grid."""
    st = _ingested(tmp_path_factory.mktemp("report") / "store")
    for i, (name, *_) in enumerate(DATASETS):
        _write_embedding(st, name, "pca", 6, shift=1.0, seed=10 + i,
                         telemetry={"cells": N_CELLS, "wall_s": 0.02, "device": "cpu", "precision": "fp64"})
        _write_embedding(st, name, "geneformer", 12, shift=2.0, seed=20 + i, telemetry=GPU_TELEMETRY)
        _write_embedding(st, name, "geneformer", 12, shift=3.0, seed=30 + i, variant="lora:abcdef0123456789",
                         telemetry=GPU_TELEMETRY)
    _evaluate(st)
    return st


@pytest.fixture(scope="module")
def report(evaluated: Store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(evaluated, tmp_path_factory.mktemp("out") / "report", projection="pca")


# --------------------------------------------------------------------------------------------
# parsing helpers
# --------------------------------------------------------------------------------------------
class _Tables(HTMLParser):
    """Rows of every <table id=...>: (row attributes, [(cell attributes, cell text)])."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[tuple[dict[str, str], list[tuple[dict[str, str], str]]]]] = {}
        self.table: str | None = None
        self.cell: dict[str, str] | None = None
        self.text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "table":
            self.table = a.get("id", "")
            self.tables[self.table] = []
        elif tag == "tr" and self.table is not None:
            self.tables[self.table].append((a, []))
        elif tag in ("td", "th") and self.table is not None:
            self.cell, self.text = a, ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None and self.table is not None:
            self.tables[self.table][-1][1].append((self.cell, self.text.strip()))
            self.cell = None
        elif tag == "table":
            self.table = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.text += data


def _tables(page: Path) -> dict:
    parser = _Tables()
    parser.feed(page.read_text())
    return parser.tables


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _parse_mean_sd(text: str) -> tuple[float | None, float | None]:
    text = re.sub(r"\(n=\d+\)", "", text.replace("*", "")).strip()
    if text == "n/a":
        return None, None
    match = re.fullmatch(r"([0-9.]+)(?: ± ([0-9.]+))?", text)
    assert match, f"unexpected cell text {text!r}"
    return float(match[1]), (float(match[2]) if match[2] else None)


def _catalog_stats(st: Store) -> dict[tuple[str, ...], tuple[float | None, float | None]]:
    """Mean and sd over folds straight from eval_results, keyed like the page's row attributes + metric."""
    frame = st.query(
        "SELECT model, variant, space_id, head, scenario, category_type, category, split_id, metric, "
        "avg(value) AS mean, stddev_samp(value) AS sd FROM eval_results GROUP BY ALL")
    out = {}
    for r in frame.itertuples():
        key = (r.model, r.variant, r.space_id, r.head, r.scenario, r.category_type, r.category, r.split_id, r.metric)
        out[key] = (None if pd.isna(r.mean) else float(r.mean), None if pd.isna(r.sd) else float(r.sd))
    return out


def _row_key(attrs: dict[str, str], metric: str) -> tuple[str, ...]:
    return tuple(attrs[f"data-{k}"] for k in ("model", "variant", "space", "head", "scenario", "category-type",
                                               "category", "split")) + (metric,)


def _header(tables: dict, table_id: str) -> list[str]:
    return [text for _, text in tables[table_id][0][1]]


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def test_files_and_figures_exist_and_are_sensible(report: Path) -> None:
    figures = report.parent / "figures"
    expected = ["overview_bars", "radar_pooled_frozen_logreg", "radar_pooled_lora_logreg", "radar_cross_frozen_logreg",
                "radar_cross_lora_logreg", "f1_by_cancer_type_pooled", "scalability"]
    for stem in expected:
        width, height = _png_size(figures / f"{stem}.png")
        assert 400 <= width <= 4000 and 300 <= height <= 4000, (stem, width, height)
        assert (figures / f"{stem}.png").stat().st_size > 10_000
        svg = figures / f"{stem}.svg"
        assert svg.stat().st_size > 5_000
        assert ET.parse(svg).getroot().tag.endswith("svg")
    # the majority-class head ignores the embedding: in the tables and bars, not in per-model radars
    assert not list(figures.glob("radar_*majority*"))
    projections = sorted(figures.glob("projection_*.png"))
    assert len(projections) == 3  # pca, geneformer frozen, geneformer LoRA: one per embedding space
    page = report.read_text()
    for png in figures.glob("*.png"):
        assert f"figures/{png.name}" in page, f"{png.name} is not shown on the page"
    assert (report.parent / "tables" / "leaderboard_all.csv").exists()
    sql = (report.parent / "tables" / "leaderboard_all.sql").read_text()
    assert sql.startswith("WITH r AS (") and "FROM results x" in sql  # the results view, whole identity


def test_leaderboard_numbers_equal_the_catalog(report: Path, evaluated: Store) -> None:
    tables = _tables(report)
    catalog = _catalog_stats(evaluated)
    checked = 0
    for table_id in ("lb-all", "lb-pooled-cancer_type", "lb-cross-all" if "lb-cross-all" in tables else "lb-pooled-tissue"):
        rows = [r for r in tables[table_id] if "data-model" in r[0]]
        assert rows, table_id
        for attrs, cells in rows:
            for cell_attrs, text in cells:
                metric = cell_attrs.get("data-metric")
                if metric is None:
                    continue
                shown_mean, shown_sd = _parse_mean_sd(text)
                mean, sd = catalog[_row_key(attrs, metric)]
                if mean is None:
                    assert shown_mean is None
                    continue
                assert shown_mean == pytest.approx(round(mean, 3), abs=1e-9), (table_id, attrs, metric)
                if sd is not None:
                    assert shown_sd == pytest.approx(round(sd, 3), abs=1e-9)
                checked += 1
    # 3 spaces x 2 heads x 2 scenarios on "all" alone, 4 metrics each
    assert checked >= 3 * 2 * 2 * 4


def test_sql_under_a_table_reproduces_it(report: Path, evaluated: Store) -> None:
    page = report.read_text()
    start = page.index("id=\"lb-all\"")
    sql = html.unescape(re.search(r"<pre><code>(.*?);</code></pre>", page[start:], re.S)[1])
    frame = evaluated.sql(sql)
    rows = [r for r in _tables(report)["lb-all"] if "data-model" in r[0]]
    assert len(frame) == len(rows)
    for attrs, cells in rows:
        match = frame[(frame["model"] == attrs["data-model"]) & (frame["variant"] == attrs["data-variant"])
                      & (frame["head"] == attrs["data-head"]) & (frame["scenario"] == attrs["data-scenario"])]
        assert len(match) == 1
        f1 = next(text for a, text in cells if a.get("data-metric") == "f1")
        assert _parse_mean_sd(f1)[0] == pytest.approx(round(float(match["f1_mean"].iloc[0]), 3))


def test_every_table_is_what_scdm_sql_gives_for_its_sql(report: Path, evaluated: Store) -> None:
    # the page promises: paste the SQL under a table into `scdm sql` and get that table
    from click.testing import CliRunner

    from scdm.cli import main

    tables = sorted((report.parent / "tables").glob("*.sql"))
    assert len(tables) >= 10
    for path in tables:
        query = path.read_text().removesuffix(";\n")
        result = CliRunner().invoke(main, ["--store", str(evaluated.root), "-q", "sql", query, "--format", "csv"])
        assert result.exit_code == 0, (path.name, result.output)
        shown = pd.read_csv(path.with_suffix(".csv"))
        pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(result.stdout)), shown, check_dtype=False, obj=path.name)


def test_page_reports_protocol_skips_fallbacks_and_costs(report: Path, evaluated: Store) -> None:
    page = report.read_text()
    tables = _tables(report)
    # split scheme used, and the warning that goes with cell-level folds
    schemes = {cells[1][1] for _, cells in tables["split-schemes"][1:]}
    assert schemes == {"cell", "study"}
    assert "cell-level folds" in page
    # cross-data on one-study categories is skipped, with the reason
    reason = _header(tables, "skipped").index("Reason")
    reasons = " ".join(cells[reason][1] for _, cells in tables["skipped"][1:])
    assert "one study" in reasons
    # tissue has 2 categories: drawn as bars, and the caption says so
    assert "A radar needs at least 3 axes" in page and "bar charts instead (error bars: sd over folds): tissue (2 categories)" in page
    # scalability from the embeddings' telemetry and the tasks' fit times
    rows = {cells[0][1]: [t for _, t in cells] for _, cells in tables["scalability"][1:]}
    assert rows["geneformer"][2] == "1.2M" and "NVIDIA H100" in rows["geneformer"][6]
    assert rows["geneformer"][5] == "96.0" and rows["geneformer"][8] == "3.00"
    assert rows["pca"][2] == "—" and rows["pca"][5] == "2,400.0"
    assert any(label.startswith("geneformer (lora:abcdef01") for label in rows)
    # head fit time: one row per series, scenario, split, head and the datasets its tasks trained on, seconds each
    fit = [[t for _, t in cells] for _, cells in tables["fit-time"][1:]]
    collections = evaluated.query("SELECT DISTINCT space_id, scenario, head, datasets FROM eval_tasks")
    assert len(fit) == len(collections) == 3 * 2 * 7  # 3 spaces x 2 heads x (5 pooled + 2 cross collections)
    assert all(re.fullmatch(r"[0-9.e-]+", row[-1]) for row in fit)
    assert {row[4] for row in fit} == {"cell k=3 seed 0", "study"}
    pooled_d1 = {row[6] for row in fit if row[1] == "d1" and row[3] == "pooled"}
    assert pooled_d1 == {"cancer_type melanoma; tissue skin"}  # the categories of d1's cells, together
    assert "PCA, first two components" in page


def test_one_model_and_selection(evaluated: Store, tmp_path: Path) -> None:
    write_report(evaluated, tmp_path / "one", projection="pca", formats=["png", "svg"], progress=False)
    (tmp_path / "one" / "figures" / "radar_pooled_frozen_mlp.png").write_bytes(b"the user's own figure")
    (tmp_path / "one" / "figures" / "notes.txt").write_text("the user's own file")
    out = write_report(evaluated, tmp_path / "one", models=["pca"], heads=["logreg"], projection="none",
                       formats=["png"])
    tables = _tables(out)
    models = {r[0]["data-model"] for r in tables["lb-all"] if "data-model" in r[0]}
    heads = {r[0]["data-head"] for r in tables["lb-all"] if "data-model" in r[0]}
    assert models == {"pca"} and heads == {"logreg"}
    figures = sorted(p.name for p in (tmp_path / "one" / "figures").iterdir())
    assert "radar_pooled_frozen_logreg.png" in figures and not any(f.endswith(".svg") for f in figures)
    assert not any(f.startswith("projection_") for f in figures)
    # the earlier report's figures are gone, files it did not write stay
    assert "radar_pooled_frozen_mlp.png" in figures and "notes.txt" in figures


def test_empty_store_gives_a_page_saying_what_to_run(tmp_path: Path) -> None:
    out = write_report(Store(tmp_path / "empty"), tmp_path / "r")
    page = out.read_text()
    assert "What to run next" in page and "no dataset" in page
    assert "ingest" in page and "embed" in page and "evaluate" in page
    assert not list((tmp_path / "r" / "figures").iterdir())


def test_store_without_results_shows_embeddings_and_next_step(tmp_path: Path) -> None:
    st = _ingested(tmp_path / "store")
    out = write_report(st, tmp_path / "r0", projection="none")
    assert "no complete embedding" in out.read_text()
    for name, *_ in DATASETS:
        _write_embedding(st, name, "pca", 6, shift=1.0, seed=1)
    out = write_report(st, tmp_path / "r1", projection="pca", formats=["png"])
    page = out.read_text()
    assert "no evaluation result yet" in page and "scdm --store" in page and "evaluate" in page
    assert len(list((tmp_path / "r1" / "figures").glob("projection_*.png"))) == 1


def test_progress_bar_is_hidden_by_no_progress_and_scdm_progress_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from scdm.store.progress import no_progress

    st = _ingested(tmp_path / "store")
    _write_embedding(st, "d1", "pca", 6, shift=1.0, seed=1)  # sections: embeddings, scalability
    monkeypatch.setenv("SCDM_PROGRESS", "1")
    write_report(st, tmp_path / "r0", projection="none")
    assert "report:" in capsys.readouterr().err  # forced on, the bar shows
    with no_progress():  # `scdm -q`
        write_report(st, tmp_path / "r1", projection="none")
    assert "report:" not in capsys.readouterr().err
    monkeypatch.setenv("SCDM_PROGRESS", "0")
    write_report(st, tmp_path / "r2", projection="none")
    assert "report:" not in capsys.readouterr().err
    monkeypatch.setenv("SCDM_PROGRESS", "1")
    write_report(st, tmp_path / "r3", projection="none", progress=False)
    assert "report:" not in capsys.readouterr().err


def test_bad_options_are_refused(evaluated: Store, tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="projection='tsne'"):
        write_report(evaluated, tmp_path / "x", projection="tsne")  # type: ignore[arg-type]
    with pytest.raises(InputDataError, match="unknown or empty"):
        write_report(evaluated, tmp_path / "x", metrics=["f2"])
    with pytest.raises(InputDataError, match="max_cells"):
        write_report(evaluated, tmp_path / "x", max_cells=3)
    with pytest.raises(InputDataError, match="formats"):
        write_report(evaluated, tmp_path / "x", formats=["gif"])


def test_report_module_does_not_import_model_code() -> None:
    code = ("import sys, scdm.classify.report, scdm.classify._plots; "
            "bad = [m for m in ('torch', 'transformers', 'peft', 'scdm.embedding', 'matplotlib.pyplot') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.slow
def test_umap_projection(evaluated: Store, tmp_path: Path) -> None:
    pytest.importorskip("umap")
    out = write_report(evaluated, tmp_path / "u", models=["pca"], projection="umap", max_cells=100, formats=["png"])
    page = out.read_text()
    assert "UMAP (umap-learn" in page and "100 of 144 cells" in page
    assert len(list((tmp_path / "u" / "figures").glob("projection_pca_*.png"))) == 1


# --------------------------------------------------------------------------------------------
# result identity: one model name on two dataset collections, one space evaluated with two k
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_pca_spaces(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """A375 and JHU006 each embedded with its own pca (two spaces, one model name); both evaluated
    with 3 folds, the A375 space also with 2 folds (same cells, another split)."""
    from scdm.embedding.runner import embed_baseline

    st = Store(tmp_path_factory.mktemp("identity") / "store")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)  # cell-level folds on per-condition labels
        st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", study="GSE108383", tissue="skin",
                  cancer_type="melanoma", drug_type="targeted", regimen="PLX4720")
        st.ingest(DATA / "JHU006_HNSCC_Kinker2020.h5ad", name="jhu006", label_key="response_Gefitinib",
                  drug="Gefitinib", study="JHU006", tissue="head and neck", cancer_type="HNSCC", drug_type="targeted",
                  regimen="EGFR inhibitor")
        (a375,) = embed_baseline(st, ["a375"], model="pca", n_comps=4, n_hvg=100, progress=False)
        embed_baseline(st, ["jhu006"], model="pca", n_comps=4, n_hvg=100, progress=False)
        options = {"scenarios": ["pooled"], "by": ["all", "tissue"], "heads": ["ridge"], "silent": True}
        evaluate(st, folds=3, **options)
        evaluate(st, [a375.embedding_id], folds=2, **options)
    return st


@pytest.fixture(scope="module")
def identity_report(two_pca_spaces: Store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(two_pca_spaces, tmp_path_factory.mktemp("identity_out") / "report", projection="none",
                        formats=["png", "svg"])


def test_leaderboards_never_mix_datasets_or_splits(identity_report: Path, two_pca_spaces: Store) -> None:
    tables = _tables(identity_report)
    # the catalog's numbers per split: a row of the page is one split, never an average of two
    per_split = two_pca_spaces.query(
        "SELECT split_id, any_value(n_folds) AS k, count(DISTINCT fold) AS folds, avg(value) AS f1 "
        "FROM eval_results WHERE metric = 'f1' GROUP BY split_id")
    per_split = per_split.set_index("split_id")
    for table_id in ("lb-all", "lb-pooled-tissue"):
        assert {"Datasets", "Label set", "Split", "Folds"} <= set(_header(tables, table_id)), table_id
        rows = [r for r in tables[table_id] if "data-model" in r[0]]
        # a375 with k=2 and k=3, jhu006 with k=3: three results, three rows
        assert sorted((a["data-datasets"], a["data-k"]) for a, _ in rows) == [("a375", "2"), ("a375", "3"), ("jhu006", "3")]
        for attrs, cells in rows:
            split = per_split.loc[attrs["data-split"]]
            assert attrs["data-folds-done"] == attrs["data-k"] == str(int(split["k"])) == str(int(split["folds"]))
            assert attrs["data-complete"] == "true"
            f1 = next(text for a, text in cells if a.get("data-metric") == "f1")
            assert _parse_mean_sd(f1)[0] == pytest.approx(round(float(split["f1"]), 3), abs=1e-9)
            assert attrs["data-label-set"] == ("Gefitinib" if attrs["data-datasets"] == "jhu006" else "response_PLX4720")
        # "best" compares results on the same split only: each row here is alone on its split
        assert not any("best" in a.get("class", "") for _, cells in rows for a, _ in cells)


def test_one_model_on_two_dataset_collections_gets_two_colours(identity_report: Path) -> None:
    series = [a for a, _ in _tables(identity_report)["figure-series"][1:]]
    by_label = {a["data-label"]: a for a in series}
    assert len(by_label) == len(series) == 3  # pca on a375 with k=2 and k=3, pca on jhu006
    a375 = [a for a in series if a["data-datasets"] == "a375"]
    jhu006 = [a for a in series if a["data-datasets"] == "jhu006"]
    assert len(a375) == 2 and len(jhu006) == 1
    # two colours for the two collections; the two splits of one space share it and differ by hatch
    assert {a["data-color"] for a in a375} != {jhu006[0]["data-color"]}
    assert len({a["data-color"] for a in a375}) == 1 and len({a["data-hatch"] for a in a375}) == 2
    # legend labels name the datasets (and the split where one space has several)
    assert all("a375" in a["data-label"] for a in a375) and "jhu006" in jhu006[0]["data-label"]
    assert {a["data-protocol"] for a in a375} == {"cell k=2 seed 0", "cell k=3 seed 0"}
    # the figure is drawn with those colours: both collections' colours are in the overview bars
    svg = (identity_report.parent / "figures" / "overview_bars.svg").read_text().lower()
    for colour in {a["data-color"] for a in series}:
        assert f"fill: {colour}" in svg, colour
    assert (identity_report.parent / "tables" / "figure_series.csv").exists()


def test_a_space_evaluated_on_two_collections_is_drawn_once_and_said(tmp_path: Path) -> None:
    """One space (same model and parameters) evaluated before and after a second dataset joined it:
    two results on category "all", two table rows, one bar (the larger collection), and the caption
    names the one left out."""
    st = _ingested(tmp_path / "store")
    _write_embedding(st, "d1", "scgpt", 6, shift=1.0, seed=1)
    _evaluate(st, heads=["ridge"], by=["all"], scenarios=["pooled"])
    _write_embedding(st, "d2", "scgpt", 6, shift=1.0, seed=2)
    _evaluate(st, heads=["ridge"], by=["all"], scenarios=["pooled"])
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"])
    rows = [a for a, _ in _tables(out)["lb-all"][1:]]
    assert sorted(a["data-datasets"] for a in rows) == ["d1", "d1,d2"]
    assert len({a["data-space"] for a in rows}) == 1
    page = out.read_text()
    assert "Several dataset collections for one series" in page
    assert "scgpt on all: drawn on datasets d1,d2; not drawn: d1" in page


def test_the_series_table_names_the_datasets_a_series_results_cover_not_all_its_space_embeds(tmp_path: Path) -> None:
    """One space embeds d1 and d2 but was evaluated on d1 only: the series table (and figure_series.csv)
    said "d1, d2" for the series, while its results cover d1 (scdm results: 48 cells, not 96)."""
    st = _ingested(tmp_path / "store")
    only_d1 = _write_embedding(st, "d1", "scgpt", 6, shift=1.0, seed=1)
    _write_embedding(st, "d2", "scgpt", 6, shift=1.0, seed=2)
    _evaluate(st, embeddings=[only_d1], heads=["ridge"], by=["all"], scenarios=["pooled"])
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"])
    (row,) = [a for a, _ in _tables(out)["figure-series"][1:]]
    assert (row["data-datasets"], row["data-space-datasets"]) == ("d1", "d1, d2")
    table = pd.read_csv(out.parent / "tables" / "figure_series.csv")
    assert table[["datasets", "space_datasets"]].values.tolist() == [["d1", "d1, d2"]]


def test_palette_gives_each_model_and_datasets_group_its_colour() -> None:
    palette = Palette([("pca", "a375"), ("pca", "jhu006"), ("scgpt", "a375")])
    a = palette.add(("pca", "frozen", "s1"), "pca [a375]", group=("pca", "a375"))
    b = palette.add(("pca", "frozen", "s2"), "pca [jhu006]", group=("pca", "jhu006"))
    lora = palette.add(("pca", "lora:x", "lora:x"), "pca (lora:x) [a375]", group=("pca", "a375"), tuned=True)
    alone = palette.add(("scgpt", "lora:y", "lora:y"), "scgpt (lora:y)", group=("scgpt", "a375"), tuned=True)
    assert len({a.color, b.color, alone.color}) == 3
    assert lora.color == a.color and lora.hatch != a.hatch and lora.linestyle != a.linestyle
    assert alone.hatch and alone.linestyle != "-"  # a LoRA series is hatched even without a frozen sibling


def _insert_results(st: Store, values: dict[str, list[float | None]], *, folds_expected: int = 3,
                    space_id: str = "space1", model: str = "scgpt", flags: str | None = None,
                    category: tuple[str, str] = ("all", "all"), scenario: str = "pooled") -> None:
    """The folds of one (model, head, category) written straight into the evaluation tables (one per
    value), as a run interrupted after three of ``folds_expected`` folds would leave them. Another
    ``space_id`` adds a second model's results on the same split; another ``category`` (type, name)
    a result on a split of its own (``folds_expected`` folds, fixed by its first call)."""
    now = pd.Timestamp("2026-01-01")
    split_id = "split1" if category == ("all", "all") else f"split-{category[0]}-{category[1]}"
    split_id += "-cross" if scenario == "cross" else ""
    common = {"run_id": "run1", "space_id": space_id, "model": model, "variant": "frozen", "split_id": split_id,
              "scenario": scenario, "category_type": category[0], "category": category[1], "scheme": "sample",
              "head": "mlp", "datasets": "d1", "label_set": "Vorinostat", "n_folds": folds_expected, "seed": 0,
              "head_params": "{}"}
    tasks, results = [], []
    for fold in range(len(next(iter(values.values())))):
        task = {**common, "task_id": f"{space_id}-{split_id}-t{fold}", "fold": fold, "n_train": 80, "n_test": 40,
                "fit_seconds": 1.5}
        tasks.append({**task, "embedding_ids": "[]", "n_test_pos": 20, "predict_seconds": 0.1,
                      "flags": flags, "created_at": now})
        results += [{**task, "metric": m, "value": v[fold]} for m, v in values.items()]
    if st.query("SELECT 1 FROM eval_runs WHERE run_id = 'run1'").empty:
        st.insert_df("eval_runs", pd.DataFrame([{"run_id": "run1", "created_at": now, "status": "complete",
                                                  "config": '{"split_scheme": "sample", "head_revisions": {"mlp": 3}}'}]))
    st.insert_df("eval_tasks", pd.DataFrame(tasks))
    st.insert_df("eval_results", pd.DataFrame(results))
    if not st.query("SELECT 1 FROM split_folds WHERE split_id = ?", [split_id]).empty:
        return
    st.insert_df("split_folds", pd.DataFrame([{"split_id": split_id, "fold": f, "n_train": 80, "n_test": 40,
                                                "n_test_pos": 20, "status": "ok"} for f in range(folds_expected)]))


def test_undefined_fold_values_are_averaged_out_and_marked(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    _insert_results(st, {"f1": [0.5, 0.7, 0.9], "auroc": [0.8, None, 0.6], "ap": [None, None, None],
                         "accuracy": [0.5, 0.5, 0.5]})
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"])
    rows = [r for r in _tables(out)["lb-all"] if "data-model" in r[0]]
    assert len(rows) == 1
    shown = {a["data-metric"]: text for a, text in rows[0][1] if "data-metric" in a}
    assert shown == {"f1": "0.700 ± 0.200", "auroc": "0.700 ± 0.141* (n=2)", "ap": "n/a", "accuracy": "0.500 ± 0.000"}
    n = {a["data-metric"]: a["data-n"] for a, _ in rows[0][1] if "data-metric" in a}
    assert n == {"f1": "3", "auroc": "2", "ap": "0", "accuracy": "3"}
    assert rows[0][0]["data-complete"] == "true" and rows[0][0]["data-label-set"] == "Vorinostat"
    page = out.read_text()
    assert "sample</b>: grouped k-fold" in page and "cell-level folds" not in page
    # one model, one category: a bar chart, no radar or per-category figure
    figures = {p.name for p in (tmp_path / "r" / "figures").iterdir()}
    assert "overview_bars.png" in figures and not any(f.startswith("radar_") for f in figures)
    # AP is undefined on every fold: no bar, and no 'n per bar: 0 to 3 folds' in the caption
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], plot_metrics=["f1", "ap"])
    caption = re.search("<figcaption>(.*?)</figcaption>", out.read_text(), re.S)[1]
    assert "n per bar: 3 folds (pooled)" in caption and " 0 " not in caption


def test_a_result_missing_folds_is_marked_incomplete(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    _insert_results(st, {"f1": [0.5, 0.7, 0.9], "auroc": [0.8, 0.7, 0.6]}, folds_expected=5)
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1", "auroc"])
    (attrs, cells), = [r for r in _tables(out)["lb-all"] if "data-model" in r[0]]
    assert attrs["data-complete"] == "false" and attrs["class"] == "incomplete"
    assert (attrs["data-folds-done"], attrs["data-folds-expected"], attrs["data-k"]) == ("3", "5", "5")
    folds = next(text for a, text in cells if "data-folds" in a)
    assert folds == "3/5 incomplete"
    assert "1 incomplete result" in out.read_text()


def test_equal_means_are_both_marked_best(tmp_path: Path) -> None:
    # the same three fold values in another row order: avg() sums them in row order, so the two
    # means differ in the last bit (0.2 and 0.20000000000000004) though they are one tie
    st = Store(tmp_path / "store")
    _insert_results(st, {"f1": [0.1, 0.2, 0.3]})
    _insert_results(st, {"f1": [0.3, 0.2, 0.1]}, space_id="space2", model="geneformer")
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1"])
    rows = [r for r in _tables(out)["lb-all"] if "data-model" in r[0]]
    cells = [next((a, text) for a, text in r[1] if a.get("data-metric") == "f1") for r in rows]
    assert [text for _, text in cells] == ["0.200 ± 0.100", "0.200 ± 0.100"]
    assert all("best" in a["class"].split() for a, _ in cells)


def test_an_incomplete_result_is_not_marked_best(tmp_path: Path) -> None:
    # a mean over the one fold an interrupted run finished is not a mean over the split's cells
    st = Store(tmp_path / "store")
    _insert_results(st, {"f1": [0.5, 0.6, 0.7]})
    _insert_results(st, {"f1": [0.4, 0.5, 0.6]}, space_id="space3", model="pca")
    _insert_results(st, {"f1": [0.95]}, space_id="space2", model="geneformer")
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1"])
    rows = [r for r in _tables(out)["lb-all"] if "data-model" in r[0]]
    best = {attrs["data-model"]: "best" in next(a for a, _ in cells if a.get("data-metric") == "f1")["class"].split()
            for attrs, cells in rows}
    complete = {attrs["data-model"]: attrs["data-complete"] for attrs, _ in rows}
    assert complete == {"scgpt": "true", "pca": "true", "geneformer": "false"}
    assert best == {"scgpt": True, "pca": False, "geneformer": False}


def test_a_result_scored_on_the_answered_cells_only_is_noted_and_not_marked_best(tmp_path: Path) -> None:
    # a prompting model that left 10 of each fold's 50 test cells unanswered is scored on the other 40:
    # not the cells its neighbours were scored on, so its higher mean is not "best"
    from scdm.classify.results import NOTES, leaderboard, leaderboard_notes

    st = Store(tmp_path / "store")
    _insert_results(st, {"f1": [0.5, 0.6, 0.7]})
    _insert_results(st, {"f1": [0.4, 0.5, 0.6]}, space_id="space3", model="pca")
    _insert_results(st, {"f1": [0.9, 0.9, 0.9]}, space_id="space2", model="llm", flags="no_scores,unanswered=10")
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1"])
    rows = [r for r in _tables(out)["lb-all"] if "data-model" in r[0]]
    best = {attrs["data-model"]: "best" in next(a for a, _ in cells if a.get("data-metric") == "f1")["class"].split()
            for attrs, cells in rows}
    assert best == {"scgpt": True, "pca": False, "llm": False}
    assert "30 of 150 test cells unanswered" in out.read_text()
    board = leaderboard(st, metrics=["f1"]).set_index("model")
    assert board.loc["llm", "note"] == "30 of 150 test cells unanswered" and board.loc["pca", "note"] == ""
    assert NOTES["unanswered"] in leaderboard_notes(board.reset_index(), ["f1"])


def test_the_unanswered_note_counts_each_test_cell_once_whatever_the_metrics(tmp_path: Path) -> None:
    # 10 of each of 3 folds' 50 test cells unanswered: 30 of 150, not once per metric column of the table
    st = Store(tmp_path / "store")
    _insert_results(st, {"f1": [0.9, 0.9, 0.9], "auroc": [0.8, 0.8, 0.8], "accuracy": [0.9, 0.9, 0.9]},
                    model="llm", flags="unanswered=10")
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1", "auroc", "accuracy"])
    (attrs, cells), = [r for r in _tables(out)["lb-all"] if "data-model" in r[0]]
    assert cells[4][1] == "llm (30 of 150 test cells unanswered)"
    table = pd.read_csv(tmp_path / "r" / "tables" / "leaderboard_all.csv")
    assert table["note"].tolist() == ["30 of 150 test cells unanswered"] and table["unanswered"].tolist() == [30]


def _figure_data(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """The frames each figure function of the report is given, by figure (bars, radar, folds)."""
    from scdm.classify import _plots

    given: dict[str, list] = {"bars": [], "radar": [], "folds": []}
    for name, kind in (("bars_figure", "bars"), ("radar_figure", "radar"), ("folds_figure", "folds")):
        def draw(frame: pd.DataFrame, *args, _kind=kind, _draw=getattr(_plots, name), **kwargs):
            given[_kind].append(frame.copy())
            return _draw(frame, *args, **kwargs)
        monkeypatch.setattr(_plots, name, draw)
    return given


def test_incomplete_and_unanswered_results_are_named_not_drawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the tables mark them (incomplete; cells unanswered) and never call them best: a bar, radar point
    # or box of them would stand beside the complete results as one of them
    st = Store(tmp_path / "store")
    for category in [("all", "all"), *[("cancer_type", c) for c in ("melanoma", "HNSCC", "oral SCC")]]:
        _insert_results(st, {"f1": [0.5, 0.6, 0.7], "auroc": [0.6, 0.7, 0.8]}, category=category)
        _insert_results(st, {"f1": [0.95], "auroc": [0.9]}, space_id="space2", model="geneformer", category=category)
        _insert_results(st, {"f1": [0.9, 0.9, 0.9], "auroc": [0.9, 0.9, 0.9]}, space_id="space3", model="llm",
                        flags="unanswered=10", category=category)
    given = _figure_data(monkeypatch)
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1", "auroc"])
    for kind in ("bars", "radar", "folds"):
        assert len(given[kind]) == 1, kind
        assert set(given[kind][0]["series"]) == {"scgpt"}, kind
    assert given["bars"][0].set_index("metric").loc["f1", "mean"] == pytest.approx(0.6)
    assert sorted(given["folds"][0]["value"]) == pytest.approx([0.5, 0.5, 0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7])
    captions = [html.unescape(re.sub("<[^>]+>", "", c)) for c in re.findall("<figcaption>(.*?)</figcaption>",
                                                                            out.read_text(), re.S)]
    assert len(captions) == 4 and "Computational cost" in captions[3]  # bars, radar, folds, fit times
    assert "geneformer, head mlp (pooled): 1 of 3 folds (incomplete)" in captions[0]
    assert "llm, head mlp (pooled): 30 of 150 test cells unanswered" in captions[0]
    for caption in captions[1:3]:
        assert "geneformer, head mlp (pooled, melanoma): 1 of 3 folds (incomplete)" in caption
        assert "llm, head mlp (pooled, oral SCC): 30 of 150 test cells unanswered" in caption
    # the tables still show them, marked
    rows = {a["data-model"]: a for a, _ in _tables(out)["lb-all"] if "data-model" in a}
    assert set(rows) == {"scgpt", "geneformer", "llm"} and rows["geneformer"]["data-complete"] == "false"


def test_a_figure_with_only_incomplete_results_says_why_it_is_missing(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    _insert_results(st, {"f1": [0.5], "auroc": [0.6]})
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1", "auroc"])
    page = html.unescape(re.sub("<[^>]+>", "", out.read_text()))
    assert not (tmp_path / "r" / "figures" / "overview_bars.png").exists()
    assert "No figure of overall performance" in page and "scgpt, head mlp (pooled): 1 of 3 folds (incomplete)" in page


def test_results_differing_only_by_their_split_are_named_in_the_split_column(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from scdm.embedding.runner import embed

    st = Store(tmp_path / "store")
    jhu006 = DATA / "JHU006_HNSCC_Kinker2020.h5ad"
    st.ingest(jhu006, name="jhu006", label_key="response_Gefitinib", drug="Gefitinib", study="JHU006")
    st.ingest(jhu006, label_key="response_Vorinostat", drug="Vorinostat")
    embed(st, "jhu006", "pca", n_comps=4, progress=False)
    common = {"scenarios": ["pooled"], "by": ["all"], "heads": ["ridge"], "folds": 3, "silent": True}
    evaluate(st, label_set="Vorinostat", **common)
    evaluate(st, label_set="Vorinostat", pair_folds_with="Gefitinib", **common)  # same protocol, another partition
    given = _figure_data(monkeypatch)
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1", "auroc"])
    # the figures draw both partitions, as two series (one colour, two hatches), never one picked as if
    # they were results on two dataset collections
    bars = given["bars"][0].set_index(["series", "metric"])
    splits = st.query("SELECT split_id, json_extract_string(definition, '$.folds_from') AS folds_from FROM splits")
    paired_split = splits.loc[splits["folds_from"] == "Gefitinib", "split_id"].iloc[0]
    assert sorted(bars.index.get_level_values("series").unique()) == [
        "pca [cell k=3 seed 0 · folds of Gefitinib]", "pca [cell k=3 seed 0]"]
    assert bars.loc[("pca [cell k=3 seed 0 · folds of Gefitinib]", "f1"), "split_id"] == paired_split
    f1 = st.query("SELECT split_id, avg(value) AS mean FROM eval_results WHERE metric = 'f1' GROUP BY split_id")
    for (_, metric), row in bars.iterrows():
        if metric == "f1":
            assert row["mean"] == pytest.approx(f1.set_index("split_id").loc[row["split_id"], "mean"])
    assert "Several dataset collections" not in out.read_text()
    tables = _tables(out)
    column = _header(tables, "lb-all").index("Split")
    rows = [(attrs, cells) for attrs, cells in tables["lb-all"] if "data-model" in attrs]
    texts = {attrs["data-split"]: cells[column][1] for attrs, cells in rows}
    assert len(rows) == 2 and len(set(texts.values())) == 2
    paired = st.query("SELECT split_id FROM splits WHERE json_extract_string(definition, '$.folds_from') = 'Gefitinib'")
    for split_id, text in texts.items():
        suffix = " (folds of Gefitinib)" if split_id == paired["split_id"].iloc[0] else ""
        assert text == f"cell k=3 seed 0 · {split_id[:8]}{suffix}"


def test_an_interrupted_report_leaves_no_page_of_the_earlier_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scdm.classify import report as report_module

    write_report(Store(tmp_path / "empty"), tmp_path / "r")

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "_build_page", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report(Store(tmp_path / "empty"), tmp_path / "r")
    # the earlier page would show its numbers beside the new (or deleted) figures and tables
    assert not (tmp_path / "r" / "index.html").exists()


def test_projection_names_the_label_set_of_its_response_colours(tmp_path: Path) -> None:
    """JHU006's Gefitinib and Vorinostat labels disagree on every cell: a projection coloured by the
    default (Gefitinib) beside results of Vorinostat alone must say whose labels it shows."""
    from scdm.embedding.runner import embed

    st = Store(tmp_path / "store")
    jhu006 = DATA / "JHU006_HNSCC_Kinker2020.h5ad"
    st.ingest(jhu006, name="jhu006", label_key="response_Gefitinib", drug="Gefitinib", study="JHU006")
    st.ingest(jhu006, label_key="response_Vorinostat", drug="Vorinostat")
    embed(st, "jhu006", "pca", n_comps=4, progress=False)
    evaluate(st, label_set="Vorinostat", scenarios=["pooled"], by=["all"], heads=["ridge"], folds=3, silent=True)
    out = write_report(st, tmp_path / "r", projection="pca", formats=["png"], metrics=["f1", "auroc"])
    captions = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<figcaption>(.*?)</figcaption>", out.read_text(), re.S)]
    caption, = [c for c in captions if "(space " in c]
    assert "Response colours: each dataset's default label set (Gefitinib)." in caption
    assert "also use label set Vorinostat" in caption


def test_bar_and_radar_captions_give_the_n_of_each_mean(report: Path, evaluated: Store) -> None:
    """A mean over 2 held-out studies must not read like one over 10: the captions give n per scenario."""
    captions = [html.unescape(re.sub(r"<[^>]+>", "", c))
                for c in re.findall(r"<figcaption>(.*?)</figcaption>", report.read_text(), re.S)]
    overview, = [c for c in captions if c.startswith("Mean over folds")]
    n = evaluated.query("SELECT scenario, count(DISTINCT fold) AS n FROM eval_results "
                        "WHERE category_type = 'all' AND metric = 'f1' GROUP BY scenario")
    n = dict(zip(n["scenario"], n["n"]))
    assert f"n per bar: {n['pooled']} folds (pooled); {n['cross']} held-out studies (cross)" in overview
    radar = next(c for c in captions if c.startswith("Cross scenario"))
    assert "n per point: 2 held-out studies (cross)" in radar  # tissue 'head and neck': studies S2 and S3


def test_confounded_studies_are_flagged_only_where_folds_can_split_a_sample(tmp_path: Path) -> None:
    """Labels constant within samples leak only through cell-level folds: no warning, and no advice to use
    --split-scheme sample, on a page whose pooled results already group by sample."""
    from scdm.embedding.runner import embed

    st = Store(tmp_path / "store")
    adata = _adata(0)
    adata.obs["response"] = np.where(np.arange(N_CELLS) % 4 < 2, "sensitive", "resistant")  # constant per sample
    adata.obs["sample"] = [f"s{i % 4}" for i in range(N_CELLS)]
    st.ingest(adata, name="d1", label_key="response", sample_key="sample", study="S1")
    embed(st, "d1", "pca", n_comps=4, progress=False)
    common = {"scenarios": ["pooled"], "by": ["all"], "heads": ["ridge"], "folds": 2, "silent": True}
    evaluate(st, split_scheme="sample", **common)
    page = write_report(st, tmp_path / "r", projection="none", formats=["png"]).read_text()
    assert "confounded-studies" not in page and "Confounded studies" not in page
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        evaluate(st, split_scheme="cell", **common)
    page = write_report(st, tmp_path / "r", projection="none", formats=["png"]).read_text()
    assert 'id="confounded-studies"' in page and "<b>S1</b>" in page


def test_the_split_table_lists_fold_counts_as_numbers() -> None:
    """Cross-data splits of 4, 5, 15 and 23 held-out studies read 4, 5, 15, 23 (text order gave 15, 23, 4, 5)."""
    import duckdb

    from scdm.classify.report import _Filters, _splits_sql

    con = duckdb.connect()
    con.execute("CREATE TABLE splits AS SELECT 'cross' AS scenario, 'study' AS scheme, n AS n_folds, 0 AS seed, "
                "'response' AS label_set, 'ok' AS status, 'tissue' AS category_type, 's' || n AS split_id "
                "FROM (VALUES (15), (23), (4), (5), (4)) t(n)")
    con.execute("CREATE TABLE eval_results AS SELECT split_id, label_set, 'sp' AS space_id, 'ridge' AS head, 0 AS fold, "
                "'{}' AS head_params FROM splits")
    con.execute("CREATE TABLE skipped_tasks AS SELECT 'r' AS run_id, * EXCLUDE (head_params) FROM eval_results WHERE false")
    (row,) = con.execute(_splits_sql(_Filters())).fetchall()
    assert row[2] == "4, 5, 15, 23"


def test_the_split_table_lists_every_label_set_evaluated_on_a_shared_split() -> None:
    """JHU006's AR-42 labels equal its Vorinostat labels, so both use the split Vorinostat made (which names
    Vorinostat): the table listed 'Vorinostat' alone although AR-42 results were made on it."""
    import duckdb

    from scdm.classify.report import _Filters, _splits_sql

    con = duckdb.connect()
    con.execute("CREATE TABLE splits AS SELECT 'pooled' AS scenario, 'cell' AS scheme, 5 AS n_folds, 0 AS seed, "
                "'Vorinostat' AS label_set, 'ok' AS status, 'all' AS category_type, 'b9e9' AS split_id")
    con.execute("CREATE TABLE eval_results AS SELECT 'b9e9' AS split_id, x AS label_set, 'sp' AS space_id, 'ridge' AS head, "
                "0 AS fold, '{}' AS head_params FROM (VALUES ('Vorinostat'), ('AR-42')) t(x)")
    con.execute("CREATE TABLE skipped_tasks AS SELECT 'r' AS run_id, * EXCLUDE (head_params) FROM eval_results WHERE false")
    (row,) = con.execute(_splits_sql(_Filters())).fetchall()
    assert row[4] == "AR-42; Vorinostat" and row[5] == 1


def test_a_run_whose_process_is_gone_reads_as_stopped_not_running(tmp_path: Path) -> None:
    """A killed evaluate cannot record failing: its row stays 'running', which the report must not repeat."""
    import subprocess
    import sys

    from scdm.classify.report import _Filters, _mark_stopped_runs, _runs_sql
    from scdm.store import evaluation as records

    st = Store(tmp_path / "store")
    records.start_run(st, {"heads": ["ridge"]}, scdm_version="test")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True).stdout)
    runs = st.sql(_runs_sql(_Filters()))
    _mark_stopped_runs(runs)
    assert runs["status"].tolist() == ["running"]  # this process: alive
    runs["pid"] = dead
    other_host = runs.assign(host="another-machine")
    _mark_stopped_runs(runs)
    _mark_stopped_runs(other_host)
    assert runs["status"].iloc[0].startswith("stopped (its process is gone")
    assert other_host["status"].tolist() == ["running"]  # cannot be known from here


def test_a_negative_mean_is_inside_the_axes_of_bars_and_radars() -> None:
    # MCC of the shuffled-label head (or an inverted classifier) is below 0: drawn from 0 up it vanished
    from scdm.classify import _plots

    palette = Palette([("pca", "d1")])
    series = palette.add(("pca", "frozen", "s1", "", ""), "pca", group=("pca", "d1"), tuned=False)
    bars = pd.DataFrame({"series": "pca", "scenario": "pooled", "head": ["shuffled-label", "logreg"], "metric": "mcc",
                         "mean": [-0.30, 0.40], "sd": [0.05, 0.05]})
    fig = _plots.bars_figure(bars, [series], scenarios=["pooled"], metrics=["mcc"], heads=["logreg", "shuffled-label"],
                             title="t")
    low, high = fig.axes[0].get_ylim()
    assert low <= -0.35 and high >= 1.0
    radar = pd.DataFrame({"series": "pca", "category_type": "cancer_type", "category": ["a", "b", "c"], "metric": "mcc",
                          "mean": [-0.3, 0.2, 0.5], "sd": 0.1})
    fig, _ = _plots.radar_figure(radar, [series], metrics=["mcc"], category_types=["cancer_type"], title="t")
    assert fig.axes[0].get_ylim() == (-1.0, 1.0)
    fig, _ = _plots.radar_figure(radar.assign(mean=[0.1, 0.2, 0.5]), [series], metrics=["mcc"],
                                 category_types=["cancer_type"], title="t")
    assert fig.axes[0].get_ylim() == (0.0, 1.0)  # metrics in [0, 1] keep their radius


def test_a_radar_figure_with_bar_panels_keys_both_hatches_and_line_styles() -> None:
    # two series of one colour: radar lines tell them apart by line style, the bars of a category type
    # with too few categories by hatch; a legend of lines alone left the hatches unexplained
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    from scdm.classify import _plots

    palette = Palette([("pca", "d1")])
    own = palette.add(("pca", "frozen", "s1", "Gefitinib", ""), "pca [Gefitinib]", group=("pca", "d1"))
    other = palette.add(("pca", "frozen", "s1", "Vorinostat", ""), "pca [Vorinostat]", group=("pca", "d1"))
    rows = [(s.label, "cancer_type", c, 0.5) for s in (own, other) for c in ("a", "b", "c")]
    rows += [(s.label, "tissue", "skin", 0.6) for s in (own, other)]
    board = pd.DataFrame(rows, columns=["series", "category_type", "category", "mean"]).assign(metric="f1", sd=0.1)
    fig, fallbacks = _plots.radar_figure(board, [own, other], metrics=["f1"], category_types=["cancer_type", "tissue"],
                                         title="t")
    assert fallbacks == ["tissue (1 category)"]

    def artists(a):
        yield a
        for child in a.get_children():
            yield from artists(child)

    legend = list(artists(fig.legends[0]))
    assert [r.get_hatch() or "" for r in legend if isinstance(r, Rectangle)] == [own.hatch, other.hatch]
    assert [ln.get_linestyle() for ln in legend if isinstance(ln, Line2D)] == [own.linestyle, other.linestyle]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["pca [Gefitinib]", "pca [Vorinostat]"]


def test_one_class_studies_pooled_with_others_are_named_on_the_page(tmp_path: Path) -> None:
    """A study whose cells are all resistant (PC9) pooled with a mixed one: the pooled results can be earned by
    recognising the study; the page names it under the protocol, whatever the scheme."""
    from scdm.store.splits import StudyLeakageWarning

    st = Store(tmp_path / "store")
    for i, (name, study) in enumerate([("pc9", "PC9"), ("a375", "A375")]):
        adata = _adata(i)
        if name == "pc9":
            adata.obs["response"] = "resistant"
        st.ingest(adata, name=name, label_key="response", sample_key="sample", study=study)
        _write_embedding(st, name, "geneformer", 6, shift=1.0, seed=i)  # one space: the two datasets are pooled
    with pytest.warns(StudyLeakageWarning, match="PC9: all 48 labelled cells resistant"):
        evaluate(st, scenarios=["pooled"], by=["all"], heads=["ridge"], folds=2, silent=True)
    page = write_report(st, tmp_path / "r", projection="none", formats=["png"]).read_text()
    assert 'id="one-class-studies"' in page
    assert "<b>PC9</b>: all labelled cells resistant in the pooled splits of all" in page and "<b>A375</b>" not in page


def test_one_class_datasets_of_a_mixed_study_are_named_in_the_warning_and_on_the_page(tmp_path: Path) -> None:
    """Study P ingested as a parental line (all sensitive) and its resistant derivative, pooled with a mixed
    study: P holds both classes, so nothing named it, though each class is one dataset (one batch)."""
    from scdm.store.splits import StudyLeakageWarning

    st = Store(tmp_path / "store")
    for i, (name, study, label) in enumerate([("parental", "P", "sensitive"), ("derived", "P", "resistant"),
                                              ("a375", "A375", None)]):
        adata = _adata(i)
        if label is not None:
            adata.obs["response"] = label
        st.ingest(adata, name=name, label_key="response", sample_key="sample", study=study)
        _write_embedding(st, name, "geneformer", 6, shift=1.0, seed=i)
    with pytest.warns(StudyLeakageWarning, match="2 datasets whose labelled cells are all one class .*derived of study P: "
                                                 "all 48 labelled cells resistant"):
        evaluate(st, scenarios=["pooled"], by=["all"], heads=["ridge"], folds=2, silent=True)
    page = write_report(st, tmp_path / "r", projection="none", formats=["png"]).read_text()
    assert "<b>derived of study P</b>: all labelled cells resistant in the pooled splits of all" in page
    assert "<b>parental of study P</b>: all labelled cells sensitive in the pooled splits of all" in page
    assert "<b>A375</b>" not in page and "<b>P</b>" not in page


def test_the_runs_table_shows_the_pooled_scheme_used_not_only_the_one_asked(tmp_path: Path) -> None:
    """--split-scheme auto (the default) read 'auto' in the runs table; the run's splits were grouped by sample."""
    st = Store(tmp_path / "store")
    for i, name in enumerate(["d1", "d2"]):
        st.ingest(_adata(i), name=name, label_key="response", sample_key="sample", study=f"S{i}")
        _write_embedding(st, name, "geneformer", 6, shift=1.0, seed=i)
    common = {"by": ["all"], "heads": ["ridge"], "folds": 2, "silent": True}
    evaluate(st, scenarios=["pooled"], **common)  # auto: 8 samples for 2 folds, so grouped by sample
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        evaluate(st, scenarios=["pooled"], split_scheme="cell", **common)
    evaluate(st, scenarios=["cross"], **common)  # no pooled split: no pooled scheme
    evaluate(st, scenarios=["pooled"], seed=1, **common)
    # a run recorded before runs kept the schemes used: read from the splits of the tasks it fitted
    last = st.query("SELECT run_id FROM eval_runs ORDER BY created_at DESC LIMIT 1")["run_id"].iloc[0]
    st.execute("UPDATE eval_runs SET config = json_object('split_scheme', 'auto') WHERE run_id = ?", [last])
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"])
    rows = _tables(out)["eval-runs"]
    column = _header(_tables(out), "eval-runs").index("Pooled scheme")
    assert [cells[column][1] for _, cells in rows[1:]] == ["auto → sample", "cell", "", "auto → sample"]


def test_figures_whose_names_differ_only_in_unsafe_characters_or_case_keep_their_own_files(tmp_path: Path) -> None:
    # radar figures of heads labelled "A/B" and "A-B" were both saved as radar_pooled_frozen_A-B.png (the
    # second overwrote the first); "Mlp" and "mlp" share one file on a case-insensitive file system
    from scdm.classify._plots import new_figure
    from scdm.classify.report import _Context

    ctx = _Context(st=None, out=tmp_path, fig_dir=tmp_path, filters=None, metrics=(), plot_metrics=(),  # type: ignore[arg-type]
                   formats=("png",), dpi=10, progress=False)
    heads = ["A/B", "A-B", "Mlp", "mlp", "mlp"]
    for i, head in enumerate(heads):
        fig = new_figure(1, 1)
        fig.subplots().set_title(str(i))
        ctx.save(fig, f"radar_pooled_frozen_{head}", caption=str(i))
    stems = [f.stem for f in ctx.figures]
    assert len({s.casefold() for s in stems}) == len(heads) == len(list(tmp_path.glob("*.png")))
    assert [f.files[0].name for f in ctx.figures] == [f"{s}.png" for s in stems]
    # names are the same in every report: a plain name unchanged, another one followed by a hash of its text
    assert stems[3] == "radar_pooled_frozen_mlp" and stems[4] == "radar_pooled_frozen_mlp-2"
    assert stems[:3] == ["radar_pooled_frozen_a-b-0730c465", "radar_pooled_frozen_a-b-fcf04d5b", "radar_pooled_frozen_mlp-70843ffc"]


def test_the_cross_data_fold_figure_counts_held_out_studies_not_folds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the y axis of the cross-data per-fold figure said "F1 per fold": each value is the score on one held-out study
    from scdm.classify import _plots

    drawn: list = []
    monkeypatch.setattr(_plots, "folds_figure", lambda *a, _draw=_plots.folds_figure, **k: drawn.append(_draw(*a, **k)) or drawn[-1])
    st = Store(tmp_path / "store")
    for scenario in ("pooled", "cross"):
        for cancer in ("melanoma", "HNSCC"):
            _insert_results(st, {"f1": [0.5, 0.7], "auroc": [0.6, 0.8]}, folds_expected=2, category=("cancer_type", cancer),
                            scenario=scenario)
    page = write_report(st, tmp_path / "r", projection="none", formats=["png"]).read_text()
    labels = {fig.axes[0].get_ylabel() for fig in drawn}
    assert labels == {"F1 per fold", "F1 per held-out study"}
    assert "F1 per fold and per held-out study across cancer types" in page and "Per-fold F1" not in page


def test_counts_in_the_tables_are_written_as_integers(report: Path) -> None:
    """A sum of BIGINT is a HUGEINT, which pandas reads as float: n_test read 66.0 and cells_embedded 108.0."""
    import csv

    columns = {"leaderboard_": ("n_test", "unanswered"), "scalability_embed": ("cells_embedded",)}
    checked = 0
    for path in sorted((report.parent / "tables").glob("*.csv")):
        wanted = next((c for prefix, c in columns.items() if path.stem.startswith(prefix)), ())
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                for column in wanted:
                    assert row[column] == "" or row[column].isdigit(), (path.name, column, row[column])
                    checked += 1
    assert checked > 0


def test_a_held_out_study_left_out_as_one_class_is_named_under_the_report_board(tmp_path: Path) -> None:
    """Cross-data on three studies of JHU006, one holding sensitive cells only: the report's row read
    'study, 3 held out ... 2/2' (complete) while its mean covers 2 of the 3 studies, and nothing on the page
    said a study was left out (a skipped fold is no task, so the skipped-tasks section has none either)."""
    from scdm.classify.results import NOTES
    from scdm.embedding.runner import embed
    from tests.jhu006 import JHU006

    adata = ad.read_h5ad(JHU006)
    third = adata.n_obs // 3
    adata.obs["study"] = ["A"] * third + ["B"] * third + ["C"] * (adata.n_obs - 2 * third)
    keep = (adata.obs["study"] != "C") | (adata.obs["response_Gefitinib"] == "sensitive")
    st = Store(tmp_path / "store")
    st.ingest(adata[keep.to_numpy()].copy(), name="jhu006_studies", label_key="response_Gefitinib", study_key="study")
    embed(st, "jhu006_studies", "pca", n_comps=5, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        evaluate(st, heads=["ridge"], by=["all"], folds=5, scenarios=["cross"], silent=True)
    page = write_report(st, tmp_path / "report", projection="none", progress=False).read_text()
    assert NOTES["skipped_folds"] in html.unescape(page)


def test_the_split_table_counts_only_splits_of_results_on_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Results of an older revision of a head are left out of every table and figure, but the split table
    counted their splits: pooled 'cell' folds '3, 4' and 2 splits beside leaderboards of k=3 alone."""
    from scdm.classify.heads import LogRegHead

    st = _ingested(tmp_path / "store")
    for i, (name, *_) in enumerate(DATASETS):
        _write_embedding(st, name, "pca", 6, shift=1.0, seed=10 + i)
    options = {"heads": ["logreg"], "by": ["all"], "scenarios": ["pooled"]}
    with monkeypatch.context() as m:  # an older scdm: revision 1, no head_revisions in its run config
        m.setattr(LogRegHead, "revision", lambda self: 1, raising=False)
        _evaluate(st, folds=4, **options)
    with st.catalog.transaction() as con:
        con.execute("UPDATE eval_runs SET config = json_object('heads', ['logreg'])")
    _evaluate(st, folds=3, **options)
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1"], progress=False)
    board = pd.read_csv(out.parent / "tables" / "leaderboard_all.csv")
    assert board["k"].tolist() == [3]
    splits = pd.read_csv(out.parent / "tables" / "split_schemes.csv", dtype={"folds": str})
    assert splits[["scenario", "scheme", "folds", "splits"]].values.tolist() == [["pooled", "cell", "3", 1]]


def test_skipped_tasks_of_two_splits_are_two_rows_naming_their_split(tmp_path: Path) -> None:
    """Sample-level folds with seeds 0 and 1 skip the same folds of a cancer type for the same reason: the
    table merged them (8 rows for 13 skipped folds here; 10 for 17 with two spaces, each 'Spaces 2') and named
    no split, so nobody could tell which protocol lost which fold."""
    st = _ingested(tmp_path / "store")
    for i, (name, *_) in enumerate(DATASETS):
        _write_embedding(st, name, "pca", 6, shift=1.0, seed=10 + i)
    for seed in (0, 1):
        _evaluate(st, heads=["logreg"], by=["cancer_type"], scenarios=["pooled"], split_scheme="sample", seed=seed)
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1"], progress=False)
    skipped = st.query("SELECT DISTINCT s.split_id, s.fold, s.reason, p.seed FROM skipped_tasks s JOIN splits p USING (split_id)")
    assert set(skipped["seed"]) == {0, 1}
    table = pd.read_csv(out.parent / "tables" / "skipped_tasks.csv")
    assert len(table) == len(skipped) and table["spaces"].tolist() == [1] * len(skipped)
    rows = _tables(out)["skipped"]
    split = _header(_tables(out), "skipped").index("Split")
    assert {cells[split][1] for _, cells in rows[1:]} == {"sample k=3 seed 0", "sample k=3 seed 1"}


def test_bar_and_radar_axes_say_what_each_mean_is_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bars' y axis read 'F1' and a radar panel 'F1 by cancer type': a figure copied out of the page did not
    say that a bar is a mean (± sd) over folds, or in cross-data over held-out studies."""
    from scdm.classify import _plots

    drawn: list = []
    for name in ("bars_figure", "radar_figure", "scalability_figure"):
        monkeypatch.setattr(_plots, name, lambda *a, _draw=getattr(_plots, name), **k: drawn.append(_draw(*a, **k)) or drawn[-1])
    st = Store(tmp_path / "store")
    for scenario in ("pooled", "cross"):
        for category in (("all", "all"), ("cancer_type", "melanoma"), ("cancer_type", "HNSCC")):
            _insert_results(st, {"f1": [0.5, 0.7], "auroc": [0.6, 0.8]}, folds_expected=2, category=category,
                            scenario=scenario)
    write_report(st, tmp_path / "r", projection="none", formats=["png"], plot_metrics=["f1"])
    bars, pooled_radar, cross_radar = drawn[0], drawn[1][0], drawn[2][0]
    assert [ax.get_ylabel() for ax in bars.axes] == ["F1: mean ± sd\nover folds", "F1: mean ± sd\nover held-out studies"]
    assert pooled_radar.axes[0].get_title() == "mean F1 over folds by cancer type (bars: 2 categories)"
    assert pooled_radar.axes[0].get_ylabel() == "F1: mean ± sd\nover folds"
    assert cross_radar.axes[0].get_title() == "mean F1 over held-out studies by cancer type (bars: 2 categories)"
    assert drawn[3].axes[-1].get_xlabel() == "mean head fit time per task (s, log scale)"


def _failing_fit(self, X, rows, y):  # noqa: ANN001, ANN202 - a head whose solver fails on every fold
    raise InputDataError("the solver did not converge (a test's failing head)")


def test_skips_a_later_run_fitted_are_not_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run whose head failed on every fold recorded 3 skipped tasks; the same command run again fitted them,
    and the page showed their results beside a skipped-tasks table still listing all 3 as skipped."""
    from scdm.classify.heads import ShuffledLabelHead

    st = _ingested(tmp_path / "store")
    for i, (name, *_) in enumerate(DATASETS):
        _write_embedding(st, name, "pca", 6, shift=1.0, seed=10 + i)
    options = {"heads": ["shuffled-label"], "by": ["all"], "scenarios": ["pooled"], "jobs": 1}
    with monkeypatch.context() as m:
        m.setattr(ShuffledLabelHead, "fit_rows", _failing_fit)
        _evaluate(st, **options)
    assert len(st.query("SELECT * FROM skipped_tasks WHERE reason LIKE '%did not converge%'")) == 3
    _evaluate(st, **options)  # fits the 3 tasks
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1"], progress=False)
    board = pd.read_csv(out.parent / "tables" / "leaderboard_all.csv")
    assert board["folds_done"].tolist() == [3]
    assert pd.read_csv(out.parent / "tables" / "skipped_tasks.csv").empty
    # a skip of another head's parameters is not superseded by these fits: still listed
    with monkeypatch.context() as m:
        m.setattr(ShuffledLabelHead, "fit_rows", _failing_fit)
        _evaluate(st, **options, head_params={"shuffled-label": {"seed": 1}})
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1"], progress=False)
    skipped = pd.read_csv(out.parent / "tables" / "skipped_tasks.csv")
    assert skipped["fold"].tolist() == [0, 1, 2] and skipped["reason"].str.contains("did not converge").all()


def test_skips_of_an_older_head_revision_are_not_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skipped tasks of a run of an older head revision (whose results the page leaves out) were listed beside
    the results of this scdm's revision: 4 skipped folds of a 'cell k=4' split the page shows no result of."""
    from scdm.classify.heads import ShuffledLabelHead

    st = _ingested(tmp_path / "store")
    for i, (name, *_) in enumerate(DATASETS):
        _write_embedding(st, name, "pca", 6, shift=1.0, seed=10 + i)
    options = {"heads": ["shuffled-label"], "by": ["all"], "scenarios": ["pooled"], "jobs": 1}
    with monkeypatch.context() as m:  # an older scdm: revision 1, and its solver failed
        m.setattr(ShuffledLabelHead, "revision", lambda self: 1)
        m.setattr(ShuffledLabelHead, "fit_rows", _failing_fit)
        _evaluate(st, folds=4, **options)
    assert len(st.query("SELECT * FROM skipped_tasks")) == 4
    _evaluate(st, folds=3, **options)
    out = write_report(st, tmp_path / "r", projection="none", formats=["png"], metrics=["f1"], progress=False)
    assert pd.read_csv(out.parent / "tables" / "leaderboard_all.csv")["k"].tolist() == [3]
    assert pd.read_csv(out.parent / "tables" / "skipped_tasks.csv").empty
    splits = pd.read_csv(out.parent / "tables" / "split_schemes.csv", dtype={"folds": str})
    assert splits[["scheme", "folds", "splits"]].values.tolist() == [["cell", "3", 1]]


def test_fit_time_is_per_dataset_collection_never_pooled_across_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One space evaluated on d1, then on d1 and d2 once d2 joined it: the fit-time table gave one row 'd1, d2',
    6 tasks, 48 training cells, a mean over folds trained on 32 and on 64 cells; one row per collection now."""
    st = _ingested(tmp_path / "store")
    _write_embedding(st, "d1", "scgpt", 6, shift=1.0, seed=1)
    _evaluate(st, heads=["ridge"], by=["all"], scenarios=["pooled"])
    _write_embedding(st, "d2", "scgpt", 6, shift=1.0, seed=2)
    _evaluate(st, heads=["ridge"], by=["all"], scenarios=["pooled"])
    from scdm.classify import _plots

    drawn: list = []
    draw = _plots.scalability_figure
    monkeypatch.setattr(_plots, "scalability_figure", lambda e, fit, *a, **k: drawn.append(fit) or draw(e, fit, *a, **k))
    out = write_report(st, tmp_path / "r", projection="none", formats=["svg"], progress=False)
    tables = _tables(out)
    header = _header(tables, "fit-time")
    rows = [dict(zip(header, (t for _, t in cells))) for _, cells in tables["fit-time"][1:]]
    assert [(r["Datasets"], r["Tasks"], r["Train cells"]) for r in rows] == [("d1, d2", "3", "64"), ("d1", "3", "32")]
    csv = pd.read_csv(out.parent / "tables" / "scalability_fit.csv")
    fitted = st.query("SELECT datasets, avg(fit_seconds) AS fit_s FROM eval_tasks GROUP BY datasets ORDER BY datasets DESC")
    assert csv["datasets"].tolist() == fitted["datasets"].tolist() == ["d1,d2", "d1"]
    assert csv["fit_s"].tolist() == pytest.approx(fitted["fit_s"].tolist())
    # the figure draws one bar per series and head: the larger collection (never the mean of both)
    assert drawn[0]["fit_s"].tolist() == pytest.approx([fitted["fit_s"].iloc[0]])
    assert "on each series' largest dataset collection" in html.unescape(out.read_text())


LONG_HEAD = ('mlp {"batch_size": 128, "dropout": 0.1, "epochs": 50, "hidden": 256, "lr": 0.001, '
             '"weight_decay": 0.0001}')


def _inside_figure(fig, text) -> bool:  # noqa: ANN001 - a drawn matplotlib figure and one of its texts
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    box, frame = text.get_window_extent(), fig.bbox
    return bool(box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1)


def test_a_title_naming_a_head_with_many_parameters_stays_inside_its_figure() -> None:
    """A head run with several parameter sets is named with its parameters: the radar's title
    'pooled · frozen embeddings · head mlp {...6 parameters}' was 10.8 in wide on a 4 in figure, cut at both
    edges, and so was the per-fold figure's 'head: mlp {...}'. Both are wrapped onto lines that fit."""
    from scdm.classify import _plots

    palette = Palette([("pca", "d1")])
    series = palette.add(("pca", "frozen", "s1", "", ""), "pca", group=("pca", "d1"))
    radar = pd.DataFrame({"series": "pca", "category_type": "cancer_type", "category": ["a", "b", "c"], "metric": "f1",
                          "mean": [0.3, 0.2, 0.5], "sd": 0.1})
    title = f"pooled · frozen embeddings · head {LONG_HEAD}"
    with _plots.style():
        fig, _ = _plots.radar_figure(radar, [series], metrics=["f1"], category_types=["cancer_type"], title=title)
        assert fig.get_suptitle().replace("\n", " ") == title and _inside_figure(fig, fig._suptitle)
        folds = pd.DataFrame({"series": "pca", "head": LONG_HEAD, "category": ["a", "b"], "fold": 0, "value": [0.5, 0.6]})
        fig = _plots.folds_figure(folds, [series], heads=[LONG_HEAD], metric="f1", title="pooled: F1 per fold")
        head_title = fig.axes[0].title
        assert head_title.get_text().replace("\n", " ") == f"head: {LONG_HEAD}" and _inside_figure(fig, head_title)


def test_fit_width_breaks_a_word_wider_than_the_line() -> None:
    from scdm.classify._plots import fit_width

    word = "x" * 200
    lines = fit_width(f"head {word}", 2.0, 10).split("\n")
    assert "".join(lines[1:]) == word and len(lines) > 2 and lines[0] == "head"
    assert fit_width("short title", 4.0, 11) == "short title"
