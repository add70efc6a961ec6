"""A password in --base-url (``http://user:pass@proxy/v1``) reaches the endpoint but never the catalog,
which ``scdm sql``, the server's SQL console and its results show to anyone who may read the store."""

from __future__ import annotations

from scdm.prompt import prompt
from scdm.prompt.backends import without_password
from scdm.store import Store

FAST = {"by": ["all"], "scenarios": ["pooled"], "folds": 2, "backoff_s": 0.01, "concurrency": 2, "silent": True}


def test_the_endpoint_is_recorded_without_its_password(marker_store: Store, llm) -> None:  # type: ignore[no-untyped-def]
    url = llm.url.replace("http://", "http://alice:hunter2@")
    summary = prompt(marker_store, ["marker"], base_url=url, model="fake-llm", **FAST)
    assert summary.n_sent > 0  # the requests went out with the URL as given
    recorded = {table: marker_store.sql(f"SELECT * FROM {table}").astype(str).to_string()
                for table in ("prompt_requests", "eval_runs", "results")}
    for table, text in recorded.items():
        assert "hunter2" not in text, table
    endpoints = set(marker_store.sql("SELECT DISTINCT endpoint FROM prompt_requests")["endpoint"])
    assert endpoints == {llm.url.replace("http://", "http://alice:***@")}


def test_urls_without_a_password_are_kept_as_given() -> None:
    for url in ("http://localhost:11434/v1", "https://user@proxy.example:8443/v1", "https://api.openai.com/v1"):
        assert without_password(url) == url
    assert without_password("https://u:p%40ss@[::1]:8000/v1") == "https://u:***@[::1]:8000/v1"
