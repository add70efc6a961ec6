"""How messages name the caller's options and input files.

The store's errors are read by people who called it through different front ends: ``scdm ingest``
takes ``--positive VALUE``, ``Store.ingest`` takes ``positive="VALUE"``, the server's upload takes
the query parameter ``positive=VALUE`` and has no ``update`` at all; and a file the server saved
under its own upload folder is, to its user, the file they uploaded. A message therefore never
spells an option or an input path itself: it asks :func:`option` and :func:`input_file`, which
answer in the words of the front end that is running (the command line's by default). A front end
names its own with :func:`spoken`::

    with spoken(options=lambda name, value: ..., files={"/srv/uploads/3f/x.h5ad": "x.h5ad"}):
        store.ingest(...)

The setting is a context variable: it holds for this thread (and task) only, so two server jobs
in two threads each get their own.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar

__all__ = ["OptionSpelling", "command_line_option", "input_file", "offers", "option", "spoken"]

OptionSpelling = Callable[[str, "str | None"], "str | None"]
"""``(option, value) -> text``: how a front end sets an option (with a placeholder value, if given);
None where it cannot set that option at all (the message then leaves that advice out)."""

_FLAGS = {"unknown_values": "--unknown-value", "cancer_key": "--cancer-type-key"}
"""Command-line flags that are not ``--`` + the option name with dashes."""
_PYTHON_TOO = {"update": "update=True", "name": "name="}
"""Options whose command-line advice also names the Python keyword (both callers read these messages)."""


def command_line_option(name: str, value: str | None = None) -> str:
    """``--positive VALUE``: the option as ``scdm ingest`` (and every other command) takes it."""
    flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
    text = f"{flag} {value}" if value else flag
    return f"{text} ({_PYTHON_TOO[name]} in Python)" if name in _PYTHON_TOO else text


_options: ContextVar[OptionSpelling] = ContextVar("scdm_option_spelling", default=command_line_option)
_files: ContextVar[Mapping[str, str]] = ContextVar("scdm_input_file_names", default={})


def option(name: str, value: str | None = None) -> str:
    """How the running front end sets option ``name`` (an ``IngestOptions`` field, ``name`` or ``update``),
    with ``value`` as a placeholder or example. Ask :func:`offers` first where a front end may lack it."""
    spelled = _options.get()(name, value)
    return spelled if spelled is not None else (f"{name}={value}" if value else name)


def offers(name: str) -> bool:
    """Whether the running front end can set option ``name`` at all (the server's upload has no ``update``)."""
    return _options.get()(name, None) is not None


def input_file(path: str | os.PathLike[str]) -> str:
    """The input file as its user knows it, quoted (an upload's own name; elsewhere the path as given)."""
    text = str(path)
    names = _files.get()
    for candidate in (text, os.path.realpath(text)):
        if candidate in names:
            return repr(names[candidate])
    return repr(text)


@contextlib.contextmanager
def spoken(*, options: OptionSpelling | None = None, files: Mapping[str, str] | None = None) -> Iterator[None]:
    """Within the block, messages set options as ``options`` spells them and name the files of ``files``
    (path -> the name its user knows) by those names."""
    option_token = _options.set(options) if options is not None else None
    files_token = None
    if files is not None:
        files_token = _files.set({**files, **{os.path.realpath(p): n for p, n in files.items()}})
    try:
        yield
    finally:
        if files_token is not None:
            _files.reset(files_token)
        if option_token is not None:
            _options.reset(option_token)
