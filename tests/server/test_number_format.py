"""The page shows numbers as `scdm results` prints them, and the SQL console as stored.

Before, the page (static/scdm.js) and `scdm results` printed every number with 3 decimals: an AUROC
of 0.9996 read ``1.000`` (perfect on every fold), an sd of 0.0004 ``0.000`` (no spread), and the SQL
console showed a stored 3e-7 as ``0.000``. The page's functions are run by Node.js where it is
installed (no browser); the CLI's rule is checked without it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from scdm.classify.results import format_leaderboard, metric_text

SCRIPT = Path(__file__).resolve().parents[2] / "src" / "scdm" / "server" / "static" / "scdm.js"
VALUES = [0.9996, 0.99996, 0.0004, -0.0004, 0.912345, 0.9123, 1.0, 0.0, 0.5, 0.25, -0.31, 0.1 + 0.2, 12.5, 3e-7, 2e-17,
          1 - 1e-15, 0.0625, 0.1875, 0.3125, -0.0625, 0.5625, 2.5, 0.00625]


def page_functions(*names: str) -> str:
    """The source of top-level functions of the page's script (each to its closing brace)."""
    text = SCRIPT.read_text()
    out = []
    for name in names:
        start = re.search(rf"^(?:async )?function {name}\(", text, re.MULTILINE)
        assert start is not None, name
        depth, at = 0, text.index("{", start.start())
        for at in range(at, len(text)):
            depth += {"{": 1, "}": -1}.get(text[at], 0)
            if depth == 0:
                break
        out.append(text[start.start():at + 1])
    return "\n".join(out)


def page_constant(name: str) -> str:
    """A one-statement top-level ``const`` of the page's script (to its semicolon)."""
    found = re.search(rf"^const {name} = [^;]*;", SCRIPT.read_text(), re.MULTILINE)
    assert found is not None, name
    return found.group(0)


def run_page(expression: str, prelude: str = "") -> object:
    """``expression`` evaluated by Node.js after the page's formatting functions and ``prelude``."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("Node.js is not installed: the page's script cannot run without a browser")
    source = (page_functions("esc", "fixedEven", "metricText", "fmt", "shown", "cell") + "\n" + prelude +
              f"\nconsole.log(JSON.stringify({expression}));")
    done = subprocess.run([node, "-e", source], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(done.stdout)


def run_page_loader(loader: str, answers: dict[str, object], form: list[tuple[str, str]], *, read: str,
                    functions: tuple[str, ...] = (), constants: tuple[str, ...] = ()) -> object:
    """The page's async ``loader(...)`` (e.g. ``loadLeaderboard()``) run by Node.js against ``answers``
    (request path -> JSON body) with ``form`` as the filter form's fields; then ``read`` (an expression on
    ``$``, the page's elements by id: ``textContent``, ``innerHTML``) evaluated and returned."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("Node.js is not installed: the page's script cannot run without a browser")
    source = page_functions("esc", "fixedEven", "metricText", "fmt", "shown", "cell", "apiResponse", "api", "rowCount",
                            "plural", "compare", "table", "showError", *functions)
    source += "\n" + "\n".join(page_constant(c) for c in constants) + f"""
const ROOT = "", ANSWERS = {json.dumps(answers)}, FORM = {json.dumps(form)}, els = {{}};
const $ = (id) => els[id] || (els[id] = {{id, textContent: "", innerHTML: "", querySelectorAll: () => []}});
async function fetch(url) {{
  const body = ANSWERS[url];
  if (body === undefined) throw new Error("unexpected request " + url);
  return {{status: 200, ok: true, headers: {{get: (h) => h === "content-type" ? "application/json" : null}}, json: async () => body}};
}}
class FormData {{ constructor() {{ return FORM; }} }}
{loader}.then(() => console.log(JSON.stringify({read})));
"""
    done = subprocess.run([node, "-e", source], capture_output=True, text=True, timeout=30, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_three_decimals_never_claim_a_whole_number_the_value_is_not() -> None:
    assert [metric_text(v) for v in (0.9996, 0.99996, 0.0004, -0.0004, 0.912345, 1.0, 0.0, 0.5)] == [
        "0.9996", "0.99996", "0.0004", "-0.0004", "0.912", "1.000", "0.000", "0.500"]
    # float rounding of a whole number is that number: the sd of identical folds, a mean of ones
    assert [metric_text(v) for v in (2e-17, 1 - 1e-15, -1e-16)] == ["0.000", "1.000", "-0.000"]


def test_the_leaderboard_prints_a_near_perfect_auroc_and_a_small_sd_as_they_are() -> None:
    board = pd.DataFrame([{"model": "pca", "variant": "frozen", "space_id": "s1", "datasets": "a375",
                           "label_set": "response_PLX4720", "split_id": "p1", "scenario": "pooled", "scheme": "cell",
                           "k": 3, "seed": 0, "category_type": "all", "category": "all", "head": "ridge", "head_params": "{}",
                           "metric": "auroc", "mean": mean, "sd": sd, "n_folds": 3, "n_null": 0, "n_test": 108,
                           "folds_done": 3, "folds_expected": 3, "complete": True, "note": ""}
                          for mean, sd in ((0.99963, 0.00041), (1.0, 0.0))])
    board.loc[1, ["space_id", "model"]] = ["s2", "hvg"]
    shown = format_leaderboard(board, metrics=["auroc"])
    assert sorted(shown["auroc"]) == ["0.9996 ± 0.0004", "1.000 ± 0.000"]


def test_the_page_formats_numbers_as_the_cli_prints_them() -> None:
    assert run_page(f"{json.dumps(VALUES)}.map(metricText)") == [metric_text(v) for v in VALUES]
    assert run_page("[fmt(0.9996), fmt(7), fmt(null), fmt({a: 1})]") == ["0.9996", 7, None, '{"a":1}']


def test_the_sql_console_shows_numbers_as_stored_and_tables_give_the_whole_value_on_hover() -> None:
    assert run_page("[shown(3e-7, true), shown(0.123456789, true), shown(3e-7, false), shown('x', true)]") == [
        "3e-7", "0.123456789", "0.0000003", "x"]
    assert run_page("cell(fmt(0.912345), 0.912345)") == '<td title="0.912345">0.912</td>'
    assert run_page("cell(fmt(0.5), 0.5)") == "<td>0.500</td>"  # nothing hidden: no hover text
