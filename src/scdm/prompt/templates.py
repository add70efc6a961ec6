"""Prompt templates: plain-text files with ``{field}`` placeholders, filled per request.

The default template (``scdm.prompt/templates/default.txt``) follows the four modules of the
scDrugMap / GPTCelltype prompt: (1) how to reason, (2) the data source, (3) the gene lists of the
cells (10 per request), (4) the output instruction with an answer template, repeated. A user
template replaces it (``--template FILE``); its hash is part of every request's identity and of the
result's embedding-space id, so results of two templates are never mixed.

Fields a template may use (Python ``str.format`` names; write a literal brace as ``{{`` or ``}}``):

===================  ==========================================================================
``{cells}``          required: one line per cell, ``Cell 1: GENE1, GENE2, ...``
``{n_cells}``        number of cells in this request
``{top_k}``          genes listed per cell (at most)
``{source}``         the cells' data source: study, tissue, cancer type, drug, drug type, regimen
``{drug}``           the drug, or "the drug" when the label set names none
``{examples}``       few-shot examples with their known response (empty in zero-shot)
``{answer_format}``  the JSON answer expected, one entry per cell
===================  ==========================================================================
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from scdm.store.errors import InputDataError

__all__ = ["FIELDS", "LABELS", "Template", "ExampleCell", "load_template", "source_description", "answer_format",
           "render"]

FIELDS: dict[str, str] = {
    "cells": "one line per cell: 'Cell 1: GENE1, GENE2, ...' (required)",
    "n_cells": "number of cells in the request",
    "top_k": "genes listed per cell (at most)",
    "source": "data source of the cells: study, tissue, cancer type, drug, drug type, regimen",
    "drug": "the drug, or 'the drug' when unknown",
    "examples": "few-shot examples with their known response (empty in zero-shot)",
    "answer_format": "the JSON answer expected, one entry per cell",
}
"""The placeholders a template may use, with what they hold."""

LABELS: dict[int, str] = {1: "sensitive", 0: "resistant"}
"""Answer words of the two classes (1 = sensitive, the positive class)."""

_SOURCE_FIELDS = (("study", "study"), ("tissue", "tissue"), ("cancer_type", "cancer type"), ("drug", "drug"),
                  ("drug_type", "drug type"), ("regimen", "regimen"))


@dataclass(frozen=True)
class Template:
    """A prompt template: its text, where it came from and its hash."""

    text: str
    name: str
    """``default`` or the file it was read from."""

    @property
    def hash(self) -> str:
        """Hash of the text (newlines normalised): part of every request's identity."""
        return hashlib.blake2b(self.text.replace("\r\n", "\n").encode(), digest_size=8).hexdigest()

    @property
    def fields(self) -> set[str]:
        """The placeholders the template uses."""
        return {field for _, field, _, _ in string.Formatter().parse(self.text) if field is not None}


@dataclass(frozen=True)
class ExampleCell:
    """A labelled cell shown as a few-shot example (always a training cell of the fold)."""

    genes: tuple[str, ...]
    label: int
    source: str


def _check(text: str, name: str) -> None:
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as err:
        msg = (f"Template {name} is not a valid format string ({err}). Write literal braces as '{{{{' and '}}}}' "
               f"(e.g. JSON examples); placeholders are {', '.join('{' + f + '}' for f in FIELDS)}.")
        raise InputDataError(msg) from err
    used = set()
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in FIELDS or spec or conversion:
            msg = (f"Template {name} uses {{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}, "
                   f"which is not a placeholder. Placeholders: {', '.join('{' + f + '}' for f in FIELDS)}; "
                   "write literal braces as '{{' and '}}'.")
            raise InputDataError(msg)
        used.add(field)
    if "cells" not in used:
        msg = f"Template {name} has no {{cells}} placeholder: the cells' genes would not be in the prompt."
        raise InputDataError(msg)


def load_template(path: str | os.PathLike[str] | None = None) -> Template:
    """The default template, or the one in file ``path`` (checked: known placeholders, ``{cells}`` present)."""
    if path is None:
        text = resources.files("scdm.prompt").joinpath("templates").joinpath("default.txt").read_text(encoding="utf-8")
        name = "default"
    else:
        file = Path(path)
        if not file.is_file():
            msg = f"Template file {str(file)!r} does not exist. Pass a text file with {{cells}} and the other placeholders."
            raise InputDataError(msg)
        text, name = file.read_text(encoding="utf-8"), str(file)
    _check(text, name)
    return Template(text=text, name=name)


def source_description(meta: dict[str, Any]) -> str:
    """``study: X; tissue: Y; ...`` from a cell's metadata (unknown fields left out)."""
    parts = []
    for key, label in _SOURCE_FIELDS:
        value = meta.get(key)
        if value is not None and value == value and str(value).strip():
            parts.append(f"{label}: {value}")
    return "; ".join(parts) or "not given"


def answer_format(n_cells: int) -> str:
    """The JSON answer a request asks for, one entry per cell."""
    entries = [{"cell": i, "response": "sensitive|resistant"} for i in range(1, n_cells + 1)]
    return json.dumps({"cells": entries})


def _gene_line(genes: Sequence[str]) -> str:
    return ", ".join(genes) if genes else "(no expressed gene)"


def _examples_block(examples: Sequence[ExampleCell]) -> str:
    if not examples:
        return ""
    lines = ["Cells whose response is known, as examples:"]
    lines += [f"Example {i} ({ex.source}): {_gene_line(ex.genes)} -> {LABELS[ex.label]}" for i, ex in enumerate(examples, 1)]
    return "\n".join(lines)


def render(template: Template, *, cells: Sequence[Sequence[str]], source: str, drug: str | None, top_k: int,
           examples: Sequence[ExampleCell] = ()) -> str:
    """The prompt text of one request."""
    values = {
        "cells": "\n".join(f"Cell {i}: {_gene_line(g)}" for i, g in enumerate(cells, 1)),
        "n_cells": len(cells),
        "top_k": top_k,
        "source": source,
        "drug": drug or "the drug",
        "examples": _examples_block(examples),
        "answer_format": answer_format(len(cells)),
    }
    text = template.text.format_map(values)
    # an empty module (zero-shot examples) leaves no run of blank lines behind
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
