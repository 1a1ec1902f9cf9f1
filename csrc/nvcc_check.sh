#!/usr/bin/env bash
# Compile csrc/edges_cuda.cu to an object file with nvcc, with the flags torch's CUDAExtension uses, and
# csrc/edges.cpp as a CUDA build compiles it, to check that both build on a machine without a GPU (nothing is
# linked or run).
#
# A CPU-only torch wheel ships the ATen/c10 CUDA headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h, nor libc10_cuda/libtorch_cuda: so the object compiles here (this
# script supplies the one-line generated header), but a loadable CUDA extension needs a CUDA build of torch
# (setup.py builds one automatically when `torch.version.cuda` is set and nvcc is found).
#
# usage: bash csrc/nvcc_check.sh [sm_XX ...]      (default: sm_80 sm_90)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
ARCHS=("${@:-sm_80 sm_90}")
read -r -a ARCHS <<< "${ARCHS[*]}"
TORCH_DIR=$(python -c "import os, torch; print(os.path.dirname(torch.__file__))")
FLAGS=$(python -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as f; print(' '.join(f))")
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
EXTRA_INC=()
if [ ! -f "$TORCH_DIR/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$TMP/inc/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$TMP/inc/c10/cuda/impl/cuda_cmake_macros.h"
  EXTRA_INC=(-I "$TMP/inc")
  echo "note: torch $(python -c 'import torch; print(torch.__version__)') lacks the generated CUDA header; supplying it"
fi
GENCODE=()
for a in "${ARCHS[@]}"; do GENCODE+=(-gencode "arch=compute_${a#sm_},code=$a"); done
# shellcheck disable=SC2086
"$NVCC" -c csrc/edges_cuda.cu -o "$TMP/edges_cuda.o" -std=c++20 -O3 --use_fast_math -DWITH_CUDA \
  -D_GLIBCXX_USE_CXX11_ABI="$(python -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')" \
  $FLAGS "${EXTRA_INC[@]}" -I "$TORCH_DIR/include" -I "$TORCH_DIR/include/torch/csrc/api/include" \
  --compiler-options -fPIC "${GENCODE[@]}" -diag-suppress 3189
echo "OK: csrc/edges_cuda.cu compiled for ${ARCHS[*]} with $("$NVCC" --version | tail -1)"
nm -C "$TMP/edges_cuda.o" | grep -E " T feature_edges(_tiled)?_cuda"
# the C++ side of a CUDA build (bindings of the CUDA entry points): syntax only, as the CUDA build compiles it
PYINC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
g++ -std=c++20 -fsyntax-only -fopenmp -DWITH_CUDA -DTORCH_EXTENSION_NAME=_edges -I "$PYINC" -I "$TORCH_DIR/include" \
  -I "$TORCH_DIR/include/torch/csrc/api/include" csrc/edges.cpp
echo "OK: csrc/edges.cpp compiles with -DWITH_CUDA"
