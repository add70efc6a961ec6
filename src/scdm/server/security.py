"""What every request passes before a route sees it: Host allow-list, CSRF rules, token, body limits, headers.

- **Host allow-list** (DNS rebinding): the ``Host`` header must name this server: a loopback name
  (``localhost``, ``127.0.0.1``, ``[::1]``), the address it binds to, or a name given with
  ``--allowed-host`` (``*.example.org`` matches subdomains; ``*`` turns the check off, for a
  proxy that checks it). Anything else is a 400.
- **No simple-request writes** (CSRF): a POST (the one state-changing method a page may send
  cross-origin without asking first) must carry ``Content-Type: application/json``
  (``application/octet-stream`` for the upload). Those types make a browser ask before sending
  cross-origin, and this server never says yes, so a foreign page cannot send one. A request that
  carries an ``Origin`` (or, without it, a ``Referer``) from another origin is refused too. The
  login form is the one form POST; it needs the same-origin check.
- **Token**: with one, every route but the login page and its static files needs
  ``Authorization: Bearer <token>`` or the session cookie, compared in constant time. The cookie
  holds HMAC-SHA256(server key, token), never the token; the key is random per server run, so a
  restart logs browsers out. Cookies are HttpOnly and SameSite=Strict.
- **Bodies**: JSON bodies are at most 1 MiB and are parsed once here, so invalid or absurdly
  nested JSON is a 400 with a message (not a 500 from a recursion error deep in a parser).
- **Headers** on every answer: a Content-Security-Policy without inline script, ``nosniff``,
  ``frame-ancestors 'none'`` / ``X-Frame-Options: DENY``, a Referrer-Policy, ``no-store`` caching.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scdm.store.errors import InputDataError

logger = logging.getLogger(__name__)

__all__ = ["SecurityPolicy", "Guard", "check_token", "is_loopback", "allowed_hosts_of", "route_path", "CSP", "REPORT_CSP",
           "SESSION_COOKIE"]

MIN_TOKEN_CHARS = 16
SESSION_COOKIE = "scdm_session"
MAX_JSON_BYTES = 1 << 20
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
BODY_TYPES = frozenset({"application/json", "application/octet-stream"})
"""Content types a state-changing request may have: none of them is one a browser sends cross-origin unasked."""
PUBLIC_PATHS = ("/", "/login", "/favicon.ico")
"""Reachable without the token: the page decides itself between the explorer and the login form."""
PUBLIC_PREFIXES = ("/static/",)

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
"""The page's policy: scripts and styles only from files of this server (no inline script)."""
REPORT_CSP = ("default-src 'self'; script-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
              "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
"""Files of the generated report: its page has inline styles and no script at all (SVGs included)."""
_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


def check_token(token: str | None) -> None:
    """Refuse a token that is blank, short or padded with whitespace.

    Raises
    ------
    InputDataError
        With a command that makes a good token.
    """
    if token is None:
        return
    make = "python -c 'import secrets; print(secrets.token_urlsafe())'"
    if not token.strip():
        msg = f"The token is empty or only whitespace; pass a random one: --token \"$({make})\"."
        raise InputDataError(msg)
    if token != token.strip():
        msg = "The token starts or ends with whitespace, which an Authorization header cannot carry; remove it."
        raise InputDataError(msg)
    if len(token) < MIN_TOKEN_CHARS:
        msg = (f"The token has {len(token)} characters; use at least {MIN_TOKEN_CHARS} random ones, e.g. "
               f"--token \"$({make})\".")
        raise InputDataError(msg)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _unspecified(host: str) -> bool:
    """``0.0.0.0`` / ``::``: every interface, not a name a client should use."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def _host_name(netloc: str) -> str:
    """``example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``::1``; lower case."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:netloc.find("]")] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


@dataclass(frozen=True)
class SecurityPolicy:
    """The server's rules: the hosts it answers to and its token."""

    token: str | None
    session_key: bytes
    """Random per server run (shared by its workers): the cookie is HMAC(session_key, token)."""
    allowed_hosts: tuple[str, ...] = ()
    """Names added with --allowed-host (besides loopback and the bound address)."""
    bind_host: str | None = None

    # ---- hosts -----------------------------------------------------------------------------
    def host_allowed(self, host_header: str | None) -> bool:
        if not host_header:
            return False
        name = _host_name(host_header)
        if name in LOOPBACK_NAMES or (self.bind_host and not _unspecified(self.bind_host) and name == _host_name(self.bind_host)):
            return True
        return self._named(name)

    def _named(self, name: str) -> bool:
        """Whether ``--allowed-host`` names ``name`` (exactly, or by a ``*.domain`` or ``*`` pattern)."""
        for pattern in self.allowed_hosts:
            pattern = pattern.lower()
            if pattern == "*" or pattern == name or (pattern.startswith("*.") and name.endswith(pattern[1:])):
                return True
        return False

    def same_origin(self, source: str, host_header: str) -> bool:
        """Whether an Origin/Referer URL is this server: the same host and port as the request's Host, or a
        host named with --allowed-host (a proxy may rewrite Host; the name was vouched for)."""
        netloc = urlsplit(source).netloc.lower()
        if not netloc:
            return False
        if netloc == host_header.strip().lower():
            return True
        return any(p != "*" for p in self.allowed_hosts) and self._named(_host_name(netloc))

    # ---- token -----------------------------------------------------------------------------
    @property
    def session_value(self) -> str | None:
        """What the session cookie holds: derived from the token, useless to learn the token from."""
        if self.token is None:
            return None
        return hmac.new(self.session_key, b"scdm-session:" + self.token.encode(), hashlib.sha256).hexdigest()

    def token_matches(self, given: str | None) -> bool:
        return self.token is not None and given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def authenticated(self, headers: Headers) -> bool:
        if self.token is None:
            return True
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return self.token_matches(auth[7:].strip())
        cookie = _cookie(headers.get("cookie", ""), SESSION_COOKIE)
        expected = self.session_value
        return cookie is not None and expected is not None and hmac.compare_digest(cookie.encode(), expected.encode())

    def session_cookie(self, *, path: str, secure: bool) -> str:
        value = self.session_value or ""
        return f"{SESSION_COOKIE}={value}; Path={path}; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def route_path(scope: Scope) -> str:
    """The request path below ``--root-path`` (what the routes match)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


# --------------------------------------------------------------------------------------------
# the middleware
# --------------------------------------------------------------------------------------------
class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Guard:
    """ASGI middleware applying :class:`SecurityPolicy` to every HTTP request (see the module docstring)."""

    def __init__(self, app: ASGIApp, policy: SecurityPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = _with_security_headers(send)
        headers = Headers(scope=scope)
        path = route_path(scope)
        try:
            self._check_host(headers)
            if scope["method"] not in SAFE_METHODS:
                self._check_write(headers, path, scope["method"])
            authenticated = self.policy.authenticated(headers)
            scope.setdefault("state", {})["authenticated"] = authenticated
            if not authenticated and not (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)):
                raise _Refused(401, "Missing or wrong token: send 'Authorization: Bearer <token>' (or open /?token=<token> "
                                    "in a browser).", {"www-authenticate": 'Bearer realm="scdm"'})
            if _media_type(headers) == "application/json":
                receive = await _checked_json_body(headers, receive)
        except _Refused as refused:
            await _error(send, refused)
            return
        await self.app(scope, receive, send)

    def _check_host(self, headers: Headers) -> None:
        host = headers.get("host")
        if not self.policy.host_allowed(host):
            raise _Refused(400, f"Host {host!r} is not a name this server answers to (it only answers to loopback names, "
                                "its bind address and the names given with --allowed-host). If this name is yours, "
                                "restart with --allowed-host NAME.")

    def _check_write(self, headers: Headers, path: str, method: str) -> None:
        host = headers.get("host", "")
        source = headers.get("origin") or headers.get("referer")
        if source is not None and not self.policy.same_origin(source, host):
            raise _Refused(403, f"Cross-origin request refused: it comes from {source!r}, not from this server ({host}).")
        if method != "POST" or path == "/login":
            return  # only POST can be a simple request; the login form is same-origin (above) and carries only a token
        kind = _media_type(headers)
        if kind not in BODY_TYPES:
            given = f"Content-Type {headers['content-type']!r}" if headers.get("content-type") else "no Content-Type"
            raise _Refused(415, f"A request with {given} cannot change anything here (a browser sends such requests "
                                "cross-origin unasked): send the body as application/json (application/octet-stream "
                                "for /api/upload).")


def _media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _checked_json_body(headers: Headers, receive: Receive) -> Receive:
    """Read a JSON body (1 MiB at most), check that it parses, and hand it on to the route."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_JSON_BYTES:
        raise _Refused(413, f"The JSON body has {declared} bytes; at most {MAX_JSON_BYTES} are accepted.")
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Refused(400, "The client disconnected before sending the body.")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_JSON_BYTES:
            raise _Refused(413, f"The JSON body is larger than {MAX_JSON_BYTES} bytes.")
        chunks.append(chunk)
        more = message.get("more_body", False)
    body = b"".join(chunks)
    if body:
        try:
            json.loads(body)
        except RecursionError:
            raise _Refused(400, "The JSON body is nested too deeply to be a request of this API.") from None
        except ValueError as err:
            raise _Refused(400, f"The request body is not valid JSON ({err}).") from None
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_security_headers(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            for name, value in _HEADERS.items():
                headers.setdefault(name, value)
            headers.setdefault("content-security-policy", CSP)
            headers.setdefault("cache-control", "no-store")
        await send(message)

    return wrapped


async def _error(send: Send, refused: _Refused) -> None:
    body = json.dumps({"error": refused.message, "status": refused.status}).encode()
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in refused.headers.items()]
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def allowed_hosts_of(values: Iterable[str]) -> tuple[str, ...]:
    """--allowed-host values, trimmed, lower case, without ports; empty ones dropped."""
    return tuple(dict.fromkeys(_host_name(v) if v.strip() != "*" else "*" for v in values if v.strip()))
