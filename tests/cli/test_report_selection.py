"""``scdm report --model/--head/--run``: a report of part of the store, judged out of date on its own rows only.

``write_report`` took models, heads and a run, but ``scdm report`` had no option for them: a report of one
model could not be written from the command line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from scdm.cli import main
from scdm.store import Store, example_data


def test_report_of_one_model_and_head_records_its_selection(tmp_path: Path) -> None:
    from scdm.classify.grid import evaluate
    from scdm.classify.report import REPORT_STATE_FILE, report_is_current
    from scdm.embedding.runner import embed_baseline

    st = Store(tmp_path / "store")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", study="GSE108383")
        embed_baseline(st, ["a375"], model="pca", n_comps=4, n_hvg=100, progress=False)
        embed_baseline(st, ["a375"], model="hvg", n_hvg=20, progress=False)
        evaluate(st, scenarios=["pooled"], by=["all"], heads=["ridge", "majority"], folds=3, silent=True)
    out = tmp_path / "report"
    args = ["--store", str(st.root), "report", "--out", str(out), "--model", "pca", "--head", "ridge,lgbm"]
    result = CliRunner().invoke(main, [*args, "-q"])
    assert result.exit_code == 0, result.output
    assert "--head 'lgbm' matches no result" in result.output
    board = pd.read_csv(out / "tables" / "leaderboard_all.csv")
    assert set(board["model"]) == {"pca"} and set(board["head"]) == {"ridge"}
    state = json.loads((out / REPORT_STATE_FILE).read_text())
    assert state["selection"] == {"run_id": None, "models": ["pca"], "heads": ["ridge", "lgbm"]}
    assert report_is_current(st, out) is True
