"""Settings of ``scdm serve`` and the state its routes share."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from fastapi.templating import Jinja2Templates

from scdm.server.jobs import JobBoard
from scdm.server.security import SecurityPolicy, allowed_hosts_of, check_token
from scdm.store import Store
from scdm.store.errors import InputDataError

__all__ = ["ServerConfig", "ServerState", "version", "SQL_TIMEOUT_ENV"]

SQL_TIMEOUT_ENV = "SCDM_SQL_TIMEOUT"
"""Environment variable read by ``scdm serve --sql-timeout`` (seconds) when the flag is not given."""


@dataclass(frozen=True)
class ServerConfig:
    """Limits and security settings of the server."""

    token: str | None = field(default=None, repr=False)
    """Bearer token required on every route (None: no auth; only allowed on loopback)."""
    allowed_hosts: tuple[str, ...] = ()
    """Host names the server answers to besides loopback and its bind address (``*.domain`` patterns)."""
    bind_host: str | None = None
    """The address it binds to (answered to as a Host name too)."""
    max_upload_bytes: int = 512 * 1024 * 1024
    """Largest accepted ``.h5ad`` upload."""
    sql_max_rows: int = 1000
    """Rows returned by one SQL query at most."""
    sql_timeout_s: float = 10.0
    """SQL queries running longer are stopped."""
    page_rows: int = 5000
    """Rows returned by list endpoints at most (``limit`` may ask for fewer)."""
    max_jobs: int = 1
    """Jobs (predictions, uploads, reports) running at once; the others wait in a queue."""
    jobs_dir: str | None = None
    """Folder of the job queue, shared by the workers (default: a new temporary folder)."""
    session_key: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)
    """Random key of this server run: session cookies are HMAC(key, token). Shared by its workers."""

    def __post_init__(self) -> None:
        check_token(self.token)
        if self.max_jobs < 1:
            msg = f"--max-jobs {self.max_jobs}: at least one job must be able to run."
            raise InputDataError(msg)
        for name in ("max_upload_bytes", "sql_max_rows", "page_rows"):
            if getattr(self, name) < 1:
                msg = f"{name}={getattr(self, name)} must be a positive number."
                raise InputDataError(msg)
        object.__setattr__(self, "allowed_hosts", allowed_hosts_of(self.allowed_hosts))


@dataclass
class ServerState:
    """What the routes need: the store, the settings, the job board, the templates."""

    store: Store
    config: ServerConfig
    jobs: JobBoard
    templates: Jinja2Templates
    policy: SecurityPolicy

    @property
    def root(self) -> Path:
        return self.store.root.resolve()


def version() -> str:
    """The installed scdm version (``0+unknown`` when running from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("scdm")
    except PackageNotFoundError:
        return "0+unknown"
