"""Scale-out benchmark: the evaluation grid with the local executor vs Ray on this machine.

Runs one grid (``bench_heads``' synthetic scDrugMap-shaped collection, random embeddings with a
planted label direction) four ways and prints one table:

- ``local jobs=1`` and ``local jobs=2``: the local executor (threads);
- ``ray 1 CPU`` and ``ray 2 CPUs``: :func:`scdm.classify.evaluate` with ``executor="ray"`` on a
  local Ray cluster started with ``num_cpus=1`` / ``2`` (started before the timed call; its start
  time is shown separately).

Columns: wall time, speed-up over ``local jobs=1``, tasks/s, and whether every metric equals the
local run's (max |difference| over all metric values). A second part measures the **per-task
overhead** of the Ray path on a grid of ``majority`` heads (a fit costs microseconds, so the
difference is the executor): ``(ray wall - local wall) / tasks`` with 1 Ray CPU, batched as
evaluate batches, and with one task per Ray task (``BATCHES_PER_CPU`` raised until every batch
holds one fit).

Every configuration starts from a store without results (finished tasks would be skipped), so
each one computes the same grid. Timings on a shared 2-core machine vary between runs; the load
average at the start of each row is printed.

Usage: python benchmarks/bench_scale.py [--scale 0.01] [--dim 256] [--heads logreg,mlp]
           [--by all,drug_type] [--workdir bench-out/bench_scale]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # `import scdm` without installing it

from benchmarks.bench_heads import build_store, collection_shape  # noqa: E402
from scdm.classify import _ray_grid  # noqa: E402
from scdm.classify.grid import evaluate  # noqa: E402
from scdm.store import Store  # noqa: E402


def clear_results(st: Store) -> None:
    """Forget every finished task so the next run computes the whole grid again."""
    for table in ("eval_predictions", "eval_results", "eval_tasks", "skipped_tasks"):
        st.execute(f"DELETE FROM {table}")


def run_grid(st: Store, *, heads: list[str], by: list[str], scenarios: list[str], jobs: int = 1,
             executor: str = "local", head_params: dict | None = None) -> tuple[float, int, pd.DataFrame]:
    """Wall seconds, tasks fitted and the metric values (task_id, metric, value) of one grid."""
    clear_results(st)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = evaluate(st, heads=heads, scenarios=scenarios, by=by, folds=10, jobs=jobs, executor=executor,
                           head_params=head_params, silent=True)
    wall = time.perf_counter() - t0
    values = st.query("SELECT task_id, metric, value FROM eval_results ORDER BY task_id, metric")
    return wall, summary.n_done, values


def max_difference(values: pd.DataFrame, reference: pd.DataFrame) -> float:
    """Largest |difference| between two runs' metric values (inf if their tasks differ)."""
    if len(values) != len(reference) or not (values["task_id"].to_numpy() == reference["task_id"].to_numpy()).all():
        return float("inf")
    a, b = values["value"].to_numpy(float), reference["value"].to_numpy(float)
    both = ~(np.isnan(a) & np.isnan(b))
    return float(np.max(np.abs(a[both] - b[both]), initial=0.0))


def start_ray(num_cpus: int) -> float:
    """Start a fresh local Ray cluster with ``num_cpus`` CPUs; returns its start-up seconds."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.01, help="fraction of scDrugMap's 326,751 cells (default 0.01)")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension (default 256)")
    parser.add_argument("--heads", default="logreg,mlp", help="heads of the timed grid (comma-separated)")
    parser.add_argument("--by", default="all,drug_type", help="category types of the grid")
    parser.add_argument("--scenarios", default="pooled,cross")
    parser.add_argument("--workdir", default="bench-out/bench_scale")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    heads, by, scenarios = args.heads.split(","), args.by.split(","), args.scenarios.split(",")
    head_params = {"mlp": {"profile": "paper"}} if "mlp" in heads else None

    t0 = time.perf_counter()
    st, n_cells = build_store(Path(args.workdir) / "store", collection_shape(), args.scale, args.dim)
    print(f"store: {n_cells:,} cells x {args.dim} (scale {args.scale}) built in {time.perf_counter() - t0:.0f} s; "
          f"grid {','.join(heads)} x {','.join(scenarios)} x {','.join(by)}, 10 folds; {os.cpu_count()} CPUs",
          flush=True)

    rows = []

    def record(what: str, wall: float, tasks: int, values: pd.DataFrame, reference: pd.DataFrame | None,
               load: float, startup: float | None = None) -> None:
        rows.append({"what": what, "tasks": tasks, "wall_s": wall, "tasks_per_s": tasks / wall,
                     "max_abs_diff": None if reference is None else max_difference(values, reference),
                     "ray_start_s": startup, "load": load})
        print(rows[-1], flush=True)

    load = os.getloadavg()[0]
    wall, tasks, reference = run_grid(st, heads=heads, by=by, scenarios=scenarios, head_params=head_params)
    record("local jobs=1", wall, tasks, reference, None, load)
    load = os.getloadavg()[0]
    wall, tasks, values = run_grid(st, heads=heads, by=by, scenarios=scenarios, jobs=2, head_params=head_params)
    record("local jobs=2", wall, tasks, values, reference, load)
    for cpus in (1, 2):
        startup = start_ray(cpus)
        load = os.getloadavg()[0]
        wall, tasks, values = run_grid(st, heads=heads, by=by, scenarios=scenarios, executor="ray",
                                       head_params=head_params)
        record(f"ray {cpus} CPU{'s' if cpus > 1 else ''}", wall, tasks, values, reference, load, startup)

    # Per-task overhead: a grid of majority heads (fits cost microseconds) with each executor.
    overhead_by = ["all", "tissue", "cancer_type", "drug_type", "regimen"]
    load = os.getloadavg()[0]
    local_wall, n_tasks, majority_ref = run_grid(st, heads=["majority"], by=overhead_by, scenarios=scenarios)
    record("majority local jobs=1", local_wall, n_tasks, majority_ref, None, load)
    startup = start_ray(1)
    load = os.getloadavg()[0]
    ray_wall, _, values = run_grid(st, heads=["majority"], by=overhead_by, scenarios=scenarios, executor="ray")
    record("majority ray 1 CPU, batched", ray_wall, n_tasks, values, majority_ref, load, startup)
    batched = (ray_wall - local_wall) / n_tasks
    default_batches = _ray_grid.BATCHES_PER_CPU
    _ray_grid.BATCHES_PER_CPU = 10**9  # every batch holds one fit
    load = os.getloadavg()[0]
    single_wall, _, values = run_grid(st, heads=["majority"], by=overhead_by, scenarios=scenarios, executor="ray")
    _ray_grid.BATCHES_PER_CPU = default_batches
    record("majority ray 1 CPU, 1 task per Ray task", single_wall, n_tasks, values, majority_ref, load)
    single = (single_wall - local_wall) / n_tasks
    import ray

    ray.shutdown()

    table = pd.DataFrame(rows)
    base = table.loc[table["what"] == "local jobs=1", "wall_s"].iloc[0]
    grid_rows = ~table["what"].str.startswith("majority")
    table.loc[grid_rows, "speedup"] = base / table.loc[grid_rows, "wall_s"]
    with pd.option_context("display.width", 250, "display.float_format", "{:.3g}".format):
        print(table[["what", "tasks", "wall_s", "speedup", "tasks_per_s", "max_abs_diff", "ray_start_s", "load"]]
              .to_string(index=False))
    print(f"Ray per-task overhead over local (majority grid, {n_tasks} tasks, 1 CPU): "
          f"{1e3 * batched:.1f} ms/task batched, {1e3 * single:.1f} ms/task with one fit per Ray task")


if __name__ == "__main__":
    main()
