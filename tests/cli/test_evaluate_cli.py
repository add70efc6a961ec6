"""`scdm evaluate` and `scdm results`: the seed reaches the heads, and rows differing only by split print apart."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from scdm.cli import main
from scdm.store import Store
from tests.jhu006 import jhu006_store


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    return jhu006_store(tmp_path / "store").root


def run(store: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["--store", str(store), *args])
    assert result.exit_code == 0, result.output
    return result.stdout


EVALUATE = ("evaluate", "--scenario", "pooled", "--by", "all", "--folds", "3", "-q")


def test_evaluate_seed_reaches_every_head_that_takes_one(store: Path) -> None:
    assert "mlp, lightgbm, shuffled-label" in run(store, "evaluate", "--help")
    run(store, *EVALUATE, "--head", "ridge,shuffled-label", "--seed", "4")
    params = Store(store).query("SELECT DISTINCT head, head_params, seed FROM eval_tasks")
    by_head = {h: json.loads(p) for h, p in zip(params["head"], params["head_params"])}
    assert by_head["shuffled-label"]["seed"] == 4 and "seed" not in by_head["ridge"]
    assert set(params["seed"]) == {4}  # the folds too


def test_results_print_rows_that_differ_only_by_split_apart(store: Path) -> None:
    run(store, *EVALUATE, "--head", "ridge")
    run(store, *EVALUATE, "--head", "ridge", "--label-set", "Vorinostat")
    run(store, *EVALUATE, "--head", "ridge", "--label-set", "Vorinostat", "--pair-folds-with", "Gefitinib")
    lines = run(store, "results", "--metric", "auroc").splitlines()
    assert "split" in lines[0].split()
    rows = [re.sub(r"\s+[0-9.]+ ± [0-9.]+$", "", line) for line in lines[1:]]  # without the metric (mean ± sd)
    assert all(row != line for row, line in zip(rows, lines[1:]))
    assert len(rows) == 3 and len(set(rows)) == 3
    assert sum("(folds of Gefitinib)" in line for line in lines) == 1


def test_evaluate_prints_the_results_it_was_asked_for_not_the_whole_store(store: Path) -> None:
    run(store, *EVALUATE, "--head", "ridge", "--format", "csv")
    out = run(store, *EVALUATE, "--head", "majority", "--label-set", "Vorinostat", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["head"], r["label_set"]) for r in rows] == [("majority", "Vorinostat")]
    again = list(csv.DictReader(io.StringIO(run(store, *EVALUATE, "--head", "ridge", "--format", "csv"))))
    assert [(r["head"], r["label_set"]) for r in again] == [("ridge", "Gefitinib")]  # reused, still printed


def test_results_name_a_filter_value_that_matches_no_result(store: Path) -> None:
    """`--dataset jhu006` for a dataset named JHU006 printed '(no rows)' and nothing else (--help's own example did)."""
    run(store, *EVALUATE, "--head", "ridge")
    dataset = Store(store).query("SELECT DISTINCT datasets FROM eval_tasks")["datasets"].iloc[0]
    result = CliRunner().invoke(main, ["--store", str(store), "results", "--dataset", dataset.lower(),
                                       "--label-set", "Vorinostt", "--head", "ridge"])
    assert result.exit_code == 0 and "(no rows)" in result.stdout
    assert (f"warning: --dataset {dataset.lower()!r} matches no result (names are exact and case-sensitive; "
            f"results have: {dataset!r})") in result.stderr
    assert "--label-set 'Vorinostt' matches no result" in result.stderr and "--head" not in result.stderr
    assert "warning" not in CliRunner().invoke(main, ["--store", str(store), "results", "--dataset", dataset]).stderr


def test_evaluate_scenario_custom_says_where_its_folds_are_given(store: Path) -> None:
    # the command line has no option for per-cell folds: it printed the split builder's 'needs custom=<DataFrame>'
    result = CliRunner().invoke(main, ["--store", str(store), "evaluate", "--scenario", "custom", "--head", "majority", "-q"])
    assert result.exit_code == 2
    assert "only the Python API takes" in result.output and "scenarios=['custom']" in result.output
    assert Store(store).query("SELECT count(*) AS n FROM eval_runs")["n"][0] == 0


def test_evaluate_notes_a_transductive_baseline_as_results_does(store: Path) -> None:
    """`scdm results` noted that pca/hvg are fitted on every cell (test cells too); evaluate printed the same rows without it."""
    import numpy as np

    from scdm.classify.results import NOTES

    note = f"note: {NOTES['transductive-baseline']}"
    evaluated = CliRunner().invoke(main, ["--store", str(store), *EVALUATE, "--head", "ridge"])
    assert evaluated.exit_code == 0 and note in evaluated.stderr and "note:" not in evaluated.stdout
    results = CliRunner().invoke(main, ["--store", str(store), "results"])
    assert note in results.stderr
    # a space no baseline fitted: no such note
    st = Store(store)
    cells = st.cells(["JHU006"])
    emb = st.create_embedding("JHU006", model="toy", params={"projection": 0}, dim=4)
    X = np.random.default_rng(0).normal(size=(len(cells), 4)).astype(np.float32)
    for chunk in range(emb.n_chunks):
        lo, hi = emb.chunk_bounds(chunk)
        emb.write_chunk(chunk, X[lo:hi])
    emb.finalize(telemetry={})
    toy = CliRunner().invoke(main, ["--store", str(store), *EVALUATE, "--head", "ridge", "--embedding", emb.embedding_id])
    assert toy.exit_code == 0 and "toy" in toy.stdout and NOTES["transductive-baseline"] not in toy.stderr
