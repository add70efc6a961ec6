"""Warning handling for one piece of work, not for the whole process: ``warnings.catch_warnings`` without its race.

``warnings.catch_warnings`` swaps the process-wide filters and ``showwarning`` (Python 3.11; 3.14
makes it context-local only on request): while one server job's thread is inside such a block,
another job's warnings are ignored or recorded by it, and its exit puts back whatever was current
at its entry. The blocks here act in the current :mod:`contextvars` context only: the thread that
entered them and the threads its work starts through :func:`in_context` (scdm's own pools do).

One process-wide hook does it, installed on first use and kept: a filter entry per warning
category a block names, matching only in a context where such a block is open (elsewhere the
usual filters decide, as before), and a ``showwarning`` in front of the one it found, which
applies the innermost open block to the warnings those entries let through and hands every
warning it shows to the context's receivers (:func:`receiving`: a server job's record) before
the usual display.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

__all__ = ["ignoring", "in_context", "once_each", "receiving", "recording"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(eq=False)
class _Rule:
    """One open block: what it takes (``category``, messages matching ``message``) and what it does with it."""

    action: str
    """ignore | record | once"""
    category: type[Warning]
    message: re.Pattern[str] | None = None
    caught: list[warnings.WarningMessage] = field(default_factory=list)
    seen: set[tuple[str, type[Warning]]] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def takes(self, category: type[Warning], text: str) -> bool:
        return issubclass(category, self.category) and (self.message is None or self.message.match(text) is not None)


_RULES: contextvars.ContextVar[tuple[_Rule, ...]] = contextvars.ContextVar("scdm_warning_rules", default=())
"""The blocks open in this context, outermost first."""
_RECEIVERS: contextvars.ContextVar[tuple[Callable[[warnings.WarningMessage], None], ...]] = contextvars.ContextVar(
    "scdm_warning_receivers", default=())
_LOCK = threading.Lock()
_ENTRIES: dict[type[Warning], tuple[Any, ...]] = {}
_DISPATCHING = threading.local()


class _OpenHere:
    """The ``message`` of a filter entry: matches when a block open in the current context takes this category."""

    def __init__(self, category: type[Warning]) -> None:
        self.category = category

    def match(self, text: str) -> bool:
        return any(rule.category is self.category and (rule.message is None or rule.message.match(text))
                   for rule in _RULES.get())

    def __repr__(self) -> str:
        return f"<scdm warning block open in this context: {self.category.__name__}>"


class _Refresh(Warning):
    """Never raised: adding its filter is the public way to make Python forget which warnings it has shown."""


def _install(categories: tuple[type[Warning], ...]) -> None:
    """Put the hook in front of ``showwarning`` and the entries of ``categories`` in front of the filters."""
    with _LOCK:
        if not getattr(warnings.showwarning, "_scdm_scopes", False):
            warnings.showwarning = _hook(warnings.showwarning)
        filters = cast(list[Any], warnings.filters)
        for category in categories:
            entry = _ENTRIES.setdefault(category, ("always", _OpenHere(category), category, None, 0))
            # in front, as catch_warnings + simplefilter put theirs: an "error" filter of a test run must not win here
            if filters[:1] != [entry]:
                with contextlib.suppress(ValueError):
                    filters.remove(entry)
                filters.insert(0, entry)
        if categories:
            _forget_shown()


def _forget_shown() -> None:
    """Python skips a warning it showed once at a code line before looking at any filter; every block starts afresh."""
    warnings.filterwarnings("ignore", category=_Refresh, append=True)


def _hook(previous: Callable[..., Any]) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if getattr(_DISPATCHING, "on", False):  # a hook installed earlier, further down the chain: shown already
            previous(message, category, filename, lineno, file, line)
            return
        text = str(message)
        for rule in reversed(_RULES.get()):
            if not rule.takes(category, text):
                continue
            with rule.lock:
                if rule.action == "record":
                    rule.caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))
                    return
                if rule.action == "ignore" or (text, category) in rule.seen:
                    return
                rule.seen.add((text, category))
            break
        shown = warnings.WarningMessage(message, category, filename, lineno, file, line)
        for receive in _RECEIVERS.get():
            receive(shown)
        _DISPATCHING.on = True
        try:
            previous(message, category, filename, lineno, file, line)
        finally:
            _DISPATCHING.on = False

    show._scdm_scopes = True  # type: ignore[attr-defined]
    return show


@contextlib.contextmanager
def _open(rule: _Rule) -> Iterator[_Rule]:
    _install((rule.category,))
    token = _RULES.set((*_RULES.get(), rule))
    try:
        yield rule
    finally:
        _RULES.reset(token)
        _forget_shown()  # as catch_warnings' exit does: a warning shown once before the block shows again after it


def ignoring(category: type[Warning] = Warning, message: str = "") -> contextlib.AbstractContextManager[Any]:
    """Drop warnings of ``category`` (whose text matches the regular expression ``message``, case-insensitive)
    given in this context while the block runs; other threads' warnings are untouched."""
    return _open(_Rule("ignore", category, re.compile(message, re.IGNORECASE) if message else None))


@contextlib.contextmanager
def recording(category: type[Warning] = Warning) -> Iterator[list[warnings.WarningMessage]]:
    """Collect, not show, every warning of ``category`` given in this context while the block runs (each time it is given)."""
    with _open(_Rule("record", category)) as rule:
        yield rule.caught


def once_each() -> contextlib.AbstractContextManager[Any]:
    """Show each warning (text and category) given in this context at most once while the block runs."""
    return _open(_Rule("once", Warning))


@contextlib.contextmanager
def receiving(receive: Callable[[warnings.WarningMessage], None]) -> Iterator[None]:
    """Hand ``receive`` every warning shown in this context while the block runs (it is still shown as usual)."""
    _install(())
    token = _RECEIVERS.set((*_RECEIVERS.get(), receive))
    try:
        yield
    finally:
        _RECEIVERS.reset(token)


def in_context(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run in a copy of the caller's context as it is now: for a pool's threads, so that the
    blocks open here and the receivers of this work (a server job) cover the warnings given there."""
    context = contextvars.copy_context()

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return context.copy().run(fn, *args, **kwargs)  # a copy per call: one context cannot run in two threads

    return run
