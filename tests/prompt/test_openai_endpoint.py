"""The prompting arm end to end against a real HTTP server speaking the OpenAI protocol (loopback).

Everything goes through the official ``openai`` client: batching, parsing, scores from
log-probabilities, retries, refusals, resume after an interruption, the cache, the budget, hard
labels without scores, and the evaluation rows the heads share.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scdm.classify.results import leaderboard
from scdm.prompt import OpenAIBackend, PromptRequestError, prompt
from scdm.prompt.plan import fold_test_cells, load_cells, plan_requests
from scdm.prompt.sentences import cell_gene_lists
from scdm.prompt.templates import load_template
from scdm.store import Store
from scdm.store.errors import InputDataError
from scdm.store.prompts import ANSWER_PARSER_VERSION
from scdm.store.splits import make_splits
from tests.prompt.fake_llm import cell_genes, p_sensitive

FAST = {"by": ["all"], "scenarios": ["pooled"], "folds": 2, "backoff_s": 0.01, "concurrency": 2, "silent": True}


def run(st: Store, llm, **kw):
    args = {"base_url": llm.url, "model": "fake-llm", **FAST, **kw}
    return prompt(st, ["marker"], **args)


def answers(st: Store) -> pd.DataFrame:
    return st.query("SELECT * FROM prompt_answers")


def metrics(st: Store, run_id: str | None = None) -> pd.DataFrame:
    sql = "SELECT split_id, fold, head, model, metric, value FROM eval_results"
    frame = st.query(sql + (" WHERE run_id = ?" if run_id else ""), [run_id] if run_id else None)
    return frame.sort_values(["split_id", "fold", "metric"]).reset_index(drop=True)


def test_batches_of_ten_parsed_and_scored_from_logprobs(marker_store, llm, marker) -> None:
    st = marker_store
    summary = run(st, llm)
    bodies = llm.behaviour.bodies
    asked = [cell_genes(b["messages"][0]["content"]) for b in bodies]
    # 64 cells of 2 studies (sources): 32 per source in requests of 10, 10, 10 and 2 cells, each cell once
    assert sorted(len(a) for a in asked) == [2, 2, 10, 10, 10, 10, 10, 10]
    assert summary.n_requests == summary.n_sent == 8 and summary.n_cells == 64 and summary.n_unanswered == 0
    for body in bodies:  # decoding as documented: deterministic, JSON mode, log-probabilities
        assert body["temperature"] == 0 and body["seed"] == 0 and body["logprobs"] is True
        assert body["response_format"] == {"type": "json_object"} and body["model"] == "fake-llm"
        text = body["messages"][0]["content"]
        assert text.count("Data source: study: S") == 1 and "drug: Erlotinib" in text
    # one evaluation task per fold, shaped like every head's, on the same split as the heads
    tasks = st.query("SELECT * FROM eval_tasks")
    assert len(tasks) == 2 and set(tasks["head"]) == {"prompt-zero-shot"} and set(tasks["model"]) == {"fake-llm"}
    assert set(tasks["variant"]) == {"prompt"} and set(tasks["embedding_ids"]) == {"[]"}
    assert set(tasks["n_test"]) == {32} and tasks["flags"].isna().all()
    heads_split = make_splits(st.cells(["marker"]), scenarios=["pooled"], by=["all"], n_folds=2)[0]
    assert set(tasks["split_id"]) == {heads_split.split_id}
    # each cell's stored probability is the server's P(sensitive) for that cell's genes
    genes = cell_gene_lists(st, "marker", list(range(64)), k=10)
    preds = st.query('SELECT "row", proba, y_true FROM eval_predictions ORDER BY "row"')
    assert preds["row"].tolist() == list(range(64))
    expected = [p_sensitive(genes[r], marker) for r in range(64)]
    np.testing.assert_allclose(preds["proba"], expected, rtol=1e-6)
    # metrics come from those scores: AUROC is defined and high (the marker predicts the label)
    m = metrics(st)
    auroc = m[m["metric"] == "auroc"]["value"]
    assert auroc.notna().all() and (auroc > 0.8).all()
    board = __import__("scdm.classify.results", fromlist=["leaderboard"]).leaderboard(st)
    row = board[(board["head"] == "prompt-zero-shot") & (board["metric"] == "auroc")].iloc[0]
    assert row["model"] == "fake-llm" and row["n_folds"] == 2 and bool(row["complete"])


def test_retries_on_429_5xx_timeouts_and_unreadable_bodies(marker_store, llm) -> None:
    b = llm.behaviour
    b.fail_429, b.fail_500, b.slow, b.slow_s, b.garbage = 2, 1, 1, 1.5, 1
    summary = run(marker_store, llm, timeout_s=0.4, concurrency=1)
    assert summary.n_sent == 8 and summary.n_pending == 0
    assert len(b.bodies) == 8 + 5  # every failure was retried once more
    attempts = marker_store.query("SELECT sum(attempts - 1) AS n FROM prompt_requests")["n"].iloc[0]
    assert attempts == 5
    assert metrics(marker_store)["value"].notna().any()


def test_gives_up_after_retries_and_keeps_the_answers(marker_store, llm) -> None:
    llm.behaviour.fail_500 = 10**6
    with pytest.raises(PromptRequestError, match="failed 3 times"):
        run(marker_store, llm, retries=2, concurrency=1)
    assert len(llm.behaviour.bodies) == 3
    runs = marker_store.query("SELECT status FROM eval_runs")
    assert runs["status"].tolist() == ["failed"]


def test_refusal_stops_the_run_and_the_next_run_resumes(marker_store, llm) -> None:
    st = marker_store
    llm.behaviour.refuse_after = 3
    with pytest.raises(PromptRequestError, match="HTTP 400.*quota exceeded"):
        run(st, llm, concurrency=1)
    assert len(st.query("SELECT * FROM prompt_requests")) == 3
    llm.behaviour.reset()
    summary = run(st, llm, concurrency=1)
    assert (summary.n_cached, summary.n_sent) == (3, 5)
    assert len(llm.behaviour.bodies) == 5  # resumed at the first missing request
    assert summary.n_tasks == 2


class KilledAfter(OpenAIBackend):
    """Simulates Ctrl-C / a killed process after ``n`` answered requests."""

    def __init__(self, n: int, **kw) -> None:
        super().__init__(**kw)
        self.left = n

    def send(self, messages, n_cells):
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return super().send(messages, n_cells)


def test_resume_after_a_kill_gives_the_results_of_a_clean_run(marker_store, llm, tmp_path, symbols) -> None:
    st = marker_store
    killed = KilledAfter(3, model="fake-llm", base_url=llm.url)
    with pytest.raises(KeyboardInterrupt):
        prompt(st, ["marker"], backend=killed, **{**FAST, "concurrency": 1})
    assert len(st.query("SELECT * FROM prompt_requests")) == 3
    assert st.query("SELECT status FROM eval_runs")["status"].tolist() == ["failed"]
    llm.behaviour.reset()
    resumed = run(st, llm)
    assert (resumed.n_cached, resumed.n_sent) == (3, 5) and len(llm.behaviour.bodies) == 5
    from tests.prompt.conftest import marker_adata

    clean = Store(tmp_path / "clean")
    clean.ingest(marker_adata(symbols), name="marker", label_key="response", study_key="study", sample_key="patient",
                 tissue="lung", cancer_type="NSCLC", drug="Erlotinib", drug_type="targeted", regimen="mono")
    run(clean, llm)
    pd.testing.assert_frame_equal(metrics(st, resumed.run_id), metrics(clean))


def test_rerun_is_free_and_a_new_template_is_a_new_configuration(marker_store, llm, tmp_path) -> None:
    st = marker_store
    first = run(st, llm)
    llm.behaviour.reset()
    again = run(st, llm)
    assert llm.behaviour.bodies == [] and (again.n_cached, again.n_sent, again.n_reused, again.n_tasks) == (8, 0, 2, 0)
    pd.testing.assert_frame_equal(again.results.drop(columns=["run_id"]), first.results.drop(columns=["run_id"]))
    # dry run after the fact: everything is answered
    dry = run(st, llm, dry_run=True)
    assert (dry.n_requests, dry.n_cached, dry.n_pending) == (8, 8, 0) and llm.behaviour.bodies == []
    custom = tmp_path / "short.txt"
    custom.write_text("Source: {source}\n{cells}\nJSON only: {answer_format}")
    other = run(st, llm, template=custom)
    assert other.n_sent == 8 and other.space_id != first.space_id
    assert st.query("SELECT count(DISTINCT space_id) AS n FROM eval_tasks")["n"].iloc[0] == 2


def test_request_budget_then_continue(marker_store, llm, caplog) -> None:
    st = marker_store
    with caplog.at_level("WARNING"):
        partial = run(st, llm, max_requests=3, concurrency=1, scenarios=["cross"])
    assert (partial.n_sent, partial.n_pending) == (3, 5) and len(llm.behaviour.bodies) == 3
    assert "budget ran out" in caplog.text
    # fold 0 (study S1) is the first 4 requests: with 3 no fold is complete, and nothing half-scored is written
    assert partial.n_tasks == 0 and partial.n_pending_tasks == 2 and st.query("SELECT * FROM eval_tasks").empty
    more = run(st, llm, max_requests=1, scenarios=["cross"])
    assert (more.n_sent, more.n_tasks, more.n_pending_tasks) == (1, 1, 1)  # requests go fold by fold
    assert st.query("SELECT fold FROM eval_tasks")["fold"].tolist() == [0]
    # a result under a budget is marked incomplete (1 of 2 folds), never read as a complete mean
    from scdm.classify.results import format_leaderboard, leaderboard

    board = leaderboard(st, metrics=["auroc"])
    assert board[["folds_done", "folds_expected", "complete"]].values.tolist() == [[1, 2, False]]
    assert format_leaderboard(board, metrics=["auroc"])["folds"].tolist() == ["1/2 incomplete"]
    rest = run(st, llm, max_requests=10, scenarios=["cross"])
    assert (rest.n_cached, rest.n_sent, rest.n_tasks, rest.n_reused) == (4, 4, 1, 1) and len(llm.behaviour.bodies) == 8
    # the runs the budget cut short are recorded partial, not complete
    status = st.query("SELECT run_id, status FROM eval_runs").set_index("run_id")["status"]
    assert [status[r.run_id] for r in (partial, more, rest)] == ["partial", "partial", "complete"]
    # pooled folds are spread over all requests (their composition never follows the splits asked):
    # asked about the same cells, they are scored without a new request
    pooled = run(st, llm, max_requests=0)
    assert (pooled.n_cached, pooled.n_sent, pooled.n_pending, pooled.n_tasks) == (8, 0, 0, 2)


def test_without_logprobs_auroc_and_ap_are_null_never_from_hard_labels(marker_store, llm) -> None:
    st = marker_store
    summary = run(st, llm, logprobs=False, response_format="text")
    assert all("logprobs" not in b and "response_format" not in b for b in llm.behaviour.bodies)
    assert summary.n_unanswered == 0  # plain-text answers ("Cell 3: resistant") are read too
    m = metrics(st)
    for name in ("auroc", "ap"):
        assert m[m["metric"] == name]["value"].isna().all()
    for name in ("f1", "accuracy", "precision", "recall"):
        assert m[m["metric"] == name]["value"].notna().all()
    flags = st.query("SELECT flags FROM eval_tasks")["flags"]
    assert all("no_scores" in f.split(",") for f in flags)
    assert set(st.query("SELECT DISTINCT proba FROM eval_predictions")["proba"]) <= {0.0, 1.0}
    assert st.query("SELECT count(p_sensitive) AS n FROM prompt_answers")["n"].iloc[0] == 0


def test_structured_output_request(marker_store, llm) -> None:
    run(marker_store, llm, response_format="json_schema")
    fmt = llm.behaviour.bodies[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["properties"]["cells"]["items"]["properties"]["response"]["enum"] == [
        "sensitive", "resistant"]


def test_unreadable_and_missing_answers_are_counted_not_guessed(marker_store, llm) -> None:
    st = marker_store
    llm.behaviour.malformed = lambda text: "study: S2" in text
    llm.behaviour.omit_last = True
    summary = run(st, llm)
    stored = answers(st)
    assert (stored["status"] == "unparsed").sum() == 32  # every S2 cell
    assert (stored["status"] == "missing").sum() == 4  # the last cell of each S1 request
    assert stored.loc[stored["status"] != "ok", "label"].isna().all()
    assert summary.n_unanswered == 36
    tasks = st.query("SELECT n_test, flags FROM eval_tasks ORDER BY fold")
    # each fold tests 32 cells, 16 of S1; S1's 4 unanswered last cells fall in either fold. Scored on
    # the answered cells only, the others counted:
    assert tasks["n_test"].sum() == 32 - 4 and (tasks["n_test"] >= 12).all()
    assert tasks["flags"].tolist() == [f"unanswered={32 - n}" for n in tasks["n_test"]]
    note = leaderboard(st, metrics=["f1"])["note"].tolist()
    assert note == ["36 of 64 test cells unanswered"]  # beside the result, not only in eval_tasks.flags
    raw = st.query("SELECT status, answer_text FROM prompt_requests WHERE status = 'unparsed'")
    assert len(raw) == 4 and raw["answer_text"].str.startswith('{"cells"').all()  # the raw answer is kept


def test_no_readable_answer_skips_the_fold(marker_store, llm) -> None:
    llm.behaviour.malformed = lambda text: True
    summary = run(marker_store, llm)
    assert summary.n_tasks == 0 and summary.n_skipped == 2
    reasons = marker_store.query("SELECT reason FROM skipped_tasks")["reason"]
    assert all(r.startswith("no test cell got a readable answer (32 unparsed)") for r in reasons)


def test_few_shot_examples_come_from_the_training_side_only(marker_store, llm) -> None:
    st = marker_store
    splits = make_splits(st.cells(["marker"]), scenarios=["pooled", "cross"], by=["all"], n_folds=4)
    table = load_cells(st, [st.dataset("marker").dataset_id], label_set=None, top_k=10)
    backend = OpenAIBackend("fake-llm", base_url=llm.url)
    plan = plan_requests(splits, table, template=load_template(), backend=backend, top_k=10, cells_per_request=10,
                         shots=4, seed=0)
    assert len(plan.examples) == 4 + 2  # every evaluated fold of both splits
    for split in splits:
        for fold in split.folds:
            examples = plan.examples[(split.split_id, fold)]
            test = set(fold_test_cells(split, fold))
            assert len(examples) == 4 and not test & set(examples)
            assert sorted(table.response(c) for c in examples) == [0, 0, 1, 1]  # balanced
            if split.scenario == "cross":  # the held-out study is never shown
                held_out = split.fold_labels[fold]
                assert all(table.source(c).split(";")[0] != f"study: {held_out}" for c in examples)
    for request in plan.requests:
        assert not set(request.examples) & set(request.cells)
        assert request.text.count("Example ") == 4 and " -> sensitive" in request.text
    backend.close()
    summary = run(st, llm, shots=4)
    assert summary.head == "prompt-4-shot" and summary.n_tasks == 2
    tasks = st.query("SELECT DISTINCT head, n_train, head_params FROM eval_tasks")
    assert tasks["head"].tolist() == ["prompt-4-shot"] and tasks["n_train"].tolist() == [4]
    assert json.loads(tasks["head_params"].iloc[0]) == {"answer_parser": ANSWER_PARSER_VERSION, "seed": 0, "shots": 4}


def test_dry_run_counts_and_sends_nothing(marker_store, llm) -> None:
    st = marker_store
    dry = run(st, llm, dry_run=True, show_prompts=2)
    assert llm.behaviour.bodies == [] and (dry.n_requests, dry.n_pending, dry.run_id) == (8, 8, None)
    assert len(dry.prompts) == 2 and dry.prompts[0].count("\nCell ") == 10
    assert dry.prompt_tokens > 8 * 100 and dry.completion_tokens == sum(12 * n + 8 for n in (10, 10, 10, 2) * 2)
    for table in ("prompt_requests", "eval_tasks", "eval_runs", "splits"):
        assert st.query(f"SELECT count(*) AS n FROM {table}")["n"].iloc[0] == 0


def test_clear_errors(marker_store, llm, monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(InputDataError, match="No API key"):
        prompt(marker_store, ["marker"], model="gpt-4o-mini")
    with pytest.raises(InputDataError, match="--model is required"):
        prompt(marker_store, ["marker"], base_url=llm.url)
    with pytest.raises(InputDataError, match="--dataset"):
        prompt(marker_store, [], base_url=llm.url, model="x")
    with pytest.raises(InputDataError, match="concurrency"):
        run(marker_store, llm, concurrency=0)
    with pytest.raises(InputDataError, match="No category 'brain'"):
        run(marker_store, llm, by=["tissue"], category="brain")
    no_examples = tmp_path / "t.txt"
    no_examples.write_text("{cells}")
    with pytest.raises(InputDataError, match="needs a template with an \\{examples\\}"):
        run(marker_store, llm, shots=2, template=no_examples)
    assert llm.behaviour.bodies == []


def test_a_cell_that_lists_no_gene_is_refused_unless_allowed(tmp_path, symbols, llm) -> None:
    # a labelled cell with no expression was sent as an empty "Cell 5: " line and the model's answer for it
    # (proba 0.1 from the fake server) was scored in eval_predictions and AUROC, where scdm embed refuses such cells
    import scipy.sparse as sp

    from tests.prompt.conftest import marker_adata

    adata = marker_adata(symbols)
    x = adata.X.toarray()
    x[5] = 0
    adata.X = sp.csr_matrix(x)
    st = Store(tmp_path / "store")
    with pytest.warns(UserWarning, match="no expression at all"):
        st.ingest(adata, name="marker", label_key="response", study_key="study", sample_key="patient")
    with pytest.raises(InputDataError, match=r"1 labelled cells express no gene with a symbol \(dataset 'marker' rows 5 "
                                             r"\(1 in all\)\).*--allow-empty-cells"):
        run(st, llm)
    assert llm.behaviour.bodies == [] and answers(st).empty
    summary = run(st, llm, allow_empty_cells=True)
    assert summary.n_cells == 64
    assert st.query('SELECT count(*) AS n FROM eval_predictions WHERE "row" = 5')["n"].iloc[0] == 1  # its test fold
