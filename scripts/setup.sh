#!/usr/bin/env bash
# One-step set-up of gemma-circuits on a fresh machine (Python >= 3.10 with pip; Debian/Ubuntu for the
# system packages). Safe to run again: it installs only what is missing.
#
#   bash scripts/setup.sh          # torch (CPU, pinned), the package with its compiled kernels, graphviz
#   bash scripts/setup.sh --test   # the same, plus the test tools and Chromium (for the browser test)
#
# PYTHON selects the interpreter (default: python3). Torch is always pinned to 2.13.0 so that pip never
# pulls a multi-gigabyte CUDA build by itself; set GEMMA_CIRCUITS_TORCH to pin another.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
TORCH_PIN="${GEMMA_CIRCUITS_TORCH:-torch==2.13.0}"
WITH_TESTS=0
for arg in "$@"; do
    case "$arg" in
        --test) WITH_TESTS=1 ;;
        *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
    esac
done

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "$PY not found; install Python 3.10+ (Debian: apt-get install python3 python3-pip python3-venv)"
"$PY" - <<'EOF' || die "Python 3.10 or newer is needed"
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
EOF
"$PY" -m pip --version >/dev/null 2>&1 || die "pip is missing for $PY; run: $PY -m ensurepip --upgrade"

# System packages: graphviz draws the SVGs; Chromium runs the HTML viewer's browser test.
apt_install() {
    local pkgs=("$@")
    local runner=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            runner=(sudo)
        else
            die "missing system packages: ${pkgs[*]}. Run: sudo apt-get install -y ${pkgs[*]}  (macOS: brew install graphviz)"
        fi
    fi
    command -v apt-get >/dev/null || die "missing system packages: ${pkgs[*]}; install them with your package manager"
    say "installing ${pkgs[*]} with apt-get"
    "${runner[@]}" apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive "${runner[@]}" apt-get install -y -qq "${pkgs[@]}" >/dev/null
}
missing=()
command -v dot >/dev/null || missing+=(graphviz)
if [ "$WITH_TESTS" = 1 ]; then
    command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
fi
if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi

# torch first, pinned, so that nothing else can pull another build.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '${TORCH_PIN#torch==}' else 1)" 2>/dev/null; then
    say "installing $TORCH_PIN"
    "$PY" -m pip install -q "$TORCH_PIN"
fi

# The package itself, editable, building the C++/OpenMP kernels against the torch just installed.
# (--no-build-isolation: the build must see that torch, not download another.)
extras=""
[ "$WITH_TESTS" = 1 ] && extras="[test]"
if ! "$PY" -c "import circuits._edges" 2>/dev/null || ! "$PY" -m pip show -q gemma-circuits >/dev/null 2>&1 \
   || [ "$WITH_TESTS" = 1 ]; then
    say "installing gemma-circuits$extras (builds the compiled edge kernels, about a minute)"
    "$PY" -m pip install -q --no-build-isolation -e ".$extras" "$TORCH_PIN"
fi
"$PY" -m circuits info | sed 's/^/[setup] /'
