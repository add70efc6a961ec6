"""Store benchmark: write and read an embedding matrix through the store vs raw NumPy and AnnData.

Prints one table. For each D: write time, full read (GB/s), random 10% of rows (sorted indices)
and a contiguous 10% block, for
  - ``npy``        np.save / np.load / np.load(mmap_mode="r")
  - ``store``      scdm store, chunked resumable write (one catalog commit per chunk), default chunks
  - ``store-bulk`` the same array written in one zarr call (no per-chunk commits) for reference
  - ``store-cN``   other chunk sizes, to justify the default
  - ``h5ad-obsm``  AnnData .h5ad with the matrix in obsm (h5py reads)
Reads are from a warm page cache (the files were just written).

Store reads are verified (issue 14): every committed chunk a read touches is checked against its
CRC-32 in the catalog. A chunk verified once in a process is trusted while its file is unchanged
(inode, size, mtime, ctime), so the table shows both costs:
  - ``full_read_s``   the first read in a process (every chunk hashed; chunks are read and hashed on several threads)
  - ``full_again_s``  a later read (chunks verified before and unchanged: one stat per chunk)
  - ``unverified_s``  the same read without any check (``store._zarr.read_rows`` without checksums)
  - ``verify_first`` / ``verify_again``  the extra time relative to ``unverified_s``
Random and contiguous 10% reads verify the chunks they touch (whole chunks, the first time).

Targets (issue 2): full read >= 0.8x np.load; random 10% <= 2x memmap; resumable chunked
write <= 1.3x one bulk write. Issue 14: verification <= 10% on a full read.

Usage: python benchmarks/bench_store.py [--n 326751] [--dims 512,3072] [--workdir /tmp/scdm-bench]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # `import scdm` without installing it

from scdm.store import (
    Store,  # noqa: E402
    _zarr,  # noqa: E402
)


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def tiny_dataset(st: Store, n: int) -> str:
    """A dataset of n cells with one gene (the benchmark only needs the row count)."""
    import anndata as ad
    import scipy.sparse as sp

    x = sp.csr_matrix((np.ones(n, dtype=np.float32), np.zeros(n, dtype=np.int32), np.arange(n + 1)), shape=(n, 1))
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=["A1BG"]))
    return st.ingest(adata, name=f"bench{n}").name


def bench_store(st: Store, name: str, data: np.ndarray, chunk_rows: int | None, label: str, rows_rand: np.ndarray, rows_cont: np.ndarray, bulk: bool = False) -> dict:
    n, d = data.shape
    params = {"label": label, "chunk_rows": chunk_rows}
    emb = st.create_embedding(name, model="bench", params=params, dim=d, chunk_rows=chunk_rows)

    def write() -> None:
        if bulk:
            arr = _zarr.open_array(emb.path)
            arr[:] = data
            st.execute("UPDATE embeddings SET status='complete' WHERE embedding_id = ?", [emb.embedding_id])
            return
        with emb.writer() as w:  # what the runner does: data flushed per chunk, rows committed each second
            for c in range(emb.n_chunks):
                lo, hi = emb.chunk_bounds(c)
                w.write(c, data[lo:hi])
        emb.finalize()

    t_write, _ = timed(write, repeat=1)

    def first(rows: np.ndarray | None = None) -> np.ndarray:
        _zarr.forget_verified()  # as in a fresh process: every chunk the read touches is hashed
        return st.read_embedding(emb.embedding_id, rows=rows)

    t_full, got = timed(first)
    assert np.array_equal(got, data)
    del got
    t_again, _ = timed(lambda: st.read_embedding(emb.embedding_id))
    t_raw, _ = timed(lambda: _zarr.read_rows(emb.location))
    t_rand_first, _ = timed(lambda: first(rows_rand))
    t_rand, _ = timed(lambda: st.read_embedding(emb.embedding_id, rows=rows_rand))
    t_cont, _ = timed(lambda: first(rows_cont))
    return {"format": label, "chunk_rows": emb.chunk_rows, "write_s": t_write, "full_read_s": t_full, "full_again_s": t_again,
            "unverified_s": t_raw, "rand10_first_s": t_rand_first, "rand10_s": t_rand, "cont10_s": t_cont}


def bench_npy(work: Path, data: np.ndarray, rows_rand: np.ndarray, rows_cont: np.ndarray) -> dict:
    path = work / "x.npy"
    t_write, _ = timed(lambda: np.save(path, data), repeat=1)
    t_full, _ = timed(lambda: np.load(path))
    mm = np.load(path, mmap_mode="r")
    t_rand, _ = timed(lambda: np.asarray(mm[rows_rand]))
    t_cont, _ = timed(lambda: np.array(mm[rows_cont[0]:rows_cont[-1] + 1]))
    return {"format": "npy (np.load / memmap)", "chunk_rows": None, "write_s": t_write, "full_read_s": t_full,
            "full_again_s": t_full, "unverified_s": t_full, "rand10_first_s": t_rand, "rand10_s": t_rand, "cont10_s": t_cont}


def bench_h5ad(work: Path, data: np.ndarray, rows_rand: np.ndarray, rows_cont: np.ndarray) -> dict:
    import anndata as ad
    import h5py

    n = data.shape[0]
    path = work / "x.h5ad"
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), obsm={"X_emb": data})
    t_write, _ = timed(lambda: adata.write_h5ad(path), repeat=1)

    def read(sel):
        with h5py.File(path, "r") as f:
            return f["obsm/X_emb"][sel]

    t_full, _ = timed(lambda: read(slice(None)))
    t_rand, _ = timed(lambda: read(rows_rand), repeat=1)
    t_cont, _ = timed(lambda: read(slice(int(rows_cont[0]), int(rows_cont[-1]) + 1)))
    return {"format": "h5ad obsm (h5py)", "chunk_rows": None, "write_s": t_write, "full_read_s": t_full,
            "full_again_s": t_full, "unverified_s": t_full, "rand10_first_s": t_rand, "rand10_s": t_rand, "cont10_s": t_cont}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=326_751, help="cells (default: the scDrugMap primary collection)")
    ap.add_argument("--dims", default="512,3072")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "scdm-bench-store"))
    ap.add_argument("--chunk-sweep", default="1024,4096,16384", help="extra chunk sizes (rows) to compare, at D=512 only")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    st = Store(work / "store")
    name = tiny_dataset(st, args.n)
    rng = np.random.default_rng(0)
    rows = []
    for d in [int(x) for x in args.dims.split(",")]:
        data = rng.standard_normal((args.n, d), dtype=np.float32)
        gb = data.nbytes / 1e9
        rows_rand = np.sort(rng.choice(args.n, args.n // 10, replace=False))
        start = args.n // 3
        rows_cont = np.arange(start, start + args.n // 10)
        results = [bench_npy(work, data, rows_rand, rows_cont)]
        results.append(bench_store(st, name, data, None, "store (default, resumable)", rows_rand, rows_cont))
        results.append(bench_store(st, name, data, None, "store-bulk (one zarr write)", rows_rand, rows_cont, bulk=True))
        if d == 512:
            for c in [int(x) for x in args.chunk_sweep.split(",") if x]:
                results.append(bench_store(st, name, data, c, f"store-c{c}", rows_rand, rows_cont))
        results.append(bench_h5ad(work, data, rows_rand, rows_cont))
        npy = results[0]
        mm_rand = npy["rand10_s"]
        for r in results:
            r.update({"D": d, "GB": round(gb, 2), "read_GB/s": gb / r["full_read_s"], "read_vs_npload": npy["full_read_s"] / r["full_read_s"],
                      "rand10_vs_memmap": r["rand10_s"] / mm_rand,
                      "verify_first": r["full_read_s"] / r["unverified_s"] - 1, "verify_again": r["full_again_s"] / r["unverified_s"] - 1})
        rows.extend(results)
        for p in work.glob("x.*"):
            p.unlink()
        for e in st.embeddings()["embedding_id"]:
            st.remove_embedding(e)
        del data
    table = pd.DataFrame(rows)[["D", "GB", "format", "chunk_rows", "write_s", "full_read_s", "full_again_s", "unverified_s",
                                "verify_first", "verify_again", "read_GB/s", "read_vs_npload", "rand10_first_s", "rand10_s",
                                "rand10_vs_memmap", "cont10_s"]]
    bulk_write = {r["D"]: r["write_s"] for r in rows if r["format"].startswith("store-bulk")}
    table["write_vs_bulk"] = [r["write_s"] / bulk_write[r["D"]] if r["format"].startswith("store") else np.nan for r in rows]
    pd.set_option("display.width", 200)
    print(f"n_cells = {args.n}; warm page cache; times are the best of 3 (writes: 1 run); verify_* = extra read time of "
          "checksum verification (first read in a process / chunks verified before); store rows only")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
