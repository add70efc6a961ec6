"""Which cells are asked about, in which requests, with which examples.

Prompting is scored on the test cells of the same stored splits as every head (``store.splits``),
so it is compared with the embedding heads on identical cells.

Zero-shot
    A cell's answer does not depend on the fold (nothing is learnt), so every labelled cell is asked
    about once and its answer scores every (split, fold) whose test side holds it, in this run and in
    any later one. Which cells share a request depends on the cells alone, never on the splits asked
    (``--scenario/--by/--category/--folds``): a model answers a cell in the context of its
    batch-mates, so a request composed from the splits would give a task other numbers when other
    splits were asked with it, and ask its cells again. The labelled cells of the datasets are cut
    into requests once, per dataset (so a dataset's requests are the same whichever datasets are
    prompted with it) and data source (the prompt has one source module), in an order drawn with
    ``seed``, ``cells_per_request`` per request: about cells / 10 requests plus one per dataset and
    source. A run sends the requests that hold a test cell of one of its folds (with their other
    cells: a given split that covers part of a source pays for the rest), in the order of the first
    fold that needs each: a budget (``--max-requests``) completes the first folds first, though a
    pooled fold's cells are spread over most requests (cross-study folds and categories follow the
    sources).
k-shot
    The examples come from the training side of the fold, so each evaluated (split, fold) has its
    own requests: its test cells, per data source in an order drawn with ``seed``, ``cells_per_request``
    per request, each request showing the same ``shots`` labelled training cells (balanced between
    the classes as far as the training side allows, drawn with a seed from the split, fold and
    ``seed``). A test cell is never an example. Nothing of another split or fold enters them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from scdm.prompt.backends import Backend
from scdm.prompt.runner import Request
from scdm.prompt.sentences import cell_gene_lists, value_note
from scdm.prompt.templates import ExampleCell, Template, render, source_description
from scdm.store.errors import InputDataError
from scdm.store.labels import resolve_label_sets
from scdm.store.prompts import request_id_of
from scdm.store.splits import Split

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from scdm.store import Store

__all__ = ["CellTable", "Plan", "Unit", "load_cells", "plan_requests", "choose_examples", "fold_test_cells",
           "zero_shot_batches"]

Cell = tuple[str, int]
Unit = tuple[str, int] | None
"""What a request's answers are valid for: None (zero-shot: any fold) or (split_id, fold)."""


@dataclass
class CellTable:
    """The labelled cells that may appear in a prompt: metadata, source text and top-k genes."""

    frame: pd.DataFrame
    """dataset_id, row, response, source, drug, genes (tuple of symbols), one row per labelled cell."""
    notes: dict[str, str] = field(default_factory=dict)
    """Dataset name -> what the listed genes mean for its values (counts, normalised, scaled)."""

    def __post_init__(self) -> None:
        keys = list(zip(self.frame["dataset_id"].astype(str), self.frame["row"].astype(int)))
        # plain dicts: planning looks cells up millions of times on large collections
        self._genes = dict(zip(keys, self.frame["genes"]))
        self._source = dict(zip(keys, self.frame["source"]))
        self._response = dict(zip(keys, self.frame["response"].astype(int)))
        self._drug = dict(zip(keys, self.frame["drug"]))

    def genes(self, cell: Cell) -> tuple[str, ...]:
        return self._genes[cell]

    def source(self, cell: Cell) -> str:
        return self._source[cell]

    def response(self, cell: Cell) -> int:
        return self._response[cell]

    def drug(self, cell: Cell) -> str | None:
        value = self._drug[cell]
        return None if value is None or value != value else str(value)


def load_cells(st: Store, dataset_ids: Sequence[str], *, label_set: str | None, top_k: int,
               allow_empty_cells: bool = False) -> CellTable:
    """Labelled cells of the datasets with their data-source text and top-k gene symbols.

    Cells that list no gene (no value above zero on a gene with a symbol) are refused unless
    ``allow_empty_cells``, as ``scdm embed`` refuses cells that express no gene the model knows:
    their prompt line would be empty, and the model's answer for it would be scored like any cell's.
    """
    cells = st.cells(list(dataset_ids), label_set=label_set)
    cells = cells[cells["response"].notna()].copy()
    if cells.empty:
        msg = "None of the cells has a response label; ingest with --label-key (or choose another --label-set)."
        raise InputDataError(msg)
    drugs = {d: ls.drug for d, ls in resolve_label_sets(st, list(dataset_ids), label_set).items()}
    cells["drug"] = cells["dataset_id"].map(drugs)
    cells["row"] = cells["row"].astype(np.int64)
    cells["response"] = cells["response"].astype(np.int8)
    cells["source"] = [source_description(r) for r in cells.to_dict("records")]
    genes: dict[Cell, tuple[str, ...]] = {}
    notes = {}
    for dataset_id, group in cells.groupby("dataset_id", sort=True):
        info = st.dataset(str(dataset_id))
        notes[info.name] = value_note(info.x_kind)
        for row, listed in cell_gene_lists(st, info.dataset_id, group["row"].tolist(), top_k).items():
            genes[(str(dataset_id), row)] = tuple(listed)
    cells["genes"] = [genes[(d, r)] for d, r in zip(cells["dataset_id"], cells["row"])]
    _check_cells_listed(st, cells, allow_empty_cells)
    return CellTable(frame=cells.sort_values(["dataset_id", "row"]).reset_index(drop=True), notes=notes)


def _check_cells_listed(st: Store, cells: pd.DataFrame, allow_empty_cells: bool) -> None:
    """Refuse (or, with ``allow_empty_cells``, warn of) labelled cells whose gene list is empty, naming their rows."""
    empty = cells[[len(g) == 0 for g in cells["genes"]]]
    if empty.empty:
        return
    where = "; ".join(f"dataset {st.dataset(str(d)).name!r} rows {_rows(g['row'].to_numpy())}"
                      for d, g in empty.groupby("dataset_id", sort=True))
    if allow_empty_cells:
        logger.warning("prompt: %d labelled cells list no gene (%s); they are prompted with an empty gene list and scored "
                       "(allow_empty_cells)", len(empty), where)
        return
    msg = (f"{len(empty)} labelled cells express no gene with a symbol ({where}), so their prompt would list no gene "
           "and the model's answer for them, scored like any cell's, would say nothing about them. Filter such cells "
           "out before ingesting (e.g. scanpy.pp.filter_cells(adata, min_genes=200)), or pass --allow-empty-cells "
           "(allow_empty_cells=True) to prompt them as they are.")
    raise InputDataError(msg)


def _rows(rows: np.ndarray, n: int = 10) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:n])
    return f"{shown}{', ...' if len(rows) > n else ''} ({len(rows)} in all)"


@dataclass
class Plan:
    """The requests of a prompting run and which request answers which cell."""

    requests: list[Request] = field(default_factory=list)
    where: dict[Unit, dict[Cell, tuple[str, int]]] = field(default_factory=dict)
    """Unit -> cell -> (request_id, position in the prompt)."""
    examples: dict[Unit, tuple[Cell, ...]] = field(default_factory=dict)
    """(split_id, fold) -> the example cells of its requests (k-shot)."""

    def answer_of(self, unit: Unit, cell: Cell) -> tuple[str, int] | None:
        return self.where.get(unit, {}).get(cell)


def _order_key(seed: int, cell: Cell) -> str:
    return hashlib.blake2b(json.dumps([seed, cell[0], int(cell[1])]).encode(), digest_size=8).hexdigest()


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=8).digest(), "little")


def fold_test_cells(split: Split, fold: int) -> list[Cell]:
    """(dataset_id, row) of fold ``fold``'s test cells."""
    test = split.cells[split.test_mask(fold)]
    return list(zip(test["dataset_id"].astype(str), test["row"].astype(int)))


def choose_examples(split: Split, fold: int, table: CellTable, shots: int, seed: int) -> tuple[Cell, ...]:
    """``shots`` labelled training cells of the fold (balanced classes where possible, seeded, shuffled)."""
    train = split.cells[split.train_mask(fold)]
    cells = [(str(d), int(r)) for d, r in zip(train["dataset_id"], train["row"])]
    cells = [c for c in cells if table.genes(c)]  # a cell without a listed gene teaches nothing
    rng = np.random.default_rng(_seed_of("examples", seed, split.split_id, fold))
    by_class = {y: [c for c in cells if table.response(c) == y] for y in (1, 0)}
    for y in by_class:
        by_class[y] = [by_class[y][i] for i in rng.permutation(len(by_class[y]))]
    want = {1: (shots + 1) // 2, 0: shots // 2}
    take = {y: min(want[y], len(by_class[y])) for y in (1, 0)}
    for y, other in ((1, 0), (0, 1)):  # fill from the other class where one is short
        take[y] = min(len(by_class[y]), take[y] + max(0, want[other] - len(by_class[other])))
    chosen = by_class[1][:take[1]] + by_class[0][:take[0]]
    return tuple(chosen[i] for i in rng.permutation(len(chosen)))


def _fill(ordered: Sequence[Cell], group: Callable[[Cell], Any], size: int) -> list[list[Cell]]:
    """Consecutive cells of one group together, ``size`` per request (the last of each group may be short)."""
    out: list[list[Cell]] = []
    for cell in ordered:
        if out and len(out[-1]) < size and group(out[-1][0]) == group(cell):
            out[-1].append(cell)
        else:
            out.append([cell])
    return out


def _batches(cells: Sequence[Cell], table: CellTable, size: int, seed: int) -> list[list[Cell]]:
    """One fold's test cells (k-shot): cells of one source together, ``size`` per request, in a seeded order."""
    return _fill(sorted(cells, key=lambda c: (table.source(c), _order_key(seed, c))), table.source, size)


def zero_shot_batches(table: CellTable, size: int, seed: int) -> list[list[Cell]]:
    """Every labelled cell of ``table`` in its zero-shot request: per dataset and source, ``size`` per
    request, in a seeded order. Only the cells and ``seed`` decide it, never the splits asked."""
    cells = list(zip(table.frame["dataset_id"].astype(str), table.frame["row"].astype(int)))

    def group(cell: Cell) -> tuple[str, str]:
        return cell[0], table.source(cell)

    return _fill(sorted(cells, key=lambda c: (*group(c), _order_key(seed, c))), group, size)


def _request(batch: list[Cell], examples: tuple[Cell, ...], table: CellTable, template: Template, backend: Backend,
             top_k: int) -> Request:
    shown = [ExampleCell(genes=table.genes(c), label=table.response(c), source=table.source(c))
             for c in examples]
    text = render(template, cells=[table.genes(c) for c in batch], source=table.source(batch[0]),
                  drug=table.drug(batch[0]), top_k=top_k, examples=shown)
    messages = [{"role": "user", "content": text}]
    rid = request_id_of(backend=backend.kind, model=backend.model, checkpoint_hash=backend.checkpoint_hash,
                        template_hash=template.hash, messages=messages, decoding=backend.decoding())
    return Request(request_id=rid, messages=messages, cells=tuple(batch), examples=examples)


def _add(plan: Plan, unit: Unit, batches: list[list[Cell]], examples: tuple[Cell, ...], table: CellTable,
         template: Template, backend: Backend, top_k: int) -> None:
    where = plan.where.setdefault(unit, {})
    for batch in batches:
        request = _request(batch, examples, table, template, backend, top_k)
        plan.requests.append(request)
        for position, cell in enumerate(batch, 1):
            where[cell] = (request.request_id, position)


def plan_requests(splits: Sequence[Split], table: CellTable, *, template: Template, backend: Backend, top_k: int,
                  cells_per_request: int, shots: int, seed: int) -> Plan:
    """The requests that answer every evaluated fold of ``splits`` (see the module docstring)."""
    plan = Plan()
    evaluated = [(s, f) for s in splits for f in s.folds]
    if shots == 0:
        first_fold: dict[Cell, int] = {}
        for i, (split, fold) in enumerate(evaluated):
            for cell in fold_test_cells(split, fold):
                first_fold.setdefault(cell, i)
        batches = [b for b in zero_shot_batches(table, cells_per_request, seed) if any(c in first_fold for c in b)]
        # the send order only (never what a request holds): the requests of the first fold first
        batches.sort(key=lambda batch: min(first_fold.get(c, len(evaluated)) for c in batch))  # stable
        _add(plan, None, batches, (), table, template, backend, top_k)
        return plan
    for split, fold in evaluated:
        examples = choose_examples(split, fold, table, shots, seed)
        plan.examples[(split.split_id, fold)] = examples
        _add(plan, (split.split_id, fold), _batches(fold_test_cells(split, fold), table, cells_per_request, seed), examples,
             table, template, backend, top_k)
    return plan
