"""``scdm demo``: the whole pipeline on built-in data, no downloads and no checkpoints.

1. generate a small scDrugMap-shaped synthetic collection (raw counts, 23 studies, real gene ids);
2. ingest it together with the bundled real A375 dataset (measured PLX4720 response);
3. embed with the baselines (``pca``, ``hvg``) and with a tiny **random-initialised** Geneformer
   written on the fly in the official file format (it shows the pipeline, not biology);
4. evaluate pooled (k-fold, grouped by sample; the paper's cell-level folds beside) and cross-data
   (leave one study out) with ``logreg``, ``ridge``, ``mlp``;
5. print the leaderboard and write the HTML report.

Everything is cached in the store: a second run reuses the collection, embeddings and finished
evaluation tasks. This module sits beside ``scdm.cli`` because it drives both stages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from scdm.store import Store, example_data, open_store

__all__ = ["DemoSummary", "run_demo", "DEMO_COLLECTION", "DEMO_A375", "DEMO_RANDOM_MODEL"]

logger = logging.getLogger("scdm.demo")

DEMO_COLLECTION = "demo-synthetic-collection"
DEMO_A375 = "A375-GSE108383"
DEMO_RANDOM_MODEL = "geneformer-tiny-random"
PRIMARY_CELLS = 326_751


@dataclass(frozen=True)
class DemoSummary:
    """What the demo did."""

    store: str
    report: str | None
    embeddings: tuple[str, ...]
    n_cells: int
    seconds: float
    leaderboard: Any
    """Wide leaderboard (category type ``all``) as a DataFrame."""
    notes: tuple[str, ...] = ()
    """The caveats that apply to the leaderboard (:func:`scdm.classify.results.leaderboard_notes`)."""


def _step(echo: Callable[[str], None], i: int, n: int, text: str) -> None:
    echo(f"[{i}/{n}] {text}")


def _check_demo_sizes(n_cells: Any, folds: Any, seed: Any) -> None:
    """Refuse, in one message, sizes the demo cannot run with (n_cells=0 read as a synthesis scale of 0.0)."""
    from scdm.store.errors import InputDataError

    problems = [f"{name}={value!r} (a whole number >= {low})" for name, value, low in
                (("n_cells", n_cells, 1), ("folds", folds, 2), ("seed", seed, 0))
                if isinstance(value, bool) or not isinstance(value, int) or value < low]
    if problems:
        msg = "Invalid demo settings: " + "; ".join(problems) + "."
        raise InputDataError(msg)


def _collection(st: Store, n_cells: int, seed: int, progress: bool) -> Path:
    from scdm.classify.synth import synthesize

    path = st.root / "artifacts" / "demo" / f"synthetic-{n_cells}-seed{seed}.h5ad"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        synthesize(n_cells / PRIMARY_CELLS, seed=seed, n_genes=2000, out=path, silent=not progress)
    return path


def _random_geneformer(st: Store, genes: Sequence[str], progress: bool) -> Path:
    from scdm.embedding import library_progress
    from scdm.embedding.models.geneformer import write_tiny_checkpoint

    folder = st.root / "artifacts" / "demo" / DEMO_RANDOM_MODEL
    if not (folder / "config.json").exists():
        # 256 input genes instead of 2048 keeps the demo inside its time budget on 2 CPU cores
        with library_progress(progress):
            write_tiny_checkpoint(folder, genes=list(genes), seed=0, num_hidden_layers=2, hidden_size=64,
                                  num_attention_heads=4, intermediate_size=128, max_position_embeddings=256)
        (folder / "README.txt").write_text(
            "RANDOM WEIGHTS. A tiny Geneformer-format checkpoint written by `scdm demo` to show the pipeline;\n"
            "its embeddings carry no biology. Point `scdm embed --checkpoint` at a real Geneformer folder instead.\n"
        )
    return folder


def run_demo(
    store: Store | str | None = None,
    *,
    n_cells: int = 6000,
    report_dir: str | Path | None = "scdm-demo-report",
    folds: int = 5,
    heads: Sequence[str] = ("logreg", "ridge", "mlp"),
    by: Sequence[str] = ("all", "tissue", "cancer_type", "drug_type"),
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoSummary:
    """Run the demo end to end (see the module docstring); returns a :class:`DemoSummary`."""
    from scdm.classify.grid import evaluate
    from scdm.classify.results import format_leaderboard, leaderboard, leaderboard_notes
    from scdm.embedding.runner import embed, embed_baseline

    _check_demo_sizes(n_cells, folds, seed)  # before minutes of synthesis and embedding, not at the first split
    t0 = time.perf_counter()
    st = open_store(store)
    n = 6 if report_dir is not None else 5
    _step(echo, 1, n, f"synthetic scDrugMap-shaped collection ({n_cells} cells, 36 datasets, 23 studies, raw counts)")
    path = _collection(st, n_cells, seed, progress)
    _step(echo, 2, n, "ingest the collection and the real A375 dataset (GSE108383, measured PLX4720 response)")
    synth = st.ingest(path, name=DEMO_COLLECTION, label_key="response", study_key="study", sample_key="sample",
                      tissue_key="tissue", cancer_key="cancer_type", drug_type_key="drug_type", regimen_key="regimen")
    a375 = st.ingest(example_data("A375"), name=DEMO_A375, label_key="response_PLX4720", study="GSE108383",
                     sample_key="condition", tissue="Cell line", cancer_type="Melanoma", drug_type="Targeted therapy",
                     regimen="PLX4720", gene_key="symbol")
    _step(echo, 3, n, "embed: pca and hvg baselines; a tiny RANDOM-WEIGHT Geneformer (pipeline demo, not biology)")
    ids = [r.embedding_id for d in (synth.name, a375.name) for r in embed_baseline(st, [d], model="pca", n_comps=50, progress=progress)]
    ids += [r.embedding_id for r in embed_baseline(st, [synth.name], model="hvg", n_hvg=256, progress=progress)]
    ckpt = _random_geneformer(st, st.genes(synth.name)["gene_id"].tolist(), progress)
    ids.append(embed(st, synth.name, "geneformer", ckpt, batch_size=64, progress=progress).embedding_id)
    _step(echo, 4, n, f"evaluate pooled ({folds}-fold, grouped by sample; the paper's cell-level folds beside) and "
                      f"cross-data (leave one study out) with {', '.join(heads)}")
    # linear heads on every category; the MLP (the costly one on 2 cores) on all cells only
    linear = [h for h in heads if h != "mlp"]
    evaluate_demo = partial(evaluate, st, ids, folds=folds, seed=seed, silent=not progress)
    if linear:
        evaluate_demo(scenarios=("pooled", "cross"), by=by, heads=linear)  # default scheme: by sample where sample ids exist
    if "mlp" in heads:
        evaluate_demo(scenarios=("pooled", "cross"), by=("all",), heads=("mlp",), head_params={"mlp": {"profile": "fast"}})
    # the scDrugMap protocol (cell-level folds, which can leak sample identity) beside it, all cells only
    evaluate_demo(scenarios=("pooled",), by=("all",), heads=heads, split_scheme="cell",
                  head_params={"mlp": {"profile": "fast"}} if "mlp" in heads else None)
    _step(echo, 5, n, "leaderboard (all cells; mean ± sd over folds; scheme: sample = grouped folds, cell = the paper's)")
    shown = ("auroc", "f1", "accuracy")
    full = leaderboard(st, category_types=["all"])
    board, notes = format_leaderboard(full, metrics=shown), tuple(leaderboard_notes(full, shown))
    report = None
    if report_dir is not None:
        from scdm.classify.report import write_report

        _step(echo, 6, n, f"report: {report_dir}")
        report = str(write_report(st, report_dir, max_cells=2000, progress=progress))
    return DemoSummary(store=str(st.root), report=report, embeddings=tuple(ids), n_cells=synth.n_cells + a375.n_cells,
                       seconds=time.perf_counter() - t0, leaderboard=board, notes=notes)


NEXT_STEPS = """\
Next steps
  - Your data:        scdm ingest my.h5ad --label-key response --study-key study --sample-key patient
  - A real model:     scdm embed my --model geneformer --checkpoint /path/to/Geneformer   (scdm models lists the files)
  - Evaluate:         scdm evaluate --head ridge,logreg,mlp --folds 10      (folds grouped by sample when sample ids exist)
  - Ask in SQL:       scdm sql "SELECT model, datasets, label_set, scenario, n_folds AS k, category, head, avg(value) AS auroc, count(value) AS n, result_key FROM results WHERE metric='auroc' GROUP BY ALL ORDER BY ALL"
                      (one row per result: never average across splits, label sets or datasets; README's SQL cookbook)
  - Report:           scdm report --out report/
"""
