// The work plan of the tiled CUDA feature-edge kernel, built on the host (csrc/edges.cpp) so that it can be
// built once per source layer and reused by every call (a plan made per call costs a device-to-host copy,
// which stalls the GPU's queue) and checked on machines without a GPU.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

// features per tile: the kernel's FT (a block computes 64 batch rows x kTileFeatures features)
constexpr int kTileFeatures = 32;

// pos: [n] int64 on the CPU. Returns (order [n], tiles [n_tiles, 3]), both int64 on the CPU: order sorts the
// features by position (stable); tile t covers sorted indices tiles[t, 0] .. tiles[t, 0] + tiles[t, 1] - 1
// (1 <= length <= kTileFeatures), all at position tiles[t, 2]. Tiles are in order of position.
std::tuple<at::Tensor, at::Tensor> feature_tiles(const at::Tensor& pos);
