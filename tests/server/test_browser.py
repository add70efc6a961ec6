"""The web page in headless Chromium (Selenium) against a real ``scdm serve`` (uvicorn) process.

The store is the one the API tests use (a pca baseline, a 3-fold ridge evaluation, a trained ridge
head) plus its report, written with ``scdm.classify.report.write_report``. Every test logs the
browser in (the server runs with a token), drives one part of the page and saves a screenshot
into a folder it prints (and into ``$SCDM_TEST_ARTIFACTS/browser`` when that is set). The page runs
under the server's Content-Security-Policy (no inline script): a violation is a console error, and
every test fails on console errors.

Without Chromium and ChromeDriver (Debian: ``apt-get install chromium chromium-driver``) the tests
are skipped, unless ``SCDM_REQUIRE_BROWSER=1`` (CI sets it): then they fail.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pandas as pd
import pytest

from tests.server.conftest import TOKEN, Server

REQUIRE_BROWSER = os.environ.get("SCDM_REQUIRE_BROWSER") == "1"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--window-size=1400,1000")
WAIT_S = 30.0
"""Longest explicit wait; generous because the 2-core CI box runs other tests beside these."""


def _missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install -e '.[test]')"
    if not any(shutil.which(name) for name in CHROMIUM_NAMES):
        return "no Chromium found (Debian/Ubuntu: apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver found (Debian/Ubuntu: apt-get install chromium-driver)"
    return None


def _skip_or_fail(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"Browser tests required (SCDM_REQUIRE_BROWSER=1) but {reason}.")
    pytest.skip(f"browser tests skipped: {reason}; set SCDM_REQUIRE_BROWSER=1 to make this a failure")


@dataclass
class Screenshots:
    """Where screenshots go: the test's temp folder and, when set, ``$SCDM_TEST_ARTIFACTS/browser``."""

    folders: list[Path]

    def save(self, driver: Any, name: str) -> None:
        for folder in self.folders:
            assert driver.save_screenshot(str(folder / f"{name}.png")), f"screenshot {name} failed"


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
    folders = [tmp_path_factory.mktemp("screenshots")]
    if os.environ.get("SCDM_TEST_ARTIFACTS"):
        folders.append(Path(os.environ["SCDM_TEST_ARTIFACTS"]) / "browser")
        folders[-1].mkdir(parents=True, exist_ok=True)
    print(f"browser screenshots: {', '.join(map(str, folders))}")
    return Screenshots(folders)


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    reason = _missing_browser()
    if reason:
        _skip_or_fail(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n))
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    # a fresh profile: no state from a desktop browser or an earlier run
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    browser.set_page_load_timeout(WAIT_S)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def site(server: Server) -> Server:
    """The module's server, with the report written into its store (PCA projection: no UMAP compile)."""
    from scdm.classify.report import write_report

    write_report(server.store, server.store / "artifacts" / "report", projection="pca", dpi=60)
    return server


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str, *, timeout: float = WAIT_S) -> Any:
    """Wait until ``condition(driver)`` is truthy and return its value; fail naming ``what``."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, f"timed out waiting for {what}")


def text_of(driver: Any, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def body_rows(driver: Any, container_id: str) -> list[list[str]]:
    """The cell texts of the table inside ``container_id`` (one JS call: no stale elements)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#' + arguments[0] + ' tbody tr')].map(tr => [...tr.cells].map(td => td.textContent));",
        container_id)


def header_texts(driver: Any, container_id: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#' + arguments[0] + ' thead th')].map(th => th.textContent);", container_id)


def javascript_errors(driver: Any) -> list[str]:
    """Uncaught exceptions and console errors of the page since the last call (network 4xx are expected)."""
    get_log = getattr(driver, "get_log", None)
    if get_log is None:
        return []
    return [e["message"] for e in get_log("browser") if e.get("level") == "SEVERE" and e.get("source") != "network"]


@pytest.fixture
def page(driver: Any, site: Server, screenshots: Screenshots, request: pytest.FixtureRequest) -> Iterator[Callable[[str], None]]:
    """Log in (``/?token=`` sets the cookie), then ``page(tab)`` opens that tab; checks for JS errors after."""
    driver.get(f"{site.url}?token={TOKEN}")
    wait_for(driver, lambda d: d.find_elements("css selector", "#lb-table table, #lb-table p"), "the leaderboard")
    javascript_errors(driver)

    def open_tab(tab: str) -> None:
        driver.find_element("css selector", f'nav a[data-tab="{tab}"]').click()
        wait_for(driver, lambda d: "on" in d.find_element("id", tab).get_attribute("class").split(), f"tab {tab}")

    yield open_tab
    screenshots.save(driver, request.node.name)
    errors = javascript_errors(driver)
    assert not errors, f"JavaScript errors on the page: {errors}"


def set_filter(driver: Any, name: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    field = driver.find_element("css selector", f'#lb-form [name="{name}"]')
    if field.tag_name == "select":
        # "any"/"all" carry value ""; the other options are named by their text
        if value:
            Select(field).select_by_visible_text(value)
        else:
            Select(field).select_by_value("")
    else:
        field.clear()
        field.send_keys(value)


def apply_filters(driver: Any, site: Server, **filters: str) -> list[list[str]]:
    """Set the filter form, submit it and wait until the table holds what the API answers for it."""
    for name, value in filters.items():
        set_filter(driver, name, value)
    # what the page sends: the form's non-empty fields
    fields = driver.execute_script("return [...new FormData(document.getElementById('lb-form'))];")
    status, expected = site.json("GET", "/api/leaderboard?" + urlencode([(k, v) for k, v in fields if v]))
    assert status == 200
    driver.find_element("css selector", "#lb-form button[type=submit]").click()
    want = f"{len(expected)} row" + ("" if len(expected) == 1 else "s")
    wait_for(driver, lambda d: text_of(d, "lb-msg") == want, f"the leaderboard message {want!r}")
    return body_rows(driver, "lb-table") if expected else []


def test_leaderboard_loads_and_filters(page: Callable[[str], None], driver: Any, site: Server) -> None:
    _, auroc = site.json("GET", "/api/leaderboard?metric=auroc")
    assert len(auroc) == 2  # category all and tissue=skin
    wait_for(driver, lambda d: text_of(d, "lb-msg") == "2 rows", "2 rows")
    columns = header_texts(driver, "lb-table")
    rows = body_rows(driver, "lb-table")
    assert {r[columns.index("category")] for r in rows} == {"all", "skin"}
    assert all(r[columns.index("model")] == "pca" and r[columns.index("head")] == "ridge" for r in rows)
    assert {r[columns.index("mean")] for r in rows} == {f"{row['mean']:.3f}" for row in auroc}

    rows = apply_filters(driver, site, category_type="tissue")
    assert [r[columns.index("category")] for r in rows] == ["skin"]
    rows = apply_filters(driver, site, metric="")  # all metrics of tissue=skin
    assert len(rows) > 2 and {r[columns.index("metric")] for r in rows} >= {"auroc", "f1", "ap", "accuracy"}
    assert apply_filters(driver, site, head="logreg") == []
    assert "(no rows)" in text_of(driver, "lb-table")
    rows = apply_filters(driver, site, head="ridge", model="pca", category_type="")
    assert len(rows) > 2 and {r[columns.index("category")] for r in rows} == {"all", "skin"}


@pytest.fixture(scope="module")
def small_pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app with pages of 5 rows (shorter than its 22-row leaderboard of every metric), served by
    uvicorn in a thread over a store of its own; its URL."""
    import socket
    import threading
    import time

    import uvicorn

    from scdm.server import create_app
    from scdm.store import Store
    from tests.server.conftest import build_store

    path = tmp_path_factory.mktemp("pages") / "store"
    build_store(path)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    app = create_app(Store(path), token=TOKEN, page_rows=5)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    assert server.started, "the small-page server did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_a_leaderboard_longer_than_a_page_says_so(driver: Any, small_pages: str) -> None:
    # the API answers one page (X-Total-Count: all rows); "5 rows" would read as the whole leaderboard
    driver.get(f"{small_pages}/?token={TOKEN}")
    wait_for(driver, lambda d: d.find_elements("css selector", "#lb-table table, #lb-table p"), "the leaderboard")
    javascript_errors(driver)
    set_filter(driver, "metric", "")  # every metric: 22 rows
    driver.find_element("css selector", "#lb-form button[type=submit]").click()
    wait_for(driver, lambda d: "of 22 rows" in text_of(d, "lb-msg"), "the count of every row")
    assert text_of(driver, "lb-msg").startswith("5 of 22 rows shown") and len(body_rows(driver, "lb-table")) == 5
    set_filter(driver, "metric", "auroc")  # 2 rows: one page
    driver.find_element("css selector", "#lb-form button[type=submit]").click()
    wait_for(driver, lambda d: text_of(d, "lb-msg") == "2 rows", "2 rows")
    assert not javascript_errors(driver)


def test_leaderboard_shows_the_dataset_and_label_set_columns(page: Callable[[str], None], driver: Any, site: Server) -> None:
    rows = apply_filters(driver, site, metric="auroc", dataset="a375")
    columns = header_texts(driver, "lb-table")
    assert {"datasets", "label_set", "k", "seed", "folds_done", "folds_expected", "complete"} <= set(columns)
    assert len(rows) == 2 and {r[columns.index("datasets")] for r in rows} == {"a375"}
    assert {r[columns.index("label_set")] for r in rows} == {"response_PLX4720"}
    assert {r[columns.index("complete")] for r in rows} == {"true"}
    assert apply_filters(driver, site, dataset="nosuchdataset") == []


def test_a_misspelled_filter_shows_the_allowed_values(page: Callable[[str], None], driver: Any, site: Server) -> None:
    set_filter(driver, "head", "rdge")
    driver.find_element("css selector", "#lb-form button[type=submit]").click()
    error = wait_for(driver, lambda d: d.find_elements("css selector", "#lb-msg .err"), "the error message")[0]
    assert error.text.startswith("head='rdge': Input should be") and "'ridge'" in error.text and "'logreg'" in error.text
    assert error.value_of_css_property("color") == "rgba(187, 0, 0, 1)"
    assert driver.find_element("id", "lb-table").text == ""
    assert apply_filters(driver, site, head="ridge")  # fixed, the table is back


def test_the_policy_blocks_inline_script_and_the_page_still_works(page: Callable[[str], None], driver: Any,
                                                                  site: Server) -> None:
    page("sql")
    blocked = driver.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.__inline = 1;';"
        "document.body.appendChild(s); return window.__inline === undefined;")
    assert blocked
    errors = javascript_errors(driver)
    assert errors and all("Content Security Policy" in e for e in errors)
    run_sql(driver, "SELECT 41 + 1 AS answer")
    assert body_rows(driver, "sql-table") == [["42"]]


def test_leaderboard_sorts_by_a_column(page: Callable[[str], None], driver: Any, site: Server) -> None:
    rows = apply_filters(driver, site, metric="")
    columns = header_texts(driver, "lb-table")
    col = columns.index("mean")

    def sort_by_mean() -> list[float]:
        driver.find_element("css selector", '#lb-table th[data-k="mean"]').click()
        return [float(r[col]) if r[col] else float("nan") for r in body_rows(driver, "lb-table")]

    ascending = sort_by_mean()
    assert header_texts(driver, "lb-table")[col] == "mean ▲"
    present = [v for v in ascending if not math.isnan(v)]
    assert present == sorted(present) and len(ascending) == len(rows)
    assert present[0] < present[-1]  # the metrics differ, so the order is visible
    descending = sort_by_mean()
    assert header_texts(driver, "lb-table")[col] == "mean ▼"
    assert [v for v in descending if not math.isnan(v)] == sorted(present, reverse=True)
    driver.find_element("css selector", '#lb-table th[data-k="metric"]').click()
    metrics = [r[columns.index("metric")] for r in body_rows(driver, "lb-table")]
    assert metrics == sorted(metrics)


def test_report_figure_opens(page: Callable[[str], None], driver: Any, site: Server) -> None:
    page("figures")
    names = wait_for(driver, lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('#fig-list img')];"
        "return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.map(i => i.alt) : null;"),
        "every report figure to render")
    assert "overview_bars" in names and "scalability" in names
    assert any(n.startswith("radar_") for n in names) and any(n.startswith("projection_") for n in names)
    radar = next(n for n in names if n.startswith("radar_"))
    driver.find_element("css selector", f'#fig-list img[alt="{radar}"]').click()
    width = wait_for(driver, lambda d: d.execute_script(
        "const v = document.getElementById('fig-view'), i = document.getElementById('fig-view-img');"
        "return !v.hidden && i.complete && i.naturalWidth;"), "the opened figure")
    assert width > 100 and driver.find_element("id", "fig-view-img").is_displayed()
    assert text_of(driver, "fig-view-name") == radar.replace("_", " ")
    assert driver.find_element("id", "fig-view-svg").get_attribute("href").endswith(f"/report/figures/{radar}.svg")
    assert driver.find_element("id", "fig-report").is_displayed()


def test_figures_say_no_report_only_when_there_is_none(page: Callable[[str], None], driver: Any, site: Server) -> None:
    report = site.store / "artifacts" / "report"
    hidden = report.with_name("report.away")
    report.rename(hidden)
    try:
        page("figures")
        wait_for(driver, lambda d: "No report yet" in text_of(d, "fig-list"), "the no-report message")
        assert str(report.resolve()) in text_of(driver, "fig-list") and not driver.find_element("id", "fig-report").is_displayed()
        # a report without figures (a store without results) is a report: no "No report yet"
        report.mkdir()
        (report / "index.html").write_text("<html><body>no results</body></html>")
        page("leaderboard")
        page("figures")
        wait_for(driver, lambda d: "has no figures" in text_of(d, "fig-list"), "the no-figures message")
        assert "No report yet" not in text_of(driver, "fig-list") and driver.find_element("id", "fig-report").is_displayed()
    finally:
        import shutil

        shutil.rmtree(report, ignore_errors=True)
        hidden.rename(report)
    page("leaderboard")
    page("figures")
    wait_for(driver, lambda d: d.find_elements("css selector", "#fig-list img"), "the figures again")
    assert "No report yet" not in text_of(driver, "fig-list")


def test_model_page(page: Callable[[str], None], driver: Any, site: Server) -> None:
    page("models")
    wait_for(driver, lambda d: d.find_elements("css selector", '#model-list button[data-m="pca"]'), "the model list")
    driver.find_element("css selector", '#model-list button[data-m="pca"]').click()
    wait_for(driver, lambda d: text_of(d, "model-name") == "pca" and body_rows(d, "mh"), "the pca page")
    assert body_rows(driver, "me")[0][0] == site.info["embedding_id"]
    assert body_rows(driver, "mh")[0][0] == site.info["head_id"]
    assert {r[header_texts(driver, "ml").index("metric")] for r in body_rows(driver, "ml")} >= {"auroc", "f1"}


def test_runs_tab(page: Callable[[str], None], driver: Any, site: Server) -> None:
    page("runs")
    wait_for(driver, lambda d: body_rows(d, "runs-table"), "the runs table")
    header = header_texts(driver, "runs-table")
    rows = body_rows(driver, "runs-table")  # the site's store: its evaluation run, complete
    assert all(row[header.index("state")] == "complete" for row in rows)
    assert "evaluate" in {row[header.index("kind")] for row in rows}
    assert all(row[header.index("finished")] >= row[header.index("started")] != "" for row in rows)
    assert text_of(driver, "runs-msg").endswith(f"{len(rows)} complete")


def run_sql(driver: Any, query: str, *, keyboard: bool = False) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("id", "sql-text")
    box.clear()
    box.send_keys(query)
    driver.execute_script("document.getElementById('sql-msg').textContent = '';")
    if keyboard:
        box.send_keys(Keys.CONTROL, Keys.ENTER)
    else:
        driver.find_element("id", "sql-run").click()
    wait_for(driver, lambda d: text_of(d, "sql-msg") not in ("", "running..."), "the SQL answer")


def test_sql_console_runs_reads_and_refuses_writes(page: Callable[[str], None], driver: Any, site: Server,
                                                   screenshots: Screenshots) -> None:
    page("sql")
    query = "SELECT metric, count(*) AS n FROM eval_results GROUP BY metric ORDER BY metric"
    run_sql(driver, query)
    _, expected = site.json("POST", "/api/sql", {"query": query})
    assert header_texts(driver, "sql-table") == ["metric", "n"]
    assert body_rows(driver, "sql-table") == [[r["metric"], str(r["n"])] for r in expected["rows"]]
    assert text_of(driver, "sql-msg").startswith(f"{expected['n_rows']} rows in ")

    run_sql(driver, "DELETE FROM datasets", keyboard=True)
    error = driver.find_element("css selector", "#sql-msg .err")
    assert error.is_displayed() and error.value_of_css_property("color") == "rgba(187, 0, 0, 1)"
    assert "Only read queries are allowed" in error.text and "DELETE" in error.text
    screenshots.save(driver, "sql_write_refused")
    assert driver.find_element("id", "sql-table").text == ""
    assert len(site.json("GET", "/api/datasets")[1]) >= 1  # nothing was deleted

    run_sql(driver, "SELECT * FROM no_such_table")
    assert "no_such_table" in driver.find_element("css selector", "#sql-msg .err").text


def test_prediction_form_shows_results_and_csv(page: Callable[[str], None], driver: Any, site: Server) -> None:
    from selenium.webdriver.support.ui import Select

    page("predict")
    head_id = site.info["head_id"]
    wait_for(driver, lambda d: d.find_elements("css selector", f'#pred-head option[value="{head_id}"]'), "the head list")
    Select(driver.find_element("id", "pred-head")).select_by_value(head_id)
    Select(driver.find_element("id", "pred-dataset")).select_by_visible_text("a375")
    driver.find_element("id", "pred-submit").click()
    wait_for(driver, lambda d: d.find_element("id", "pred-csv").is_displayed() and body_rows(d, "pred-table"),
             "the prediction table")
    _, stored = site.json("GET", f"/api/predictions?head_id={head_id}&dataset=a375")
    assert len(stored) == 108
    assert text_of(driver, "pred-msg").startswith(f"108 cells, {sum(r['label'] for r in stored)} predicted sensitive")
    assert driver.find_element("id", "pred-progress").get_attribute("value") == "1"
    columns = header_texts(driver, "pred-table")
    assert columns == ["cell_id", "proba", "label", "response", "label_set", "trained_on"]
    # the head was fitted on these 108 cells: the page says so, as scdm predict does, beside the numbers
    assert "108 of them trained the head" in text_of(driver, "pred-msg")
    notes = driver.find_elements("css selector", "#pred-notes .note")
    assert any("108 of the 108 cells of a375 trained head" in n.text and n.is_displayed() for n in notes)
    shown = body_rows(driver, "pred-table")
    assert [r[0] for r in shown] == [r["cell_id"] for r in stored]
    assert [float(r[1]) for r in shown] == pytest.approx([r["proba"] for r in stored], abs=5e-4)
    assert [r[2] for r in shown] == [str(r["label"]) for r in stored]
    assert [r[4] for r in shown] == [r["label_set"] for r in stored]  # the drug the head learned
    assert [r[5] for r in shown] == ["true"] * 108 and all(r["trained_on"] for r in stored)

    link = driver.find_element("id", "pred-csv")
    assert link.get_attribute("download") is not None and "/api/predictions.csv?" in link.get_attribute("href")
    # the link downloads through the page's login cookie, as a click would
    csv = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(document.getElementById('pred-csv').href).then(r => r.text().then(t => done([r.status, t])));")
    assert csv[0] == 200
    frame = pd.read_csv(io.StringIO(csv[1]))
    assert len(frame) == 108 and list(frame["cell_id"]) == [r["cell_id"] for r in stored]


def test_jobs_tab_shows_an_uploads_warnings_as_scdm_ingest_prints_them(page: Callable[[str], None], driver: Any,
                                                                      site: Server, tmp_path: Path) -> None:
    from tests.server.test_job_warnings import unlogged_a375

    file = unlogged_a375(tmp_path / "unlogged_page.h5ad")
    status, _, body = site.request("POST", "/api/upload?filename=unlogged_page.h5ad&label_key=response_PLX4720",
                                   file.read_bytes(), headers={"Content-Type": "application/octet-stream"})
    assert status == 202, body
    job = site.wait_job(json.loads(body)["job_id"])
    assert job["state"] == "done" and any("are not logged" in w for w in job["warnings"]), job

    page("jobs")
    selector = f'#jobs-list .job[data-job="{job["job_id"]}"]'
    wait_for(driver, lambda d: d.find_elements("css selector", selector), "the upload job")
    shown = [n.text for n in driver.find_elements("css selector", f"{selector} .note")]
    assert shown == job["warnings"]
    assert "done" in driver.find_element("css selector", f"{selector} .state").text


def _job_state(driver: Any, job_id: str) -> str | None:
    """A job's state on the Jobs tab, read in one JS call: the tab redraws its list each second, so an element
    found first and read after can be gone (a stale element reference)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : null;",
        f'#jobs-list .job[data-job="{job_id}"] .state')


def test_jobs_tab_follows_a_running_job_until_it_ends(page: Callable[[str], None], driver: Any, site: Server) -> None:
    # a job listed while it ran kept reading 'running' on the tab until the user thought of reloading it
    # a report can end before a loaded machine has drawn the page: a job first seen done shows no following, so
    # another is asked for (each try is a few seconds of report)
    for _ in range(3):
        status, job = site.json("POST", "/api/report", {"projection": "pca"})
        assert status == 202
        page("jobs")
        first = wait_for(driver, lambda d: _job_state(d, job["job_id"]), "the report job")
        if first != "done":
            break
        assert site.wait_job(job["job_id"], timeout=120)["state"] == "done"
    assert first in ("queued", "running"), "three report jobs ended before the page listed them"
    assert site.wait_job(job["job_id"], timeout=120)["state"] == "done"
    wait_for(driver, lambda d: _job_state(d, job["job_id"]) == "done", "the job to read done")


def test_prediction_table_cut_to_its_first_rows_says_so(page: Callable[[str], None], driver: Any, site: Server) -> None:
    # before: the table fetched 200 rows and said nothing, so sorting it by proba ranked the first 200 cells only
    from selenium.webdriver.support.ui import Select

    page("predict")
    head_id = site.info["head_id"]
    wait_for(driver, lambda d: d.find_elements("css selector", f'#pred-head option[value="{head_id}"]'), "the head list")
    driver.execute_script("PRED_ROWS = 50;")  # a375 has 108 cells: the page's cut of 200, made smaller
    Select(driver.find_element("id", "pred-head")).select_by_value(head_id)
    Select(driver.find_element("id", "pred-dataset")).select_by_visible_text("a375")
    driver.find_element("id", "pred-submit").click()
    wait_for(driver, lambda d: d.find_element("id", "pred-csv").is_displayed() and body_rows(d, "pred-table"),
             "the prediction table")
    assert len(body_rows(driver, "pred-table")) == 50
    notes = [n.text for n in driver.find_elements("css selector", "#pred-notes .note")]
    assert any("first 50 of 108 cells" in n and "CSV holds all 108" in n for n in notes)


def test_token_is_asked_for_and_accepted(driver: Any, site: Server, screenshots: Screenshots) -> None:
    driver.delete_all_cookies()
    driver.get(site.url)
    box = wait_for(driver, lambda d: d.find_elements("id", "login-token"), "the login form")[0]
    assert "needs its token" in driver.find_element("tag name", "h2").text
    assert not driver.find_elements("id", "lb-table")
    box.send_keys("not-the-token-123")
    box.submit()
    wait_for(driver, lambda d: d.find_elements("id", "login-msg"), "the wrong-token message")
    assert "Wrong token" in text_of(driver, "login-msg")
    screenshots.save(driver, "login_wrong_token")
    driver.find_element("id", "login-token").send_keys(TOKEN)
    driver.find_element("css selector", "#login-form button").click()
    wait_for(driver, lambda d: d.find_elements("id", "lb-msg") and text_of(d, "lb-msg") == "2 rows", "the leaderboard")
    assert driver.current_url.removesuffix("#leaderboard") == site.url  # the token is not left in the address bar
    cookies = {c["name"]: c for c in driver.get_cookies()}
    assert cookies["scdm_session"]["httpOnly"] is True and cookies["scdm_session"]["sameSite"] == "Strict"
    assert TOKEN not in cookies["scdm_session"]["value"]  # a session value derived from the token, not the token
    assert driver.execute_script("return document.cookie;") == ""  # page scripts cannot read it
    screenshots.save(driver, "login_accepted")
    driver.delete_all_cookies()
    driver.get(f"{site.url}?token=wrong-token-999")
    wait_for(driver, lambda d: d.find_elements("id", "login-msg"), "the login form after a wrong link")
    assert javascript_errors(driver) == []


@pytest.mark.slow
def test_generate_report_button(page: Callable[[str], None], driver: Any, site: Server) -> None:
    page("figures")
    driver.find_element("id", "fig-make").click()
    wait_for(driver, lambda d: text_of(d, "fig-msg") == "report ready" or d.find_elements("css selector", "#fig-msg .err"),
             "the report job", timeout=240)
    assert text_of(driver, "fig-msg") == "report ready"
    wait_for(driver, lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('#fig-list img')];"
        "return imgs.length > 3 && imgs.every(i => i.complete && i.naturalWidth > 0);"), "the new figures")


def test_docs_renders_the_operations_from_files_of_this_server(driver: Any, site: Server, screenshots: Screenshots) -> None:
    """/docs: Swagger UI from the server's own files (no CDN, no network) under the page's CSP."""
    driver.get(f"{site.url}?token={TOKEN}")  # the session cookie
    wait_for(driver, lambda d: d.find_elements("id", "lb-msg"), "the page")
    javascript_errors(driver)
    driver.get(f"{site.url.rstrip('/')}/docs")
    wait_for(driver, lambda d: len(d.find_elements("css selector", ".opblock .opblock-summary-path")) > 10,
             "the operations list of Swagger UI")
    paths = driver.execute_script(
        "return [...document.querySelectorAll('.opblock .opblock-summary-path')].map(e => e.textContent.replace(/\\u200b/g, ''));")
    assert {"/api/datasets", "/api/leaderboard", "/api/sql", "/api/upload"} <= set(paths)
    assert "scdm serve" in driver.find_element("css selector", ".information-container .title").text
    origin = site.url.rstrip("/")
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert any("/static/swagger-ui/swagger-ui-bundle.js" in u for u in loaded) and any("/openapi.json" in u for u in loaded)
    assert all(u.startswith(origin + "/") for u in loaded), loaded  # nothing from another origin
    screenshots.save(driver, "docs")
    assert javascript_errors(driver) == []
