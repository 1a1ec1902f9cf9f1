#!/usr/bin/env bash
# Everything this project checks on a lent GPU (about 10 minutes on an H200, in two parts so that each stays
# inside one 10-minute device call): build the CUDA kernels, run the GPU tests, the edge-kernel benchmark on
# the GPU, and the side-by-side with circuit-tracer on Gemma 3 1B- and 4B-shaped random models. Logs and
# tables land in OUTDIR (at most 8 files per part).
#
#   bash benchmarks/gpu_session.sh OUTDIR                  # everything
#   bash benchmarks/gpu_session.sh OUTDIR tests,edges,1b   # some stages: tests, edges, 1b, 4b (each builds
#                                                          # the kernels first where they are not built yet)
#
# circuit-tracer 0.5.0 pins transformers 4.x, so it runs from wheels in .whl/ (`bash
# benchmarks/setup_circuit_tracer.sh --wheels` downloads them for Python 3.12) installed into a directory of
# their own that only its processes see; our side runs on the machine's own torch and transformers.
set -u
OUTDIR=$(mkdir -p "${1:?usage: bash benchmarks/gpu_session.sh OUTDIR [tests,edges,1b,4b]}" && cd "$1" && pwd)
STAGES=",${2:-tests,edges,1b,4b},"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=$(command -v "${PYTHON:-python3}")
T0=$(date +%s)
stage() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }

stage machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
nproc; free -g | head -2

CTSITE=/tmp/ctsite CTPID=
if [ ! -f /tmp/ctsite.log ] && ls .whl/*.whl > /dev/null 2>&1; then  # in the background while the kernels build
  ( "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $CTSITE .whl/*.whl
    echo "circuit-tracer wheels installed: rc $?" ) > /tmp/ctsite.log 2>&1 &
  CTPID=$!
fi

build() {
stage build
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 300 "$PY" setup.py build_ext --inplace > "$OUTDIR/build.log" 2>&1
echo "build rc $?"
grep -iE "warning|error" "$OUTDIR/build.log" | grep -v Wsign | head -5
"$PY" -c "from circuits import backend as be; print('extension:', be._ext_error or 'loaded', '| cuda kernels:', bool(be._ext and be._ext.has_cuda()), '|', be.backend_reason('cuda'))"
}

peer() {
[ -n "$CTPID" ] && wait $CTPID
cat /tmp/ctsite.log
printf '#!/bin/sh\nPYTHONPATH=%s exec %s "$@"\n' "$CTSITE" "$PY" > /tmp/ctpy && chmod +x /tmp/ctpy
/tmp/ctpy -c "import circuit_tracer, transformers, huggingface_hub; print('peer side: transformers', transformers.__version__, 'hub', huggingface_hub.__version__)"
}
COMMON="--device cuda --sets skip --repeats 1 --threads 16 --batch-tokens 8192 --max-rss-gb 110 --fd-max-tokens 0
        --profile --warmup --workdir /tmp/vsct --ct-python /tmp/ctpy"

"$PY" -c "import circuits._edges" 2> /dev/null || build

if [[ $STAGES == *,tests,* ]]; then
stage tests
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_edges.py \
  "tests/test_attribution.py::test_graph_on_the_gpu_equals_the_cpu" > "$OUTDIR/tests.log" 2>&1
echo "tests rc $?"; tail -4 "$OUTDIR/tests.log"
fi

if [[ $STAGES == *,edges,* ]]; then
stage edges
timeout 200 "$PY" benchmarks/edges.py --threads 16 --min-seconds 0.3 \
  --methods cuda cuda-rowwise torch@cuda \
  --cases 270m-plt-64 270m-plt-128 270m-plt-64-bf16 270m-clt-64 4b-plt-64 4b-plt-64-bf16 \
  --out /tmp/edges_gpu.md > "$OUTDIR/edges.log" 2>&1
echo "edges rc $?"
fi

if [[ $STAGES == *,1b,* ]]; then
stage vs_circuit_tracer 1b
peer
# shellcheck disable=SC2086
timeout 260 "$PY" benchmarks/vs_circuit_tracer.py --model random-1b --lengths 32,128 --timeout-s 120 $COMMON \
  --out /tmp/vsct/vs_circuit_tracer_1b.md > "$OUTDIR/vsct_1b.log" 2>&1
echo "1b rc $?"; grep "^\[vs_circuit_tracer\]" "$OUTDIR/vsct_1b.log"
fi

if [[ $STAGES == *,4b,* ]]; then
stage vs_circuit_tracer 4b
peer
# shellcheck disable=SC2086
timeout 280 "$PY" benchmarks/vs_circuit_tracer.py --model random-4b --lengths 128 --timeout-s 150 $COMMON \
  --out /tmp/vsct/vs_circuit_tracer_4b.md > "$OUTDIR/vsct_4b.log" 2>&1
echo "4b rc $?"; grep "^\[vs_circuit_tracer\]" "$OUTDIR/vsct_4b.log"
fi
tar czf "$OUTDIR/vsct_runs.tgz" -C /tmp --exclude='*.npz' --exclude='*.safetensors' vsct/runs vsct/vs_circuit_tracer_1b.md \
  vsct/vs_circuit_tracer_4b.md edges_gpu.md 2>/dev/null
stage done
