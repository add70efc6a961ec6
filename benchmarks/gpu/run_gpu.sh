#!/usr/bin/env bash
# GPU benchmark of the embedding stage (issue #19, point 7): published-size random models on CUDA.
#
# Run from the repository root on the GPU machine:   bash benchmarks/gpu/run_gpu.sh [extra bench_embed.py flags]
# e.g. `bash benchmarks/gpu/run_gpu.sh --models llm,uce --seconds 5`. Writes to $OUT (default bench-out/gpu):
# env.txt (nvidia-smi, load average), bench_embed_gpu.log (everything printed), bench_embed_gpu.md (the
# table, rewritten after every model) and bench_embed_gpu.json (every number). Finishes in about 5-7 minutes:
# bench_embed.py skips models that no longer fit its --budget-s (400 s here) and `timeout` is the last resort.
# Missing Python packages (duckdb: the store package imports it) come from .whl/ when present.
set -u -o pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT="${OUT:-$PWD/bench-out/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # `import scdm` without installing it
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv
    echo "uptime: $(uptime)"
    "$PY" -c 'import sys, torch, numpy; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "numpy", numpy.__version__)'
} 2>&1 | tee "$OUT/env.txt"
# the two 512-wide models, which spent about half their GPU time outside matmuls and attention, also run
# through torch.compile (scdm embed --compile); `--compile ""` leaves the compiled rows out
timeout -k 10 430 "$PY" benchmarks/bench_embed.py --published --budget-s 400 --seconds 6 --compile geneformer,scgpt \
    --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_embed_gpu.log"
rc=$?
echo "uptime after: $(uptime)" | tee -a "$OUT/env.txt"
if [ "$rc" -ne 0 ] && [ -f "$OUT/bench_embed_gpu.md" ]; then
    echo "== bench_embed.py ended with exit code $rc; the results written so far:"
    cat "$OUT/bench_embed_gpu.md"
fi
exit "$rc"
