#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment holding the peer tool circuit-tracer 0.5.0,
# for the side-by-side benchmark (benchmarks/ct_runner.py runs inside it).
#
# Usage: bash benchmarks/setup_circuit_tracer.sh [VENV_DIR]
#   VENV_DIR defaults to $CT_VENV or <repo root>/.venv-ct (ignored by git).
#   PYTHON selects the interpreter that creates the venv (default: python3).
#        bash benchmarks/setup_circuit_tracer.sh --wheels [PYVER]
#   downloads, into <repo root>/.whl (ignored by git), the wheels that circuit-tracer needs beyond what a
#   machine with torch and transformers 5 already has, for CPython PYVER (default 3.12) on x86-64 Linux:
#   benchmarks/gpu_session.sh installs them into a directory of their own on a GPU machine with no index.
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

# circuit-tracer's nnsight backend imports these (found by running it over a machine's own packages);
# transformers, huggingface-hub, tokenizers and cloudpickle are pinned to the versions it was measured with
WHEELS=(circuit-tracer==0.5.0 "$NNSIGHT_PIN" transformers==4.57.3 huggingface_hub==0.36.2 tokenizers==0.22.2
        cloudpickle==3.1.3 pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
        astor==0.8.1 bidict==0.24.1 dill==0.4.1 python-engineio==4.15.1 python-socketio==5.18.1
        websocket-client==1.9.2 simple_websocket==1.1.0 wsproto==1.3.2 zstandard==0.25.0 toml==0.10.2
        ipython==9.18.1 ipython_pygments_lexers==1.1.1 traitlets==5.16.1 decorator==5.3.1 matplotlib-inline==0.2.2
        pexpect==4.9.0 ptyprocess==0.7.0 prompt_toolkit==3.0.53 wcwidth==0.9.4 jedi==0.20.1 parso==0.8.7
        stack_data==0.6.3 executing==2.3.0 asttokens==3.0.2 pure_eval==0.2.4 hf_xet==1.8.0)
if [ "${1:-}" = "--wheels" ]; then
    pyver="${2:-3.12}"
    platforms=()
    for p in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
        platforms+=(--platform "${p}_x86_64")
    done
    mkdir -p "$REPO_ROOT/.whl"
    say "downloading ${#WHEELS[@]} wheels for CPython $pyver into $REPO_ROOT/.whl"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        "${platforms[@]}" -d "$REPO_ROOT/.whl" "${WHEELS[@]}"
    say "$(ls "$REPO_ROOT/.whl" | wc -l) wheels, $(du -sh "$REPO_ROOT/.whl" | cut -f1)"
    exit 0
fi

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
