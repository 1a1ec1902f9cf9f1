#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment holding the peer tool circuit-tracer 0.5.0,
# for the side-by-side benchmark (benchmarks/ct_runner.py runs inside it).
#
# Usage: bash benchmarks/setup_circuit_tracer.sh [VENV_DIR]
#   VENV_DIR defaults to $CT_VENV or <repo root>/.venv-ct (ignored by git).
#   PYTHON selects the interpreter that creates the venv (default: python3).
#
# Idempotent: a venv that already imports circuit_tracer 0.5.0 with torch 2.13.0 is left as it is.
# torch is always pinned (2.13.0, the CPU wheel found through pip's configured find-links);
# pip never gets to pick a torch of its own.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${CT_VENV:-$REPO_ROOT/.venv-ct}}"
PY="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
CT_PIN="circuit-tracer==0.5.0"
# circuit-tracer 0.5.0 asks for nnsight>=0.6 but imports nnsight.intervention.tracing, which nnsight 0.8 removed
NNSIGHT_PIN="nnsight==0.7.0"

say() { echo "[setup_circuit_tracer] $*"; }

check() {
    "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.metadata as md
assert md.version("circuit-tracer") == "0.5.0", md.version("circuit-tracer")
assert md.version("torch").startswith("2.13.0"), md.version("torch")
import huggingface_hub.constants as c
if not hasattr(c, "HF_HUB_ENABLE_HF_TRANSFER"):
    c.HF_HUB_ENABLE_HF_TRANSFER = False
import circuit_tracer  # noqa: F401
from circuit_tracer.replacement_model.replacement_model_nnsight import NNSightReplacementModel  # noqa: F401
import gguf, accelerate, yaml  # noqa: F401
EOF
}

if [ -x "$VENV/bin/python" ] && check; then
    say "venv $VENV already has $CT_PIN and $TORCH_PIN: nothing to do"
else
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating venv $VENV with $($PY --version 2>&1)"
        "$PY" -m venv "$VENV"
    else
        say "venv $VENV exists but is incomplete: installing into it"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch first and pinned, so that no dependency can pull another one; then the rest with the pin repeated.
    say "installing $TORCH_PIN"
    "$VENV/bin/python" -m pip install --quiet "$TORCH_PIN"
    say "installing $CT_PIN (brings transformers, transformer-lens) + $NNSIGHT_PIN, gguf, accelerate, safetensors, psutil"
    "$VENV/bin/python" -m pip install --quiet "$TORCH_PIN" "$CT_PIN" "$NNSIGHT_PIN" gguf accelerate safetensors psutil
    if ! check; then
        say "ERROR: the venv at $VENV does not import circuit_tracer 0.5.0 with $TORCH_PIN"
        exit 1
    fi
fi

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
names = ["circuit-tracer", "torch", "transformers", "transformer-lens", "nnsight", "huggingface-hub", "numpy"]
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"
print("[setup_circuit_tracer] versions: " + ", ".join(f"{n} {version(n)}" for n in names))
EOF
say "python: $VENV/bin/python"
say "run: $VENV/bin/python $REPO_ROOT/benchmarks/ct_runner.py --help"
