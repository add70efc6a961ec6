"""The page and the API give the caveats `scdm results` prints under the same leaderboard, in its words.

Before, `scdm results` printed its notes on stderr (a pca baseline fitted on every cell, test folds and
held-out studies included; results missing folds; a space of an older gene table; ...) and the page's
Leaderboard tab and GET /api/leaderboard gave the same numbers without any of them. The store here has
all four of those caveats. The page's script runs under Node.js where it is installed (no browser).
"""

from __future__ import annotations

import html
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from click.testing import CliRunner

from scdm.classify.results import NOTES
from scdm.cli import main
from scdm.store import Store, example_data
from tests.server.test_number_format import run_page_loader


@pytest.fixture(scope="module")
def caveat_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A375 in a pca space of an older gene table and one of this scdm's, ridge evaluated on both (complete),
    shuffled-label stopped after its first fold (incomplete) and logreg fitted by an older scdm (left out)."""
    from scdm.classify.grid import evaluate
    from scdm.classify.heads import LogRegHead
    from scdm.embedding import runner
    from scdm.store import evaluation

    st = Store(tmp_path_factory.mktemp("notes") / "store")
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("ignore")
        st.ingest(example_data("A375"), name="a375", label_key="response_PLX4720", study="GSE108383")
        patch.setattr(runner, "gene_table_version", lambda: "0ld0ld0ld0ld")
        (old,) = runner.embed_baseline(st, ["a375"], model="pca", n_comps=4, n_hvg=100, progress=False)
        patch.undo()
        runner.embed_baseline(st, ["a375"], model="pca", n_comps=4, n_hvg=100, progress=False)
        options: dict[str, Any] = {"scenarios": ["pooled"], "by": ["all"], "folds": 3, "split_scheme": "cell", "silent": True}
        evaluate(st, heads=["ridge"], **options)
        with pytest.MonkeyPatch.context() as older_scdm:  # revision 1 of logreg, recorded as an older scdm records it
            older_scdm.setattr(LogRegHead, "revision", lambda self: 1, raising=False)
            run_id = evaluate(st, heads=["logreg"], **options).run_id
        with st.catalog.transaction() as con:
            con.execute("UPDATE eval_runs SET config = json_object('heads', ['logreg']) WHERE run_id = ?", [run_id])
        real_add = evaluation.ResultWriter.add

        def one_fold(writer: evaluation.ResultWriter, out: evaluation.TaskOutcome) -> None:
            real_add(writer, out)
            raise KeyboardInterrupt  # a run stopped after its first task

        patch.setattr(evaluation.ResultWriter, "add", one_fold)
        with pytest.raises(KeyboardInterrupt):
            evaluate(st, [old.embedding_id], heads=["shuffled-label"], jobs=1, **options)
    return st.root


@pytest.fixture(scope="module")
def api(caveat_store: Path) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from scdm.server import create_app

    with TestClient(create_app(Store(caveat_store), token=None), base_url="http://127.0.0.1:8000") as client:
        yield client


def cli_notes(store: Path, *args: str) -> list[str]:
    """The lines `scdm results ARGS` prints on stderr."""
    result = CliRunner().invoke(main, ["--store", str(store), "results", *args])
    assert result.exit_code == 0, result.output
    return result.stderr.splitlines()


def api_lines(answer: dict[str, list[str]]) -> list[str]:
    """The API's notes as the CLI prints them."""
    return [f"results: {t}" for t in answer["left_out"]] + [f"note: {t}" for t in answer["notes"]]


# (CLI options, the same filters on the API)
FILTERS = [
    ((), {"metric": "auroc,ap,f1,accuracy"}),  # the CLI's default metrics
    (("--metric", "auroc"), {"metric": "auroc"}),
    (("--metric", "ami"), {"metric": "ami"}),
    (("--head", "ridge"), {"head": "ridge", "metric": "auroc,ap,f1,accuracy"}),
    (("--head", "shuffled-label", "--metric", "mcc"), {"head": "shuffled-label", "metric": "mcc"}),
]


@pytest.mark.parametrize(("options", "query"), FILTERS)
def test_the_api_gives_the_notes_the_cli_prints_for_the_same_rows(caveat_store: Path, api: Any, options: tuple[str, ...],
                                                                   query: dict[str, str]) -> None:
    response = api.get("/api/leaderboard/notes?" + urlencode(query))
    assert response.status_code == 200, response.text
    assert api_lines(response.json()) == cli_notes(caveat_store, *options)


def test_the_store_has_each_caveat_and_a_filter_drops_those_of_rows_it_hides(api: Any) -> None:
    every = api.get("/api/leaderboard/notes?metric=auroc").json()["notes"]
    for key in ("transductive-baseline", "incomplete", "older-gene-table", "shuffled-label"):
        assert NOTES[key] in every, key
    assert [t.split(" were ")[0] for t in api.get("/api/leaderboard/notes").json()["left_out"]] == ["6 logreg tasks"]
    ridge = api.get("/api/leaderboard/notes?metric=auroc&head=ridge").json()["notes"]
    assert NOTES["incomplete"] not in ridge and NOTES["shuffled-label"] not in ridge
    assert NOTES["transductive-baseline"] in ridge


def test_a_models_leaderboard_comes_with_its_notes(caveat_store: Path, api: Any) -> None:
    from scdm.classify.metrics import METRICS

    detail = api.get("/api/models/pca").json()
    every_metric = ("--model", "pca", "--by", "all", "--metric", ",".join(METRICS))
    assert api_lines(detail) == cli_notes(caveat_store, *every_metric)
    assert NOTES["incomplete"] in detail["notes"]


def test_the_leaderboard_tab_shows_the_cli_notes_above_its_table(caveat_store: Path, api: Any) -> None:
    """The page's own loadLeaderboard, fed the server's answers, writes the CLI's note lines above the table."""
    query = "metric=auroc"
    answers = {f"/api/leaderboard?{query}": api.get(f"/api/leaderboard?{query}").json(),
               f"/api/leaderboard/notes?{query}": api.get(f"/api/leaderboard/notes?{query}").json()}
    notes_html, msg = run_page_loader("loadLeaderboard()", answers, [("metric", "auroc"), ("model", "")],
                                      read="[$('lb-notes').innerHTML, $('lb-msg').textContent]",
                                      functions=("notesHtml", "withSignedPartner", "loadLeaderboard"), constants=("LEADERBOARD_COLUMNS",))
    lines = [html.unescape(re.sub(r"<[^>]+>", "", p)) for p in re.findall(r"<p[^>]*>.*?</p>", notes_html)]
    assert lines and lines == cli_notes(caveat_store, "--metric", "auroc")
    assert msg == "3 rows"  # the table loaded beside them, no error


def test_the_page_shows_mcc_beside_ami_and_ari_as_the_cli_does(caveat_store: Path, api: Any) -> None:
    """AMI scores an inverted classifier as high as a perfect one: scdm results --metric ami prints MCC beside it;
    the page showed the AMI rows alone."""
    from scdm.classify.results import with_signed_partner

    asked = [["ami"], ["ari", "auroc"], ["auroc", "ami", "ari"], ["mcc", "ami"], ["auroc"], ["ami", "ami"]]
    assert run_page_loader("Promise.resolve()", {}, [], read=f"{json.dumps(asked)}.map(withSignedPartner)",
                           functions=("withSignedPartner",)) == [with_signed_partner(m) for m in asked]

    query = urlencode({"metric": ",".join(with_signed_partner(["ami"]))})
    answers = {f"/api/leaderboard{tail}?{query}": api.get(f"/api/leaderboard{tail}?{query}").json() for tail in ("", "/notes")}
    shown = run_page_loader("loadLeaderboard()", answers, [("metric", "ami")], read="$('lb-table').innerHTML",
                            functions=("notesHtml", "withSignedPartner", "loadLeaderboard"), constants=("LEADERBOARD_COLUMNS",))
    metrics = set(re.findall(r"<td>(ami|mcc|auroc)</td>", str(shown)))
    cli = CliRunner().invoke(main, ["--store", str(caveat_store), "results", "--metric", "ami", "--long", "--format", "json"])
    assert cli.exit_code == 0, cli.output
    assert metrics == {r["metric"] for r in json.loads(cli.stdout)} == {"ami", "mcc"}
