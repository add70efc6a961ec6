"""Sending requests: cache first, then concurrency, rate limit, retries with back-off, and a budget.

Every planned :class:`Request` has a content address (:func:`store.prompts.request_id_of`). Those
already in the catalog are not sent again. The others are sent in plan order by ``concurrency``
threads, at most ``rpm`` starts per minute, and the answers are written to the catalog as they arrive
(in one short transaction per second at most), so a run that is interrupted (Ctrl-C, an exhausted
budget, an endpoint that gives up) loses nothing it was answered, a killed process at most the last
second's answers, and the next run continues with the first request that has no answer. A request that fails with HTTP 429, a 5xx or a timeout is retried after
``backoff_s * 2**attempt`` seconds (or the server's ``Retry-After``), at most ``retries`` times;
any other refusal stops the run with the endpoint's message.

Stored answers are read again from their stored text (:func:`load_answers`): a store written by an
older scdm holds answers its parser read, and what was misread then (a probability ``Cell 1: 0.7``
as the label 0, cells numbered from 0 shifted by one) is read as the current parser reads it, and
stored so.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from scdm.prompt.answers import label_scores, parse_answer
from scdm.prompt.backends import Backend, PromptRequestError, Reply, TransientError
from scdm.store.errors import InputDataError
from scdm.store.prompts import ANSWER_PARSER_VERSION, PromptAnswer, PromptRecord, load_prompts, save_prompts
from scdm.store.warning_scopes import in_context

if TYPE_CHECKING:
    from scdm.store import Store

__all__ = ["Request", "SendPolicy", "SendReport", "send_requests", "record_of", "load_answers", "read_again", "cut_short"]

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 120.0
"""Longest wait between two attempts of one request."""
SAVE_EVERY_S = 1.0
"""New answers are written to the catalog at least this often (and whenever the run stops)."""


@dataclass(frozen=True)
class Request:
    """One planned request: its messages and the cells it asks about, in prompt order."""

    request_id: str
    messages: list[dict[str, Any]]
    cells: tuple[tuple[str, int], ...]
    """(dataset_id, row) of the asked cells; cell number i of the prompt is ``cells[i - 1]``."""
    examples: tuple[tuple[str, int], ...] = ()
    """(dataset_id, row) of the few-shot example cells shown in the prompt."""

    @property
    def text(self) -> str:
        return "\n\n".join(str(m["content"]) for m in self.messages)


@dataclass(frozen=True)
class SendPolicy:
    """How requests are sent."""

    concurrency: int = 4
    rpm: float | None = None
    """Request starts per minute (None: no limit)."""
    retries: int = 6
    backoff_s: float = 1.0
    max_requests: int | None = None
    """New requests this call may send (None: all); cached ones are free."""

    def __post_init__(self) -> None:
        bad = []
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
            bad.append(f"concurrency={self.concurrency!r} must be an integer >= 1")
        if self.rpm is not None and not self.rpm > 0:
            bad.append(f"rpm={self.rpm!r} must be > 0")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            bad.append(f"retries={self.retries!r} must be an integer >= 0")
        if not self.backoff_s >= 0:
            bad.append(f"backoff_s={self.backoff_s!r} must be >= 0")
        if self.max_requests is not None and (isinstance(self.max_requests, bool) or not isinstance(self.max_requests, int)
                                              or self.max_requests < 0):
            bad.append(f"max_requests={self.max_requests!r} must be an integer >= 0")
        if bad:
            raise InputDataError("; ".join(bad) + ".")


@dataclass
class SendReport:
    """What :func:`send_requests` did."""

    records: dict[str, PromptRecord] = field(default_factory=dict)
    """Every planned request that has an answer now (cached or new)."""
    n_cached: int = 0
    n_sent: int = 0
    n_pending: int = 0
    """Requests left unsent (the budget ran out)."""
    n_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _RateLimiter:
    """Spaces request starts at least ``60 / rpm`` seconds apart (shared by the sending threads)."""

    def __init__(self, rpm: float | None) -> None:
        self.interval = 60.0 / rpm if rpm else 0.0
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        time.sleep(max(0.0, start - now))


def record_of(backend: Backend, request: Request, reply: Reply, *, template_hash: str, attempts: int,
              seconds: float) -> PromptRecord:
    """The catalog record of one answered request: parsed per cell, with scores where there are any."""
    n = len(request.cells)
    parsed = parse_answer(reply.text, n)
    scores = dict(reply.scores) or label_scores(reply.text, reply.tokens, parsed)
    answers = tuple(PromptAnswer(a.position, a.status, a.label, scores.get(a.position) if a.status == "ok" else None)
                    for a in parsed.answers)
    return PromptRecord(request_id=request.request_id, backend=backend.kind, model=backend.model,
                        checkpoint_hash=backend.checkpoint_hash, endpoint=backend.endpoint, template_hash=template_hash,
                        decoding=backend.decoding(), messages=request.messages, n_cells=n, status=parsed.status,
                        answer_text=reply.text, response=reply.raw, prompt_tokens=reply.prompt_tokens,
                        completion_tokens=reply.completion_tokens, attempts=attempts, seconds=seconds, answers=answers)


def _stored_tokens(response: Mapping[str, Any] | None) -> list[dict[str, Any]] | None:
    """The token log-probabilities of a stored response body: OpenAI-style (``choices[0].logprobs.content``)
    or Ollama's (``logprobs``, entries of the same form)."""
    try:
        tokens = response["choices"][0]["logprobs"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        tokens = response.get("logprobs") if isinstance(response, Mapping) and "choices" not in response else None
    return tokens if isinstance(tokens, list) and tokens else None


def cut_short(record: PromptRecord) -> bool:
    """Whether the endpoint stopped the answer at the token limit (``finish_reason`` ``length``) before
    every cell had a readable answer: the rest of the answer was never written, not unreadable."""
    try:
        reason = record.response["choices"][0]["finish_reason"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):  # Ollama's own body says done_reason
        reason = record.response.get("done_reason") if isinstance(record.response, Mapping) else None
    return reason == "length" and any(a.status != "ok" for a in record.answers)


def _stored_scores(response: Mapping[str, Any] | None) -> dict[int, float] | None:
    """P(sensitive) per cell that the local model gave (``decisions`` of its stored response body)."""
    decisions = response.get("decisions") if isinstance(response, Mapping) else None
    if not isinstance(decisions, list):
        return None
    try:
        return {int(d["cell"]): float(d["p_sensitive"]) for d in decisions}
    except (KeyError, TypeError, ValueError):
        return None


def read_again(record: PromptRecord) -> PromptRecord:
    """The stored request with its answer text read by the current parser (``record`` itself when alike).

    P(sensitive) is computed again from the stored response body (token log-probabilities, or the
    local model's decisions); where the body holds neither, the stored scores stay for cells whose
    reading did not change and are dropped for the others (their labels then count as hard labels).
    """
    parsed = parse_answer(record.answer_text, record.n_cells)
    stored = {a.position: a for a in record.answers}
    scores = _stored_scores(record.response)
    if scores is None:
        tokens = _stored_tokens(record.response)
        scores = label_scores(record.answer_text, tokens, parsed) if tokens is not None else None
    answers = []
    for a in parsed.answers:
        if a.status != "ok":
            p = None
        elif scores is not None:
            p = scores.get(a.position)
        else:
            old = stored.get(a.position)
            p = old.p_sensitive if old is not None and (old.status, old.label) == (a.status, a.label) else None
        answers.append(PromptAnswer(a.position, a.status, a.label, p))
    if parsed.status == record.status and tuple(answers) == tuple(record.answers):
        return record
    return dataclasses.replace(record, status=parsed.status, answers=tuple(answers))


def load_answers(st: Store, request_ids: Sequence[str]) -> dict[str, PromptRecord]:
    """The stored requests among ``request_ids``, their answers read by the current parser.

    Answers that read differently now (stored by an older scdm) are stored again as read now.
    """
    records = load_prompts(st, request_ids)
    changed = []
    for request_id, record in records.items():
        now = read_again(record)
        if now is not record:
            records[request_id] = now
            changed.append(now)
    if changed:
        logger.warning("prompt: %d stored answers read differently by this scdm's answer parser (version %d) than "
                       "when they were stored: read again from their stored text and stored so", len(changed),
                       ANSWER_PARSER_VERSION)
        save_prompts(st, changed)
    return records


def _send_one(backend: Backend, request: Request, policy: SendPolicy, limiter: _RateLimiter,
              template_hash: str) -> PromptRecord:
    started = time.perf_counter()
    for attempt in range(policy.retries + 1):
        limiter.wait()
        try:
            reply = backend.send(request.messages, len(request.cells))
        except TransientError as err:
            if attempt == policy.retries:
                msg = (f"Request {request.request_id} failed {attempt + 1} times ({err}); the answers so far are stored. "
                       f"Run the same command again later to continue (or raise --retries).")
                raise PromptRequestError(msg) from err
            delay = min(MAX_BACKOFF_S, max(policy.backoff_s * 2 ** attempt, err.retry_after or 0.0))
            logger.info("prompt: request %s: %s; retrying in %.2f s", request.request_id[:8], err, delay)
            time.sleep(delay)
            continue
        return record_of(backend, request, reply, template_hash=template_hash, attempts=attempt + 1,
                         seconds=time.perf_counter() - started)
    raise AssertionError("unreachable")  # pragma: no cover


def send_requests(st: Store, backend: Backend, requests: Sequence[Request], *, template_hash: str,
                  policy: SendPolicy = SendPolicy(), progress: Callable[[int], None] | None = None) -> SendReport:
    """Answer every planned request: from the catalog where stored, else from the backend (then stored).

    Parameters
    ----------
    st : Store
    backend : Backend
    requests : sequence of Request
        In the order they should be sent (a budget keeps the first ones).
    template_hash : str
        Recorded with each request.
    policy : SendPolicy
    progress : callable, optional
        Called with the number of new answers each time they are stored.

    Raises
    ------
    PromptRequestError
        A request was refused or failed after every retry. Answers already stored stay.
    """
    report = SendReport()
    unique = list({r.request_id: r for r in requests}.values())
    report.records = load_answers(st, [r.request_id for r in unique])
    report.n_cached = len(report.records)
    todo = [r for r in unique if r.request_id not in report.records]
    if policy.max_requests is not None and len(todo) > policy.max_requests:
        report.n_pending = len(todo) - policy.max_requests
        todo = todo[:policy.max_requests]
    if not todo:
        return report
    limiter = _RateLimiter(policy.rpm)
    workers = min(policy.concurrency, backend.max_concurrency or policy.concurrency, len(todo))
    queue = iter(todo)
    saver = _Saver(st, report, progress)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scdm-prompt") as pool:
        running: dict[Future[PromptRecord], Request] = {}

        def submit_next() -> None:
            request = next(queue, None)
            if request is not None:
                running[pool.submit(in_context(_send_one), backend, request, policy, limiter, template_hash)] = request

        for _ in range(workers):
            submit_next()
        try:
            while running:
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    running.pop(future)
                    saver.keep(future.result())  # result() raises a failed request's error
                    submit_next()
        except BaseException:
            # stop: start nothing new, but keep the answers of requests already in flight (they are paid for)
            for future in list(running):
                if not future.cancel():
                    try:
                        saver.keep(future.result())
                    except BaseException:  # noqa: BLE001 - the first error is the one reported
                        pass
            raise
        finally:
            saver.flush()
    return report


class _Saver:
    """Buffers new answers and writes them in one short transaction at least every ``SAVE_EVERY_S`` seconds.

    Only the thread that calls :func:`send_requests` writes the catalog (DuckDB has one writer).
    """

    def __init__(self, st: Store, report: SendReport, progress: Callable[[int], None] | None) -> None:
        self.st, self.report, self.progress = st, report, progress
        self.pending: list[PromptRecord] = []
        self.last = time.monotonic()

    def keep(self, record: PromptRecord) -> None:
        self.pending.append(record)
        report = self.report
        report.records[record.request_id] = record
        report.n_sent += 1
        report.n_retries += record.attempts - 1
        report.prompt_tokens += record.prompt_tokens or 0
        report.completion_tokens += record.completion_tokens or 0
        if time.monotonic() - self.last >= SAVE_EVERY_S:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            save_prompts(self.st, self.pending)
            if self.progress is not None:
                self.progress(len(self.pending))
        self.pending = []
        self.last = time.monotonic()
