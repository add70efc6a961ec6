"""The page's tables show what `scdm results` and `scdm ls` print to tell results and embeddings apart.

The page's script runs under Node.js where it is installed (no browser), fed the server's answers.
"""

from __future__ import annotations

import html
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from scdm.cli import main
from scdm.store import Store
from tests.jhu006 import jhu006_store
from tests.server.test_number_format import run_page_loader


@pytest.fixture(scope="module")
def paired_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JHU006's Vorinostat labels evaluated on their own folds and on Gefitinib's (pair_folds_with), and a
    second pca space recorded as read from a checkpoint."""
    from scdm.classify.grid import evaluate
    from scdm.embedding.runner import embed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = jhu006_store(tmp_path_factory.mktemp("columns") / "store")
        options: dict[str, Any] = {"heads": ["ridge"], "scenarios": ["pooled"], "by": ["all"], "folds": 3,
                                   "split_scheme": "cell", "silent": True, "label_set": "Vorinostat"}
        evaluate(st, **options)
        evaluate(st, pair_folds_with="Gefitinib", **options)
        embed(st, "JHU006", "pca", n_comps=6, progress=False)  # a second pca space of the same cells
    # as a model embedding records the checkpoint it read (the embed runner writes telemetry.checkpoint)
    with st.catalog.transaction() as con:
        con.execute("UPDATE embeddings SET telemetry = json_merge_patch(coalesce(telemetry, '{}'), ?) WHERE dim = 6",
                    ['{"checkpoint": {"hub_id": "lab/pca-ckpt", "commit": "0123abc"}}'])
    return st.root


@pytest.fixture(scope="module")
def api(paired_store: Path) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    with TestClient(create_app(Store(paired_store), token=None), base_url="http://127.0.0.1:8000") as client:
        yield client


def html_table(text: str) -> list[dict[str, str]]:
    """The rows of the page's table (``<th>`` names -> ``<td>`` text)."""
    names = [html.unescape(re.sub(r"<[^>]+>", "", h)) for h in re.findall(r"<th[^>]*>(.*?)</th>", text)]
    rows = re.findall(r"<tr>(.*?)</tr>", text.split("<tbody>", 1)[1])
    return [dict(zip(names, (html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", r)), strict=True)) for r in rows]


def test_the_leaderboard_tab_says_which_split_reuses_another_label_sets_folds(paired_store: Path, api: Any) -> None:
    """Two Vorinostat rows differing only by split_id: the CLI prints '(folds of Gefitinib)' beside one."""
    cli = CliRunner().invoke(main, ["--store", str(paired_store), "results", "--metric", "auroc"])
    assert cli.exit_code == 0, cli.output
    paired_prefix = re.search(r"(\w{8}) \(folds of Gefitinib\)", cli.stdout)
    assert paired_prefix is not None, cli.stdout

    answers = {path: api.get(path).json() for path in ("/api/leaderboard?metric=auroc", "/api/leaderboard/notes?metric=auroc")}
    shown = run_page_loader("loadLeaderboard()", answers, [("metric", "auroc")], read="$('lb-table').innerHTML",
                            functions=("notesHtml", "withSignedPartner", "loadLeaderboard"), constants=("LEADERBOARD_COLUMNS",))
    rows = html_table(str(shown))
    assert len(rows) == 2
    folds_from = {r["split_id"][:8]: r["folds_from"] for r in rows}
    assert folds_from.pop(paired_prefix.group(1)) == "Gefitinib" and list(folds_from.values()) == [""]


def test_a_models_page_ties_each_embedding_to_its_space_and_checkpoint_as_ls_does(paired_store: Path, api: Any) -> None:
    """Two pca embeddings of JHU006 (10 and 6 components): the page named neither their space nor their checkpoint."""
    ls = CliRunner().invoke(main, ["--store", str(paired_store), "ls", "--what", "embeddings", "--format", "json"])
    assert ls.exit_code == 0, ls.output
    expected = {e["embedding_id"]: (e["space_id"], e["checkpoint"]) for e in json.loads(ls.stdout)}
    assert sorted(c for _, c in expected.values()) == ["", "lab/pca-ckpt@0123abc"]

    shown = run_page_loader("loadModel('pca')", {"/api/models/pca": api.get("/api/models/pca").json()}, [],
                            read="els['me'].innerHTML", functions=("notesHtml", "loadModel"))
    rows = html_table(str(shown))
    assert {r["embedding_id"]: (r["space_id"], r["checkpoint_source"]) for r in rows} == expected


def test_the_predict_forms_heads_name_the_drug_they_learned(paired_store: Path, api: Any) -> None:
    """Two ridge heads on the same pca embedding and category, one of Gefitinib's labels, one of Vorinostat's: the
    head list read '<id> ridge on pca (all=all)' for both."""
    from scdm.classify.trained_heads import train_head

    st = Store(paired_store)
    (embedding,) = st.embeddings().query("dim == 10")["embedding_id"]
    learned = {train_head(st, [embedding], "all", "all", "ridge", label_set=drug): drug for drug in ("Gefitinib", "Vorinostat")}
    answers = {path: api.get(path).json() for path in ("/api/heads", "/api/datasets")}
    shown = run_page_loader("loadPredict()", answers, [], read="$('pred-head').innerHTML", functions=("headText", "loadPredict"))
    options = {v: html.unescape(t) for v, t in re.findall(r'<option value="([^"]+)">(.*?)</option>', str(shown))}
    for head_id, drug in learned.items():
        assert options[head_id] == f"{head_id} ridge on pca (all=all): {drug} of JHU006"
