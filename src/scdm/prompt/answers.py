"""Reading a language model's answer: one label per cell, and P(sensitive) from token log-probabilities.

:func:`parse_answer` reads the JSON answer the prompt asks for (``{"cells": [{"cell": 1,
"response": "sensitive"}, ...]}``; a bare list, a ``{"1": "sensitive"}`` mapping, code fences and
text around the JSON are accepted too), or, failing JSON, lines such as ``Cell 3: resistant``.
Labels are the words sensitive/resistant (any case) or the paper's 1/0 (a text line naming both
words is not an answer). Each cell gets a status:
``ok``, ``missing`` (no entry), ``invalid`` (an entry that is not a label, or two different labels;
every cell when the answer numbers a cell 0, i.e. not the prompt's numbering) or, when nothing
readable came back, ``unparsed``. Nothing is guessed.

:func:`label_scores` turns the token log-probabilities of an OpenAI-style response into
P(sensitive) per cell: at the token where a cell's label word starts, the probability mass of the
alternatives spelling "sensitive" and of those spelling "resistant" (from ``top_logprobs``),
normalised over the two. A class absent from the listed alternatives gets an upper bound, the
smaller of the unlisted mass and the least listed probability, so a score is never exactly 0 or 1
merely because the endpoint listed few alternatives.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scdm.store.prompts import PromptAnswer

__all__ = ["ParsedAnswer", "parse_answer", "label_scores"]

_WORDS = {"sensitive": 1, "resistant": 0}
_WORD_RE = re.compile(r"(?i)\b(sensitive|resistant)\b")
# a bare 0/1 is a label, but not the start of a number such as 0.7, 0,9 or 1e-3 (a probability is not a label)
_LINE_RE = re.compile(r"(?i)cell\s*#?\s*(\d+)[\s*:=)\].\-\"']*(sensitive|resistant|[01](?![.,]?\d|%|e-?\d))\b")
_POSITION_KEYS = ("cell", "id", "index", "cell_id", "number")
_LABEL_KEYS = ("response", "label", "answer", "prediction", "result")
_LIST_KEYS = ("cells", "answers", "results", "predictions", "responses", "res")


@dataclass(frozen=True)
class ParsedAnswer:
    """The cells' answers of one response."""

    status: str
    """``answered`` (some cell readable) or ``unparsed``."""
    answers: tuple[PromptAnswer, ...]
    word_order: tuple[int, ...]
    """Cell numbers of the entries whose value is a label word, in the order they appear in the text."""


def _label_of(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value in (0, 1):
        return value
    if isinstance(value, str):
        word = value.strip().strip(".\"'* ").lower()
        if word in _WORDS:
            return _WORDS[word]
        if word in ("0", "1"):
            return int(word)
    return None


def _is_word(value: Any) -> bool:
    return isinstance(value, str) and value.strip().strip(".\"'* ").lower() in _WORDS


def _json_payloads(text: str) -> tuple[list[Any], bool]:
    """The JSON values of the text: the whole text, else each JSON value found in it, in order; and
    whether the text is one JSON value (nothing around it).

    Prose around the answer may hold brackets (``[low confidence]``) or the answer may come twice,
    so the values are decoded one by one rather than from the first bracket to the last.
    """
    body = re.sub(r"^\s*```[a-zA-Z]*\s*|\s*```\s*$", "", text.strip())
    try:
        return [json.loads(body)], True
    except ValueError:
        pass
    decoder, at = json.JSONDecoder(), 0
    out: list[Any] = []
    while True:
        starts = [i for i in (body.find("{", at), body.find("[", at)) if i >= 0]
        if not starts:
            return out, False
        start = min(starts)
        try:
            value, at = decoder.raw_decode(body, start)
        except ValueError:
            at = start + 1
            continue
        out.append(value)


def _position(item: dict[str, Any]) -> int | None:
    for key in _POSITION_KEYS:
        value = item.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*(cell\s*)?\d+\s*", value, re.IGNORECASE):
            return int(re.sub(r"\D", "", value))
    return None


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (isinstance(value, str) and re.fullmatch(r"\s*-?\d+([.,]\d*)?\s*", value) is not None)


def _entries(obj: Any, n_cells: int, whole: bool = True) -> list[tuple[int | None, Any]] | None:
    """(cell number, value) pairs in text order, or None when ``obj`` is not an answer.

    A list entry without a cell number is the cell of its place in the list only when the list has
    one entry per cell: in a shorter or longer list the place says nothing (a skipped cell would
    give every later cell its neighbour's answer), so such entries get no cell number. Nor does a
    list of plain numbers that is not the whole answer (``cells [1, 2] look resistant`` lists cell
    numbers: read by place, cell 1 was "sensitive"), nor one holding a number other than 0 and 1.
    """
    if isinstance(obj, dict):
        for key in _LIST_KEYS:
            if isinstance(obj.get(key), list):
                return _entries(obj[key], n_cells, whole)
        if obj and all(re.fullmatch(r"\s*(cell\s*)?\d+\s*", str(k), re.IGNORECASE) for k in obj):
            return [(int(re.sub(r"\D", "", str(k))), v) for k, v in obj.items()]
        return None
    if isinstance(obj, list):
        out: list[tuple[int | None, Any]] = []
        numbers = [item for item in obj if _is_number(item)]
        by_place = len(obj) == n_cells and not (numbers and (not whole or any(_label_of(v) is None for v in numbers)))
        for i, item in enumerate(obj, 1):
            if isinstance(item, dict):
                value = next((item[k] for k in _LABEL_KEYS if k in item), None)
                position = _position(item)
                out.append((i if position is None and by_place else position, value))
            else:
                out.append((i if by_place else None, item))
        return out
    return None


def _json_entries(text: str, n_cells: int) -> list[tuple[int | None, Any]]:
    """Entries of every JSON answer in the text (two answers that disagree on a cell make it invalid)."""
    out: list[tuple[int | None, Any]] = []
    payloads, whole = _json_payloads(text)
    for payload in payloads:
        entries = _entries(payload, n_cells, whole) or []
        if any(position is not None for position, _ in entries):  # not a stray "[1]" of the prose
            out += entries
    return out


def _text_entries(text: str) -> list[tuple[int | None, Any]]:
    """``Cell N: label`` entries; a label followed on its line by the other label word is not an answer.

    ``Cell 1: sensitive|resistant`` (the answer format echoed back), ``sensitive or resistant`` or
    ``resistant (not sensitive)`` name both classes: which one is meant would be a guess.
    """
    matches = list(_LINE_RE.finditer(text))
    out: list[tuple[int | None, Any]] = []
    for k, m in enumerate(matches):
        stop = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        line_end = text.find("\n", m.end())
        rest = text[m.end():stop if line_end < 0 else min(stop, line_end)]
        label = _label_of(m.group(2))
        both = any(_WORDS[w.group(1).lower()] != label for w in _WORD_RE.finditer(rest))
        out.append((int(m.group(1)), m.group(0) if both else m.group(2)))
    return out


def parse_answer(text: str | None, n_cells: int) -> ParsedAnswer:
    """Each cell's answer (1-based positions ``1..n_cells``) from a response text."""
    entries = None
    if text:
        entries = _json_entries(text, n_cells) or None
        if not entries:
            entries = _text_entries(text) or None
    if not entries:
        return ParsedAnswer("unparsed", tuple(PromptAnswer(i, "unparsed") for i in range(1, n_cells + 1)), ())
    if any(position is not None and position < 1 for position, _ in entries):
        # the prompt numbers its cells from 1: a cell 0 means the model numbered them its own way
        # (0-based), and reading its numbers as the prompt's would give each cell its neighbour's answer
        return ParsedAnswer("unparsed", tuple(PromptAnswer(i, "invalid") for i in range(1, n_cells + 1)), ())
    values: dict[int, list[Any]] = {}
    for position, value in entries:
        if position is not None:
            values.setdefault(position, []).append(value)
    answers = []
    for i in range(1, n_cells + 1):
        labels = {_label_of(v) for v in values.get(i, [])}
        if i not in values:
            answers.append(PromptAnswer(i, "missing"))
        elif None in labels or len(labels) != 1:
            answers.append(PromptAnswer(i, "invalid"))
        else:
            answers.append(PromptAnswer(i, "ok", labels.pop()))
    word_order = tuple(p for p, v in entries if p is not None and _is_word(v))
    status = "answered" if any(a.status == "ok" for a in answers) else "unparsed"
    if status == "unparsed":
        answers = [PromptAnswer(a.position, "unparsed") for a in answers]
    return ParsedAnswer(status, tuple(answers), word_order)


def _class_of(rest: str) -> int | None:
    rest = rest.strip().lower()
    if not rest:
        return None
    hits = {label for word, label in _WORDS.items() if word.startswith(rest) or rest.startswith(word)}
    return hits.pop() if len(hits) == 1 else None


def _score_at(tokens: Sequence[dict[str, Any]], starts: Sequence[int], offset: int) -> float | None:
    """P(sensitive) at the token holding character ``offset`` (the first letter of a label word)."""
    t = next(i for i, s in enumerate(starts) if s <= offset < s + len(str(tokens[i].get("token", ""))))
    chosen = tokens[t]
    token, pre = str(chosen.get("token", "")), offset - starts[t]
    listed = {str(alt.get("token", "")): float(alt.get("logprob", -math.inf)) for alt in chosen.get("top_logprobs") or []}
    listed.setdefault(token, float(chosen.get("logprob", -math.inf)))
    mass = {0: 0.0, 1: 0.0}
    for alt, logprob in listed.items():
        if len(alt) <= pre or alt[:pre] != token[:pre]:
            continue  # a different text before the label (e.g. no quote): not an alternative label
        label = _class_of(alt[pre:])
        if label is not None:
            mass[label] += math.exp(logprob)
    probs = [math.exp(lp) for lp in listed.values() if lp > -math.inf]
    if not probs or mass[0] + mass[1] == 0.0:
        return None
    bound = min(max(0.0, 1.0 - sum(probs)), min(probs))
    for label in (0, 1):
        if mass[label] == 0.0:
            mass[label] = bound
    return mass[1] / (mass[0] + mass[1])


def label_scores(text: str | None, tokens: Sequence[dict[str, Any]] | None, parsed: ParsedAnswer) -> dict[int, float]:
    """P(sensitive) per cell number from token log-probabilities (empty when they cannot be aligned).

    ``tokens`` are OpenAI chat ``logprobs.content`` entries (``token``, ``logprob``,
    ``top_logprobs``). Scores are given only when the tokens spell the text exactly and each
    label word of the text belongs to one entry of the parsed answer.
    """
    if not text or not tokens or parsed.status != "answered":
        return {}
    pieces = [str(t.get("token", "")) for t in tokens]
    if "".join(pieces) != text:
        return {}
    occurrences = [m.start() for m in _WORD_RE.finditer(text)]
    if len(occurrences) != len(parsed.word_order):
        return {}
    starts, at = [], 0
    for piece in pieces:
        starts.append(at)
        at += len(piece)
    ok = {a.position for a in parsed.answers if a.status == "ok"}
    scores: dict[int, float] = {}
    for position, offset in zip(parsed.word_order, occurrences):
        if position in ok:
            score = _score_at(tokens, starts, offset)
            if score is not None:
                scores[position] = score
    return scores
