"""Embedding benchmark: every registered adapter through the real runner on real PC9 counts.

Prints one table. Each model is a **mid-size random model of its real architecture**, written in
the model's official on-disk format by its ``write_tiny_checkpoint`` (real vocabulary / gene
counts and real token counts per cell; fewer or narrower layers where a full-size model would not
fit a CPU run; the config column says what was used). The input is the bundled real PC9 raw-count
subsample (``tests/data/PC9_erlotinib_subsample300.h5ad``): a seeded random set of cells, kept in
file order, ingested into a temporary store. Then, per model, in a fresh subprocess (so peak
memory does not accumulate across models)::

    scdm.embedding.runner.embed(store, dataset, model, checkpoint, batch_size=..., progress=False)

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

``--published`` (issue #19 point 7; ``benchmarks/gpu/run_gpu.sh`` runs it on the H200) is a second,
GPU-only mode: Geneformer 12L x 512, scGPT whole-human, scFoundation 100M, UCE 33L and a LLaMA-3-8B
shaped ``llm`` at their **published sizes** (random weights; the checkpoints are written by a
background process while earlier models run, the 8B model is built directly on the GPU in bf16),
on synthetic raw counts (1,000-4,000 expressed genes of 20,000 per cell). Per model, in this process,
through the adapter's ``tokenize``/``collate``/``embed`` and the runner's batching
(``batches_by_length`` per chunk, ``embed_cells``), store writes left out, one row each for:
``ref`` (the reference extractor's batch size, ordering and precision, float32 weights), ``scdm``
(the default path on CUDA: the adapter configured for bf16 before loading, as the runner does, so
its weights are bf16 where the adapter supports it; the runner's batch size) and ``scdm+batch`` (the
same at a larger batch). It reports cells/s, tokens/s, TFLOP/s and MFU beside the goals (MFU >= 40 %, >= 5x the
reference settings), the per-process tokenisation rate and a one-batch kernel-time profile, skips
what no longer fits ``--budget-s``, and writes ``--out``/bench_embed_gpu.{md,json} after every model.
``--compile MODELS`` adds an ``scdm+compile`` row (the ``scdm`` setting after ``torch.compile``, as
``scdm embed --compile`` runs it), with its compile time and its distance from the eager embeddings.
``--smoke`` runs the same path with tiny models on the CPU.

Usage::

    python benchmarks/bench_embed.py                         # all models, default cells per model
    python benchmarks/bench_embed.py --models geneformer,tgpt --cells 100 --batch-size 32
    python benchmarks/bench_embed.py --device cuda --cells 4096     # GPU rows only; cells repeat
    python benchmarks/bench_embed.py --workdir /tmp/bench-embed     # keep the checkpoints
    python benchmarks/bench_embed.py --published --out bench-out/gpu  # published sizes on CUDA (~5 min)
    python benchmarks/bench_embed.py --smoke                          # the same path, tiny, on the CPU
    python benchmarks/bench_embed.py --published --compile geneformer,scgpt   # + torch.compile rows
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # `import scdm` without installing it

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
    from scdm.store.genes import gene_table

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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
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
    task = {"write": _task_write, "embed": _task_embed, "write_published": _task_write_published}[job["task"]]
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
        module = importlib.import_module(f"scdm.embedding.models.{spec.name}")
        genes = symbols if spec.n_genes == 0 else vocabulary(symbols, spec.n_genes, spec.gene_kind)
        t0 = time.perf_counter()
        module.write_tiny_checkpoint(folder, genes=genes, seed=0, **spec.write_kwargs, **spec.overrides)
        seconds[spec.name] = time.perf_counter() - t0
        marker.write_text("ok\n")
    return {"write_s": seconds}


def _record_adapters(created: list[Any]) -> None:
    """Make the runner hand us the adapter it builds (to count its weights after the run)."""
    import scdm.embedding.runner as runner

    original = runner.get_adapter

    def get_adapter(name: str) -> Any:
        cls = original(name)

        def build(*args: Any, **kwargs: Any) -> Any:
            adapter = cls(*args, **kwargs)
            created.append(adapter)
            return adapter

        return build

    runner.get_adapter = get_adapter


def linear_weights(model: Any, per_cell_prefixes: tuple[str, ...] = ()) -> tuple[int, int]:
    """(weights of the matmuls applied to every token, weights applied once per cell).

    Counts Linear/Conv1D weights and ``nn.MultiheadAttention``-style fused ``in_proj_weight``
    (scGPT, scFoundation, UCE); modules under ``per_cell_prefixes`` (e.g. UCE's decoder on the CLS
    vector) count once per cell. Embedding tables are lookups and do not count.
    """
    per_token = per_cell = 0
    for name, module in model.named_modules():
        weights = []
        if type(module).__name__ in ("Linear", "Conv1D", "NonDynamicallyQuantizableLinear"):
            weights.append(module.weight)
        weights.extend(p for n, p in module.named_parameters(recurse=False) if n == "in_proj_weight")
        n_weights = sum(int(w.numel()) for w in weights)
        if name.startswith(per_cell_prefixes):
            per_cell += n_weights
        else:
            per_token += n_weights
    return per_token, per_cell


def _token_accounting(adapter: Any, st: Any, dataset: str, per_cell_prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Linear weights applied per token / per cell, and every cell's token length (re-tokenised)."""
    from scdm.store._ingest import to_csr

    per_token, per_cell = linear_weights(adapter.model, per_cell_prefixes)
    adata = st.open_anndata(dataset, backed=True)
    try:
        x = to_csr(adata.X[:])
    finally:
        adata.file.close()
    lengths = [adapter.token_length(c) for c in adapter.tokenize(x, np.arange(x.shape[0]))]
    return {"w_token": per_token, "w_cell": per_cell, "lengths": lengths}


def _task_embed(job: dict[str, Any]) -> dict[str, Any]:
    """One measured ``runner.embed`` call (after a warm-up call on a small dataset on CUDA)."""
    from scdm.embedding import get_adapter
    from scdm.embedding.runner import embed
    from scdm.store import Store

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
    return model_flops(spec.attention, spec.attn_layers, spec.attn_width, counts["w_token"], counts["w_cell"], counts["lengths"],
                       favor_features=spec.favor_features, head_dim=spec.head_dim)


def model_flops(attention: str, layers: int, width: int, w_token: float, w_cell: float, lengths: Any, *,
                favor_features: int = 0, head_dim: int = 0) -> np.ndarray:
    """Forward FLOPs of each cell from its real token count (the formulas of the module docstring)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    w_token, w_cell = float(w_token), float(w_cell)
    if attention == "flow":  # one token per cell; lengths are the genes in its bag
        return 2 * w_token + 2 * w_cell + 2 * lengths * width + 4 * width * head_dim * layers
    dense = 2 * w_token * lengths + 2 * w_cell
    if attention == "softmax":
        return dense + 4 * layers * lengths**2 * width
    if attention == "causal":
        return dense + 2 * layers * lengths**2 * width
    if attention == "favor":
        return dense + 8 * favor_features * width * lengths * layers
    msg = f"unknown attention kind {attention!r}"
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


# ---- published sizes on CUDA (issue #19, point 7) ---------------------------------------------------
# `--published`: random-initialised models at the real published sizes, on synthetic cells, in this
# process, through the adapter's tokenize/collate/embed and the runner's own batching code
# (`batches_by_length` per chunk, `embed_cells`: collate, copy to the device, inference_mode +
# autocast, forward, pooling, copy back). The store is not written (no catalog or array I/O in the
# numbers). Three rows per model:
#   ref          the reference extractor's batch size, ordering and precision, through our adapter
#                loaded without `configure_precision` (float32 weights); each batch read back
#                before the next starts, as the reference loops do;
#   scdm         what `scdm embed` does on CUDA: `adapter.configure_precision("cuda", "bf16")` before
#                `load` (half-precision weights where the adapter has `half_precision_weights`), the
#                runner's batch size, length-sorted batches per chunk, bf16 autocast, and
#                `BATCHES_PER_CALL` batches per `embed_cells` call (the next launched before the
#                last is read back, as in the runner);
#   scdm+batch   the same model at a larger batch (`opt_batch`).
# Padding masks are left out of unpadded batches by the adapters' `collate` in every row.
# Cells: a pool of tokenised synthetic cells, resampled; batches run in random order until the
# row's time is up, so an early stop still measures an unbiased sample of the batches.
@dataclass(frozen=True)
class ReferenceSettings:
    """How the model's reference extractor batches, for the ``ref`` row."""

    batch: int
    precision: str
    """Runner precision that matches it: ``fp32``, ``fp16`` or ``bf16`` (autocast)."""
    sort: bool
    source: str


@dataclass(frozen=True)
class PublishedSpec:
    """One model at its published size (``--published``)."""

    key: str
    adapter: str
    shape: str
    vocab: int
    """Genes in the vocabulary (the real count); 0 = the synthetic dataset's genes."""
    gene_kind: str
    overrides: dict[str, Any]
    """``write_tiny_checkpoint`` config at the published size (llm: the LlamaConfig built on the GPU)."""
    attention: str
    attn_layers: int
    """Attention layers the embedding runs (Geneformer stops at the penultimate layer)."""
    attn_width: int
    ref: ReferenceSettings
    opt_batch: int
    write_kwargs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    per_cell_prefixes: tuple[str, ...] = ()
    smoke: dict[str, Any] = field(default_factory=dict)
    """``--smoke`` replacements for overrides, vocab, attn_layers, attn_width, params."""

    def sized(self, smoke: bool) -> PublishedSpec:
        """This spec, or its tiny ``--smoke`` version."""
        if not smoke:
            return self
        from dataclasses import replace

        return replace(self, shape=f"tiny smoke config (published: {self.shape})", **self.smoke)


LLAMA3_8B: dict[str, Any] = {
    "vocab_size": 128_256, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14_336, "max_position_embeddings": 8192, "rope_theta": 500_000.0,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
}  # fmt: skip
LLM_BPE_VOCAB = 2000
"""BPE vocabulary trained on gene symbols for the llm row: ~2.8 tokens per gene (LLaMA-3's own tokenizer cannot be fetched)."""

PUBLISHED: dict[str, PublishedSpec] = {
    s.key: s
    for s in (
        PublishedSpec(
            "geneformer", "geneformer",
            "gf-12L-30M-i2048 (V1 dictionary): BERT 12L x 512, 8 heads, FFN 1024, vocab 25,426, <=2048 tokens; "
            "penultimate layer (11 layers run), mean pool",
            25_424, "ensembl",
            {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8, "intermediate_size": 1024,
             "max_position_embeddings": 2048},
            "softmax", 11, 512,
            ReferenceSettings(100, "fp32", True, "EmbExtractor: forward_batch_size=100, fp32, cells sorted longest first"),
            opt_batch=256, write_kwargs={"version": 1},
            smoke={"vocab": 800, "attn_layers": 1, "attn_width": 32,
                   "overrides": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}},
        ),
        PublishedSpec(
            "scgpt", "scgpt",
            "whole-human: 12L x 512, 8 heads, FFN 512, vocab 60,697, <=1200 tokens (CLS + 1199 genes), CLS",
            60_694, "symbol", {"embsize": 512, "nheads": 8, "d_hid": 512, "nlayers": 12},
            "softmax", 12, 512,
            ReferenceSettings(64, "fp16", False, "embed_data: batch_size=64, fp16 autocast, rows in order"),
            opt_batch=512,
            smoke={"vocab": 1000, "attn_layers": 2, "attn_width": 32,
                   "overrides": {"embsize": 32, "nheads": 4, "d_hid": 64, "nlayers": 2}},
        ),
        PublishedSpec(
            "scfoundation", "scfoundation",
            "xTrimoGene 100M: encoder 12L x 768, 12 heads, FFN 3072, 19,264 genes + T,S, every non-zero gene "
            "(no cap); decoder written, not run",
            19_264, "symbol",
            {"encoder": {"hidden_dim": 768, "depth": 12, "heads": 12, "dim_head": 64, "module_type": "transformer",
                         "norm_first": False},
             "decoder": {"hidden_dim": 512, "depth": 6, "heads": 8, "dim_head": 64, "module_type": "performer"},
             "bin_num": 100},
            "softmax", 12, 768,
            ReferenceSettings(1, "fp32", False, "get_embedding.py: one cell per forward, fp32"),
            opt_batch=96,
            smoke={"vocab": 500, "attn_layers": 2, "attn_width": 32,
                   "overrides": {"encoder": {"hidden_dim": 32, "depth": 2, "heads": 4, "dim_head": 8,
                                             "module_type": "transformer", "norm_first": False}, "bin_num": 10}},
        ),
        PublishedSpec(
            "uce", "uce",
            "33l_8ep_1024t_1280: 33L x 1280, 20 heads, FFN 5120, ESM2 tokens 5120-d, 1024 sampled genes + "
            "chromosome tokens (~1,070 tokens), decoder 1024/1280 on CLS",
            0, "symbol",
            {"token_dim": 5120, "d_model": 1280, "n_heads": 20, "d_hid": 5120, "n_layers": 33, "decoder_hidden": 1024,
             "output_dim": 1280},
            "softmax", 33, 1280,
            ReferenceSettings(25, "fp32", False, "evaluate.py: batch_size=25, fp32 (no mixed precision), rows in order"),
            opt_batch=256, write_kwargs={"variant": "33layer"}, params={"variant": "33layer"}, per_cell_prefixes=("decoder.",),
            smoke={"attn_layers": 2, "attn_width": 40, "params": {"variant": "33layer", "sample_size": 64},
                   "overrides": {"token_dim": 16, "d_model": 40, "n_heads": 20, "d_hid": 48, "n_layers": 2,
                                 "decoder_hidden": 24, "output_dim": 24}},
        ),
        PublishedSpec(
            "llm", "llm",
            "LLaMA-3-8B shape: 32L x 4096, 32 heads / 8 KV heads, SwiGLU 14336, vocab 128,256, bf16 weights (built "
            "on the GPU); top-100 gene sentence, BPE ~2.8 tokens/gene; mean pool",
            0, "symbol", LLAMA3_8B,
            "causal", 32, 4096,
            ReferenceSettings(8, "bf16", False, "no reference extractor: the adapter's batch 8, bf16 weights, rows in order"),
            opt_batch=256, params={"top_k": 100},
            smoke={"attn_layers": 2, "attn_width": 32,
                   "overrides": {**LLAMA3_8B, "vocab_size": 4096, "hidden_size": 32, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}},
        ),
    )
}
PUBLISHED_RUN_ORDER = ("geneformer", "scgpt", "llm", "scfoundation", "uce")
"""Run order: the big checkpoints (scFoundation, UCE 33L) are written in the background meanwhile."""
MFU_GOAL = 0.40
SPEEDUP_GOAL = 5.0


def synthetic_genes(n: int, seed: int) -> list[str]:
    """``n`` distinct gene symbols of the shipped table that have an Ensembl id (seeded), in table order."""
    from scdm.store.genes import gene_table

    table = gene_table()
    table = table[table["ensembl"] != ""].drop_duplicates("symbol").drop_duplicates("ensembl")
    pick = np.sort(np.random.default_rng(seed).choice(len(table), size=min(n, len(table)), replace=False))
    return table["symbol"].iloc[pick].tolist()


def synthetic_counts(n_cells: int, n_genes: int, seed: int, expressed: tuple[int, int] = (1000, 4000)) -> Any:
    """Raw UMI-like counts, CSR float32 (n_cells, n_genes).

    Each cell expresses a log-uniform number of genes in ``expressed``, drawn without replacement
    by a Zipf-like gene popularity (a few genes in nearly every cell, a long tail); counts are
    1 + Poisson with a mean that grows with the gene's popularity (ties at 1-3 counts, as in
    real data).
    """
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    log_p = -1.1 * np.log(rng.permutation(n_genes) + 20.0)
    log_p -= np.logaddexp.reduce(log_p)
    lo, hi = min(expressed[0], n_genes), min(expressed[1], n_genes)
    n_expr = np.exp(rng.uniform(np.log(lo), np.log(hi), n_cells)).astype(np.int64).clip(1, n_genes)
    indptr, indices, data = [0], [], []
    for k in n_expr:
        keys = log_p + rng.gumbel(size=n_genes)  # Gumbel top-k = sampling without replacement by weight
        genes = np.sort(np.argpartition(-keys, k - 1)[:k])
        mean = 2.0 * np.exp(log_p[genes] - log_p[genes].mean())
        indices.append(genes)
        data.append(1.0 + rng.poisson(np.minimum(mean, 1000.0)))
        indptr.append(indptr[-1] + k)
    return sp.csr_matrix((np.concatenate(data).astype(np.float32), np.concatenate(indices), np.asarray(indptr)),
                         shape=(n_cells, n_genes))


def _write_bpe_tokenizer(folder: Path) -> None:
    """Replace the llm folder's word-level tokenizer by a BPE one trained on gene symbols."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from scdm.embedding.models.llm import BOS, EOS, UNK
    from scdm.store.genes import gene_table

    table = gene_table()
    symbols = sorted(set(table.loc[table["ensembl"] != "", "symbol"]))
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=LLM_BPE_VOCAB, special_tokens=[BOS, EOS, UNK], show_progress=False)
    tokenizer.train_from_iterator(symbols, trainer)
    bos = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos)])
    tokenizer.save(str(folder / "tokenizer.json"))


def _task_write_published(job: dict[str, Any]) -> dict[str, Any]:
    """Write the checkpoints one after the other; each folder gets ``.complete`` or ``.failed``."""
    import importlib
    import traceback

    import torch

    torch.set_num_threads(max(1, int(job.get("threads") or 1)))
    symbols = job["genes"]
    for entry in job["checkpoints"]:
        folder = Path(entry["folder"])
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"scdm.embedding.models.{entry['adapter']}")
            if entry["adapter"] == "llm":  # tokenizer + tiny weights: the 8B model is built on the device
                module.write_tiny_checkpoint(folder, genes=symbols, seed=0)
                _write_bpe_tokenizer(folder)
            else:
                genes = symbols if entry["vocab"] == 0 else vocabulary(symbols, entry["vocab"], entry["gene_kind"])
                module.write_tiny_checkpoint(folder, genes=genes, seed=0, **entry["write_kwargs"], **entry["overrides"])
        except Exception:
            (folder / ".failed").write_text(traceback.format_exc())
            continue
        (folder / ".complete").write_text(json.dumps({"write_s": time.perf_counter() - t0}))
    return {}


def _wait_for_checkpoint(folder: Path, writer: subprocess.Popen, log: Path, deadline: float) -> float:
    """Seconds the writer took for ``folder``, once it is complete; raises if it failed or time ran out."""
    while True:
        done = folder / ".complete"
        if done.exists():
            return float(json.loads(done.read_text())["write_s"])
        failed = folder / ".failed"
        if failed.exists():
            raise RuntimeError("writing the checkpoint failed: " + failed.read_text().strip().splitlines()[-1])
        if writer.poll() is not None and not done.exists():
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:]) if log.exists() else ""
            raise RuntimeError(f"the checkpoint writer exited ({writer.returncode}) before {folder.name}: {tail}")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"checkpoint {folder.name} not written within the time budget")
        time.sleep(0.1)


def _build_llm(adapter: Any, config: dict[str, Any], device: str) -> None:
    """What ``LLMAdapter.load`` yields (sdpa, bf16 on CUDA), built from the config on the device.

    An 8B checkpoint cannot be written and read back within the lease, so the weights are
    initialised where they live; the tokenizer comes from the folder as in ``load``.
    """
    import torch
    from transformers import AutoModel, LlamaConfig

    from scdm.embedding.models._common import dtype_argument

    adapter._load_tokenizer()
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # LLMAdapter.load's choice
    with dev:  # allocate and initialise on the device: an fp32 init on the CPU would take minutes
        model = AutoModel.from_config(LlamaConfig(**config), attn_implementation="sdpa", **dtype_argument(dtype))
    adapter.config_ = dict(config)  # emb_dim reads hidden_size from here (the folder holds a tiny config)
    adapter.device = dev
    adapter.model = model.eval()


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _matmul_tflops(device: str) -> float | None:
    """bf16 8192^3 matmul rate on this GPU (random data, CUDA events, median of 10)."""
    import torch

    if not device.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / float(np.median(times)) / 1e12


def kernel_kind(name: str) -> str:
    """``attention``, ``gemm``, ``copy`` or ``other``, from a CUDA kernel's name."""
    name = name.lower()
    if any(k in name for k in ("flash", "fmha", "attention", "attn", "sdpa", "efficient")):
        return "attention"
    if any(k in name for k in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul", "sm90_")):
        return "gemm"
    if name.startswith(("memcpy", "memset")):
        return "copy"
    return "other"


def _kernel_shares(run: Any) -> dict[str, Any]:
    """Share of GPU kernel time in GEMMs, attention and everything else, for one call of ``run``."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    totals = {"gemm": 0.0, "attention": 0.0, "copy": 0.0, "other": 0.0}
    kernels = []
    for evt in prof.key_averages():
        if getattr(evt, "device_type", None) != DeviceType.CUDA:
            continue
        t = float(getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0) or 0)
        totals[kernel_kind(evt.key)] += t
        kernels.append((t, evt.key))
    total = sum(totals.values()) or 1.0
    kernels.sort(reverse=True)
    return {**{k: v / total for k, v in totals.items()}, "kernel_ms": total / 1e3,
            "top": [f"{t / total:.0%} {k[:70]}" for t, k in kernels[:3]]}


BATCHES_PER_CALL = 8
"""Batches per ``embed_cells`` call in the ``scdm`` rows. The runner passes a whole chunk (16-32
batches at the published sizes) and ``embed_cells`` reads each batch back only after launching the
next, so the device waits on the host once per call; 8 keeps a row's calls short against its
seconds and counts that wait a little more often than the runner does."""


def _measure_setting(adapter: Any, cells: list[dict[str, np.ndarray]], lengths: np.ndarray, flops: np.ndarray, *, batch: int,
                     sort: bool, precision: str, seconds: float, chunk_rows: int, device: str, rng: np.random.Generator,
                     per_call: int = 1) -> dict[str, Any]:
    """Throughput of one setting: warm-up, probe, then random-order batches until ``seconds`` are up.

    The batches are sized from the probe's time; when they run out before ``seconds`` (a probe slowed
    by first-call work, e.g. kernel plans for a new sequence length) they run again in the same order,
    so every row measures about ``seconds`` of steady work. Up to ``per_call`` batches go to each
    ``embed_cells`` call (fewer when that many would take over a third of ``seconds``): 1 reads
    every batch back before the next starts, as the reference extractors' loops do; the runner's
    rows pass :data:`BATCHES_PER_CALL`.
    """
    import torch

    from scdm.embedding.runner import batches_by_length, embed_cells

    state: dict[str, Any] = {"batch_size": batch}

    def run(ids: np.ndarray) -> None:
        embed_cells(adapter, [cells[i] for i in ids], [np.arange(len(ids))], device, precision, state)

    def run_batches(group: list[np.ndarray]) -> None:
        bounds = np.cumsum([0] + [len(b) for b in group])
        embed_cells(adapter, [cells[i] for i in np.concatenate(group)], [np.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])],
                    device, precision, state)

    _sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()  # the warm-up batch (the longest cells) sets the peak
    t_warm = time.perf_counter()
    run(np.argsort(-lengths, kind="stable")[:batch])  # the longest cells: allocator high-water mark, OOM early
    batch = int(state["batch_size"])
    probe = rng.integers(0, len(cells), size=batch)
    t0 = time.perf_counter()
    run(probe)
    probe_s = time.perf_counter() - t0
    warm_s = time.perf_counter() - t_warm
    n = int(np.clip(batch / max(probe_s, 1e-6) * seconds * 1.3, 2 * batch, 500_000))
    picks = rng.integers(0, len(cells), size=n)  # the measured "dataset": pool cells resampled, in row order
    batches: list[np.ndarray] = []
    for lo in range(0, n, chunk_rows):  # as the runner: sorted within each store chunk
        batches += [picks[lo + b] for b in batches_by_length(lengths[picks[lo:lo + chunk_rows]].tolist(), batch, sort=sort)]
    order = rng.permutation(len(batches))
    # a call of several batches stays within a third of the row's seconds (the 8B model's take seconds each)
    per_call = max(1, min(per_call, len(batches), int(seconds / (3 * max(probe_s, 1e-6)))))
    _sync(device)
    done: list[np.ndarray] = []
    t0 = time.perf_counter()
    while not done or time.perf_counter() - t0 < seconds:
        group = [batches[order[(len(done) + j) % len(order)]] for j in range(per_call)]
        run_batches(group)
        done.extend(group)
    wall = time.perf_counter() - t0
    ids = np.concatenate(done)
    padded = sum(len(b) * int(lengths[b].max()) for b in done)
    real = int(lengths[ids].sum())
    return {
        "batch": batch, "final_batch": int(state["batch_size"]), "oom_backoffs": int(state.get("oom_backoffs", 0)),
        "cells": int(len(ids)), "batches": f"{len(done)}/{len(batches)}", "batches_per_call": per_call, "wall_s": wall, "warmup_s": warm_s,
        "cells_per_s": len(ids) / wall, "tokens_per_s": real / wall, "padding": 1 - real / padded if padded else 0.0,
        "tok_median": float(np.median(lengths[ids])), "tok_max": int(lengths[ids].max()),
        "tflops": float(flops[ids].sum()) / wall / 1e12,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        "first_batch": done[0], "other_batch": _other_padding(done, lengths),
    }


def _is_padded(ids: np.ndarray, lengths: np.ndarray) -> bool:
    return bool(lengths[ids].min() < lengths[ids].max())


def _other_padding(done: list[np.ndarray], lengths: np.ndarray) -> np.ndarray | None:
    """The first measured batch padded when ``done[0]`` is not, or not padded when it is (None: there is none)."""
    first = _is_padded(done[0], lengths)
    return next((b for b in done[1:] if _is_padded(b, lengths) != first), None)


def _profile_batch(adapter: Any, batch_cells: list[dict[str, np.ndarray]], device: str, repeats: int = 3) -> dict[str, Any]:
    """Kernel time shares of one bf16 batch as the runner embeds it, its wall time and whether it is padded.

    Kernel time well below the wall time means the GPU waited (on the host, or on a sync); errors are
    reported, not raised.
    """
    from scdm.embedding.runner import embed_cells

    def run() -> None:
        embed_cells(adapter, batch_cells, [np.arange(len(batch_cells))], device, "bf16", {"batch_size": len(batch_cells)})

    try:
        out = _kernel_shares(run)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            run()  # embed_cells copies the vectors to the host: each call ends synchronised
        out["wall_ms"] = (time.perf_counter() - t0) / repeats * 1e3
        lengths = [adapter.token_length(c) for c in batch_cells]
        out["padded"] = min(lengths) < max(lengths)
        return out
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"[:160]}


def _weights_label(model: Any) -> str:
    """The dtype most parameters have, and the others (``bfloat16 (+float32 norms)``)."""
    counts: dict[str, int] = {}
    for p in model.parameters():
        name = str(p.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + int(p.numel())
    main = max(counts, key=lambda k: counts[k])
    others = sorted(k for k in counts if k != main)
    return main + (f" (+{'/'.join(others)} norms)" if others else "")


def _default_path_adapter(spec: PublishedSpec, folder: Path, loaded: Any, genes: list[str], device: str) -> tuple[Any, dict[str, Any], float | None]:
    """The adapter as ``scdm embed`` loads it on ``device`` at bf16: ``configure_precision`` before ``load``.

    Returns the adapter, the parameters the choice adds to the embedding's identity and the load
    time; when the choice changes nothing (CPU, or an adapter without half-precision weights) the
    already ``loaded`` one (load time None), else ``loaded``'s model is freed first.
    """
    from scdm.embedding import get_adapter

    adapter = get_adapter(spec.adapter)(checkpoint=folder, **spec.params)
    extra = adapter.configure_precision(device, "bf16")
    if not extra:
        return loaded, extra, None
    loaded.model = None
    _free(device)
    t0 = time.perf_counter()
    adapter.load(device)
    _sync(device)
    load_s = time.perf_counter() - t0
    adapter.prepare(genes, gene_id_kind="symbol")
    return adapter, extra, load_s


def _shape_variants(lengths: np.ndarray, batch: int) -> list[np.ndarray]:
    """Batches of each kind a compiled model traces apart: with padding (cells of mixed lengths),
    without (one length: the adapters pass no mask, and attention takes a faster path) and of one
    cell (torch.compile specialises sizes of 1 even with dynamic shapes)."""
    rng = np.random.default_rng(0)
    mixed = np.sort(rng.choice(len(lengths), size=min(batch, len(lengths)), replace=False))
    one_length = np.full(batch, int(np.argmax(lengths)))  # one cell repeated: the measured batches resample cells too
    return [mixed, one_length, mixed[:1]]


def _measure_compiled(adapter: Any, cells: list[dict[str, np.ndarray]], lengths: np.ndarray, batch: int, device: str, start_by: float,
                      facts: dict[str, Any], measure: Callable[..., None]) -> None:
    """The ``scdm+compile`` row: the ``scdm`` setting after ``scdm embed --compile``'s compile_model.

    Its first batches compile (timed into ``facts["compile_s"]``), one of each kind the measured
    batches hold (:func:`_shape_variants`), since each is a graph of its own and compiling one
    inside the measured seconds would swamp them. The batch of the longest cells, embedded before
    and after, says how far the compiled kernels' numbers are from the eager ones.
    """
    from scdm.embedding.chunks import compile_model, embed_cells

    if time.perf_counter() > start_by:
        facts["compile_error"] = "skipped: time budget spent"
        return
    longest = [cells[i] for i in np.argsort(-lengths, kind="stable")[:batch]]
    whole = [np.arange(len(longest))]
    eager = embed_cells(adapter, longest, whole, device, "bf16", {"batch_size": batch})
    try:
        compile_model(adapter)
        t0 = time.perf_counter()
        compiled = embed_cells(adapter, longest, whole, device, "bf16", {"batch_size": batch})
        for ids in _shape_variants(lengths, batch):
            embed_cells(adapter, [cells[i] for i in ids], [np.arange(len(ids))], device, "bf16", {"batch_size": batch})
        _sync(device)
        facts["compile_s"] = time.perf_counter() - t0
    except Exception as err:  # the eager rows still report
        logger.exception("torch.compile failed")
        facts["compile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        return
    facts["compile_agreement"] = _agreement(compiled, eager)
    measure(adapter, "scdm+compile", batch, True, "bf16", "the scdm setting through torch.compile (scdm embed --compile)")


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


COMPILE_ALLOWANCE_S = 120.0
"""Seconds kept free for torch.compile's first batches before an ``scdm+compile`` row starts."""


def _agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """How close two embeddings of the same cells are: the lowest cosine similarity and the largest relative difference."""
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    rel = np.abs(a - b).max(1) / np.maximum(np.abs(b).max(1), 1e-30)
    return {"min_cosine": float(cos.min()), "max_rel_diff": float(rel.max())}


def bench_published_model(spec: PublishedSpec, folder: Path, write_s: float, counts: Any, genes: list[str], *, device: str,
                          peak: float | None, seconds: float, deadline: float, profile: bool, seed: int,
                          compile_row: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of one model (``ref``, ``scdm``, ``scdm+batch``, with ``compile_row`` ``scdm+compile``), and the facts
    about it (shape, params, load and tokenise times; for the compiled row its compile time and how far its
    embeddings are from the eager ones)."""
    import torch

    from scdm.embedding import get_adapter
    from scdm.embedding.runner import _auto_batch_size, model_chunk_rows

    rng = np.random.default_rng(seed)
    adapter = get_adapter(spec.adapter)(checkpoint=folder, **spec.params)
    t0 = time.perf_counter()
    if spec.adapter == "llm":
        _build_llm(adapter, spec.overrides, device)
    else:
        adapter.load(device)
    _sync(device)
    load_s = time.perf_counter() - t0
    adapter.prepare(genes, gene_id_kind="symbol")
    t0 = time.perf_counter()
    cells = adapter.tokenize(counts, np.arange(counts.shape[0]))
    tokenize_rate = len(cells) / (time.perf_counter() - t0)
    lengths = np.array([adapter.token_length(c) for c in cells], dtype=np.int64)
    model: Any = adapter.model
    w_token, w_cell = linear_weights(model, spec.per_cell_prefixes)
    flops = model_flops(spec.attention, spec.attn_layers, spec.attn_width, w_token, w_cell, lengths)
    n_params = sum(int(p.numel()) for p in model.parameters())
    n_embedding = sum(int(m.weight.numel()) for m in model.modules() if isinstance(m, torch.nn.Embedding))
    chunk_rows = model_chunk_rows(None, adapter.emb_dim, adapter.params(), False)
    cpu = not device.startswith("cuda")
    facts = {"model": spec.key, "shape": spec.shape, "params_m": n_params / 1e6, "embedding_params_m": n_embedding / 1e6,
             "matmul_weights_per_token_m": w_token / 1e6, "write_s": write_s, "load_s": load_s, "tokenize_cells_per_s": tokenize_rate,
             "pool_cells": len(cells), "pool_tok_median": float(np.median(lengths)), "pool_tok_max": int(lengths.max()),
             "chunk_rows": chunk_rows, "gflop_per_cell": float(flops.mean()) / 1e9}
    rows: list[dict[str, Any]] = []

    def measure(adapter: Any, name: str, batch: int, sort: bool, precision: str, what: str, per_call: int = BATCHES_PER_CALL) -> None:
        row: dict[str, Any] = {"model": spec.key, "setting": name, "batch": batch, "sort": sort, "what": what,
                               "precision": f"{_weights_label(adapter.model)} weights, " + ("fp32" if precision == "fp32" else f"{precision} autocast")}
        rows.append(row)
        if time.perf_counter() + seconds + 3 > deadline:
            row["error"] = "skipped: time budget spent"
            return
        if cpu and precision == "fp16":  # the smoke run on CPU: fp16 autocast is CUDA-only in the runner
            precision = "bf16"
        _free(device)  # what a failed setting left behind (its traceback is gone by now)
        try:
            res = _measure_setting(adapter, cells, lengths, flops, batch=batch, sort=sort, precision=precision, seconds=seconds,
                                   chunk_rows=chunk_rows, device=device, rng=rng, per_call=per_call)
        except Exception as err:  # one failing setting still reports the others
            logger.exception("%s %s failed", spec.key, name)
            row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            return
        row.update({k: v for k, v in res.items() if k not in ("first_batch", "other_batch")})
        row["mfu"] = row["tflops"] / peak if peak else None
        logger.info("%s %s: %.1f cells/s, %.0f tokens/s, %.1f TFLOP/s (%s cells, batches %s)", spec.key, name, row["cells_per_s"],
                    row["tokens_per_s"], row["tflops"], row["cells"], row["batches"])
        if profile and not cpu and name in ("scdm", "scdm+compile"):  # where the GPU time of one batch goes
            facts["kernels" if name == "scdm" else "kernels_compile"] = _profile_batch(adapter, [cells[i] for i in res["first_batch"]], device)
            if name == "scdm" and res["other_batch"] is not None:  # padded batches take a masked attention path
                facts["kernels_other"] = _profile_batch(adapter, [cells[i] for i in res["other_batch"]], device)

    measure(adapter, "ref", spec.ref.batch, spec.ref.sort, spec.ref.precision, spec.ref.source, per_call=1)
    model = None
    try:  # the default path: configure_precision("cuda", "bf16") before load, as the runner does
        adapter, facts["weights_param"], default_load_s = _default_path_adapter(spec, folder, adapter, genes, device)
    except Exception as err:  # the ref row still reports
        logger.exception("%s: loading the default path failed", spec.key)
        facts["error"] = f"default-path load: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        return rows, facts
    if default_load_s is not None:
        facts["load_s"], facts["load_ref_s"] = default_load_s, load_s
    auto = _auto_batch_size(adapter, device)
    measure(adapter, "scdm", auto, True, "bf16", "runner defaults on CUDA (weights as configure_precision + load give them)")
    if spec.opt_batch != auto:
        measure(adapter, "scdm+batch", spec.opt_batch, True, "bf16", "the same, larger batch")
    if compile_row:
        _measure_compiled(adapter, cells, lengths, auto, device, deadline - COMPILE_ALLOWANCE_S, facts, measure)
    fastest = max((r.get("cells_per_s") or 0.0 for r in rows), default=0.0)
    facts["feed_processes"] = fastest / tokenize_rate  # tokenising processes (runner --workers) the GPU rate needs
    ref = rows[0].get("cells_per_s")
    for row in rows[1:]:
        if ref and row.get("cells_per_s"):
            row["speedup"] = row["cells_per_s"] / ref
    adapter.model = None  # free the GPU before the next model
    _free(device)
    return rows, facts


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _shares(k: dict[str, Any]) -> str:
    if "gemm" not in k:
        return str(k.get("error", "-"))
    shares = f"{k['gemm']:.0%} / {k['attention']:.0%} / {k['copy']:.0%} / {k['other']:.0%} of {k['kernel_ms']:.0f} ms"
    if k.get("wall_ms") is not None:
        shares += f" in {k['wall_ms']:.0f} ms wall ({'padded' if k.get('padded') else 'unpadded'} batch)"
    return shares


def render_published(rows: list[dict[str, Any]], facts: list[dict[str, Any]]) -> str:
    """The results table (goal beside each measured number) and the per-model facts table."""
    head = ["model", "setting", "batch", "sorted", "precision", "cells", "tok/cell med [max]", "padding", "cells/s",
            "tokens/s", "TFLOP/s", f"MFU (goal >={MFU_GOAL:.0%})", f"x ref (goal >={SPEEDUP_GOAL:.0f}x)", "peak GPU GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        first = [r["model"], r["setting"], str(r.get("final_batch", r["batch"])), "yes" if r["sort"] else "no", r["precision"]]
        if r.get("error"):
            lines.append("| " + " | ".join(first + [f"**{r['error']}**"] + ["-"] * (len(head) - 6)) + " |")
            continue
        mfu = _pct(r.get("mfu")) if r.get("mfu") is not None else "n/a (no GPU)"
        speed = "-"
        if r["setting"] != "ref" and r.get("mfu") is not None:
            mfu += " met" if r["mfu"] >= MFU_GOAL else " missed"
        if r["setting"] != "ref":
            if r.get("speedup"):
                speed = f"{r['speedup']:.1f}x " + ("met" if r["speedup"] >= SPEEDUP_GOAL else "missed")
        gib = "-" if r.get("peak_gpu_gib") is None else f"{r['peak_gpu_gib']:.1f}"
        lines.append("| " + " | ".join(first + [f"{r['cells']:,}", f"{r['tok_median']:.0f} [{r['tok_max']}]", _pct(r["padding"]),
                                                f"{r['cells_per_s']:,.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['tflops']:.2f}", mfu,
                                                speed, gib]) + " |")
    fhead = ["model", "published shape", "params M (embedding M)", "matmul weights/token M", "GFLOP/cell (pool mean)",
             "ckpt write s", "load s", "tokenise cells/s, 1 process [processes to feed the fastest row]",
             "kernel time GEMM/attn/copy/other (one scdm batch, padded and not)", "top kernels"]
    flines = ["| " + " | ".join(fhead) + " |", "|" + "---|" * len(fhead)]
    for f in facts:
        if f.get("error"):
            flines.append("| " + " | ".join([f["model"], f"**{f['error']}**"] + ["-"] * (len(fhead) - 2)) + " |")
            continue
        k = f.get("kernels") or {}
        shares = _shares(k)
        if f.get("kernels_other"):
            shares += f"; {_shares(f['kernels_other'])}"
        if f.get("kernels_compile"):
            shares += f"; +compile: {_shares(f['kernels_compile'])}"
        if f.get("compile_s") is not None:
            agree = f.get("compile_agreement") or {}
            shares += (f"; compile {f['compile_s']:.0f} s, vs eager: cosine >= {agree.get('min_cosine', float('nan')):.5f}, "
                       f"max rel diff {agree.get('max_rel_diff', float('nan')):.1e}")
        elif f.get("compile_error"):
            shares += f"; compile: {f['compile_error']}"
        load = f"{f['load_s']:.1f}" + (f" (fp32 weights: {f['load_ref_s']:.1f})" if f.get("load_ref_s") is not None else "")
        flines.append("| " + " | ".join([f["model"], f["shape"], f"{f['params_m']:,.1f} ({f['embedding_params_m']:,.1f})",
                                         f"{f['matmul_weights_per_token_m']:,.1f}", f"{f['gflop_per_cell']:,.1f}", f"{f['write_s']:.1f}",
                                         load, f"{f['tokenize_cells_per_s']:,.0f} [{f.get('feed_processes', 0):.1f}]", shares,
                                         "; ".join(k.get("top", [])) or "-"]) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(flines)


def _env_header(device: str, peak: float | None, measured: float | None) -> list[str]:
    import importlib.metadata as md

    import torch

    versions = []
    for pkg in ("torch", "transformers", "numpy", "scipy", "duckdb"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            versions.append(f"{pkg} missing")
    gpu = "no GPU (CPU smoke run)"
    if device.startswith("cuda"):
        prop = torch.cuda.get_device_properties(0)
        gpu = f"{prop.name} (cc {prop.major}.{prop.minor}, {prop.total_memory / 2**30:.0f} GiB, {prop.multi_processor_count} SMs), CUDA {torch.version.cuda}"
    try:
        load = "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "load average n/a"
    lines = [f"# GPU: {gpu}", f"# {platform.python_implementation()} {platform.python_version()}, " + ", ".join(versions)
             + f"; {os.cpu_count()} CPUs, {load}"]
    if peak:
        lines.append(f"# MFU = model FLOPs / {peak:.1f} TFLOP/s (dense bf16 peak of the data sheet; for every row, fp32 ones too)"
                     + (f"; bf16 8192^3 matmul measured here: {measured:.0f} TFLOP/s" if measured else ""))
    lines.append("# model FLOPs per cell: 2 x (matmul weights applied per token) x T + 4 x layers x T^2 x width (causal: half) "
                 "+ 2 x per-cell head weights; T = the cell's real tokens, so padding is lost utilisation")
    return lines


def run_published(args: argparse.Namespace) -> None:
    """``--published``: the GPU benchmark of issue #19 point 7 (``--smoke``: tiny, on the CPU)."""
    t_start = time.perf_counter()
    smoke = bool(args.smoke)
    wanted = [m.strip() for m in (args.models or ",".join(PUBLISHED)).split(",") if m.strip()]
    unknown = [m for m in wanted if m not in PUBLISHED]
    if unknown:
        raise SystemExit(f"Unknown model(s) {unknown} for --published; choose from {', '.join(PUBLISHED)}.")
    order = [m for m in PUBLISHED_RUN_ORDER if m in wanted]
    compiled = set(order) if args.compile == "all" else {m.strip() for m in (args.compile or "").split(",") if m.strip()}
    if compiled - set(order):
        raise SystemExit(f"--compile names model(s) {sorted(compiled - set(order))} that this run does not include ({', '.join(order)}).")
    specs = {m: PUBLISHED[m].sized(smoke) for m in order}
    seconds = args.seconds if args.seconds is not None else (0.3 if smoke else 8.0)
    pool = args.pool or (16 if smoke else 1024)
    budget = args.budget_s if args.budget_s is not None else (300.0 if smoke else 330.0)
    deadline = t_start + budget
    device = "cpu" if smoke else "cuda"
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)

    keep = args.workdir is not None
    work = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="scdm-bench-published-"))
    work.mkdir(parents=True, exist_ok=True)
    genes = synthetic_genes(600 if smoke else 20_000, args.seed)
    folders = {m: work / "published" / f"{m}-{'smoke' if smoke else 'full'}-{hashlib.blake2b(json.dumps(asdict(s), sort_keys=True, default=str).encode(), digest_size=6).hexdigest()}"
               for m, s in specs.items()}
    job = {"task": "write_published", "threads": max(1, min(4, (os.cpu_count() or 2) // 4)), "genes": genes,
           "checkpoints": [{"adapter": s.adapter, "folder": str(folders[m]), "vocab": s.vocab, "gene_kind": s.gene_kind,
                            "overrides": s.overrides, "write_kwargs": s.write_kwargs} for m, s in specs.items()]}
    job_file, writer_log = work / "job-write-published.json", work / "writer.log"
    _write_json(job_file, job)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    with open(writer_log, "w") as log_fh:  # checkpoints are written in the background while earlier models run
        writer = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_file), str(work / "out-write.json")],
                                  env=env, cwd=ROOT, stdout=log_fh, stderr=subprocess.STDOUT)
    rows: list[dict[str, Any]] = []
    facts: list[dict[str, Any]] = []
    header: list[str] = []
    try:
        import torch

        if not smoke and not torch.cuda.is_available():
            raise SystemExit(f"--published needs a CUDA device (torch {torch.__version__} sees none); use --smoke for the CPU check.")
        name = torch.cuda.get_device_name(0) if not smoke else "cpu"
        peak = peak_bf16_tflops(name, args.peak_tflops) if not smoke else None
        measured = _matmul_tflops(device)
        header = _env_header(device, peak, measured)
        counts = synthetic_counts(pool, len(genes), args.seed, (50, 200) if smoke else (1000, 4000))
        header.append(f"# cells: pool of {pool} synthetic cells over {len(genes):,} genes, {int(np.median(np.diff(counts.indptr)))} "
                      f"expressed genes median [{np.diff(counts.indptr).min()}-{np.diff(counts.indptr).max()}], tokenised once per "
                      f"model and resampled; {seconds:g} s per row after warm-up, batches in random order")
        for m in order:
            spec = specs[m]
            need = 3 * (seconds + 4) + 10
            if time.perf_counter() + need > deadline:
                facts.append({"model": m, "error": f"skipped: {deadline - time.perf_counter():.0f} s of the budget left, ~{need:.0f} s needed"})
                logger.warning("skipping %s: time budget", m)
                continue
            logger.info("benchmarking %s (%.0f s elapsed)", m, time.perf_counter() - t_start)
            _free(device)  # what a failed model left behind (its traceback is gone by now)
            try:
                write_s = _wait_for_checkpoint(folders[m], writer, writer_log, deadline - need)
                model_rows, model_facts = bench_published_model(spec, folders[m], write_s, counts, genes, device=device, peak=peak,
                                                                seconds=seconds, deadline=deadline, profile=not args.no_profile,
                                                                seed=args.seed, compile_row=m in compiled)
            except Exception as err:  # one failing model still reports the others
                logger.exception("%s failed", m)
                facts.append({"model": m, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"})
                continue
            rows.extend(model_rows)
            facts.append(model_facts)
            _write_published(out_dir, header, rows, facts, args, t_start, final=False)
            print(render_published(model_rows, []).split("\n\n")[0], flush=True)  # partial results in the log
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(_write_published(out_dir, header, rows, facts, args, t_start, final=True))


def _write_published(out_dir: Path | None, header: list[str], rows: list[dict[str, Any]], facts: list[dict[str, Any]],
                     args: argparse.Namespace, t_start: float, *, final: bool) -> str:
    canon = {m: i for i, m in enumerate(PUBLISHED)}
    rows = sorted(rows, key=lambda r: canon.get(r["model"], 99))
    facts = sorted(facts, key=lambda f: canon.get(f["model"], 99))
    cmd = "python benchmarks/bench_embed.py " + " ".join(sys.argv[1:])
    text = "\n".join([f"# bench_embed --published ({'final' if final else 'partial'}): {cmd}", *header,
                      f"# total wall {time.perf_counter() - t_start:.0f} s", "", render_published(rows, facts), ""])
    if out_dir:
        (out_dir / "bench_embed_gpu.md").write_text(text)
        _write_json(out_dir / "bench_embed_gpu.json", {"header": header, "rows": rows, "models": facts, "final": final,
                                                       "wall_s": time.perf_counter() - t_start, "argv": sys.argv[1:]})
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None,
                    help="comma-separated adapters and/or baselines (default: all nine adapters + pca,hvg; with "
                         f"--published: {','.join(PUBLISHED)})")
    ap.add_argument("--cells", type=int, default=None,
                    help="cells per model (default: per-model sizes chosen so everything takes ~10 min on 2 CPU cores; "
                         "baselines: all 300). Above 300 the file's cells repeat (for GPU runs)")
    ap.add_argument("--batch-size", type=int, default=None, help="cells per forward pass (default: each adapter's default)")
    ap.add_argument("--gpu-batch-size", type=int, default=None,
                    help="batch size of the CUDA rows (default: per model, 8 (scBERT) to 1024 (CellPLM))")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CPU rows, plus cuda/bf16 rows when CUDA is available; cpu or cuda: only those rows")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader tokenisation workers of the runner (0 = inline; default: the runner's, 2 on CUDA and 0 on the CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each worker (default: torch's)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU dense bf16 peak for MFU (default: from the device name)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cell selection")
    ap.add_argument("--workdir", default=None, help="keep checkpoints here between runs (default: a temporary folder, removed)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    pub = ap.add_argument_group("published sizes on a GPU (issue #19 point 7; see benchmarks/README.md)")
    pub.add_argument("--published", action="store_true",
                     help="random-initialised models at their published sizes on CUDA, synthetic cells, in-process: "
                          "reference settings vs scdm vs scdm with bf16 weights; cells/s, tokens/s, MFU")
    pub.add_argument("--smoke", action="store_true", help="--published with tiny models on the CPU (checks the whole path in <1 min)")
    pub.add_argument("--seconds", type=float, default=None, help="measured seconds per row after warm-up (default 8; smoke 0.3)")
    pub.add_argument("--pool", type=int, default=None, help="synthetic cells tokenised per model, then resampled (default 1024; smoke 16)")
    pub.add_argument("--budget-s", type=float, default=None,
                     help="wall-clock budget of the whole run; models that no longer fit are skipped (default 330; smoke 300)")
    pub.add_argument("--out", default=None, help="also write bench_embed_gpu.md and bench_embed_gpu.json here (after every model)")
    pub.add_argument("--no-profile", action="store_true", help="skip the one-batch kernel profile per model")
    pub.add_argument("--compile", default=None, metavar="MODELS",
                     help="comma-separated models (or 'all') that also get an scdm+compile row: the scdm setting after torch.compile "
                          "(scdm embed --compile); the facts table gives its compile time and its distance from the eager embeddings")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(*args.worker)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.published or args.smoke:
        run_published(args)
        return
    from scdm.embedding import available_models

    wanted = [m.strip() for m in (args.models or ",".join([*SPECS, *BASELINES])).split(",") if m.strip()]
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

    from scdm.store import Store

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
