"""Prompting as an evaluation: the test cells of every fold of the heads' splits, scored like a head.

:func:`prompt` builds (or reads) the same splits as ``scdm evaluate``, asks the language model about
their test cells (:mod:`scdm.prompt.plan`, :mod:`scdm.prompt.runner`) and writes one evaluation task
per (split, fold) through :class:`store.evaluation.ResultWriter`, so ``scdm results``, the report and
the server show the model beside the embedding heads:

- ``head`` is ``prompt-zero-shot`` or ``prompt-<k>-shot``; ``model`` is the language model's name;
  ``variant`` is ``prompt``; there are no embeddings (``embedding_ids`` is ``[]``);
- ``space_id`` identifies the prompting configuration: backend, model (and checkpoint hash),
  template hash, decoding parameters, genes per cell and cells per request. Two configurations are
  two rows of every leaderboard, never averaged together;
- metrics come from :func:`store.metrics.compute_metrics`: from P(sensitive) when every answered
  test cell has one (token log-probabilities, or the local model), else from the hard labels with
  AUROC/AP NULL and the flag ``no_scores``;
- test cells without a readable answer are left out of the metrics and counted in the task's flags
  (``unanswered=N``); a fold without any readable answer is recorded as skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from scdm.prompt.backends import Backend, OpenAIBackend, without_password
from scdm.prompt.plan import CellTable, Plan, Unit, fold_test_cells, load_cells, plan_requests
from scdm.prompt.runner import SendPolicy, SendReport, cut_short, load_answers, send_requests
from scdm.prompt.sentences import DEFAULT_TOP_K
from scdm.prompt.templates import Template, load_template
from scdm.store.errors import InputDataError
from scdm.store.evaluation import (
    ResultWriter,
    SkippedTask,
    TaskKey,
    TaskOutcome,
    finish_run,
    finished_tasks,
    run_skipped,
    skip_reasons,
    start_run,
    task_results,
    unanswered_flag,
)
from scdm.store.progress import progress_bar
from scdm.store.prompts import (
    ANSWER_PARSER_VERSION,
    PROMPT_VARIANT,
    ZERO_SHOT_BATCHING,
    PromptRecord,
    forget_older_prompt_tasks,
    load_prompts,
)
from scdm.store.splits import CATEGORY_TYPES, Split, load_split, make_splits, save_splits, shared_partitions, split_datasets

if TYPE_CHECKING:
    from scdm.store import Store

__all__ = ["PromptSummary", "prompt", "head_name", "make_backend"]

logger = logging.getLogger(__name__)

VARIANT = PROMPT_VARIANT
"""The ``variant`` of every prompting result (heads say zero-shot or k-shot)."""
OUTPUT_TOKENS_PER_CELL = 12
"""Answer tokens per cell assumed by dry-run estimates (``{"cell": 3, "response": "resistant"}``)."""


@dataclass(frozen=True)
class PromptSummary:
    """What one :func:`prompt` call did (or, for a dry run, would do)."""

    run_id: str | None
    """The evaluation run (None for a dry run)."""
    space_id: str
    model: str
    head: str
    n_requests: int
    """Requests the run needs in all."""
    n_cached: int
    """Of those, answered before this call (free)."""
    n_sent: int
    """Sent and answered by this call."""
    n_pending: int
    """Not sent: the request budget (``max_requests``) ran out; run again to continue."""
    n_cells: int
    """Distinct cells asked about."""
    n_asks: int
    """Answers asked for: a cell is asked once per request that holds it (few-shot asks a test cell once per
    split and fold that tests it), so this may exceed ``n_cells``."""
    n_unanswered: int
    """Of ``n_asks``, those without a readable answer (missing, invalid or unparsed)."""
    n_tasks: int
    """(split, fold) tasks scored by this call."""
    n_reused: int
    """Tasks already in the catalog."""
    n_skipped: int
    """Tasks recorded as skipped (split or fold skipped, or no readable answer)."""
    n_pending_tasks: int
    """Tasks waiting for requests not sent yet."""
    prompt_tokens: int
    """Prompt tokens of the requests sent (dry run: estimated for the requests to send)."""
    completion_tokens: int
    """Answer tokens of the requests sent (dry run: estimated)."""
    seconds: float
    dry_run: bool = False
    prompts: tuple[str, ...] = ()
    """Dry run: the texts of the first requests to send."""
    results: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)
    """Long-format metrics of every task of the run (scored now or before)."""
    config: dict[str, Any] = field(default_factory=dict, repr=False)


def head_name(shots: int) -> str:
    """``prompt-zero-shot`` or ``prompt-<k>-shot``."""
    return "prompt-zero-shot" if shots == 0 else f"prompt-{shots}-shot"


def make_backend(backend: str, *, model: str | None = None, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 checkpoint: str | os.PathLike[str] | None = None, device: str = "auto", **openai_options: Any) -> Backend:
    """A backend by name: ``openai`` (any OpenAI-compatible endpoint), ``ollama`` (Ollama's own API, its
    context length checked) or ``hf`` (a local model folder)."""
    num_ctx = openai_options.pop("num_ctx", None)
    if num_ctx is not None and backend != "ollama":
        msg = "--num-ctx is for --backend ollama (an OpenAI-compatible endpoint takes no context length)."
        raise InputDataError(msg)
    if backend == "ollama":
        if checkpoint is not None:
            msg = "--checkpoint is for --backend hf; the ollama backend talks to --base-url with --model."
            raise InputDataError(msg)
        from scdm.prompt.ollama import DEFAULT_NUM_CTX, OllamaBackend

        return OllamaBackend(model or "", base_url=base_url, num_ctx=num_ctx or DEFAULT_NUM_CTX, **openai_options)
    if backend == "openai":
        if checkpoint is not None:
            msg = "--checkpoint is for --backend hf; the openai backend talks to --base-url with --model."
            raise InputDataError(msg)
        if base_url and urlsplit(base_url).port == 11434:
            logger.warning("prompt: %s looks like Ollama's OpenAI-compatible route, which cuts a prompt longer than the "
                           "model's context from its start without saying so; --backend ollama refuses such prompts.",
                           without_password(base_url))
        return OpenAIBackend(model or "", base_url=base_url, api_key_env=api_key_env, **openai_options)
    if backend == "hf":
        if checkpoint is None:
            msg = "--backend hf needs --checkpoint DIR: a local Hugging Face causal-LM folder."
            raise InputDataError(msg)
        from scdm.prompt.local import HFBackend

        return HFBackend(Path(checkpoint), model=model, device=device)
    msg = f"backend={backend!r} is not one of 'openai', 'ollama', 'hf'."
    raise InputDataError(msg)


def _space_id(backend: Backend, template: Template, top_k: int, cells_per_request: int) -> str:
    text = json.dumps({"arm": "prompt", "backend": backend.kind, "model": backend.model,
                       "checkpoint_hash": backend.checkpoint_hash, "template_hash": template.hash,
                       "decoding": backend.decoding(), "top_k": top_k, "cells_per_request": cells_per_request},
                      sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        msg = f"{name}={value!r} must be an integer >= {low}."
        raise InputDataError(msg)
    return int(value)


def _dataset_ids(st: Store, datasets: Sequence[str]) -> list[str]:
    if not datasets:
        msg = "Name the dataset(s) to prompt about (--dataset NAME, repeatable); see `scdm ls`."
        raise InputDataError(msg)
    return sorted({st.dataset(d).dataset_id for d in datasets})


def _splits(st: Store, table: CellTable, *, split_ids: Sequence[str], scenarios: Sequence[str], by: Sequence[str],
            category: str | None, folds: int, split_scheme: str, seed: int, label_set: str | None) -> list[Split]:
    if split_ids:
        splits = [load_split(st, s) for s in split_ids]
        other = [s for s in splits if category is not None and s.category != category]
        if other:  # a stored split is scored as it is: --category would be dropped, and another category's numbers shown
            named = ", ".join(f"{s.split_id} ({s.category_type}={s.category})" for s in other)
            msg = (f"--category {category} does not select among given splits: {named} {'is' if len(other) == 1 else 'are'} "
                   f"of another category. Drop --category, or pass --split-id of splits of category {category}.")
            raise InputDataError(msg)
        known = dict(zip(zip(table.frame["dataset_id"].astype(str), table.frame["row"].astype(int)),
                         table.frame["response"].astype(int)))
        for split in splits:
            cells = dict(zip(zip(split.cells["dataset_id"].astype(str), split.cells["row"].astype(int)),
                             split.cells["response"].astype(int)))
            if not cells.keys() <= known.keys():
                msg = (f"Split {split.split_id} covers cells outside the labelled cells of the datasets given "
                       f"({len(cells.keys() - known.keys())} cells); pass its datasets with --dataset.")
                raise InputDataError(msg)
            # the split scores against the labels it stores, while examples and the drug come from the
            # label set asked: the two must be the same labels, or the result mixes two label sets
            differ = sum(1 for cell, y in cells.items() if known[cell] != y)
            if differ:
                msg = (f"Split {split.split_id} was made with labels (label set {split.label_set or 'default'}) that "
                       f"differ from those of --label-set {label_set or '(default)'} on {differ} of its {len(cells)} "
                       f"cells; pass the split's label set with --label-set, or leave out --split-id.")
                raise InputDataError(msg)
        return splits
    names = dict(st.query("SELECT dataset_id, name FROM datasets").itertuples(index=False, name=None))
    splits = make_splits(table.frame, scenarios=scenarios, by=by, n_folds=folds, scheme=split_scheme,  # type: ignore[arg-type]
                         seed=seed, dataset_names=names)
    if category is not None:
        chosen = [s for s in splits if s.category == category]
        if not chosen:
            have = sorted({s.category for s in splits})
            msg = f"No category {category!r} among the splits of --by {','.join(by)}; categories: {', '.join(have)}."
            raise InputDataError(msg)
        splits = chosen
    return splits


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scdm")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class _Scoring:
    """Turns stored answers into task outcomes for one run."""

    space_id: str
    model: str
    head: str
    params_key: str
    shots: int
    names: dict[str, str]
    plan: Plan
    records: dict[str, PromptRecord]

    def key(self, split: Split, fold: int) -> TaskKey:
        return TaskKey(self.space_id, self.model, VARIANT, (), split, split_datasets(split, self.names), fold, self.head,
                       self.params_key)

    def skipped(self, split: Split, fold: int | None, reason: str) -> SkippedTask:
        return SkippedTask(self.space_id, split, split_datasets(split, self.names), fold, self.head, reason)

    def outcome(self, split: Split, fold: int) -> TaskOutcome | SkippedTask | None:
        """The task's outcome, a skip when no test cell has a readable answer, None while requests are unsent."""
        unit: Unit = None if self.shots == 0 else (split.split_id, fold)
        cells = fold_test_cells(split, fold)
        y_all = split.cells["response"].to_numpy(np.int8)[split.test_mask(fold)]
        keep, labels, scores, used = [], [], [], set()
        counts: dict[str, int] = {}
        for i, cell in enumerate(cells):
            where = self.plan.answer_of(unit, cell)
            record = None if where is None else self.records.get(where[0])
            if where is None or record is None:
                return None
            used.add(record.request_id)
            answer = record.answers[where[1] - 1]
            counts[answer.status] = counts.get(answer.status, 0) + 1
            if answer.status == "ok":
                keep.append(i)
                labels.append(answer.label)
                scores.append(answer.p_sensitive)
        n_bad = len(cells) - len(keep)
        if not keep:
            why = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
            return self.skipped(split, fold, f"no test cell got a readable answer ({why})")
        hard = any(s is None for s in scores)
        proba = np.asarray(labels if hard else scores, dtype=np.float64)
        idx = np.asarray(keep)
        seconds = sum(self.records[r].seconds or 0.0 for r in used)
        return TaskOutcome(self.key(split, fold), y_all[idx], proba, np.asarray([cells[i][0] for i in keep], dtype=object),
                           np.asarray([cells[i][1] for i in keep], dtype=np.int64), self.shots, 0.0, seconds,
                           hard_only=hard, extra_flags=unanswered_flag(n_bad))


def prompt(
    store: str | os.PathLike[str] | Store,
    datasets: Sequence[str] = (),
    *,
    backend: str | Backend = "openai",
    model: str | None = None,
    base_url: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    checkpoint: str | os.PathLike[str] | None = None,
    device: str = "auto",
    shots: int = 0,
    top_k: int = DEFAULT_TOP_K,
    cells_per_request: int = 10,
    template: str | os.PathLike[str] | Template | None = None,
    scenarios: Iterable[str] = ("pooled", "cross"),
    by: Iterable[str] = CATEGORY_TYPES,
    category: str | None = None,
    folds: int = 10,
    split_scheme: str = "auto",
    seed: int = 0,
    label_set: str | None = None,
    split_ids: Sequence[str] = (),
    temperature: float = 0.0,
    max_tokens: int = 512,
    response_format: str = "json_object",
    logprobs: bool = True,
    top_logprobs: int = 5,
    timeout_s: float = 120.0,
    num_ctx: int | None = None,
    concurrency: int = 4,
    rpm: float | None = None,
    retries: int = 6,
    backoff_s: float = 1.0,
    max_requests: int | None = None,
    dry_run: bool = False,
    show_prompts: int = 1,
    silent: bool = False,
    on_progress: Callable[[int], None] | None = None,
    allow_empty_cells: bool = False,
) -> PromptSummary:
    """Predict drug response by prompting a language model, scored on the heads' splits.

    Parameters
    ----------
    store : str, path or Store
    datasets : sequence of str
        Dataset names or ids; their labelled cells are pooled like one embedding space's.
    backend : {"openai", "ollama", "hf"} or Backend, default "openai"
        ``openai``: any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp) at
        ``base_url``; ``ollama``: an Ollama server's own API at ``base_url`` (default
        ``http://localhost:11434``), which refuses prompts longer than ``num_ctx`` instead of
        cutting them silently as Ollama's OpenAI-compatible route does; ``hf``: a local causal LM
        folder ``checkpoint``.
    model : str, optional
        The endpoint's model name (required for ``openai``); for ``hf`` the name shown in results.
    base_url, api_key_env : str
        Endpoint and the environment variable holding its key (local endpoints need none).
    checkpoint, device : for ``hf``.
    shots : int, default 0
        Labelled training cells shown as examples in each request (0 = zero-shot).
    top_k : int, default 10
        Genes per cell (scDrugMap: 10).
    cells_per_request : int, default 10
        Cells per request (scDrugMap: 10, to limit hallucination).
    template : path or Template, optional
        Replaces the default four-module template (see :mod:`scdm.prompt.templates`).
    scenarios, by, category, folds, split_scheme, seed, label_set :
        The splits, as in ``scdm.classify.evaluate`` (same defaults, hence the same split ids);
        ``category`` keeps one category value of ``by``. ``seed`` also orders the cells into
        requests and draws the examples.
    split_ids : sequence of str, optional
        Use these stored splits instead of building them.
    temperature, max_tokens, response_format, logprobs, top_logprobs, timeout_s :
        Decoding of the ``openai`` and ``ollama`` backends (see :class:`scdm.prompt.backends.OpenAIBackend`).
    num_ctx : int, optional
        ``ollama``: the context length to run the model with (default 8192; see
        :class:`scdm.prompt.ollama.OllamaBackend`).
    concurrency, rpm, retries, backoff_s, max_requests :
        Sending (see :mod:`scdm.prompt.runner`): parallel requests, starts per minute, retries on
        429/5xx/timeouts with exponential back-off, and a budget of new requests for this call.
    dry_run : bool, default False
        Plan only: count requests (and those already answered) and tokens, keep the first
        ``show_prompts`` prompt texts; send nothing, write nothing.
    silent : bool
        No progress bar.
    on_progress : callable, optional
        Called with the number of new answers each time they are stored.
    allow_empty_cells : bool, default False
        Prompt labelled cells that list no gene (none expressed with a symbol) with an empty gene list;
        refused otherwise, naming them, as ``scdm embed`` refuses cells without a gene the model knows.

    Returns
    -------
    PromptSummary

    Examples
    --------
    >>> s = prompt("scdm-store", ["a375"], backend="ollama", model="llama3.1:8b")  # doctest: +SKIP
    >>> s.results.query("metric == 'f1'")  # doctest: +SKIP
    """
    from scdm.store import open_store

    started = time.perf_counter()
    st = open_store(store)
    if not dry_run:
        st.check_writable("prompt a language model (answers and scores are written to the store)")
    shots = _check_int("shots", shots, 0)
    top_k = _check_int("top_k", top_k, 1)
    cells_per_request = _check_int("cells_per_request", cells_per_request, 1)
    seed = _check_int("seed", seed, 0)  # also orders cells into requests and draws examples, with or without split_ids
    policy = SendPolicy(concurrency=concurrency, rpm=rpm, retries=retries, backoff_s=backoff_s, max_requests=max_requests)
    tmpl = template if isinstance(template, Template) else load_template(template)
    if shots and "examples" not in tmpl.fields:
        msg = f"--shots {shots} needs a template with an {{examples}} placeholder; {tmpl.name} has none."
        raise InputDataError(msg)
    ids = _dataset_ids(st, datasets)
    table = load_cells(st, ids, label_set=label_set, top_k=top_k, allow_empty_cells=allow_empty_cells)
    for name, note in table.notes.items():
        if "scaled" in note:
            logger.warning("prompt: %s: %s", name, note)
    splits = _splits(st, table, split_ids=list(split_ids), scenarios=list(scenarios), by=list(by), category=category,
                     folds=folds, split_scheme=split_scheme, seed=seed, label_set=label_set)
    owned = isinstance(backend, str)
    llm = make_backend(backend, model=model, base_url=base_url, api_key_env=api_key_env, checkpoint=checkpoint,
                       device=device, temperature=temperature, max_tokens=max_tokens, response_format=response_format,
                       logprobs=logprobs, top_logprobs=top_logprobs, timeout_s=timeout_s,
                       **({} if num_ctx is None else {"num_ctx": num_ctx})) if isinstance(backend, str) \
        else backend
    try:
        plan = plan_requests(splits, table, template=tmpl, backend=llm, top_k=top_k, cells_per_request=cells_per_request,
                             shots=shots, seed=seed)
        space_id = _space_id(llm, tmpl, top_k, cells_per_request)
        head = head_name(shots)
        config = {"arm": "prompt", "backend": llm.kind, "model": llm.model, "endpoint": llm.endpoint,
                  "checkpoint_hash": llm.checkpoint_hash, "decoding": llm.decoding(), "template": tmpl.name,
                  "template_hash": tmpl.hash, "top_k": top_k, "cells_per_request": cells_per_request, "shots": shots,
                  "seed": seed, "datasets": sorted(table.notes), "values": table.notes, "label_set": label_set,
                  "scenarios": list(scenarios), "by": list(by), "category": category, "folds": folds,
                  "split_scheme": split_scheme, "split_ids": [s.split_id for s in splits], "space_id": space_id,
                  "split_schemes_used": sorted({s.scheme for s in splits if s.scenario == "pooled"}),
                  "head": head, "max_requests": max_requests}
        if dry_run:
            return _dry_run(st, llm, plan, config, space_id, head, show_prompts, started)
        return _run(st, llm, plan, splits, config, space_id=space_id, head=head, shots=shots, policy=policy,
                    template_hash=tmpl.hash, silent=silent, on_progress=on_progress, started=started)
    finally:
        if owned:
            llm.close()


def _dry_run(st: Store, llm: Backend, plan: Plan, config: dict[str, Any], space_id: str, head: str, show: int,
             started: float) -> PromptSummary:
    unique = list({r.request_id: r for r in plan.requests}.values())
    cached = set(load_prompts(st, [r.request_id for r in unique]))
    todo = [r for r in unique if r.request_id not in cached]
    n_prompt = sum(llm.count_tokens(r.text) for r in todo)
    n_answer = sum(OUTPUT_TOKENS_PER_CELL * len(r.cells) + 8 for r in todo)
    cells = {c for r in unique for c in r.cells}
    budget = config.get("max_requests")
    return PromptSummary(run_id=None, space_id=space_id, model=llm.model, head=head, n_requests=len(unique),
                         n_cached=len(cached), n_sent=0,
                         n_pending=len(todo) if budget is None else max(0, len(todo) - int(budget)),
                         n_cells=len(cells), n_asks=sum(len(r.cells) for r in unique), n_unanswered=0, n_tasks=0, n_reused=0, n_skipped=0, n_pending_tasks=0,
                         prompt_tokens=n_prompt, completion_tokens=n_answer, seconds=time.perf_counter() - started,
                         dry_run=True, prompts=tuple(r.text for r in todo[:max(0, show)]), config=config)


def _run(st: Store, llm: Backend, plan: Plan, splits: Sequence[Split], config: dict[str, Any], *, space_id: str, head: str,
         shots: int, policy: SendPolicy, template_hash: str, silent: bool, on_progress: Callable[[int], None] | None,
         started: float) -> PromptSummary:
    save_splits(st, splits)
    splits = shared_partitions(st, splits)
    names = dict(st.query("SELECT dataset_id, name FROM datasets").itertuples(index=False, name=None))
    # the parser version is part of the task: a task scored from an older parse is not reused; so is,
    # for zero-shot, how its requests are composed (an older scdm composed them by the splits asked)
    params: dict[str, Any] = {"answer_parser": ANSWER_PARSER_VERSION, "shots": shots, "seed": config["seed"]}
    if shots == 0:
        params["batching"] = ZERO_SHOT_BATCHING
    params_key = json.dumps(params, sort_keys=True)
    run_id = start_run(st, config, scdm_version=_version())
    report = SendReport()
    bar = progress_bar(len({r.request_id for r in plan.requests}), desc=f"prompt {llm.model}", unit="request",
                       silent=silent, leave=False)

    def tick(n: int) -> None:
        bar.update(n)
        if on_progress is not None:
            on_progress(n)

    try:
        report = send_requests(st, llm, plan.requests, template_hash=template_hash, policy=policy, progress=tick)
        bar.close()
    except BaseException:
        bar.close()
        # score what is complete (answers already stored stay for the next run), then fail the run
        partial = load_answers(st, [r.request_id for r in plan.requests])
        _score(st, run_id, splits, _Scoring(space_id, llm.model, head, params_key, shots, names, plan, partial))
        finish_run(st, run_id, status="failed", seconds=time.perf_counter() - started)
        raise
    scoring = _Scoring(space_id, llm.model, head, params_key, shots, names, plan, report.records)
    counts = _score(st, run_id, splits, scoring)
    n_old = forget_older_prompt_tasks(st, space_id=space_id, head=head, seed=config["seed"],
                                      split_ids=[s.split_id for s in splits])
    if n_old:
        logger.warning("prompt: %d tasks an older scdm scored (answers read by an older answer parser, or zero-shot "
                       "requests composed by the splits asked) are replaced by this run's scores", n_old)
    seconds = time.perf_counter() - started
    # a run the request budget cut short is partial: its waiting tasks are done by the same command again
    finish_run(st, run_id, status="partial" if counts["pending"] else "complete", seconds=seconds,
               n_tasks=counts["tasks"], n_done=counts["done"], n_reused=counts["reused"], n_skipped=counts["skipped"])
    if counts["done"] + counts["reused"] + counts["pending"] == 0:
        _warn_nothing_scored(st, run_id)
    # every ask once: a test cell in the requests of several (split, fold) units was asked several times
    asks = {where for unit in plan.where.values() for where in unit.values()}
    unanswered = sum(1 for rid, pos in asks
                     if rid in report.records and report.records[rid].answers[pos - 1].status != "ok")
    _warn_cut_short(report, config)
    if report.n_pending:
        logger.warning("prompt: the request budget ran out: %d of %d requests not sent, %d tasks wait for them. "
                       "Run the same command again to continue (answers so far are stored).",
                       report.n_pending, len({r.request_id for r in plan.requests}), counts["pending"])
    return PromptSummary(run_id=run_id, space_id=space_id, model=llm.model, head=head,
                         n_requests=len({r.request_id for r in plan.requests}), n_cached=report.n_cached,
                         n_sent=report.n_sent, n_pending=report.n_pending, n_cells=len({c for r in plan.requests
                                                                                        for c in r.cells}),
                         n_asks=len(asks), n_unanswered=unanswered, n_tasks=counts["done"], n_reused=counts["reused"],
                         n_skipped=counts["skipped"], n_pending_tasks=counts["pending"],
                         prompt_tokens=report.prompt_tokens, completion_tokens=report.completion_tokens, seconds=seconds,
                         results=task_results(st, counts["ids"]), config=config)


def _warn_cut_short(report: SendReport, config: dict[str, Any]) -> None:
    """Say when answers stopped at the token limit: their cells count as unanswered, and the stored answer
    is reused by every rerun with the same decoding, so only a larger --max-tokens asks them again."""
    cut = [r for r in report.records.values() if cut_short(r)]
    if not cut:
        return
    n_cells = sum(1 for r in cut for a in r.answers if a.status != "ok")
    limit = (config.get("decoding") or {}).get("max_tokens")
    logger.warning("prompt: %d of %d answers stopped at the token limit (--max-tokens %s) before every cell was answered, "
                   "leaving %d cells of them without a readable answer. Rerun with a larger --max-tokens (those "
                   "requests are then sent again).", len(cut), len(report.records), limit, n_cells)


def _warn_nothing_scored(st: Store, run_id: str) -> None:
    """Say why a run scored nothing (as ``scdm evaluate`` does), instead of an empty leaderboard."""
    skipped = run_skipped(st, run_id)
    why = (skip_reasons(skipped) + " (all of them: the skipped_tasks table)") if len(skipped) else (
        "no category of the chosen --by has cells to test (see the splits: lines above)")
    logger.warning("prompt: nothing could be scored: %s", why)


def _score(st: Store, run_id: str, splits: Sequence[Split], scoring: _Scoring) -> dict[str, Any]:
    """Write every task that can be scored now (skipping those already stored); counts by outcome."""
    writer = ResultWriter(st, run_id)
    counts: dict[str, Any] = {"tasks": 0, "done": 0, "reused": 0, "skipped": 0, "pending": 0, "ids": []}
    evaluated = [(s, f) for s in splits for f in s.folds]
    keys = {(s.split_id, f): scoring.key(s, f).task_id for s, f in evaluated}
    done = finished_tasks(st, list(keys.values()))
    for split in splits:
        if split.reason:
            writer.skip(scoring.skipped(split, None, split.reason))
            counts["skipped"] += 1
            continue
        for fold, why in split.skipped_folds.items():
            writer.skip(scoring.skipped(split, fold, why))
            counts["skipped"] += 1
    for split, fold in evaluated:
        task_id = keys[(split.split_id, fold)]
        counts["tasks"] += 1
        if task_id in done:
            counts["reused"] += 1
            counts["ids"].append(task_id)
            continue
        out = scoring.outcome(split, fold)
        if out is None:
            counts["pending"] += 1
        elif isinstance(out, SkippedTask):
            writer.skip(out)
            counts["skipped"] += 1
        else:
            writer.add(out)
            counts["done"] += 1
            counts["ids"].append(task_id)
    writer.flush()
    # tasks another run stored meanwhile (two identical runs at once) are that run's: reused here
    counts["done"] -= writer.n_dropped + writer.n_elsewhere
    counts["reused"] += writer.n_elsewhere
    return counts
