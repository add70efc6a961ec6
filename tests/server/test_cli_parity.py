"""The server, the CLI and the Python API show the same results for the same store.

The store: A375 and JHU006 in one joint pca space, evaluated on every cell (category ``all``:
datasets ``A375,JHU006``, pooled) and per cancer type (``A375`` alone, ``JHU006`` alone).
"""

from __future__ import annotations

import io
import json
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest
from click.testing import CliRunner

from scdm.cli import main
from scdm.store import Store, example_data

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def joint_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from scdm.classify.grid import evaluate
    from scdm.embedding.runner import embed_baseline
    from scdm.store.splits import SampleLeakageWarning

    root = tmp_path_factory.mktemp("parity") / "store"
    st = Store(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleLeakageWarning)
        st.ingest(example_data("A375"), name="A375", label_key="response_PLX4720", drug="PLX-4720", study="GSE108383",
                  cancer_type="Melanoma")
        st.ingest(DATA / "JHU006_HNSCC_Kinker2020.h5ad", name="JHU006", label_key="response_Gefitinib", drug="Gefitinib",
                  study="Kinker2020", cancer_type="Head and neck cancer")
        embed_baseline(st, ["A375", "JHU006"], model="pca", n_comps=6, n_hvg=200, progress=False)
        evaluate(st, heads=["ridge"], scenarios=["pooled"], by=["all", "cancer_type"], folds=3, split_scheme="cell",
                 silent=True)
    return root


@pytest.fixture(scope="module")
def api(joint_store: Path) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    with TestClient(create_app(Store(joint_store), token=None), base_url="http://127.0.0.1:8000") as client:
        yield client


def cli(store: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["--store", str(store), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def cli_board(store: Path, *args: str) -> pd.DataFrame:
    return pd.DataFrame(json.loads(cli(store, "results", "--long", "--metric", "auroc", "--format", "json", *args)))


@pytest.mark.parametrize(("asked", "expected"), [
    (["A375"], ["A375"]),  # the Melanoma category: A375's cells alone, not the pooled result that holds them too
    (["JHU006,A375"], ["A375,JHU006"]),  # the pooled result, named in any order
    (["A375,JHU006"], ["A375,JHU006"]),
    (["A375", "JHU006"], ["A375", "JHU006"]),  # several: each exactly
])
def test_a_dataset_filter_matches_a_results_datasets_exactly_everywhere(joint_store: Path, api: Any, asked: list[str],
                                                                         expected: list[str]) -> None:
    from scdm import results

    query = "&".join(f"dataset={d}" for d in asked)
    board = api.get(f"/api/leaderboard?metric=auroc&{query}")
    folds = api.get(f"/api/results?metric=auroc&{query}")
    assert board.status_code == folds.status_code == 200
    assert sorted(r["datasets"] for r in board.json()) == expected
    assert sorted({r["datasets"] for r in folds.json()}) == expected and len(folds.json()) == 3 * len(expected)
    shown = cli_board(joint_store, *[a for d in asked for a in ("--dataset", d)])
    assert sorted(shown["datasets"]) == expected
    assert sorted(results(joint_store, metrics=["auroc"], datasets=asked)["datasets"]) == expected
    # the same numbers: the server's means are the CLI's, and the mean of the server's folds
    by_datasets = {r["datasets"]: r["mean"] for r in board.json()}
    assert by_datasets == pytest.approx(dict(zip(shown["datasets"], shown["mean"])))
    for name, mean in by_datasets.items():
        values = [r["value"] for r in folds.json() if r["datasets"] == name]
        assert mean == pytest.approx(sum(values) / len(values))


def test_a_pooled_label_set_filter_is_exact_on_the_server_as_in_the_cli(joint_store: Path, api: Any) -> None:
    # the pooled result's label sets are 'Gefitinib,PLX-4720': a comma joins them, it does not list two filters
    board = api.get("/api/leaderboard?metric=auroc&label_set=PLX-4720,Gefitinib").json()
    assert [(r["datasets"], r["label_set"]) for r in board] == [("A375,JHU006", "Gefitinib,PLX-4720")]
    shown = cli_board(joint_store, "--label-set", "PLX-4720,Gefitinib")
    assert list(shown["datasets"]) == ["A375,JHU006"]
    alone = api.get("/api/results?metric=auroc&label_set=PLX-4720").json()
    assert {r["datasets"] for r in alone} == {"A375"}


def test_a_dataset_that_is_only_pooled_warns_in_the_cli_and_is_empty_on_the_server(tmp_path: Path, joint_store: Path,
                                                                                  api: Any) -> None:
    result = CliRunner().invoke(main, ["--store", str(joint_store), "results", "--dataset", "a375"])
    assert result.exit_code == 0 and "'a375' matches no result" in result.stderr and "'A375,JHU006'" in result.stderr
    assert api.get("/api/leaderboard?dataset=a375").json() == []
    # a pooled set named in another order is the stored one: no warning
    result = CliRunner().invoke(main, ["--store", str(joint_store), "results", "--dataset", "JHU006,A375"])
    assert result.exit_code == 0 and "matches no result" not in result.stderr


def test_the_leaderboard_is_the_catalogs_own_aggregate(tmp_path: Path, joint_store: Path, api: Any) -> None:
    """Every mean, sd and n the server returns, recomputed from the catalog file with duckdb alone."""
    board = pd.DataFrame(api.get("/api/leaderboard").json())
    shutil.copy(joint_store / "catalog.duckdb", tmp_path / "copy.duckdb")  # this process holds the file open already
    con = duckdb.connect(str(tmp_path / "copy.duckdb"), read_only=True)
    try:
        own = con.execute("SELECT space_id, datasets, label_set, split_id, category, head, metric, avg(value) AS mean, "
                          "stddev_samp(value) AS sd, count(value) AS n_folds, count(*) AS n FROM results "
                          "GROUP BY ALL").df()
    finally:
        con.close()
    merged = board.merge(own, on=["space_id", "datasets", "label_set", "split_id", "category", "head", "metric"],
                         suffixes=("", "_own"), validate="one_to_one")
    assert len(merged) == len(board) == len(own)
    assert merged["mean"].to_numpy() == pytest.approx(merged["mean_own"].to_numpy(), nan_ok=True)
    assert merged["sd"].to_numpy() == pytest.approx(merged["sd_own"].to_numpy(), nan_ok=True)
    assert (merged["n_folds"] == merged["n_folds_own"]).all()
    assert (merged["folds_done"] == merged["n"]).all()
    # the CLI's CSV holds the same means
    wide = pd.read_csv(io.StringIO(cli(joint_store, "results", "--metric", "auroc", "--format", "csv")))
    auroc = board[board["metric"] == "auroc"]
    assert sorted(wide["auroc"]) == pytest.approx(sorted(auroc["mean"]))


def test_results_on_a_space_of_an_older_gene_table_are_marked_as_ls_marks_it(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedding again after the gene table changed makes a second space: ls marks the older one, and so do
    the leaderboard (CLI, Python, server), the per-fold results, the embeddings list and the report."""
    from fastapi.testclient import TestClient

    from scdm import results
    from scdm.classify.grid import evaluate
    from scdm.classify.report import write_report
    from scdm.embedding import runner
    from scdm.server import create_app

    st = Store(tmp_path / "store")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", study="GSE108383")
        with monkeypatch.context() as older_scdm:
            older_scdm.setattr(runner, "gene_table_version", lambda: "0ld0ld0ld0ld")
            (old,) = runner.embed_baseline(st, ["a375"], model="pca", n_comps=4, n_hvg=100, progress=False)
        runner.embed_baseline(st, ["a375"], model="pca", n_comps=4, n_hvg=100, progress=False)
        evaluate(st, heads=["ridge"], scenarios=["pooled"], by=["all"], folds=3, split_scheme="cell", silent=True)
    old_space = st.embedding(old.embedding_id).space_id
    note = "older gene table (0ld0ld0ld0ld; this scdm: "

    def marked(rows: pd.DataFrame) -> set[str]:
        """The spaces whose rows carry the note (every row of a space the same)."""
        assert rows["space_id"].nunique() == 2 and len(rows) >= 2
        flags = rows.assign(old=rows["note"].str.startswith(note)).groupby("space_id")["old"].agg(["min", "max"])
        assert (flags["min"] == flags["max"]).all()
        return set(flags.index[flags["max"]])

    ls = pd.read_csv(io.StringIO(cli(st.root, "ls", "--what", "embeddings", "--format", "csv")), keep_default_na=False)
    assert marked(ls) == {old_space}
    assert marked(cli_board(st.root)) == marked(results(st, long=True)) == {old_space}
    wide = pd.DataFrame(json.loads(cli(st.root, "results", "--format", "json")))
    assert sorted(wide["note"].str.startswith(note)) == [False, True]
    table = CliRunner().invoke(main, ["--store", str(st.root), "results"])
    assert table.exit_code == 0 and note in table.stdout and "Rows noted 'older gene table'" in table.stderr
    with TestClient(create_app(st, token=None), base_url="http://127.0.0.1:8000") as api:
        for route in ("/api/leaderboard", "/api/results", "/api/embeddings"):
            assert marked(pd.DataFrame(api.get(route).json())) == {old_space}, route
        model = api.get("/api/models/pca").json()
        assert marked(pd.DataFrame(model["leaderboard"])) == marked(pd.DataFrame(model["embeddings"])) == {old_space}
    index = write_report(st, tmp_path / "report", projection="none", progress=False)
    assert note in index.read_text()


def test_two_spaces_of_one_model_are_told_apart_on_the_page_as_in_the_cli(tmp_path: Path) -> None:
    """Before, the page's leaderboard showed no space_id: pca with 4 and with 6 components on A375 were two rows
    alike in every shown column but their numbers (`scdm results` prints 'pca [<space>]' for each)."""
    from fastapi.testclient import TestClient

    from scdm.classify.grid import evaluate
    from scdm.embedding.runner import embed_baseline
    from scdm.server import create_app

    from .test_number_format import page_constant, page_functions, run_page

    st = Store(tmp_path / "store")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st.ingest(example_data("A375"), name="A375", label_key="response_PLX4720", study="GSE108383")
        for n_comps in (4, 6):
            embed_baseline(st, ["A375"], model="pca", n_comps=n_comps, n_hvg=200, progress=False)
        evaluate(st, heads=["ridge"], scenarios=["pooled"], by=["all"], folds=3, split_scheme="cell", silent=True)
    with TestClient(create_app(st, token=None), base_url="http://127.0.0.1:8000") as api:
        board = api.get("/api/leaderboard?metric=auroc").json()
    assert len(board) == 2 and len({r["space_id"] for r in board}) == 2
    prelude = (page_functions("plural", "compare", "table") + "\n" + page_constant("LEADERBOARD_COLUMNS")
               + f"\nconst el = {{innerHTML: '', querySelectorAll: () => []}}; table(el, {json.dumps(board)}, LEADERBOARD_COLUMNS);")
    html = str(run_page("el.innerHTML", prelude))
    header = re.findall(r'<th data-k="([^"]+)"', html)
    rows = [re.findall(r"<td[^>]*>([^<]*)</td>", tr) for tr in html.split("<tr>")[2:]]
    identity = [[v for k, v in zip(header, row) if k not in ("mean", "sd")] for row in rows]
    assert len(identity) == 2 and identity[0] != identity[1]
    assert {row[header.index("space_id")] for row in rows} == {r["space_id"] for r in board}
    printed = cli(st.root, "results", "--metric", "auroc")
    assert all(f"pca [{r['space_id'][:8]}]" in printed for r in board)


def _strict_json(text: str) -> Any:
    def refuse(token: str) -> None:
        raise AssertionError(f"{token} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_every_machine_output_carries_the_catalogs_floats_to_the_last_digit(joint_store: Path, api: Any) -> None:
    """--format json, --format csv and the server answer each mean and sd exactly as the leaderboard computes it.

    pandas' to_json rounded to 10 digits: an F1 mean of 0.9841269841269842 came out 0.9841269841 in JSON only.
    """
    from scdm.classify.results import leaderboard

    keys = ["space_id", "datasets", "split_id", "category", "head", "metric"]
    own = leaderboard(Store(joint_store, read_only=True)).set_index(keys).sort_index()
    as_json = pd.DataFrame(_strict_json(cli(joint_store, "results", "--long", "--format", "json"))).set_index(keys).sort_index()
    as_csv = pd.read_csv(io.StringIO(cli(joint_store, "results", "--long", "--format", "csv")), float_precision="round_trip",
                         keep_default_na=False, na_values=[""]).set_index(keys).sort_index()
    served = pd.DataFrame(_strict_json(api.get("/api/leaderboard?limit=100000").text)).set_index(keys).sort_index()
    assert any(len(repr(v)) > 12 for v in own["mean"].dropna())  # digits past the 10th to lose
    assert served.index.equals(own.index) and len(as_json) == len(as_csv) == 12  # the CLI's four default metrics
    for other in (as_json, as_csv, served):
        same = own.loc[other.index]
        for column in ("mean", "sd", "n_folds"):  # NaN != NaN: compare them as None
            assert [None if pd.isna(v) else v for v in other[column]] == [None if pd.isna(v) else v for v in same[column]]
