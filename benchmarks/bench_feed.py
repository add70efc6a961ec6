"""Feeding the device: tokenisation overlapped with the forward pass by the runner's workers (issue 19, point 7).

On a GPU the forward pass uses the device, not the CPU, so the runner can tokenise the next chunks
in worker processes (``--workers``; 2 by default on CUDA) while the model runs. Whether that keeps
the device busy depends on the CPU side alone: tokenising, collating, the store's reads and writes.
This benchmark measures that CPU side on any machine. It runs ``scdm.embedding.runner.embed`` end to
end (real store, real scGPT tokeniser on synthetic counts, real collate and chunk writes) with the
model's forward pass replaced by a device stand-in that uses no CPU, as a GPU kernel does, and is
busy ``1 / --device-cells-per-s`` per cell. The default rate, 2,676 cells/s, is scGPT's measured
forward pass on an H200 (``benchmarks/results/bench_embed_gpu_h200_2026-12-04_after.md``), the
fastest published-size model there relative to its tokeniser.

The stand-in keeps a CUDA stream's timing (``--device``): ``async`` (default) queues each batch
behind the ones before it and returns at once, and copying a batch's vectors back to the host
waits until the device has finished it, as on a GPU; ``sync`` makes the forward pass itself wait
until its batch is done, which is the schedule the runner had before ``embed_cells`` ran one batch
deep (each batch read back before the next was collated).

Prints ONE table, a row per ``--device`` mode and ``--workers`` value: wall time, cells/s end to
end, the share of the wall time the stand-in device was busy, and cells/s against inline
tokenisation (``workers`` 0) in the same mode. Goal (ours): the device busy >= 90 % with the CUDA
default of 2 workers and the async device.
The first chunk cannot overlap with anything, so fewer, larger chunks lower the ceiling; the
default 16 chunks of 1,024 cells leave at most ~1/16 to it.

Usage: python benchmarks/bench_feed.py [--cells 16384] [--chunk-rows 1024] [--device-cells-per-s 2676] [--workers 0,1,2]
       [--device async,sync]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # `import scdm` without installing it
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_embed import synthetic_counts, synthetic_genes  # noqa: E402

BUSY_GOAL = 0.90
CUDA_DEFAULT_WORKERS = 2  # runner.TOKENISE_WORKERS_CUDA, checked in main()


class StandinDevice:
    """A GPU's timing without a GPU: batches run one after another, each ``n / cells_per_s`` seconds.

    ``launch`` queues a batch behind the ones before it (``asynchronous``: returns at once, as a
    kernel launch does; otherwise waits until the batch is done); ``wait_oldest`` is the copy of the
    oldest unread batch back to the host, which waits until the device has finished it.
    """

    def __init__(self, cells_per_s: float, *, asynchronous: bool) -> None:
        self.cells_per_s = cells_per_s
        self.asynchronous = asynchronous
        self.busy_s = 0.0
        self._free_at = 0.0
        self._done_at: deque[float] = deque()

    def launch(self, n_cells: int) -> None:
        seconds = n_cells / self.cells_per_s
        self._free_at = max(time.perf_counter(), self._free_at) + seconds
        self._done_at.append(self._free_at)
        self.busy_s += seconds
        if not self.asynchronous:
            _sleep_until(self._free_at)

    def wait_oldest(self) -> None:
        _sleep_until(self._done_at.popleft())


def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


_REAL_TO_HOST: Any = None
"""``chunks._to_host`` as the runner has it, before :func:`use_standin` wraps it."""


def use_standin(device: StandinDevice) -> None:
    """Route scGPT's forward pass and ``embed_cells``' copies back to the host through ``device``."""
    import torch

    from scdm.embedding import chunks
    from scdm.embedding.models import scgpt

    def embed(self: Any, batch: dict[str, Any]) -> torch.Tensor:
        n = int(batch["input_ids"].shape[0])
        device.launch(n)
        return torch.full((n, self.emb_dim), self.emb_dim ** -0.5)

    global _REAL_TO_HOST
    if _REAL_TO_HOST is None:
        _REAL_TO_HOST = chunks._to_host
    real = _REAL_TO_HOST

    def to_host(out: np.ndarray, idx: np.ndarray, vecs: Any) -> None:
        device.wait_oldest()
        real(out, idx, vecs)

    scgpt.ScGPTAdapter.embed = embed  # type: ignore[method-assign]
    chunks._to_host = to_host


def tokenise_rate(st: Any, dataset: str, ckpt: Path, n: int) -> float:
    """Cells/s of the scGPT tokeniser in this process, on the first ``n`` cells."""
    from scdm.embedding import get_adapter

    adapter = get_adapter("scgpt")(checkpoint=ckpt)
    adapter.prepare(st.genes(dataset)["gene_id"].astype(str).tolist(), gene_id_kind="symbol")
    x = st.open_anndata(dataset, backed=True).X[:n]
    import scipy.sparse as sp

    x = sp.csr_matrix(x)
    t0 = time.perf_counter()
    adapter.tokenize(x, np.arange(n))
    return n / (time.perf_counter() - t0)


def ingest_counts(st: Any, name: str, genes: list[str], n_cells: int, seed: int) -> str:
    """A dataset of ``n_cells`` synthetic count profiles over ``genes``; its id."""
    import anndata as ad

    counts = synthetic_counts(n_cells, len(genes), seed=seed)
    obs = pd.DataFrame(index=[f"{name}-{i}" for i in range(n_cells)])
    return str(st.ingest(ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes)), name=name).dataset_id)


def warm_up(st: Any, ckpt: Path, genes: list[str], batch_size: int) -> None:
    """One small run first, so the first measured row does not pay for the first model load and imports (~2 s)."""
    from scdm.embedding import runner

    ingest_counts(st, "warmup", genes, 2 * batch_size, seed=2)
    use_standin(StandinDevice(1e9, asynchronous=True))
    result = runner.embed(st, "warmup", "scgpt", ckpt, workers=0, device="cpu", precision="fp32", batch_size=batch_size, progress=False)
    st.remove_embedding(result.embedding_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=16_384)
    ap.add_argument("--chunk-rows", type=int, default=1024, help="cells per stored chunk (the runner's default on real data: 4,096 for scGPT)")
    ap.add_argument("--device-cells-per-s", type=float, default=2676.0, help="the stand-in device's rate (default: scGPT, H200)")
    ap.add_argument("--workers", default="0,1,2", help="comma-separated --workers values, one row each")
    ap.add_argument("--device", default="async,sync",
                    help="stand-in device modes: async (a GPU stream: the runner's vectors are read back after the next batch is "
                         "launched) and/or sync (each forward waits for its batch: the runner's schedule before a5c48ad)")
    ap.add_argument("--batch-size", type=int, default=256, help="cells per forward pass (the runner's CUDA default for scGPT)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "scdm-bench-feed"))
    args = ap.parse_args()

    from scdm.embedding import runner
    from scdm.embedding.models import scgpt
    from scdm.store import Store

    assert runner.TOKENISE_WORKERS_CUDA == CUDA_DEFAULT_WORKERS, "update CUDA_DEFAULT_WORKERS"
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    genes = synthetic_genes(20_000, seed=0)
    ckpt = scgpt.write_tiny_checkpoint(work / "scgpt", genes=genes)
    st = Store(work / "store")
    dataset_id = ingest_counts(st, "feed", genes, args.cells, seed=1)
    one_process = tokenise_rate(st, dataset_id, ckpt, min(2048, args.cells))
    warm_up(st, ckpt, genes, args.batch_size)

    rows = []
    for mode in args.device.split(","):
        if mode not in ("async", "sync"):
            raise SystemExit(f"--device takes async and/or sync, not {mode!r}")
        inline = None
        for workers in (int(w) for w in args.workers.split(",")):
            device = StandinDevice(args.device_cells_per_s, asynchronous=mode == "async")
            use_standin(device)
            t0 = time.perf_counter()
            result = runner.embed(st, "feed", "scgpt", ckpt, workers=workers, device="cpu", precision="fp32",
                                  batch_size=args.batch_size, chunk_rows=args.chunk_rows, progress=False)
            wall = time.perf_counter() - t0  # the whole call: model load, claims, every chunk, finalize
            st.remove_embedding(result.embedding_id)
            loop = float(result.telemetry["wall_s"])  # the chunk loop: tokenise, forward, write (no model load, no finalize)
            graded = workers == CUDA_DEFAULT_WORKERS and mode == "async"
            busy = device.busy_s / wall
            inline = args.cells / wall if workers == 0 else inline
            rows.append({"device": mode, "workers": f"{workers}{' (CUDA default)' if workers == CUDA_DEFAULT_WORKERS else ''}",
                         "wall_s": wall, "loop_s": loop, "cells_per_s": args.cells / wall,
                         "x_inline": args.cells / wall / inline if inline else float("nan"),
                         "device_busy": busy, "busy_in_loop": device.busy_s / loop,
                         "goal": f">={BUSY_GOAL:.0%}" if graded else "-", "met": ("yes" if busy >= BUSY_GOAL else "NO") if graded else "-"})
    pd.set_option("display.width", 200)
    print(f"{args.cells} cells in chunks of {args.chunk_rows}, batches of {args.batch_size}; device stand-in at "
          f"{args.device_cells_per_s:,.0f} cells/s (floor {args.cells / args.device_cells_per_s:.2f} s); "
          f"scGPT tokeniser, one process: {one_process:,.0f} cells/s")
    print(pd.DataFrame(rows)[["device", "workers", "wall_s", "loop_s", "cells_per_s", "x_inline", "device_busy", "busy_in_loop", "goal", "met"]]
          .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
