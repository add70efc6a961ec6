"""Store benchmark: write and read an embedding matrix through the store vs raw NumPy (issue 19 point 3).

Prints ONE table: operation, scdm time, baseline time, ratio, goal, met. Every round runs each
operation once, baseline and store alternating, and the table shows the median over rounds:

  - ``catalog write``        one small write transaction on the catalog (median of 9 per round) vs DuckDB alone
                               connecting to the file, running it and closing (no goal of its own)
  - ``resumable write``      ``Embedding.writer()`` chunk by chunk (what the embedding runner does:
                               atomic chunk files, CRC-32 per chunk, catalog rows committed in
                               batches, the last ones with the mark complete: ``ChunkWriter.finalize``), vs one ``np.save`` of the same matrix to a new file
  - ``chunk files only``     the same chunks through ``_zarr.RowWriter`` without the catalog (claims, commits,
                               finalize), vs a second ``np.save``: the data path alone (no goal of its own)
  - ``full read, first``     ``Store.read_embedding`` as the first read of the matrix in a process: every
                               chunk's CRC-32 is checked (``_zarr.forget_verified()`` first), vs ``np.load``;
                               the store that wrote it knows its checksums from the finalize transaction
  - ``full read, new Store`` the same read through a ``Store`` opened after the write: it also looks the
                               embedding and its checksums up in the catalog, which the write changed, so DuckDB
                               opens it again (~10 ms on any file, even ``:memory:``) (no goal of its own)
  - ``full read, again``     a later read (chunks verified before and unchanged: one stat each), vs ``np.load``
  - ``random 10%, first``    sorted random 10% of the rows, chunks verified on the way, vs ``np.load(mmap_mode="r")[rows]``
                               (no goal: a chunk's CRC-32 needs the whole chunk, so a first read of rows spread
                               over every chunk reads the whole matrix)
  - ``random 10%, again``    the same read once the chunks are verified, vs the memmap

Reads are from a warm page cache (the files were just written). On a 2-core VM (AMD EPYC, session 9)
whatever ran right after writing or deleting 638 MB was slowed by the kernel's work on those pages,
by up to 2x for a read and 10x for np.load after an ``os.sync()``; the first full read ranged from
0.8x to 2x np.load between runs of this script. Compare several runs, not one table. Goals (issue 19): write <= 1.3x
one bulk write, full read <= 1.25x np.load (with the CRC check), random 10% <= 2x memmap.

``--data-path`` prints a second, quieter table instead: the chunk files alone (``_zarr.RowWriter``, one
thread, CRC-32 included) with their blocks reserved first (``fallocate``, as np.save's ``tofile`` does)
and without, against ``np.save``, and a checked read of them started at once, against ``np.load`` of
the ``np.save`` file; each write is deleted after its read, so no round leaves gigabytes behind for
the next one to wait on (medians of ``--rounds`` x 2, interleaved).

Usage: python benchmarks/bench_store.py [--n 326751] [--dims 512] [--rounds 5] [--workdir /tmp/scdm-bench-store] [--data-path]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # `import scdm` without installing it

from scdm.store import (
    Store,  # noqa: E402
    _zarr,  # noqa: E402
)

GOALS: dict[str, float | None] = {"catalog write": None, "resumable write": 1.3, "chunk files only": None, "full read, first": 1.25,
                                  "full read, new Store": None, "full read, again": 1.25, "random 10%, first": None,
                                  "random 10%, again": 2.0}


def once(fn: Callable[[], object]) -> tuple[float, object]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def tiny_dataset(st: Store, n: int) -> str:
    """A dataset of n cells with one gene (the benchmark only needs the row count)."""
    import anndata as ad
    import scipy.sparse as sp

    x = sp.csr_matrix((np.ones(n, dtype=np.float32), np.zeros(n, dtype=np.int32), np.arange(n + 1)), shape=(n, 1))
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]), var=pd.DataFrame(index=["A1BG"]))
    return st.ingest(adata, name=f"bench{n}").name


def catalog_writes(st: Store, times: int = 9) -> tuple[float, float]:
    """Median seconds of one small write transaction on the catalog: through the store, and by DuckDB alone.

    The store attaches the file to the in-memory DuckDB instance its process keeps for writes; the
    baseline connects to the file, runs the same statement and closes (what every write did before).
    """
    sql = "UPDATE meta SET value = value WHERE key = 'schema_version'"
    st.catalog._pool.close()  # as after a write: neither side finds a read connection to close
    ours, duckdb_alone = [], []
    for _ in range(times):
        t0 = time.perf_counter()
        with st.catalog.transaction() as con:
            con.execute(sql)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        con = duckdb.connect(str(st.catalog.path))
        con.execute(sql)
        con.close()
        duckdb_alone.append(time.perf_counter() - t0)
    return statistics.median(ours), statistics.median(duckdb_alone)


def one_round(st: Store, name: str, work: Path, data: np.ndarray, rows_rand: np.ndarray, r: int) -> dict[str, tuple[float, float]]:
    """Each operation once, baseline then store: {operation: (scdm s, baseline s)}."""
    out: dict[str, tuple[float, float]] = {"catalog write": catalog_writes(st)}
    npy = work / "x.npy"
    npy.unlink(missing_ok=True)
    emb = st.create_embedding(name, model="bench", params={"round": r}, dim=data.shape[1])
    t_save, _ = once(lambda: np.save(npy, data))

    def write() -> None:
        with emb.writer() as w:
            for c in range(emb.n_chunks):
                lo, hi = emb.chunk_bounds(c)
                w.write(c, data[lo:hi])
            w.finalize()

    t_write, _ = once(write)
    out["resumable write"] = (t_write, t_save)
    npy.unlink()
    t_save2, _ = once(lambda: np.save(npy, data))
    scratch = work / f"raw{r}.zarr"
    _zarr.create_array(scratch, n_rows=data.shape[0], dim=data.shape[1], dtype="float32", chunk_rows=emb.chunk_rows)
    rows = _zarr.RowWriter(scratch)

    def files_only() -> None:
        for c in range(emb.n_chunks):
            lo, hi = emb.chunk_bounds(c)
            rows.write(lo, data[lo:hi])

    t_files, _ = once(files_only)
    shutil.rmtree(scratch)
    out["chunk files only"] = (t_files, t_save2)

    t_load, loaded = once(lambda: np.load(npy))
    del loaded

    def first(rows: np.ndarray | None = None) -> np.ndarray:
        _zarr.forget_verified()  # as in a fresh process: every chunk the read touches is hashed
        return st.read_embedding(emb.embedding_id, rows=rows)

    t_first, got = once(first)
    assert isinstance(got, np.ndarray) and np.array_equal(got, data)
    del got
    t_load_new, loaded = once(lambda: np.load(npy))
    del loaded
    other = Store(st.root)

    def new_store() -> np.ndarray:
        _zarr.forget_verified()
        return other.read_embedding(emb.embedding_id)

    t_new, got = once(new_store)
    assert np.array_equal(got, data)
    del got
    t_load2, loaded = once(lambda: np.load(npy))
    del loaded
    t_again, _ = once(lambda: st.read_embedding(emb.embedding_id))
    out["full read, first"] = (t_first, t_load)
    out["full read, new Store"] = (t_new, t_load_new)
    out["full read, again"] = (t_again, t_load2)

    mm = np.load(npy, mmap_mode="r")
    t_mm, picked = once(lambda: np.asarray(mm[rows_rand]))
    t_rand_first, got = once(lambda: first(rows_rand))
    assert isinstance(got, np.ndarray) and np.array_equal(got, picked)
    t_mm2, _ = once(lambda: np.asarray(mm[rows_rand]))
    t_rand, _ = once(lambda: st.read_embedding(emb.embedding_id, rows=rows_rand))
    out["random 10%, first"] = (t_rand_first, t_mm)
    out["random 10%, again"] = (t_rand, t_mm2)
    st.remove_embedding(emb.embedding_id)
    return out


def data_path_table(data: np.ndarray, work: Path, rounds: int) -> list[dict[str, object]]:
    """np.save vs the chunk files with and without reserving their blocks; each write deleted at once."""
    chunk_rows = _zarr.default_chunk_rows(data.shape[1])
    reserve = _zarr._reserve

    def chunk_files(reserved: bool) -> tuple[float, float]:
        """(write s, s of a checked read started at once)."""
        _zarr._reserve = reserve if reserved else (lambda fd, nbytes: None)
        location = work / "files.zarr"
        _zarr.create_array(location, n_rows=data.shape[0], dim=data.shape[1], dtype="float32", chunk_rows=chunk_rows)
        rows = _zarr.RowWriter(location)
        try:
            seconds, sums = once(lambda: {i: rows.write(lo, data[lo:lo + chunk_rows])
                                          for i, lo in enumerate(range(0, data.shape[0], chunk_rows))})
            _zarr.forget_verified()
            read_s, _ = once(lambda: _zarr.read_rows(location, checksums=sums))  # type: ignore[arg-type]
        finally:
            _zarr._reserve = reserve
            shutil.rmtree(location)
        return seconds, read_s

    def save() -> tuple[float, float]:
        npy = work / "x.npy"
        seconds, _ = once(lambda: np.save(npy, data))
        load_s, _ = once(lambda: np.load(npy))
        npy.unlink()
        return seconds, load_s

    runs: dict[str, list[tuple[float, float]]] = {"np.save": [], "reserved": [], "not reserved": []}
    save(), chunk_files(True)  # warm-up
    for _ in range(2 * rounds):
        runs["np.save"].append(save())
        runs["reserved"].append(chunk_files(True))
        runs["not reserved"].append(chunk_files(False))
    table: list[dict[str, object]] = []
    for j, (what, baseline) in enumerate((("chunk files", "np.save"), ("read at once, CRC checked", "np.load"))):
        base = statistics.median(r[j] for r in runs["np.save"])
        for k in ("reserved", "not reserved"):
            t = statistics.median(r[j] for r in runs[k])
            table.append({"D": data.shape[1], "MB": round(data.nbytes / 2**20), "operation": f"{what}, {k}", "scdm_s": t,
                          "baseline": baseline, "baseline_s": base, "ratio": t / base, "goal": "-", "met": "-"})
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=326_751, help="cells (default: the scDrugMap primary collection)")
    ap.add_argument("--dims", default="512")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (each runs every operation once); medians are shown")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "scdm-bench-store"))
    ap.add_argument("--data-path", action="store_true", help="only the chunk files vs np.save, each write deleted at once (see above)")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(0)
    if args.data_path:
        rows = [r for d in args.dims.split(",") for r in data_path_table(rng.standard_normal((args.n, int(d)), dtype=np.float32), work, args.rounds)]
        pd.set_option("display.width", 200)
        print(f"n_cells = {args.n}; the data path alone, one thread; medians of {2 * args.rounds} interleaved rounds (after one warm-up)")
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        shutil.rmtree(work, ignore_errors=True)
        return
    st = Store(work / "store")
    name = tiny_dataset(st, args.n)
    table = []
    for d in [int(x) for x in args.dims.split(",")]:
        data = rng.standard_normal((args.n, d), dtype=np.float32)
        rows_rand = np.sort(rng.choice(args.n, args.n // 10, replace=False))
        one_round(st, name, work, data, rows_rand, -1)  # warm-up: first file creations, imports, thread pools
        rounds = [one_round(st, name, work, data, rows_rand, r) for r in range(args.rounds)]
        for op, goal in GOALS.items():
            scdm = statistics.median(x[op][0] for x in rounds)
            base = statistics.median(x[op][1] for x in rounds)
            baseline = ("duckdb.connect" if op == "catalog write" else "np.save" if op in ("resumable write", "chunk files only")
                        else "np.load" if op.startswith("full") else "memmap[rows]")
            table.append({"D": d, "MB": round(data.nbytes / 2**20), "operation": op, "scdm_s": scdm, "baseline": baseline,
                          "baseline_s": base, "ratio": scdm / base, "goal": goal if goal is not None else "-",
                          "met": "-" if goal is None else "yes" if scdm / base <= goal else "NO"})
        del data
    pd.set_option("display.width", 200)
    print(f"n_cells = {args.n}; warm page cache; medians of {args.rounds} interleaved rounds (after one warm-up round)")
    print(pd.DataFrame(table).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
