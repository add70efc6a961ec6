"""scdm's blocks that silence or collect warnings act in their own context, never on another thread's warnings.

They replaced ``warnings.catch_warnings`` blocks, which swap the process-wide filters and
``showwarning``: a server job inside one silenced or took the warnings of the job beside it.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from scdm.store.errors import ScdmWarning
from scdm.store.progress import plain_warnings
from scdm.store.warning_scopes import ignoring, in_context, once_each, recording


def _in_thread(fn: Callable[[], None]) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join(10)


def test_a_block_silences_its_own_thread_only() -> None:
    inside, warned = threading.Event(), threading.Event()

    def other() -> None:
        assert inside.wait(10)
        warnings.warn("the other thread's", ScdmWarning, stacklevel=1)
        warned.set()

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        thread = threading.Thread(target=other)
        thread.start()
        with ignoring(UserWarning):
            warnings.warn("this thread's", ScdmWarning, stacklevel=1)
            inside.set()
            assert warned.wait(10)
        thread.join(10)
        warnings.warn("after the block", ScdmWarning, stacklevel=1)
    assert [str(w.message) for w in shown] == ["the other thread's", "after the block"]


def test_a_recording_takes_each_warning_each_time_and_shows_none() -> None:
    def twice() -> None:
        for _ in range(2):
            warnings.warn("converge", RuntimeWarning, stacklevel=1)

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")  # Python's own: once per code line
        twice()  # shown once, and remembered as shown at that line
        with recording() as caught:
            twice()
        twice()  # the line shows it again after the block, as after a catch_warnings block
    assert [str(w.message) for w in caught] == ["converge", "converge"]
    assert len(shown) == 2


def test_once_each_covers_the_threads_a_pool_runs_for_the_block() -> None:
    out = io.StringIO()
    with plain_warnings(out), once_each(), ThreadPoolExecutor(2) as pool:
        list(pool.map(in_context(lambda i: warnings.warn("one fold", ScdmWarning, stacklevel=1)), range(4)))
        warnings.warn("one fold", ScdmWarning, stacklevel=1)
    assert out.getvalue() == "warning: one fold\n"


def test_the_command_line_prints_what_a_block_lets_through_as_before() -> None:
    out = io.StringIO()
    with plain_warnings(out):
        with ignoring(FutureWarning):
            warnings.warn("kept", ScdmWarning, stacklevel=1)
            warnings.warn("dropped", FutureWarning, stacklevel=1)
        _in_thread(lambda: warnings.warn("from a thread", ScdmWarning, stacklevel=1))
    assert out.getvalue() == "warning: kept\nwarning: from a thread\n"
