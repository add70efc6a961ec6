"""How far ``reference_quirks`` moves each custom adapter, and how much each mode depends on the batch.

For scGPT, scFoundation, UCE, scBERT, CellLM and CellPLM: a tiny random model in the official
on-disk format (``write_tiny_checkpoint``, vocabulary = the most-counted PC9 genes), the bundled
real PC9 raw counts (``tests/data/PC9_erlotinib_subsample300.h5ad``), embedded through the real
runner (``scdm.embedding.runner.embed``, CPU, fp32) into temporary stores. Per adapter it reports

* ``default vs quirks``: max |diff| between ``reference_quirks=False`` and ``True`` (batch size 16);
* ``batch 1 vs 16``: max |diff| between batch sizes 1 and 16, in each mode;
* ``seed 0 vs 1``: max |diff| between seeds 0 and 1 in quirk mode (the size of a fresh random
  draw, to read the scGPT/UCE/CellPLM rows against);

and prints a markdown table (the one in ``docs/reference-differences.md``). Extra rows measure the
quirks that the default PC9 run never triggers (scFoundation's dropped T token needs a
``tgthighres`` giving T <= 0; UCE's float mask needs sentences of different lengths, which 1024
genes drawn from a few thousand rarely give) and the accuracy of CellLM's one-weighted-pad-row emulation of the
reference's 6000-token padding.

Usage::

    python benchmarks/bench_quirks.py                  # 300 cells, 2000 genes (about 2-4 min on 2 CPUs)
    python benchmarks/bench_quirks.py --cells 64 --genes 500 --models scgpt,uce
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # `import scdm` without installing it

import anndata as ad
import scipy.sparse as sp
import torch

from scdm.embedding.models import celllm, cellplm, scbert, scfoundation, scgpt, uce
from scdm.embedding.runner import embed
from scdm.store import Store

logger = logging.getLogger(__name__)

PC9 = ROOT / "tests" / "data" / "PC9_erlotinib_subsample300.h5ad"
WRITERS: dict[str, Callable[..., Path]] = {
    "scgpt": scgpt.write_tiny_checkpoint,
    "scfoundation": scfoundation.write_tiny_checkpoint,
    "uce": uce.write_tiny_checkpoint,
    "scbert": scbert.write_tiny_checkpoint,
    "celllm": celllm.write_tiny_checkpoint,
    "cellplm": cellplm.write_tiny_checkpoint,
}
DIFFERENCE = {
    "scgpt": "bin tie-breaks and >max_length subsample: per-cell seeded generators vs the reference's global RNG stream",
    "scfoundation": "T/S tokens with value <= 0: kept vs dropped and pooled by position (gatherData)",
    "uce": "padding mask: boolean vs additive float (+1 on pads); gene sampling/chromosome shuffle: per-cell seeds vs global stream",
    "scbert": "FAVOR+ key stabiliser: max per cell vs one max over the batch tensor",
    "celllm": "FAVOR+ key stabiliser: per cell vs over the batch (pads in the normaliser in both modes)",
    "cellplm": "GMVAE cluster: argmax vs seeded Gumbel sample (reference RNG replayed)",
}


def _small_pc9(folder: Path, n_cells: int, n_genes: int) -> tuple[Path, list[str]]:
    """The first ``n_cells`` PC9 cells over their ``n_genes`` most-counted genes (raw counts)."""
    full = ad.read_h5ad(PC9)
    x = sp.csr_matrix(full.X, dtype=np.float32)[:n_cells]
    genes = np.sort(np.argsort(-np.asarray(x.sum(axis=0)).ravel(), kind="stable")[:n_genes])
    small = ad.AnnData(X=sp.csr_matrix(x[:, genes]))
    small.obs_names = full.obs_names[:n_cells]
    small.var_names = full.var_names[genes]
    path = folder / "pc9.h5ad"
    small.write_h5ad(path)
    return path, small.var_names.tolist()


def _embedding(st: Store, family: str, ckpt: Path, **kwargs: Any) -> np.ndarray:
    result = embed(st, "pc9", family, ckpt, device="cpu", precision="fp32", progress=False, chunk_rows=64, **kwargs)
    return st.read_embedding(result.embedding_id)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def measure(family: str, ckpt: Path, data: Path, workdir: Path, **params: Any) -> dict[str, float]:
    """The four runner embeddings of one adapter and the differences between them."""
    stores = {bs: Store(workdir / f"{family}-bs{bs}") for bs in (1, 16)}
    for st in stores.values():
        st.ingest(data, name="pc9")
    runs = {
        (quirks, bs): _embedding(stores[bs], family, ckpt, batch_size=bs, reference_quirks=quirks, **params)
        for quirks in (False, True)
        for bs in (1, 16)
    }
    other_seed = _embedding(stores[16], family, ckpt, batch_size=16, reference_quirks=True, seed=1, **params)
    return {
        "default_vs_quirks": _max_diff(runs[(False, 16)], runs[(True, 16)]),
        "batch_default": _max_diff(runs[(False, 1)], runs[(False, 16)]),
        "batch_quirks": _max_diff(runs[(True, 1)], runs[(True, 16)]),
        "seed_quirks": _max_diff(runs[(True, 16)], other_seed),
    }


def celllm_padding_emulation(ckpt: Path, data: Path, n_cells: int = 16) -> float:
    """Max |diff| between CellLM's weighted pad row and literal padding to ``max_length`` (6000)."""
    adata = ad.read_h5ad(data)
    adapter = celllm.CellLMAdapter(ckpt)
    adapter.load("cpu")
    adapter.prepare(adata.var_names.tolist(), gene_id_kind="symbol")
    cells = adapter.tokenize(sp.csr_matrix(adata.X[:n_cells], dtype=np.float32), np.arange(n_cells))
    pad_token, _, pad_pos, _ = adapter._special
    with torch.inference_mode():
        emulated = adapter.embed(adapter.collate(cells))
        literal = []
        for cell in cells:  # the reference's forward: every cell padded to max_length, pad keys kept
            ids = torch.full((1, adapter.max_length), pad_token, dtype=torch.long)
            pos = torch.full((1, adapter.max_length), pad_pos, dtype=torch.long)
            mask = torch.zeros((1, adapter.max_length), dtype=torch.bool)
            n = len(cell["input_ids"])
            ids[0, :n] = torch.from_numpy(cell["input_ids"].astype(np.int64))
            pos[0, :n] = torch.from_numpy(cell["gene_pos"].astype(np.int64))
            mask[0, :n] = True
            assert adapter.model is not None
            hidden = adapter.model(ids, pos, key_weight=torch.ones(1, adapter.max_length), value_mask=mask, key_max="cell")
            literal.append(hidden[:, 0])
    return _max_diff(emulated.numpy(), torch.cat(literal).numpy())


def uce_mask_effect(ckpt: Path, data: Path, batch_size: int = 16, **params: Any) -> float:
    """Max |diff| between UCE's float and boolean padding masks on the same sentences and batches."""
    adata = ad.read_h5ad(data)
    n_cells = adata.n_obs
    adapter = uce.UCEAdapter(ckpt, reference_quirks=True, **params)
    adapter.load("cpu")
    adapter.prepare(adata.var_names.tolist(), gene_id_kind="symbol")
    cells = adapter.tokenize(sp.csr_matrix(adata.X[:n_cells], dtype=np.float32), np.arange(n_cells))
    assert adapter.model is not None
    diffs = []
    with torch.inference_mode():
        for lo in range(0, n_cells, batch_size):  # the runner's fixed batches of consecutive rows
            batch = adapter.collate(cells[lo:lo + batch_size])
            diffs.append(_max_diff(adapter.embed(batch).numpy(), adapter.model(batch["input_ids"], batch["padding_mask"]).numpy()))
    return max(diffs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=300, help="PC9 cells (first N of the 300)")
    parser.add_argument("--genes", type=int, default=2000, help="most-counted PC9 genes kept (the tiny vocabularies)")
    parser.add_argument("--models", default=",".join(WRITERS), help="comma-separated subset of " + ",".join(WRITERS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data, genes = _small_pc9(workdir, args.cells, args.genes)
        for family in models:
            t0 = time.perf_counter()
            ckpt = WRITERS[family](workdir / f"ckpt-{family}", genes=genes, seed=0)
            rows.append((family, DIFFERENCE[family], measure(family, ckpt, data, workdir)))
            if family == "scfoundation":  # T = log10(total) + shift <= 0 for the smaller half of the cells
                totals = np.asarray(ad.read_h5ad(data).X.sum(axis=1)).ravel()
                tgthighres = f"a{-np.log10(np.median(totals)):.3f}"
                contrived = measure(family, ckpt, data, workdir / "scf-shift", tgthighres=tgthighres)
                rows.append((f"{family} (tgthighres={tgthighres})", "T <= 0 for half the cells: T dropped, pooled by position", contrived))
            if family == "uce":
                for size in (1024, 64):
                    effect = uce_mask_effect(ckpt, data, sample_size=size)
                    print(f"uce: float vs boolean mask, same sentences (sample_size={size}), batches of 16, max |diff| = {effect:.1e}", file=sys.stderr)
            if family == "uce":  # 64 genes per sentence: cells miss chromosomes, so lengths (and padding) vary
                contrived = measure(family, ckpt, data, workdir / "uce-64", sample_size=64)
                rows.append((f"{family} (sample_size=64)", "as above, with sentences of varying length", contrived))
            if family == "celllm":
                print(f"celllm: weighted pad row vs literal 6000-token padding, max |diff| = {celllm_padding_emulation(ckpt, data):.1e}", file=sys.stderr)
            print(f"{family}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"PC9 cells: {args.cells}, genes: {args.genes}, CPU fp32, tiny random models (seed 0)\n")
    print("| adapter | difference | default vs quirks | batch 1 vs 16 (default) | batch 1 vs 16 (quirks) | seed 0 vs 1 (quirks) |")
    print("|---|---|---|---|---|---|")
    for family, what, m in rows:
        cells = " | ".join(f"{m[k]:.1e}" for k in ("default_vs_quirks", "batch_default", "batch_quirks", "seed_quirks"))
        print(f"| {family} | {what} | {cells} |")


if __name__ == "__main__":
    main()
