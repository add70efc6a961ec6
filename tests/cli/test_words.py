"""What the help texts, messages and README's SQL cookbook say is what the code does.

tests/cli/test_examples.py checks that every example *runs*; these check that the words are true:
an option a message tells the user to type exists, a default a help text states is the code's,
and the cookbook's per-result queries aggregate one result's folds, never several splits' or
several head settings'.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from scdm.classify.grid import evaluate
from scdm.cli import main
from scdm.embedding.chunks import MODEL_CHUNK_ROWS_MAX
from scdm.embedding.runner import embed_baseline
from scdm.store import Store, example_data
from scdm.store._constants import TARGET_CHUNK_BYTES

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"

FOREIGN_OPTIONS = {"--revision"}
"""Options of other tools that scdm's messages quote (`hf download REPO --revision REV`)."""


def _scdm_options() -> set[str]:
    known = {o for p in main.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    for command in main.commands.values():
        known |= {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    return known


def _message_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings (messages, help texts, printed hints)."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_every_option_a_message_names_exists() -> None:
    known = _scdm_options() | FOREIGN_OPTIONS
    unknown = [
        f"{path.relative_to(ROOT)}:{line}: {option}"
        for path in sorted((ROOT / "src" / "scdm").rglob("*.py"))
        for line, text in _message_strings(path)
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)
        if option not in known
    ]
    assert not unknown, unknown


def test_counts_on_scaled_values_says_which_option_to_drop(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    runner = CliRunner()
    refused = runner.invoke(
        main, ["--store", store, "-q", "embed", str(example_data("A375")), "--model", "pca", "--n-comps", "5", "--counts"]
    )
    assert refused.exit_code == 1 and "cannot be normalised as counts. Drop --counts" in refused.output
    done = runner.invoke(main, ["--store", store, "-q", "embed", "A375_melanoma_GSE108383", "--model", "pca", "--n-comps", "5"])
    assert done.exit_code == 0, done.output


def test_chunk_rows_help_states_the_code_default() -> None:
    option = next(p for p in main.commands["embed"].params if p.name == "chunk_rows")
    assert f"{TARGET_CHUNK_BYTES // 2**20} MiB" in option.help
    assert f"at most {MODEL_CHUNK_ROWS_MAX:,} for a foundation model" in option.help


# ---- README's SQL cookbook on a store with two splits of one partition kind and two logreg settings --------
def _cookbook() -> dict[str, str]:
    """README's cookbook queries by the first words of their comment."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## SQL cookbook\n.*?^```sql\n(.*?)^```", text, flags=re.S | re.M).group(1)  # type: ignore[union-attr]
    queries = [q.strip() for q in block.split(";") if q.strip()]
    return {q.splitlines()[0].removeprefix("-- ").split(":")[0].split(" (")[0]: q for q in queries}


@pytest.fixture(scope="module")
def two_splits(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """JHU006 + SCC47 (two studies, one joint pca space), each with label sets 'egfr' (Gefitinib / Afatinib)
    and 'inverse' (Vorinostat / Sorafenib). 'inverse' is evaluated twice with 3 pooled folds of the same
    scheme and seed: its own folds and the folds of 'egfr' (two splits that differ only by the partition),
    plus cross-data with two logreg settings."""
    st = Store(tmp_path_factory.mktemp("words") / "st")
    for file, name, study, egfr, inverse in (
        ("JHU006_HNSCC_Kinker2020", "jhu006", "JHU006", "Gefitinib", "Vorinostat"),
        ("SCC47_HNSCC_Kinker2020", "scc47", "SCC47", "Afatinib", "Sorafenib"),
    ):
        st.ingest(DATA / f"{file}.h5ad", name=name, label_key=f"response_{egfr}", label_set="egfr", study=study)
        st.ingest(DATA / f"{file}.h5ad", name=name, label_key=f"response_{inverse}", label_set="inverse")
    ids = [r.embedding_id for r in embed_baseline(st, ["jhu006", "scc47"], model="pca", n_comps=5, progress=False)]
    common = {"heads": ["logreg"], "by": ["all"], "folds": 3, "label_set": "inverse", "silent": True}
    evaluate(st, ids, scenarios=["pooled", "cross"], **common)  # type: ignore[arg-type]
    evaluate(st, ids, scenarios=["pooled"], pair_folds_with="egfr", **common)  # type: ignore[arg-type]
    evaluate(st, ids, scenarios=["cross"], head_params={"logreg": {"C": 0.01}}, **common)  # type: ignore[arg-type]
    return st


def test_cookbook_gap_is_per_pooled_split(two_splits: Store) -> None:
    gap = two_splits.query(_cookbook()["the pooled vs cross-data gap"])
    assert len(gap) == 2 and gap["split_id"].nunique() == 2  # one row per pooled split, both named
    assert (gap["pooled_n"] <= gap["k"]).all() and (gap["cross_n"] <= 2).all(), gap  # 3 folds, 2 held-out studies


def test_cookbook_best_model_per_split_names_the_split(two_splits: Store) -> None:
    best = two_splits.query(_cookbook()["best model per split and head"])
    assert "split_id" in best.columns and not best.duplicated().any()  # two splits' rows never print alike
    assert (best["n"] <= best["k"]).all()


def test_cookbook_per_cell_predictions_count_each_cell_once_per_result(two_splits: Store) -> None:
    rows = two_splits.query(_cookbook()["per-cell test predictions joined with the cell metadata, per result"])
    assert rows["head_params"].nunique() == 2  # both logreg settings, apart
    labelled = two_splits.query(
        "SELECT c.study, l.response AS y_true, count(*) AS cells FROM cell_labels l "
        "JOIN label_sets s USING (label_set_id) JOIN cells c ON c.dataset_id = l.dataset_id "
        "AND c.row = l.row WHERE s.name = 'inverse' AND l.response IS NOT NULL GROUP BY ALL"
    )
    merged = rows.merge(labelled, on=["study", "y_true"])
    assert len(merged) == len(rows) and (merged["n"] == merged["cells"]).all(), merged
