"""What scdm shows a person while it works: progress bars and warnings, one helper each.

Bars are ``tqdm.auto`` bars on stderr: a text bar in a terminal, a widget in Jupyter. Warnings a
user should act on (:class:`~scdm.store.errors.ScdmWarning`) are printed once each, as one plain
line, inside :func:`plain_warnings` (the CLI and the ``scdm.*`` notebook functions use it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

from scdm.store.errors import ScdmWarning

__all__ = ["no_progress", "plain_warnings", "progress_bar", "progress_enabled", "warning_line"]


def _in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (its stderr is not a terminal, but bars render there)."""
    shell = sys.modules.get("IPython")
    get_ipython = getattr(shell, "get_ipython", None)
    return get_ipython is not None and type(get_ipython()).__name__ == "ZMQInteractiveShell"


_silenced: list[bool] = []
"""Open :func:`no_progress` blocks (the CLI's ``-q``)."""


@contextlib.contextmanager
def no_progress() -> Iterator[None]:
    """No bars at all while the block runs (``scdm -q ...``), whatever each call asks for."""
    _silenced.append(True)
    try:
        yield
    finally:
        _silenced.pop()


def progress_enabled() -> bool:
    """Bars show in a terminal and in Jupyter, not in logs of batch jobs; ``SCDM_PROGRESS=1``/``0`` forces them on/off."""
    if _silenced:
        return False
    forced = os.environ.get("SCDM_PROGRESS", "")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty() or _in_notebook()


def progress_bar(total: int | None = None, *, desc: str = "", unit: str = "it", silent: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; ``silent=True`` gives a bar that prints nothing.

    Bars are also hidden where :func:`progress_enabled` says so (stderr neither a terminal nor
    a Jupyter kernel), so logs of batch jobs stay readable.
    """
    disable = silent or not progress_enabled()
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5, unit_scale=True, **kwargs)


@contextlib.contextmanager
def plain_warnings(stream: TextIO | None = None) -> Iterator[None]:
    """Print each distinct scdm warning once, as ``warning: <message>``, while the block runs.

    Python's default format (file path, line number, the source line, repeated per call site)
    suits developers; a person running ``scdm evaluate`` needs the sentence once. Warnings of
    other libraries keep Python's handling. Nested blocks share the outer block's memory.
    """
    if getattr(warnings.showwarning, "_scdm_plain", False):
        yield
        return
    seen: set[str] = set()
    previous = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        if not issubclass(category, ScdmWarning):
            previous(message, category, filename, lineno, file, line)
            return
        text = warning_line(message)
        if text not in seen:
            seen.add(text)
            print(text, file=stream or sys.stderr, flush=True)

    show._scdm_plain = True  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("always", ScdmWarning)  # our memory dedupes, across call sites
        warnings.showwarning = show
        yield


def warning_line(message: Warning | str) -> str:
    """An scdm warning as :func:`plain_warnings` prints it (the server's jobs record it in the same words)."""
    return "warning: " + " ".join(str(message).split())
