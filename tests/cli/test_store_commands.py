from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner

from scdm.cli import main
from scdm.store import Store, example_data


@pytest.fixture()
def run(tmp_path):
    runner = CliRunner()
    store = str(tmp_path / "store")

    def _run(*args, ok=True):
        result = runner.invoke(main, ["--store", store, *args], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result

    _run.store = store
    return _run


def test_help_for_every_command_teaches():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0 and "Typical session" in top.output
    for name, cmd in main.commands.items():
        out = runner.invoke(main, [name, "--help"])
        assert out.exit_code == 0, name
        assert cmd.help and len(cmd.help.split()) >= 5, f"{name} needs a real help text"


def test_ingest_ls_sql_export_rm_round_trip(run, tmp_path):
    out = run("ingest", example_data(), "--label-key", "response_PLX4720", "--study", "GSE108383", "--name", "a375")
    assert out.stdout.startswith("ingested a375") and "108 cells x 2873 genes" in out.output
    assert "already in the store" in run("ingest", example_data(), "--label-key", "response_PLX4720").stdout
    out = run("embed", "a375", "--model", "pca", "--n-comps", "5", "-q")
    assert "pca embedding of a375: 108 x 5" in out.output
    listing = run("ls").stdout
    assert "a375" in listing and "complete" in listing and "1/1" in listing
    rows = json.loads(run("sql", "SELECT response, count(*) AS n FROM cells GROUP BY ALL ORDER BY response", "--format", "json").stdout)
    assert rows == [{"response": 0, "n": 46}, {"response": 1, "n": 62}]
    csv = run("sql", "SELECT name FROM datasets", "--format", "csv").stdout
    assert csv == "name\na375\n"
    out = run("export", "--dataset", "a375", "--model", "pca", "--out", str(tmp_path / "x.npy")).stdout
    arr = np.load(tmp_path / "x.npy")
    assert arr.shape == (108, 5)
    query = out.split('scdm sql "')[1].split('"')[0]  # the printed query gives the rows' cell ids, in order
    ids = [r["cell_id"] for r in json.loads(run("sql", query, "--format", "json").stdout)]
    assert ids == list(ad.read_h5ad(example_data()).obs_names)
    assert "would delete" in run("rm", "--dataset", "a375", "--model", "pca", "--dry-run").output
    assert "deleted embedding" in run("rm", "--dataset", "a375", "--model", "pca").output
    assert Store(run.store).embeddings().empty


@pytest.mark.parametrize("query", ["DROP TABLE cells", "INSERT INTO meta VALUES ('a', 'b')", "COPY cells TO 'x.csv'"])
def test_sql_refuses_writes_with_a_clean_error(run, query):
    run("ingest", example_data())
    out = run("sql", query, ok=False)
    assert out.exit_code == 1 and out.output.startswith("Error: ") and "Traceback" not in out.output


@pytest.mark.parametrize("query", ["SELECT setseed(0.5)", "SELECT (0.5).setseed(), random()"])
def test_sql_refuses_setseed_with_a_clean_error(run, query):
    out = run("sql", query, ok=False)  # was answered (a NULL) on the read connection the process's reads share
    assert out.exit_code == 1 and out.output.startswith("Error: setseed() is not allowed in a read query")
    assert "Traceback" not in out.output


@pytest.mark.parametrize(("option", "value"), [("--max-rows", "-1"), ("--max-rows", "1.5"), ("--timeout", "0"), ("--timeout", "-1")])
def test_sql_refuses_a_row_or_time_limit_that_cannot_be_meant(run, option, value):
    out = run("sql", "SELECT 1 AS x", option, value, ok=False)  # was a TypeError traceback, or '(no rows)' with exit 0
    assert out.exit_code == 2 and f"Invalid value for '{option}'" in out.output and "Traceback" not in out.output
    assert "x" in run("sql", "SELECT 1 AS x", option, "1").stdout
    out = run("sql", "SELECT 1 AS x", "--timeout", "nan", ok=False)
    assert out.exit_code == 1 and out.output.startswith("Error: ") and "time limit" in out.output


def test_sql_prints_at_most_10000_rows_unless_told_and_says_when_it_cut(run):
    """`scdm sql "SELECT * FROM predictions"` read the whole answer into memory (2M rows of a 200-character text
    held 1.6 GB); it prints 10,000 rows, says on stderr that the answer has more, and how to get them."""
    out = run("sql", "SELECT * FROM range(10001) AS t(i)", "--format", "csv")
    assert out.stdout.splitlines() == ["i", *map(str, range(10_000))]
    assert "note: printed the first 10,000 rows; the answer has more" in out.stderr and "--all" in out.stderr
    assert "note" not in run("sql", "SELECT * FROM range(10000) AS t(i)", "--format", "csv").stderr  # all of it: no note
    out = run("sql", "SELECT * FROM range(10) AS t(i)", "--max-rows", "3", "--format", "json")
    assert json.loads(out.stdout) == [{"i": 0}, {"i": 1}, {"i": 2}] and "the first 3 rows" in out.stderr
    for every in (["--all"], ["--max-rows", "0"]):
        out = run("sql", "SELECT * FROM range(10001) AS t(i)", *every)
        assert len(out.stdout.splitlines()) == 10_002 and out.stderr == ""
    out = run("sql", "SELECT 1 AS x", "--all", "--max-rows", "5", ok=False)
    assert out.exit_code == 2 and "--all prints every row and --max-rows 5" in out.output
    assert "10000" in CliRunner().invoke(main, ["sql", "--help"]).output  # the default, in --help


def test_sql_all_writes_csv_and_json_in_batches(run, monkeypatch):
    from scdm.store import _catalog

    held = []
    real_fetch = _catalog._fetch

    def fetch(result, max_rows):
        frame = real_fetch(result, max_rows)
        held.append(len(frame))
        return frame

    monkeypatch.setattr(_catalog, "_fetch", fetch)
    query = "SELECT range AS i, CASE WHEN range % 7 = 0 THEN NULL ELSE range END AS holes FROM range(25000)"
    whole = run("sql", query, "--format", "csv", "--max-rows", "25000").stdout
    held.clear()
    out = run("sql", query, "--all", "--format", "csv")
    assert out.stdout == whole and out.stderr == "" and whole.splitlines()[1:3] == ["0,", "1,1"]
    assert max(held) <= 10_000 and sum(held) == 25_000  # never the whole answer at once
    assert json.loads(run("sql", query, "--all", "--format", "json").stdout) == json.loads(
        run("sql", query, "--format", "json", "--max-rows", "25000").stdout)
    assert run("sql", "SELECT 1 AS x WHERE false", "--all", "--format", "json").stdout == "[]\n"
    assert run("sql", "SELECT 1 AS x WHERE false", "--all", "--format", "csv").stdout == "x\n"


def test_sql_prints_an_integer_column_with_a_null_as_integers(run):
    """Under a row limit (now the default) a column of 1 and NULL printed 1.0, in CSV and JSON alike."""
    query = "SELECT * FROM (VALUES (1, 1.5::DECIMAL(4, 2), true), (NULL, NULL, NULL)) AS t(n, d, b)"
    for rows in (["--max-rows", "5"], ["--all"]):
        assert run("sql", query, "--format", "csv", *rows).stdout.splitlines() == ["n,d,b", "1,1.5,True", ",,"]
        assert json.loads(run("sql", query, "--format", "json", *rows).stdout) == [
            {"n": 1, "d": 1.5, "b": True}, {"n": None, "d": None, "b": None}]
    assert run("sql", query, "--all").stdout == run("sql", query).stdout


def test_sql_syntax_error_is_a_clean_error_with_the_parsers_message(run):
    out = run("sql", "SELEC name FROM datasets", ok=False)
    assert out.exit_code == 1 and out.output.startswith("Error: Could not parse the query") and "SELEC" in out.output
    assert "Traceback" not in out.output and "read queries" not in out.output


def test_ls_csv_is_one_table(run):
    import io

    import pandas as pd

    run("ingest", example_data(), "--label-key", "response_PLX4720", "--name", "a375")
    out = run("ls", "--format", "csv", ok=False)  # three tables with different headers would read as one wrong table
    assert out.exit_code == 2 and "--what datasets" in out.output and "--what embeddings" in out.output
    datasets = pd.read_csv(io.StringIO(run("ls", "--what", "datasets", "--format", "csv").stdout))
    assert datasets["name"].tolist() == ["a375"] and datasets["n_cells"].tolist() == [108]
    labels = pd.read_csv(io.StringIO(run("ls", "--what", "labels", "--format", "csv").stdout))
    assert labels["label_key"].tolist() == ["response_PLX4720"]
    doc = json.loads(run("ls", "--format", "json").stdout)  # json keeps every section in one document
    assert set(doc) == {"datasets", "label_sets", "embeddings"}
    # a count is printed as a count, the same in the datasets and label sets tables (not 54.0 beside 54)
    (dataset,), (label_set,) = doc["datasets"], doc["label_sets"]
    assert dataset["n_sensitive"] == label_set["n_sensitive"] and isinstance(dataset["n_sensitive"], int)
    assert f" {label_set['n_sensitive']}.0" not in run("ls", "--what", "datasets").stdout


def test_user_errors_are_one_line_messages(run, tmp_path):
    bad = tmp_path / "x.h5ad"
    bad.write_text("nope")
    out = run("ingest", str(bad), ok=False)
    assert out.exit_code == 1 and "not an .h5ad" in out.output
    out = run("ingest", example_data(), "--label-key", "nope", ok=False)
    assert "Available obs columns: response_PLX4720, condition" in out.output
    out = run("embed", "missing-dataset", "--model", "pca", ok=False)
    assert "is not in the store" in out.output
    run("ingest", example_data(), "--name", "a")
    out = run("embed", "a", "--model", "nope", ok=False)
    assert "Unknown model 'nope'" in out.output and "geneformer" in out.output
    out = run("export", "--out", str(tmp_path / "y.npy"), ok=False)
    assert "--embedding ID" in out.output


def test_an_export_path_through_a_file_is_a_message_not_a_traceback(run, tmp_path):
    run("ingest", example_data(), "--name", "a375")
    run("embed", "a375", "--model", "pca", "--n-comps", "5", "-q")
    (tmp_path / "a_file").write_text("")
    out = run("export", "--dataset", "a375", "--model", "pca", "--out", str(tmp_path / "a_file" / "x.npy"), ok=False)
    assert out.exit_code == 1 and out.output.startswith("Error: NotADirectoryError") and "a_file" in out.output


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    RuntimeError('Failed to commit: Could not write file "catalog.duckdb.wal": No space left on device'),  # as DuckDB says it
])
def test_a_full_disk_is_a_message_saying_what_to_do(run, monkeypatch, error):
    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(Store, "ingest", full)
    out = run("ingest", example_data(), ok=False)
    assert out.exit_code == 1 and out.output.startswith("Error: No space left on device")
    assert "Free some space there" in out.output and "Traceback" not in out.output
    assert "embedding resumes" not in out.output  # an embed's remedy, not an ingest's


def test_a_full_disk_on_export_names_the_file_and_the_out_option(run, monkeypatch, tmp_path):
    run("ingest", example_data(), "--name", "a375")
    run("embed", "a375", "--model", "pca", "--n-comps", "5", "-q")
    target = tmp_path / "x.npy"

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(target))

    monkeypatch.setattr("numpy.save", full)
    out = run("export", "--dataset", "a375", "--model", "pca", "--out", str(target), ok=False)
    assert out.exit_code == 1 and f"(writing '{target}')" in out.output and "another --out path" in out.output
    assert not target.exists()


def test_a_bug_keeps_its_traceback(run, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Store, "ingest", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        run("ingest", example_data(), ok=False)


def test_max_genes_on_a_model_that_counts_tokens_names_the_parameter_it_takes(run, tmp_path):
    from scdm.embedding.models import geneformer

    geneformer.write_tiny_checkpoint(tmp_path / "gf", genes=["ENSG00000141510", "ENSG00000075624"])
    run("ingest", example_data(), "--label-key", "response_PLX4720", "--name", "a375")
    out = run("embed", "a375", "--model", "geneformer", "--checkpoint", str(tmp_path / "gf"), "--max-genes", "100", ok=False)
    assert out.exit_code == 2 and "--param max_length=N" in out.output


def test_ls_marks_embeddings_made_with_an_older_gene_table(run, monkeypatch):
    """Embedding again after the gene table changed makes a second space; ls says which one is the older."""
    import io

    import pandas as pd

    from scdm.embedding import runner

    run("ingest", example_data(), "--label-key", "response_PLX4720", "--name", "a375")
    with monkeypatch.context() as older_scdm:
        older_scdm.setattr(runner, "gene_table_version", lambda: "0ld0ld0ld0ld")
        run("embed", "a375", "--model", "pca", "--n-comps", "4", "-q")
    run("embed", "a375", "--model", "pca", "--n-comps", "4", "-q")  # this scdm's table: a new embedding
    shown = pd.read_csv(io.StringIO(run("ls", "--what", "embeddings", "--format", "csv").stdout), keep_default_na=False)
    assert len(shown) == 2 and shown["space_id"].nunique() == 2
    assert sorted(shown["note"].str.startswith("older gene table (0ld0ld0ld0ld")) == [False, True]


def test_ingest_says_how_many_cells_each_class_and_unknown_hold(run, tmp_path):
    adata = ad.read_h5ad("tests/data/PC9_erlotinib_subsample300.h5ad")
    adata.obs["resp"] = np.where(np.arange(adata.n_obs) % 3 == 0, "sensitive", "resistant").astype(object)
    adata.obs.iloc[:10, adata.obs.columns.get_loc("resp")] = None  # unlabelled: kept, left out of evaluation
    path = tmp_path / "pc9.h5ad"
    adata.write_h5ad(path)
    out = run("ingest", str(path), "--label-key", "resp").stdout
    assert "added label set 'resp' of pc9: 290 of 300 cells labelled (96 sensitive, 194 resistant), 10 unknown" in out


def test_sql_json_writes_each_value_as_the_query_answered_it(run):
    """pandas' to_json wrote a NULL inside a list as 0, one day as 86.4 seconds and 0.1 + 0.2 as 0.3."""
    run("ingest", example_data(), "--label-key", "response_PLX4720", "--name", "a375")
    query = ("SELECT [1, NULL] AS list, INTERVAL 1 DAY AS interval, 0.1::DOUBLE + 0.2::DOUBLE AS sum, "
             "'nan'::DOUBLE AS nan, 'inf'::DOUBLE AS inf, 'a,\"b\"\nc' AS text")

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    (row,) = json.loads(run("sql", query, "--format", "json").stdout, parse_constant=refuse)
    assert row == {"list": [1, None], "interval": "P1DT0H0M0S", "sum": 0.1 + 0.2, "nan": None, "inf": None, "text": 'a,"b"\nc'}


def test_sql_prints_a_sum_of_integers_as_an_integer(run):
    """sum() of an integer column is a HUGEINT, which DuckDB hands pandas as float: 108.0 (108 with --max-rows)."""
    run("ingest", example_data(), "--label-key", "response_PLX4720", "--name", "a375")
    query = "SELECT sum(n_cells) AS cells, sum(n_cells) FILTER (WHERE false) AS none FROM datasets"
    assert run("sql", query, "--format", "csv").stdout.splitlines() == ["cells,none", "108,"]
    assert json.loads(run("sql", query, "--format", "json").stdout) == [{"cells": 108, "none": None}]
    assert run("sql", query, "--format", "csv").stdout == run("sql", query, "--format", "csv", "--max-rows", "5").stdout


def test_sql_csv_writes_a_list_or_struct_as_json_a_reader_parses_back(run):
    """pandas wrote DuckDB's [1.1, 2] as '[1.1 2. ]' and [1, NULL] as '[1 --]'."""
    import csv
    import io

    run("ingest", example_data(), "--label-key", "response_PLX4720", "--name", "a375")
    out = run("sql", "SELECT [1.1, 2] AS list, [1, NULL] AS holes, {'a': 1.5, 'b': 'x,y'} AS struct", "--format", "csv").stdout
    (row,) = csv.DictReader(io.StringIO(out))
    assert {k: json.loads(v) for k, v in row.items()} == {"list": [1.1, 2.0], "holes": [1, None], "struct": {"a": 1.5, "b": "x,y"}}


def test_non_finite_values_in_csv_and_json_are_as_the_readme_says(tmp_path) -> None:
    """CSV keeps inf/-inf (pandas reads them back) and leaves NULL and NaN empty; JSON writes all four null."""
    import io

    import pandas as pd

    store = str(tmp_path / "st")
    query = "SELECT 'inf'::DOUBLE AS a, '-inf'::DOUBLE AS b, 'nan'::DOUBLE AS c, NULL::DOUBLE AS d, 1.5 AS e"
    csv = CliRunner().invoke(main, ["--store", store, "sql", query, "--format", "csv"])
    back = pd.read_csv(io.StringIO(csv.stdout)).iloc[0]
    assert back["a"] == float("inf") and back["b"] == float("-inf") and pd.isna(back["c"]) and pd.isna(back["d"])
    doc = json.loads(CliRunner().invoke(main, ["--store", store, "sql", query, "--format", "json"]).stdout)
    assert doc == [{"a": None, "b": None, "c": None, "d": None, "e": 1.5}]


def test_two_embeddings_of_one_model_name_the_one_of_an_older_gene_table(run, monkeypatch, tmp_path):
    """After the gene table changed, --dataset/--model finds two embeddings: the refusal says which is the older."""
    from scdm.embedding import runner

    run("ingest", example_data(), "--label-key", "response_PLX4720", "--name", "a375")
    with monkeypatch.context() as older_scdm:
        older_scdm.setattr(runner, "gene_table_version", lambda: "0ld0ld0ld0ld")
        run("embed", "a375", "--model", "pca", "--n-comps", "4", "-q")
    run("embed", "a375", "--model", "pca", "--n-comps", "4", "-q")  # this scdm's table: a new embedding
    refused = run("export", "--dataset", "a375", "--model", "pca", "--out", str(tmp_path / "a375.npy"), ok=False)
    assert refused.exit_code != 0 and not (tmp_path / "a375.npy").exists()
    assert re.search(r"2 pca \(frozen\) embeddings with different parameters \([0-9a-f]{16} \(older gene table "
                     r"\(0ld0ld0ld0ld; this scdm: [0-9a-f]{12}\)\), [0-9a-f]{16}\); pass --embedding ID", refused.output)
