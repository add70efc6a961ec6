"""Parsing answers (never guessing) and P(sensitive) from token log-probabilities."""

from __future__ import annotations

import json
import math

import pytest

from scdm.prompt.answers import label_scores, parse_answer
from scdm.prompt.templates import FIELDS, load_template, render
from scdm.store.errors import InputDataError


def statuses(text: str | None, n: int) -> list[tuple[str, int | None]]:
    return [(a.status, a.label) for a in parse_answer(text, n).answers]


def test_json_answer_forms() -> None:
    body = {"cells": [{"cell": 1, "response": "sensitive"}, {"cell": 2, "response": "Resistant"}]}
    assert statuses(json.dumps(body), 2) == [("ok", 1), ("ok", 0)]
    fenced = "Sure!\n```json\n" + json.dumps(body) + "\n```\nHope this helps."
    assert statuses(fenced, 2) == [("ok", 1), ("ok", 0)]
    assert statuses('["resistant", "sensitive", 1]', 3) == [("ok", 0), ("ok", 1), ("ok", 1)]
    assert statuses('{"1": "sensitive", "cell 2": 0}', 2) == [("ok", 1), ("ok", 0)]
    assert statuses('{res:1,0}', 2)[0][0] == "unparsed"  # the paper's format is not JSON: no guess


def test_missing_invalid_and_unparsed_are_recorded_not_guessed() -> None:
    text = json.dumps({"cells": [{"cell": 1, "response": "sensitive"}, {"cell": 3, "response": "maybe"},
                                 {"cell": 4, "response": "sensitive"}, {"cell": 4, "response": "resistant"}]})
    assert statuses(text, 5) == [("ok", 1), ("missing", None), ("invalid", None), ("invalid", None), ("missing", None)]
    assert parse_answer(text, 5).status == "answered"
    for broken in ['{"cells": [{"cell": 1, "response": "sens', "", None, "I cannot help with that."]:
        parsed = parse_answer(broken, 3)
        assert parsed.status == "unparsed"
        assert [a.status for a in parsed.answers] == ["unparsed"] * 3


def test_text_answers() -> None:
    text = "Here you go:\nCell 1: sensitive\nCell 2 - Resistant\n**Cell 3**: sensitive"
    assert statuses(text, 4) == [("ok", 1), ("ok", 0), ("ok", 1), ("missing", None)]


def tokens_of(pieces: list[tuple[str, float, list[tuple[str, float]]]]) -> list[dict]:
    return [{"token": t, "logprob": lp, "top_logprobs": [{"token": a, "logprob": alp} for a, alp in alts]}
            for t, lp, alts in pieces]


def test_scores_from_top_logprobs() -> None:
    text = '{"cells": [{"cell": 1, "response": "sensitive"}, {"cell": 2, "response": "resistant"}]}'
    parsed = parse_answer(text, 2)
    # split text into tokens; label words start with their own tokens ('sens'+'itive', 'res'+'istant')
    first, rest = text.split("sensitive")
    mid, last = rest.split("resistant")
    pieces = [(first, -0.01, []), ("sens", math.log(0.7), [("sens", math.log(0.7)), ("res", math.log(0.2)),
                                                           ("Sens", math.log(0.05))]),
              ("itive", -0.001, []), (mid, -0.01, []),
              ("res", math.log(0.6), [("res", math.log(0.6)), ("sens", math.log(0.3))]), ("istant", -0.001, []), (last, 0, [])]
    scores = label_scores(text, tokens_of(pieces), parsed)
    assert scores[1] == pytest.approx(0.75 / 0.95)  # 'Sens' counts for sensitive too
    assert scores[2] == pytest.approx(0.3 / 0.9)


def test_scores_with_quote_merged_into_token_and_missing_alternative() -> None:
    text = '{"cells": [{"cell": 1, "response": "sensitive"}]}'
    parsed = parse_answer(text, 1)
    head, tail = text.split('"sensitive')
    # the label starts inside the token '"sens'; the only alternative listed is the chosen one
    pieces = [(head, 0.0, []), ('"sens', math.log(0.9), [('"sens', math.log(0.9)), ('"', math.log(0.05))]),
              ("itive", 0.0, []), (tail, 0.0, [])]
    score = label_scores(text, tokens_of(pieces), parsed)[1]
    # resistant unlisted: bounded by the unlisted mass 0.05 (smaller than the least listed 0.05 -> 0.05)
    assert score == pytest.approx(0.9 / (0.9 + 0.05))
    assert 0 < score < 1


def test_no_scores_when_tokens_do_not_align() -> None:
    text = '{"cells": [{"cell": 1, "response": "sensitive"}]}'
    parsed = parse_answer(text, 1)
    assert label_scores(text, None, parsed) == {}
    assert label_scores(text, tokens_of([("something else", 0.0, [])]), parsed) == {}
    # a label word outside the entries (an explanation) makes the alignment ambiguous: no scores
    noisy = 'sensitive cells first: {"cells": [{"cell": 1, "response": "sensitive"}]}'
    assert label_scores(noisy, tokens_of([(noisy, 0.0, [])]), parse_answer(noisy, 1)) == {}


def test_default_template_has_the_four_modules_and_fields() -> None:
    tmpl = load_template()
    text = render(tmpl, cells=[["EGFR", "KRT18"], []], source="study: S1; drug: Erlotinib", drug="Erlotinib", top_k=10)
    reasoning, source, genes, instruction = (text.index("expert"), text.index("Data source: study: S1"),
                                             text.index("Cell 1: EGFR, KRT18"), text.index("Answer with JSON only"))
    assert reasoning < source < genes < instruction
    assert "Cell 2: (no expressed gene)" in text
    assert text.count('"sensitive" or "resistant"') == 2  # the output instruction is repeated
    assert json.loads(text.split("exactly in this form:\n")[1].splitlines()[0])["cells"][1]["cell"] == 2
    assert "\n\n\n" not in text and "Example" not in text  # zero-shot: no empty examples module


def test_custom_template_checked_and_hashed(tmp_path) -> None:
    good = tmp_path / "mine.txt"
    good.write_text("Drug {drug}. {n_cells} cells:\n{cells}\nAnswer as {{\"cells\": [...]}}: {answer_format}")
    tmpl = load_template(good)
    assert tmpl.hash != load_template().hash and tmpl.name == str(good)
    assert render(tmpl, cells=[["A"]], source="x", drug=None, top_k=3).startswith("Drug the drug. 1 cells:\nCell 1: A")
    for text, match in [("no cells here {n_cells}", "no \\{cells\\}"), ("{cells} {genes}", "not a placeholder"),
                        ("{cells.__class__}", "not a placeholder"), ("{cells} {", "not a valid format string")]:
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(InputDataError, match=match):
            load_template(bad)
    with pytest.raises(InputDataError, match="does not exist"):
        load_template(tmp_path / "nope.txt")
    assert set(FIELDS) >= {"cells", "source", "examples", "answer_format"}


def test_text_numbers_are_not_labels() -> None:
    # "0.7" is a probability (or a score), not the label 0; "0.9 (sensitive)" was read as resistant
    assert statuses("Cell 1: 0.7\nCell 2: 0.2", 2) == [("unparsed", None), ("unparsed", None)]
    assert statuses("Cell 1: 0.9 (sensitive)\nCell 2: 0,3\nCell 3: 1.0\nCell 4: 0%", 4) == [("unparsed", None)] * 4
    assert statuses("Cell 1: 0\nCell 2: 1.", 2) == [("ok", 0), ("ok", 1)]


def test_cells_numbered_from_zero_are_not_shifted_onto_their_neighbours() -> None:
    # the model answered cells 0, 1, 2: its cell 0 is the prompt's cell 1, and so on; reading its
    # numbers as the prompt's gave cell 1 the answer meant for cell 2 (and left cell 3 missing)
    body = {"cells": [{"cell": i, "response": "sensitive" if i % 2 == 0 else "resistant"} for i in range(3)]}
    for text in (json.dumps(body), "Cell 0: sensitive\nCell 1: resistant\nCell 2: sensitive"):
        parsed = parse_answer(text, 3)
        assert parsed.status == "unparsed"
        assert statuses(text, 3) == [("invalid", None)] * 3


def test_unnumbered_list_of_the_wrong_length_is_not_read_by_place() -> None:
    # three cells, the model skipped one: which one is unknown, and reading by place gave cell 2
    # the answer meant for cell 3
    for text in ('["sensitive", "resistant"]', '{"cells": [{"response": "sensitive"}, {"response": "resistant"}]}',
                 '["sensitive", "resistant", "resistant", "sensitive"]'):
        assert statuses(text, 3) == [("unparsed", None)] * 3
    # numbered entries keep their numbers whatever the length
    assert statuses('[{"cell": 3, "response": "resistant"}, {"cell": 1, "response": "sensitive"}]', 3) == [
        ("ok", 1), ("missing", None), ("ok", 0)]


def test_json_answer_with_brackets_in_the_prose_around_it() -> None:
    # the text from the first bracket to the last is not JSON: the whole request was unparsed
    body = json.dumps({"cells": [{"cell": 1, "response": "sensitive"}, {"cell": 2, "response": "resistant"}]})
    for text in (body + "\nNote: cell 2 is uncertain [low confidence].", "Answer [JSON] (see [1]):\n" + body,
                 body + "\n" + body):
        assert statuses(text, 2) == [("ok", 1), ("ok", 0)]
    # two answers that disagree: the cell they disagree on is invalid, not the first answer's
    other = json.dumps({"cells": [{"cell": 1, "response": "sensitive"}, {"cell": 2, "response": "sensitive"}]})
    assert statuses(body + "\nCorrection:\n" + other, 2) == [("ok", 1), ("invalid", None)]


def test_text_line_naming_both_labels_is_not_an_answer() -> None:
    # the answer format echoed back read as "sensitive" for every cell
    assert statuses("Cell 1: sensitive|resistant\nCell 2: sensitive|resistant", 2) == [("unparsed", None)] * 2
    assert statuses("Cell 1: sensitive or resistant\nCell 2: resistant", 2) == [("invalid", None), ("ok", 0)]
    # one label per cell on one line is fine
    assert statuses("Cell 1: sensitive, Cell 2: resistant", 2) == [("ok", 1), ("ok", 0)]


def test_list_of_cell_numbers_in_the_prose_is_not_read_as_labels_by_place() -> None:
    # "[1, 2]" names cells, not labels: read by place (as long as the request), cell 1 became
    # "sensitive" and the model's "Cell N: resistant" lines were not read at all
    text = "Cell 1: resistant\nCell 2: resistant\n\nResistant cells: [1, 2]"
    assert statuses(text, 2) == [("ok", 0), ("ok", 0)]
    assert statuses("Cell 1: resistant\nSee [1].", 1) == [("ok", 0)]
    assert statuses("Both look resistant: cells [1, 2] express ABCB1.", 2) == [("unparsed", None)] * 2
    assert statuses('["1", "2"]', 2) == [("unparsed", None)] * 2  # numbers other than 0/1: not labels
    # the whole answer a list of 0/1 labels (the paper's form), alone or with words: read by place
    assert statuses("[1, 0, 1]", 3) == [("ok", 1), ("ok", 0), ("ok", 1)]
    assert statuses('{"cells": [0, "sensitive"]}', 2) == [("ok", 0), ("ok", 1)]
