"""What an attacker tries against a loopback ``scdm serve``: CSRF, DNS rebinding, the cookie, hostile bodies.

Most checks run against a real uvicorn process (headers exactly as sent); a few through the TestClient.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from scdm.server.security import CSP
from tests.server.conftest import ROOT, TOKEN, Server, server_at, start_server, stop_server


@pytest.fixture(scope="module")
def open_server(built_store: tuple[Path, dict[str, str]]) -> Iterator[Server]:
    """A real server without a token (the case the CSRF and rebinding attacks aim at)."""
    path, info = built_store
    proc, url = start_server(path, token=None, extra=["--allowed-host", "scdm.example.org"],
                             log=path.with_name("open.serve.log"))
    yield server_at(url, None, path, info)
    stop_server(proc)


def _jobs(server: Server) -> list[dict[str, Any]]:
    status, jobs = server.json("GET", "/api/jobs")
    assert status == 200
    return jobs


# --------------------------------------------------------------------------------------------
# CSRF: no simple-request POSTs, no cross-origin writes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_cross_origin_simple_post_is_refused_and_runs_nothing(open_server: Server, content_type: str | None) -> None:
    """What a foreign page can send without a CORS preflight: text/plain, form or multipart bodies."""
    before = _jobs(open_server)
    uploads = sorted(open_server.store.glob("uploads/**/*"))
    predict = json.dumps({"head_id": open_server.info["head_id"], "dataset": "a375"}).encode()
    for path, body in (("/api/jobs/predict", predict), ("/api/upload?filename=evil.h5ad&study=%3Cb%3Ex%3C%2Fb%3E", b"\x89HDF" * 64),
                       ("/api/report", b"{}"), ("/api/sql", b'{"query": "SELECT 1"}')):
        headers = {"Origin": "http://evil.example"} | ({"Content-Type": content_type} if content_type else {})
        status, _, answer = open_server.request("POST", path, body, headers=headers)
        assert status in (403, 415), (path, status)
        # the same request from no origin at all (a script) is still refused for its content type
        headers.pop("Origin")
        status, _, answer = open_server.request("POST", path, body, headers=headers)
        assert status == 415 and "application/json" in json.loads(answer)["error"], path
    assert _jobs(open_server) == before and sorted(open_server.store.glob("uploads/**/*")) == uploads


def test_a_cross_origin_json_post_is_refused(open_server: Server) -> None:
    before = _jobs(open_server)
    body = {"head_id": open_server.info["head_id"], "dataset": "a375"}
    for header in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Referer": "http://evil.example/page.html"},
                   {"Origin": f"http://localhost:{open_server.port + 1}"}):  # another port is another origin
        status, _, answer = open_server.request("POST", "/api/jobs/predict", body, headers=header)
        assert status == 403 and "Cross-origin request refused" in json.loads(answer)["error"], header
    assert _jobs(open_server) == before
    # the page itself (same origin) and a proxy name the server was told about are fine
    same = {"Origin": f"http://{open_server.host}:{open_server.port}"}
    assert open_server.json("POST", "/api/sql", {"query": "SELECT 1 AS x"}, headers=same)[0] == 200
    proxied = {"Origin": "https://scdm.example.org", "Host": "scdm.example.org"}
    assert open_server.json("POST", "/api/sql", {"query": "SELECT 1 AS x"}, headers=proxied)[0] == 200


# --------------------------------------------------------------------------------------------
# DNS rebinding: the Host allow-list
# --------------------------------------------------------------------------------------------
def test_a_foreign_host_is_refused_on_every_route(open_server: Server) -> None:
    for path in ("/", "/api/datasets", "/api/sql", "/openapi.json", "/static/scdm.js", "/nowhere"):
        for host in ("evil.example", f"evil.example:{open_server.port}", "127.0.0.1.evil.example", "attacker.scdm.example.org.evil"):
            status, headers, body = open_server.request("GET", path, headers={"Host": host})
            assert status == 400, (path, host)
            assert "--allowed-host" in json.loads(body)["error"] and headers["x-content-type-options"] == "nosniff"
    for host in (f"127.0.0.1:{open_server.port}", f"localhost:{open_server.port}", "scdm.example.org", "SCDM.example.org:443"):
        assert open_server.request("GET", "/api/health", headers={"Host": host})[0] == 200, host


def test_the_allow_list_patterns(tmp_path: Path) -> None:
    from scdm.server.security import SecurityPolicy

    policy = SecurityPolicy(None, b"k", ("*.lab.example.org", "scdm.example.org"), "10.0.0.5")
    assert policy.host_allowed("[::1]:8000") and policy.host_allowed("LOCALHOST") and policy.host_allowed("10.0.0.5:80")
    assert policy.host_allowed("a.lab.example.org") and policy.host_allowed("scdm.example.org:8443")
    assert not policy.host_allowed("lab.example.org.evil") and not policy.host_allowed("evillab.example.org")
    assert not policy.host_allowed(None) and not policy.host_allowed("") and not policy.host_allowed("10.0.0.6")
    assert SecurityPolicy(None, b"k", ("*",)).host_allowed("anything.example")
    assert not SecurityPolicy(None, b"k", (), "0.0.0.0").host_allowed("0.0.0.0:8000")  # every interface is no name


# --------------------------------------------------------------------------------------------
# the token and the cookie
# --------------------------------------------------------------------------------------------
def test_the_cookie_holds_a_session_value_not_the_token(server: Server) -> None:
    status, headers, _ = server.request("POST", "/login", f"token={TOKEN}".encode(), token=None,
                                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 303
    cookie = headers["set-cookie"]
    name, value = cookie.split(";")[0].split("=", 1)
    assert name == "scdm_session" and TOKEN not in cookie and re.fullmatch(r"[0-9a-f]{64}", value)
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {part.strip() for part in cookie.split(";")}
    assert server.request("GET", "/api/datasets", token=None, headers={"Cookie": f"scdm_session={value}"})[0] == 200
    # the token itself in the cookie, or a tampered value, is not a session
    for forged in (TOKEN, value[:-1] + ("0" if value[-1] != "0" else "1"), ""):
        assert server.request("GET", "/api/datasets", token=None, headers={"Cookie": f"scdm_session={forged}"})[0] == 401
    assert server.request("GET", "/api/datasets", token=None, headers={"Cookie": f"scdm_token={TOKEN}"})[0] == 401


def test_login_form_wrong_token_and_cross_origin(server: Server) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, headers, page = server.request("POST", "/login", b"token=wrong-token-0000000000", token=None, headers=form)
    assert status == 401 and b"Wrong token" in page and "set-cookie" not in headers
    status, _, _ = server.request("POST", "/login", f"token={TOKEN}".encode(), token=None,
                                  headers=form | {"Origin": "http://evil.example"})
    assert status == 403


def test_sessions_do_not_outlive_the_server_run(built_store: tuple[Path, dict[str, str]]) -> None:
    """The cookie is HMAC(key of this run, token): another run of the server with the same token refuses it."""
    from fastapi.testclient import TestClient

    from scdm.server import create_app
    from scdm.store import Store

    path, _ = built_store
    cookies = []
    for _ in range(2):
        with TestClient(create_app(Store(path), token=TOKEN), base_url="http://localhost", follow_redirects=False) as c:
            response = c.get(f"/?token={TOKEN}")
            assert response.status_code == 302 and response.headers["location"] == "/"
            cookies.append(response.headers["set-cookie"].split(";")[0])
            assert c.get("/api/health", headers={"Cookie": cookies[-1]}).status_code == 200
            if len(cookies) == 2:
                assert cookies[0] != cookies[1]
                assert c.get("/api/health", headers={"Cookie": cookies[0]}).status_code == 401


def test_a_blank_or_short_token_is_refused_at_startup(tmp_path: Path) -> None:
    for token, message in (("   ", "only whitespace"), ("only-12-char", "at least 16")):
        result = subprocess.run([sys.executable, "-m", "scdm", "--store", str(tmp_path / "s"), "serve", "--port", "0",
                                 "--token", token], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
        assert "listening" not in result.stderr


# --------------------------------------------------------------------------------------------
# hostile bodies
# --------------------------------------------------------------------------------------------
def test_deep_and_huge_json_bodies_are_a_400_and_a_413(open_server: Server) -> None:
    deep = b"[" * 200_000 + b"]" * 200_000
    for path in ("/api/sql", "/api/jobs/predict", "/api/report"):
        status, _, body = open_server.request("POST", path, deep, headers={"Content-Type": "application/json"})
        assert status == 400 and "nested too deeply" in json.loads(body)["error"], path
    deep_object = b'{"query": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}"
    status, _, body = open_server.request("POST", "/api/sql", deep_object, headers={"Content-Type": "application/json"})
    assert status in (400, 413)
    huge = json.dumps({"query": "SELECT 1 -- " + "x" * (2 << 20)}).encode()
    status, _, body = open_server.request("POST", "/api/sql", huge, headers={"Content-Type": "application/json"})
    assert status == 413 and "bytes" in json.loads(body)["error"]
    assert open_server.json("GET", "/api/health")[0] == 200  # still serving


def test_an_upload_cut_off_mid_body_leaves_nothing_behind(open_server: Server) -> None:
    before = _jobs(open_server)
    sock = socket.create_connection((open_server.host, open_server.port), timeout=30)
    head = (f"POST /api/upload?filename=cut.h5ad HTTP/1.1\r\nHost: {open_server.host}:{open_server.port}\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n").encode()
    sock.sendall(head + b"\x89HDF" * 25_000)  # a tenth of the body, then the client is gone
    time.sleep(0.5)
    sock.close()
    for _ in range(50):
        if _cut_uploads(open_server.store) == []:
            break
        time.sleep(0.1)
    assert _cut_uploads(open_server.store) == []
    assert _jobs(open_server) == before


def _cut_uploads(store: Path) -> list[Path] | None:
    """What is left of the cut upload; None while the server is removing it (a folder gone mid-scan)."""
    try:
        return list(store.glob("uploads/**/*cut*"))
    except FileNotFoundError:  # pathlib's glob of Python 3.11 raises when a folder it lists vanishes
        return None


# --------------------------------------------------------------------------------------------
# headers and the page's policy
# --------------------------------------------------------------------------------------------
class _Scripts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.handlers: list[str] = []
        self.in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        self.handlers += [k for k in names if k.startswith("on")]
        if tag == "script":
            self.in_script = "src" not in names
            if self.in_script:
                self.inline.append("")
        if tag == "style" or "style" in names:
            self.inline.append(f"<{tag} style>")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_script = False

    def handle_data(self, data: str) -> None:
        if self.in_script:
            self.inline[-1] += data


def test_security_headers_on_pages_errors_and_files(server: Server) -> None:
    for path, token in (("/", "default"), ("/", None), ("/api/datasets", "default"), ("/nowhere", "default"),
                        ("/api/datasets", None), ("/static/scdm.js", None)):
        status, headers, _ = server.request("GET", path, token=token, headers={"Accept": "text/html"})
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "frame-ancestors 'none'" in csp, path
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] and "server" not in headers


def test_the_pages_have_no_inline_script_or_style(server: Server) -> None:
    _, _, login = server.request("GET", "/", token=None, headers={"Accept": "text/html"})
    _, _, page = server.request("GET", "/")
    for html in (login, page):
        parser = _Scripts()
        parser.feed(html.decode())
        assert parser.inline == [] and parser.handlers == []
    assert b'<script src="/static/scdm.js' in page and b'id="login-form"' in login


class _Links(HTMLParser):
    """Every URL a page loads or links to (src, href)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [(tag, v) for k, v in attrs if k in ("src", "href") and v]


def test_docs_loads_only_files_of_this_server_under_the_page_policy(server: Server) -> None:
    status, headers, page = server.request("GET", "/docs")
    _, page_headers, _ = server.request("GET", "/")
    assert status == 200
    assert headers["content-security-policy"] == page_headers["content-security-policy"] == CSP  # not widened for /docs
    scripts = _Scripts()
    scripts.feed(page.decode())
    assert scripts.inline == [] and scripts.handlers == []
    links = _Links()
    links.feed(page.decode())
    urls = {tag: [u for t, u in links.urls if t == tag] for tag in ("script", "link")}
    assert len(urls["script"]) == 2 and len(urls["link"]) == 2  # the bundle and its starter; the style and an empty icon
    want = {"swagger-ui-bundle.js": "text/javascript", "docs.js": "text/javascript", "swagger-ui.css": "text/css"}
    seen = set()
    for url in urls["script"] + urls["link"]:
        if url == "data:,":  # the empty favicon (no request)
            continue
        assert url.startswith("/static/") and "//" not in url, url  # same origin: no scheme, no host
        status, headers, body = server.request("GET", url, token=None)  # public, like the page's own files
        name = url.split("?")[0].rsplit("/", 1)[-1]
        assert status == 200 and headers["content-type"].startswith(want[name]), (url, status, headers)
        assert headers["content-security-policy"] == CSP and len(body) > (100 if name == "docs.js" else 100_000)
        seen.add(name)
    assert seen == set(want)
    assert b"SwaggerUIBundle" in server.request("GET", "/static/swagger-ui/swagger-ui-bundle.js", token=None)[2]
