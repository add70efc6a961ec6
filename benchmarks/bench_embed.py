"""Embedding benchmark: every registered adapter through the real runner on real PC9 counts.

Prints one table. Each model is a **mid-size random model of its real architecture**, written in
the model's official on-disk format by its ``write_tiny_checkpoint`` (real vocabulary / gene
counts and real token counts per cell; fewer or narrower layers where a full-size model would not
fit a CPU run; the config column says what was used). The input is the bundled real PC9 raw-count
subsample (``tests/data/PC9_erlotinib_subsample300.h5ad``): a seeded random set of cells, kept in
file order, ingested into a temporary store. Then, per model, in a fresh subprocess (so peak
memory does not accumulate across models)::

    scdm_embed.runner.embed(store, dataset, model, checkpoint, batch_size=..., progress=False)

and the table reports from its telemetry: cells/s (wall time of the chunk loop: tokenise, sort,
collate, forward, write; model loading excluded and shown separately), peak RSS of the process,
parameters, tokens per cell, and the padding saved by length-sorted batches (tokens computed vs
tokens with naive batches in row order, same batch size). The ``pca``/``hvg`` baselines run the same
way (cells/s includes their fit).

FLOPs per cell are estimated as ``2 * W * tokens`` (W = weights of the Linear/Conv1D layers and
fused q/k/v projections applied to every token; per-cell heads count once) plus an attention term:
``4 * layers * T^2 * width`` for bidirectional softmax attention, half of that for causal attention,
``8 * m * width * T * layers`` for Performer FAVOR+ (m random features), and ``4 * width * head_dim
* layers`` per cell for CellPLM's Flowformer over cells (+ its gene-bag embedding, ``2 * genes *
width``). Only real tokens count, so padding shows up as lost utilisation. Model FLOP utilisation
(MFU) = achieved FLOP/s / the GPU's dense bf16 peak; it is printed only for CUDA rows ("n/a (no
GPU)" on CPU).

With ``--device auto`` (default) and a CUDA device present (``torch.cuda.is_available()``), every
model also gets a ``cuda/bf16`` row (bf16 autocast, as the runner does by default on CUDA) at a
per-model GPU batch size, after one warm-up call on a small dataset.

Usage::

    python benchmarks/bench_embed.py                         # all models, default cells per model
    python benchmarks/bench_embed.py --models geneformer,tgpt --cells 100 --batch-size 32
    python benchmarks/bench_embed.py --device cuda --cells 4096     # GPU rows only; cells repeat
    python benchmarks/bench_embed.py --workdir /tmp/bench-embed     # keep the checkpoints
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

logger = logging.getLogger(__name__)

DATA = ROOT / "tests" / "data" / "PC9_erlotinib_subsample300.h5ad"
BASELINES = ("pca", "hvg")

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets. The first
# substring found in torch.cuda.get_device_name() wins, so the specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)


# ---- what each model is benchmarked as ---------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """One adapter's benchmark configuration (mid-size random model of the real architecture)."""

    name: str
    """Registered adapter name."""
    config: str
    """Human-readable config, printed in the table."""
    n_genes: int
    """Genes in the vocabulary (the real model's count where feasible)."""
    gene_kind: str
    """``"symbol"`` or ``"ensembl"``: how the vocabulary is given to ``write_tiny_checkpoint``."""
    overrides: dict[str, Any]
    """``**config_overrides`` for ``write_tiny_checkpoint``."""
    attention: str
    """``softmax``, ``causal``, ``favor`` or ``flow`` (for the FLOP estimate)."""
    attn_layers: int
    """Attention layers the embedding actually runs (Geneformer stops at the penultimate layer)."""
    attn_width: int
    """heads x head_dim."""
    cells: int
    """Default cells (``--cells`` overrides): sized so the whole benchmark takes ~10 min on 2 cores."""
    gpu_batch: int = 64
    """Batch size of the CUDA rows (``--gpu-batch-size`` overrides); the CPU rows use the adapter's default."""
    write_kwargs: dict[str, Any] = field(default_factory=dict)
    """Other keyword arguments of ``write_tiny_checkpoint`` (e.g. Geneformer ``version``)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Adapter parameters passed to ``embed`` (defaults of the adapter otherwise)."""
    favor_features: int = 0
    """Performer random features per head."""
    head_dim: int = 0
    """For ``flow`` attention."""
    per_cell_prefixes: tuple[str, ...] = ()
    """Module-name prefixes of Linear layers applied once per cell, not per token."""


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec(
            "geneformer",
            "V1 (the real V1-10M shape): 6L x 256, 4 heads, FFN 512, vocab 25,426, <=2048 tok; "
            "penultimate layer (5 layers run), mean pool",
            25_424, "ensembl",
            {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 4, "intermediate_size": 512,
             "max_position_embeddings": 2048},
            "softmax", 5, 256, cells=48, gpu_batch=64, write_kwargs={"version": 1},
        ),
        ModelSpec(
            "tgpt",
            "real tGPT shape: GPT-2 8L x 1024, 16 heads, FFN 4096, vocab 21,150, 64 tok (62 genes)",
            21_146, "symbol",
            {"n_embd": 1024, "n_layer": 8, "n_head": 16, "n_positions": 64},
            "causal", 8, 1024, cells=48, gpu_batch=256,
        ),
        ModelSpec(
            "llm",
            "LLaMA-3 style: 4L x 1024, 8 heads / 2 KV heads, SwiGLU 3584, RoPE 5e5; top-100 gene "
            "sentence; word-level tokenizer over the gene table (LLaMA-3's BPE splits symbols into more "
            "tokens; not measured)",
            20_000, "symbol",
            {"hidden_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
             "intermediate_size": 3584, "max_position_embeddings": 8192},
            "causal", 4, 1024, cells=48, gpu_batch=64,
        ),
        ModelSpec(
            "scgpt",
            "whole-human shape, fewer layers: 4L x 512 (real 12L), 8 heads, FFN 512, vocab 60,697, "
            "<=1200 tok, CLS",
            60_694, "symbol",
            {"embsize": 512, "nheads": 8, "d_hid": 512, "nlayers": 4},
            "softmax", 4, 512, cells=48, gpu_batch=64,
        ),
        ModelSpec(
            "scfoundation",
            "small encoder: 2L x 768 (real 12L), 12 heads, FFN 3072, 19,264 genes (+T,S), "
            "non-zero genes only; decoder (unused) tiny",
            19_264, "symbol",
            {"encoder": {"hidden_dim": 768, "depth": 2, "heads": 12, "dim_head": 64, "module_type": "transformer",
                         "norm_first": False},
             "bin_num": 100},
            "softmax", 2, 768, cells=24, gpu_batch=32,
        ),
        ModelSpec(
            "uce",
            "4-layer, narrower: 4L x 640 (real 1280), 20 heads, FFN 2560, token dim 5120 (ESM2), "
            "1024 sampled genes + chrom tokens, decoder 1024/1280; token table 12.7k rows (real 145k)",
            0, "symbol",
            {"token_dim": 5120, "d_model": 640, "n_heads": 20, "d_hid": 2560, "n_layers": 4,
             "decoder_hidden": 1024, "output_dim": 1280},
            "softmax", 4, 640, cells=24, gpu_batch=64, per_cell_prefixes=("decoder.",),
        ),
        ModelSpec(
            "scbert",
            "2L (real 6L) x 200, 10 heads x 64, FFN 800, 266 FAVOR+ features, full 16,907-token "
            "gene length, CLS (last token)",
            16_906, "symbol",
            {"dim": 200, "depth": 2, "heads": 10, "dim_head": 64, "ff_mult": 4},
            "favor", 2, 640, cells=4, gpu_batch=8, favor_features=266,
        ),
        ModelSpec(
            "celllm",
            "2L (real 10L) x 512, 16 heads x 64, FFN 2048, 266 FAVOR+ features, 19,379 genes, "
            "<=6000 tok (CLS + expressed genes), CLS",
            19_379, "symbol",
            {"dim": 512, "depth": 2, "heads": 16, "dim_head": 64, "ff_mult": 4},
            "favor", 2, 1024, cells=24, gpu_batch=32, favor_features=266,
        ),
        ModelSpec(
            "cellplm",
            "real 20230926_85M shape: Flowformer 4L x 1024, 8 heads, latent 512, 16 clusters, "
            "19,374 genes; cells are the tokens (batch = one sequence)",
            19_374, "ensembl",
            {"enc_hid": 1024, "enc_layers": 4, "enc_head": 8, "post_latent_dim": 512, "num_clusters": 16,
             "dec_hid": 1024},
            "flow", 4, 1024, cells=300, gpu_batch=1024, head_dim=128,
        ),
    )
}


# ---- small helpers -------------------------------------------------------------------------------
def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, default=float))


def select_cells(n_total: int, n: int, seed: int) -> np.ndarray:
    """``n`` cells drawn at random (seeded; smaller draws are subsets of larger ones), in file order.

    File order matters: the naive-padding baseline batches cells in row order. More cells than
    the file holds (for GPU runs) repeat every cell as evenly as possible.
    """
    order = np.random.default_rng(seed).permutation(n_total)
    return np.sort(np.tile(order, -(-n // n_total))[:n])  # beyond n_total the cells repeat


def vocabulary(dataset_symbols: Sequence[str], n: int, kind: str) -> list[str]:
    """``n`` genes of the shipped table, the dataset's known genes first (as a real vocabulary covers them)."""
    from store.genes import gene_table

    table = gene_table()
    column = "symbol" if kind == "symbol" else "ensembl"
    known = dict(zip(table["symbol"], table[column]))
    first = [known[s] for s in dataset_symbols if s in known]
    genes = list(dict.fromkeys(g for g in [*first, *table[column]] if g))
    if len(genes) < n:
        logger.warning("gene table has only %d %s genes; vocabulary smaller than the real model's %d", len(genes), kind, n)
    return genes[:n]


def peak_bf16_tflops(device_name: str, override: float | None) -> float | None:
    """The GPU's dense bf16 peak (``--peak-tflops`` wins), or None when unknown."""
    if override:
        return override
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# ---- worker processes ----------------------------------------------------------------------------
def _run_worker(job: dict[str, Any], work: Path, tag: str, timeout: float) -> dict[str, Any]:
    """Run ``job`` in a fresh interpreter; return its JSON result or ``{"error": ...}``."""
    job_file = work / f"job-{tag}.json"
    out_file = work / f"out-{tag}.json"
    out_file.unlink(missing_ok=True)
    _write_json(job_file, job)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(job_file), str(out_file)]
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not out_file.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(out_file.read_text())


def worker_main(job_file: str, out_file: str) -> None:
    """Entry point of a worker subprocess."""
    job = json.loads(Path(job_file).read_text())
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    task = {"write": _task_write, "embed": _task_embed}[job["task"]]
    _write_json(out_file, task(job))


def _spec_from_json(obj: dict[str, Any]) -> ModelSpec:
    return ModelSpec(**{**obj, "per_cell_prefixes": tuple(obj["per_cell_prefixes"])})


def _task_write(job: dict[str, Any]) -> dict[str, Any]:
    """Write every missing checkpoint (one process for all, kept apart from the measured ones)."""
    import importlib

    import anndata as ad

    symbols = [str(g) for g in ad.read_h5ad(DATA, backed="r").var_names]
    seconds = {}
    for entry in job["checkpoints"]:
        spec, folder = _spec_from_json(entry["spec"]), Path(entry["folder"])
        marker = folder / ".complete"  # dotfiles are not part of the runner's checkpoint hash
        if marker.exists():
            seconds[spec.name] = 0.0
            continue
        shutil.rmtree(folder, ignore_errors=True)
        module = importlib.import_module(f"scdm_embed.models.{spec.name}")
        genes = symbols if spec.n_genes == 0 else vocabulary(symbols, spec.n_genes, spec.gene_kind)
        t0 = time.perf_counter()
        module.write_tiny_checkpoint(folder, genes=genes, seed=0, **spec.write_kwargs, **spec.overrides)
        seconds[spec.name] = time.perf_counter() - t0
        marker.write_text("ok\n")
    return {"write_s": seconds}


def _record_adapters(created: list[Any]) -> None:
    """Make the runner hand us the adapter it builds (to count its weights after the run)."""
    import scdm_embed.runner as runner

    original = runner.get_adapter

    def get_adapter(name: str) -> Any:
        cls = original(name)

        def build(*args: Any, **kwargs: Any) -> Any:
            adapter = cls(*args, **kwargs)
            created.append(adapter)
            return adapter

        return build

    runner.get_adapter = get_adapter


def _token_accounting(adapter: Any, st: Any, dataset: str, per_cell_prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Linear weights applied per token / per cell, and every cell's token length (re-tokenised)."""
    from store._ingest import to_csr

    per_token = per_cell = 0
    for name, module in adapter.model.named_modules():
        weights = []
        if type(module).__name__ in ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear"):
            weights.append(module.weight)
        # nn.MultiheadAttention-style fused q/k/v projections (scGPT, scFoundation, UCE)
        weights.extend(p for n, p in module.named_parameters(recurse=False) if n == "in_proj_weight")
        n_weights = sum(int(w.numel()) for w in weights)
        if name.startswith(per_cell_prefixes):
            per_cell += n_weights
        else:
            per_token += n_weights
    adata = st.open_anndata(dataset, backed=True)
    try:
        x = to_csr(adata.X[:])
    finally:
        adata.file.close()
    lengths = [adapter.token_length(c) for c in adapter.tokenize(x, np.arange(x.shape[0]))]
    return {"w_token": per_token, "w_cell": per_cell, "lengths": lengths}


def _task_embed(job: dict[str, Any]) -> dict[str, Any]:
    """One measured ``runner.embed`` call (after a warm-up call on a small dataset on CUDA)."""
    from scdm_embed import get_adapter
    from scdm_embed.runner import embed
    from store import Store

    st = Store(job["store"])
    if job["model"] in BASELINES:
        rss_start = _rss_peak_bytes()
        result = embed(st, job["dataset"], job["model"], progress=False)
        return {"telemetry": result.telemetry, "rss_start": rss_start}
    get_adapter(job["model"])  # import the model module before taking the start RSS
    created: list[Any] = []
    _record_adapters(created)
    rss_start = _rss_peak_bytes()
    common = {"batch_size": job["batch_size"], "device": job["device"], "precision": job["precision"], "progress": False,
              "workers": job["workers"], **job["params"]}
    if job.get("warmup_dataset"):  # CUDA: kernels, cuBLAS handles and the caching allocator
        embed(st, job["warmup_dataset"], job["model"], job["checkpoint"], **common)
    result = embed(st, job["dataset"], job["model"], job["checkpoint"], **common)
    # after the measured call (its telemetry already holds the peak RSS): FLOP accounting
    spec = _spec_from_json(job["spec"])
    return {"telemetry": result.telemetry, "rss_start": rss_start,
            **_token_accounting(created[-1], st, job["dataset"], spec.per_cell_prefixes)}


# ---- FLOPs ---------------------------------------------------------------------------------------
def flops_per_cell(spec: ModelSpec, counts: dict[str, Any]) -> np.ndarray:
    """Estimated forward FLOPs of each cell (real tokens only), see the module docstring."""
    lengths = np.asarray(counts["lengths"], dtype=np.float64)
    w_token, w_cell = float(counts["w_token"]), float(counts["w_cell"])
    layers, width = spec.attn_layers, spec.attn_width
    if spec.attention == "flow":  # one token per cell; lengths are the genes in its bag
        return 2 * w_token + 2 * w_cell + 2 * lengths * width + 4 * width * spec.head_dim * layers
    dense = 2 * w_token * lengths + 2 * w_cell
    if spec.attention == "softmax":
        return dense + 4 * layers * lengths**2 * width
    if spec.attention == "causal":
        return dense + 2 * layers * lengths**2 * width
    if spec.attention == "favor":
        return dense + 8 * spec.favor_features * width * lengths * layers
    msg = f"unknown attention kind {spec.attention!r}"
    raise ValueError(msg)


# ---- the benchmark -------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table."""

    model: str
    config: str
    device: str
    precision: str
    cells: int
    batch: int | None = None
    params_m: float | None = None
    tok_median: float | None = None
    tok_max: int | None = None
    tokens_computed: int | None = None
    tokens_naive: int | None = None
    padding_saved: float | None = None
    cells_per_s: float | None = None
    gflop_per_cell: float | None = None
    gflop_per_s: float | None = None
    mfu: str = "n/a (no GPU)"
    load_s: float | None = None
    peak_rss_mib: float | None = None
    rss_start_mib: float | None = None
    peak_gpu_mib: float | None = None
    error: str | None = None


def ingest_subsets(st: Any, sizes: Sequence[int], seed: int) -> dict[int, tuple[str, list[int]]]:
    """Ingest one dataset per cell count; returns size -> (dataset name, rows of the h5ad)."""
    import anndata as ad

    full = ad.read_h5ad(DATA)
    out = {}
    for n in sorted(set(sizes)):
        rows = select_cells(full.n_obs, n, seed)
        name = f"pc9_{len(rows)}_s{seed}"
        subset = full[rows].copy()
        subset.obs_names_make_unique()
        st.ingest(subset, name=name)
        out[n] = (name, rows.tolist())
    return out


def spec_key(spec: ModelSpec) -> str:
    """Names a checkpoint folder after everything that shapes the checkpoint."""
    shape = {k: getattr(spec, k) for k in ("name", "n_genes", "gene_kind", "overrides", "write_kwargs")}
    blob = json.dumps(shape, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()


def checkpoint_folder(spec: ModelSpec, work: Path) -> Path:
    return work / "checkpoints" / f"{spec.name}-{spec_key(spec)}"


def run_model(spec: ModelSpec, args: argparse.Namespace, st_root: Path, work: Path, datasets: dict[int, tuple[str, list[int]]],
              cuda: dict[str, Any] | None) -> list[Row]:
    n = args.cells or spec.cells
    name, rows = datasets[n]
    runs = []  # (device, precision, batch size, is the GPU row)
    if args.device in ("auto", "cpu"):
        runs.append(("cpu", "fp32", args.batch_size, False))
    if cuda is not None:
        runs.append((cuda["device"], "bf16", args.gpu_batch_size or spec.gpu_batch, True))
    out = []
    for device, precision, batch, on_gpu in runs:
        t0 = time.perf_counter()
        job = {"task": "embed", "model": spec.name, "spec": asdict(spec), "store": str(st_root), "dataset": name,
               "checkpoint": str(checkpoint_folder(spec, work)), "batch_size": batch, "device": device,
               "precision": precision, "workers": args.workers, "params": spec.params, "threads": args.threads,
               "warmup_dataset": datasets[min(datasets)][0] if on_gpu else None}
        res = _run_worker(job, work, f"{spec.name}-{device}", args.timeout)
        row = Row(spec.name, spec.config, device, precision, len(rows))
        out.append(row)
        if "error" in res:
            row.error = res["error"]
            continue
        tel = res["telemetry"]
        flops = flops_per_cell(spec, res)
        row.batch = tel.get("final_batch_size")
        row.params_m = tel.get("n_parameters", 0) / 1e6
        stats = tel.get("token_stats", {})
        row.tok_median, row.tok_max = stats.get("tokens_per_cell_median"), stats.get("tokens_per_cell_max")
        row.tokens_computed, row.tokens_naive = tel.get("tokens_computed"), tel.get("tokens_naive_padding")
        row.padding_saved = tel.get("padding_saved")
        row.cells_per_s = tel.get("cells_per_s")
        row.gflop_per_cell = float(flops.mean()) / 1e9
        row.gflop_per_s = float(flops.sum()) / tel["wall_s"] / 1e9 if tel.get("wall_s") else None
        row.load_s = tel.get("load_s")
        row.peak_rss_mib = tel.get("peak_rss_bytes", 0) / 2**20
        row.rss_start_mib = res["rss_start"] / 2**20
        if spec.attention == "flow":  # the runner does not sort: a batch is one sequence of cells
            row.padding_saved = None
        if on_gpu:
            row.peak_gpu_mib = tel.get("peak_gpu_mem_bytes", 0) / 2**20
            peak = peak_bf16_tflops(cuda["name"], args.peak_tflops)  # type: ignore[index]
            row.mfu = f"{row.gflop_per_s / (peak * 1e3):.1%}" if (peak and row.gflop_per_s) else "n/a (peak unknown: --peak-tflops)"
        logger.info("%s %s/%s: %.2f cells/s, worker %.0f s", spec.name, device, precision, row.cells_per_s or 0, time.perf_counter() - t0)
    return out


def run_baseline(model: str, args: argparse.Namespace, st_root: Path, work: Path, datasets: dict[int, tuple[str, list[int]]]) -> Row:
    n = args.cells or max(s for s in datasets)
    name, rows = datasets[n]
    cfg = "normalize_total 1e4, log1p, 2000 HVG" + (", PCA 50" if model == "pca" else "") + "; fit + transform"
    job = {"task": "embed", "model": model, "store": str(st_root), "dataset": name, "device": "cpu", "precision": "fp32",
           "workers": 0, "threads": args.threads}
    res = _run_worker(job, work, model, args.timeout)
    row = Row(model, cfg, "cpu", "fp64", len(rows), mfu="-")
    if "error" in res:
        row.error = res["error"]
        return row
    tel = res["telemetry"]
    total = tel.get("wall_s", 0) + tel.get("fit_s", 0)
    row.cells_per_s = len(rows) / total if total else None
    row.peak_rss_mib = tel.get("peak_rss_bytes", 0) / 2**20
    row.rss_start_mib = res["rss_start"] / 2**20
    row.params_m = 0.0
    return row


# ---- output --------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def render(rows: list[Row]) -> str:
    head = ["model", "config", "device", "params", "cells", "batch", "tok/cell med [max]",
            "tokens computed / naive (padding saved)", "cells/s", "GFLOP/cell", "GFLOP/s", "MFU", "load s",
            "peak RSS MiB (start)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.error:
            cells = [r.model, r.config, f"{r.device}/{r.precision}", "-", str(r.cells), "-", "-", f"ERROR {r.error}",
                     "-", "-", "-", "-", "-", "-"]
        else:
            tok = f"{r.tok_median:.0f} [{r.tok_max}]" if r.tok_median is not None else "-"
            if r.tokens_computed is None:
                pad = "-"
            elif r.padding_saved is None:
                pad = "n/a (cells are the tokens; not sorted)"
            else:
                pad = f"{r.tokens_computed:,} / {r.tokens_naive:,} ({r.padding_saved:.0%})"
            rss = f"{r.peak_rss_mib:,.0f} ({r.rss_start_mib:,.0f})" if r.peak_rss_mib else "-"
            if r.peak_gpu_mib:
                rss += f"; GPU {r.peak_gpu_mib:,.0f}"
            params = f"{r.params_m:.1f}M" if r.params_m else "-"
            cells = [r.model, r.config, f"{r.device}/{r.precision}", params, str(r.cells), _fmt(r.batch), tok, pad,
                     _fmt(r.cells_per_s, ".1f"), _fmt(r.gflop_per_cell, ".2f"), _fmt(r.gflop_per_s, ".1f"), r.mfu,
                     _fmt(r.load_s, ".1f"), rss]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cuda_info(device: str) -> dict[str, Any] | None:
    import torch

    if device == "cpu":
        return None
    if not torch.cuda.is_available():
        if device == "cuda":
            msg = f"--device cuda was asked for, but torch {torch.__version__} sees no CUDA device; use --device cpu or auto."
            raise SystemExit(msg)
        return None
    return {"name": torch.cuda.get_device_name(0), "device": "cuda"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join([*SPECS, *BASELINES]),
                    help="comma-separated adapters and/or baselines (default: all nine adapters + pca,hvg)")
    ap.add_argument("--cells", type=int, default=None,
                    help="cells per model (default: per-model sizes chosen so everything takes ~10 min on 2 CPU cores; "
                         "baselines: all 300). Above 300 the file's cells repeat (for GPU runs)")
    ap.add_argument("--batch-size", type=int, default=None, help="cells per forward pass (default: each adapter's default)")
    ap.add_argument("--gpu-batch-size", type=int, default=None,
                    help="batch size of the CUDA rows (default: per model, 8 (scBERT) to 1024 (CellPLM))")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CPU rows, plus cuda/bf16 rows when CUDA is available; cpu or cuda: only those rows")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader tokenisation workers of the runner (0 = inline)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each worker (default: torch's)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak for MFU (default: from the device name)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cell selection")
    ap.add_argument("--workdir", default=None, help="keep checkpoints here between runs (default: a temporary folder, removed)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from scdm_embed import available_models

    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    registered = available_models()
    unknown = [m for m in wanted if m not in SPECS and m not in BASELINES]
    if unknown:
        raise SystemExit(f"Unknown model(s) {unknown}; benchmarked: {', '.join([*SPECS, *BASELINES])}.")
    missing = [m for m in wanted if m in SPECS and m not in registered]
    if missing:
        raise SystemExit(f"Model(s) {missing} are not registered adapters (registered: {', '.join(registered)}).")
    if args.cells is not None and args.cells < 1:
        raise SystemExit(f"--cells {args.cells}: use at least 1.")
    cuda = _cuda_info(args.device)

    from store import Store

    keep = args.workdir is not None
    work = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="scdm-bench-embed-"))
    work.mkdir(parents=True, exist_ok=True)
    st_root = work / f"store-{os.getpid()}-{int(time.time())}"
    t_start = time.perf_counter()
    try:
        st = Store(st_root)
        sizes = [args.cells or SPECS[m].cells for m in wanted if m in SPECS]
        if any(m in BASELINES for m in wanted):
            sizes.append(args.cells or max([*sizes, 300]))
        if cuda is not None:
            sizes.append(min(8, *sizes))
        datasets = ingest_subsets(st, sizes, args.seed)
        specs = [SPECS[m] for m in wanted if m in SPECS]
        if specs:
            logger.info("writing checkpoints (cached in %s)", work / "checkpoints")
            written = _run_worker({"task": "write", "threads": args.threads,
                                   "checkpoints": [{"spec": asdict(s), "folder": str(checkpoint_folder(s, work))} for s in specs]},
                                  work, "write", args.timeout)
            if "error" in written:
                raise SystemExit(f"Writing the checkpoints failed: {written['error']}")
            logger.info("checkpoints written in %s", ", ".join(f"{k} {v:.1f} s" for k, v in written["write_s"].items()))
        rows: list[Row] = []
        for m in wanted:
            logger.info("benchmarking %s", m)
            if m in BASELINES:
                rows.append(run_baseline(m, args, st_root, work, datasets))
            else:
                rows.extend(run_model(SPECS[m], args, st_root, work, datasets, cuda))
    finally:
        shutil.rmtree(st_root, ignore_errors=True)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    print(f"# bench_embed: {' '.join(['python', 'benchmarks/bench_embed.py', *(argv if argv is not None else sys.argv[1:])])}")
    print(f"# host {platform.node()}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads() if args.threads is None else args.threads} threads)"
          + (f", GPU {cuda['name']}" if cuda else ", no GPU"))
    print(f"# data: {DATA.relative_to(ROOT)} (raw UMI counts), cells drawn with seed {args.seed}; "
          f"total {time.perf_counter() - t_start:.0f} s")
    print(render(rows))


if __name__ == "__main__":
    main()
