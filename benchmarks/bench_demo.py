"""Wall time and peak memory of the newcomer's commands: `scdm demo` and `scdm report` (issue #19, point 6).

    .venv/bin/python benchmarks/bench_demo.py                 # a fresh store in a temporary folder
    .venv/bin/python benchmarks/bench_demo.py --keep /tmp/bd  # keep the store and the report

Each command runs as a user runs it (`python -m scdm ...` in a subprocess, -q); the demo on an
empty store (everything computed), then again (everything found in the store), then `scdm report`
on the demo's store. Prints one table: seconds, the goal, the ratio, peak RSS, and the load average
before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GOALS = {"demo (fresh store)": 120.0, "demo (again: cached)": None, "report": 30.0}


# a wrapper process per command, so that RUSAGE_CHILDREN holds that command's peak alone
WRAPPER = """
import resource, subprocess, sys, time
started = time.perf_counter()
subprocess.run([sys.executable, "-m", "scdm", *sys.argv[1:]], check=True, stdout=subprocess.DEVNULL)
print(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""


def _run(args: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of one `python -m scdm ...` run."""
    out = subprocess.run([sys.executable, "-c", WRAPPER, *args], check=True, capture_output=True, text=True).stdout
    seconds, rss = (float(v) for v in out.split())
    return seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="Folder for the store and the report (default: a temporary one).")
    opts = parser.parse_args()
    root = opts.keep or Path(tempfile.mkdtemp(prefix="bench-demo-"))
    store, report = root / "store", root / "report"
    load_before = os.getloadavg()[0]
    rows = []
    for name, args in (("demo (fresh store)", ["--store", str(store), "-q", "demo", "--report-dir", str(root / "demo-report")]),
                       ("demo (again: cached)", ["--store", str(store), "-q", "demo", "--report-dir", str(root / "demo-report")]),
                       ("report", ["--store", str(store), "-q", "report", "--out", str(report)])):
        seconds, rss = _run(args)
        goal = GOALS[name]
        rows.append((name, seconds, goal, rss))
    load_after = os.getloadavg()[0]
    print(f"{'command':22} {'seconds':>8} {'goal s':>7} {'ratio':>6} {'met':>4} {'peak RSS MiB':>13}")
    for name, seconds, goal, rss in rows:
        ratio = f"{seconds / goal:.2f}" if goal else "-"
        met = ("yes" if seconds <= goal else "no") if goal else "-"
        print(f"{name:22} {seconds:8.1f} {goal or '-':>7} {ratio:>6} {met:>4} {rss:13.0f}")
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after; {os.cpu_count()} CPUs; store {store}")


if __name__ == "__main__":
    main()
