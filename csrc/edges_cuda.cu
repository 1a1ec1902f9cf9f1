// Attribution edge kernels on CUDA. Same contract as csrc/edges.cpp:
//     out[b, i] = act[i] * sum_o decoder[feat[i], o, :] . grad[b, o, pos[i], :]
//   grad [B, n_out, n_pos, D], decoder [F, n_out, D]: any strides, float32 / bfloat16 / float16 / float64;
//   accumulation and output in float32.
//
// Two kernels:
// - tiled (the default): features sorted by position and cut into tiles of at most FT features
//   that share one position, so a tile's edges are a small matrix product [BT rows x D] . [D x FT]. A block
//   stages a BT x DK slab of the gradient and an FT x DK slab of gathered decoder rows in shared memory
//   (consecutive threads read consecutive d: coalesced), and each thread accumulates a 4 x 2 patch of the
//   output. Each gradient row is read once per tile instead of once per feature.
// - rowwise (`variant="rowwise"`): one block per (feature, tile of ROWS batch rows); the block stages the
//   feature's decoder row in shared memory and each warp folds its rows with a shuffle reduction.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>

#include "tiles.h"

namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int ROWS_PER_WARP = 4;
constexpr int ROWS = WARPS * ROWS_PER_WARP;  // batch rows per block
constexpr int CHUNK = 2048;                  // decoder floats staged in shared memory at once (8 KiB)

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
  return x;
}

template <typename TG, typename TD>
__global__ void __launch_bounds__(THREADS)
    feature_edges_kernel(const TG* __restrict__ grad, int64_t gs0, int64_t gs1, int64_t gs2, int64_t gs3,
                         const TD* __restrict__ dec, int64_t ds0, int64_t ds1, int64_t ds2,
                         const int64_t* __restrict__ pos, const int64_t* __restrict__ feat,
                         const float* __restrict__ act, float* __restrict__ out, int64_t B, int64_t n,
                         int64_t n_out, int64_t D) {
  __shared__ float row[CHUNK];
  const int64_t i = blockIdx.x;
  const int64_t b0 = (int64_t)blockIdx.y * ROWS;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const TD* drow = dec + feat[i] * ds0;
  const TG* gpos = grad + pos[i] * gs2;
  float acc[ROWS_PER_WARP];
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) acc[r] = 0.f;

  for (int64_t o = 0; o < n_out; ++o) {
    for (int64_t d0 = 0; d0 < D; d0 += CHUNK) {
      const int len = (int)(D - d0 < CHUNK ? D - d0 : CHUNK);
      __syncthreads();  // the previous chunk is no longer read
      for (int d = threadIdx.x; d < len; d += THREADS) row[d] = static_cast<float>(drow[o * ds1 + (d0 + d) * ds2]);
      __syncthreads();
#pragma unroll
      for (int r = 0; r < ROWS_PER_WARP; ++r) {
        const int64_t b = b0 + warp + (int64_t)r * WARPS;
        if (b >= B) break;
        const TG* g = gpos + b * gs0 + o * gs1 + d0 * gs3;
        float s = 0.f;
        for (int d = lane; d < len; d += 32) s += row[d] * static_cast<float>(g[d * gs3]);
        acc[r] += s;
      }
    }
  }
  const float a = act[i];
#pragma unroll
  for (int r = 0; r < ROWS_PER_WARP; ++r) {
    const int64_t b = b0 + warp + (int64_t)r * WARPS;
    const float total = warp_sum(acc[r]);  // every lane takes part, also for rows past B
    if (lane == 0 && b < B) out[b * n + i] = a * total;
  }
}

// tiled kernel: BT x FT outputs per block, 256 threads as 16 x 16, each thread 4 rows x 2 features
constexpr int FT = kTileFeatures, BT = 64, DK = 32;

template <typename TG, typename TD>
__global__ void __launch_bounds__(THREADS)
    feature_edges_tiled_kernel(const TG* __restrict__ grad, int64_t gs0, int64_t gs1, int64_t gs2, int64_t gs3,
                               const TD* __restrict__ dec, int64_t ds0, int64_t ds1, int64_t ds2,
                               const int64_t* __restrict__ tiles,  // [n_tiles, 3]: first sorted index, length, pos
                               const int64_t* __restrict__ order, const int64_t* __restrict__ feat,
                               const float* __restrict__ act, float* __restrict__ out, int64_t B, int64_t n,
                               int64_t n_out, int64_t D) {
  __shared__ float gs[BT][DK + 1];  // +1: column reads by different rows fall in different banks
  __shared__ float ds[FT][DK + 1];
  const int64_t t0 = tiles[3 * blockIdx.x], len = tiles[3 * blockIdx.x + 1], p = tiles[3 * blockIdx.x + 2];
  const int64_t b0 = (int64_t)blockIdx.y * BT;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;  // features tx*2.., rows ty*4..
  float acc[4][2] = {{0.f, 0.f}, {0.f, 0.f}, {0.f, 0.f}, {0.f, 0.f}};
  for (int64_t o = 0; o < n_out; ++o) {
    for (int64_t d0 = 0; d0 < D; d0 += DK) {
      __syncthreads();  // the previous slab is no longer read
      for (int e = threadIdx.x; e < BT * DK; e += THREADS) {
        const int r = e / DK, d = e % DK;
        const int64_t b = b0 + r, dd = d0 + d;
        gs[r][d] = (b < B && dd < D) ? static_cast<float>(grad[b * gs0 + o * gs1 + p * gs2 + dd * gs3]) : 0.f;
      }
      for (int e = threadIdx.x; e < FT * DK; e += THREADS) {
        const int f = e / DK, d = e % DK;
        const int64_t dd = d0 + d;
        ds[f][d] = (f < len && dd < D) ? static_cast<float>(dec[feat[t0 + f] * ds0 + o * ds1 + dd * ds2]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int d = 0; d < DK; ++d) {
        const float f0 = ds[tx * 2][d], f1 = ds[tx * 2 + 1][d];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const float g = gs[ty * 4 + r][d];
          acc[r][0] += g * f0;
          acc[r][1] += g * f1;
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int f = tx * 2 + j;
    if (f >= len) continue;
    const int64_t col = order[t0 + f];
    const float a = act[t0 + f];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t b = b0 + ty * 4 + r;
      if (b < B) out[b * n + col] = a * acc[r][j];
    }
  }
}

#define EDGES_CUDA_DISPATCH(tensor, T, ...)                                                       \
  switch ((tensor).scalar_type()) {                                                               \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }                                     \
    case at::kBFloat16: { using T = at::BFloat16; __VA_ARGS__; break; }                           \
    case at::kHalf: { using T = at::Half; __VA_ARGS__; break; }                                   \
    case at::kDouble: { using T = double; __VA_ARGS__; break; }                                   \
    default: TORCH_CHECK(false, "edge kernels: unsupported dtype ", (tensor).scalar_type());       \
  }

}  // namespace

at::Tensor feature_edges_tiled_cuda(const at::Tensor& grad, const at::Tensor& decoder, const at::Tensor& tiles,
                                   int64_t n_tiles, const at::Tensor& order, const at::Tensor& feat,
                                   const at::Tensor& act, int64_t n_cols);

at::Tensor feature_edges_cuda(const at::Tensor& grad, const at::Tensor& pos_in, const at::Tensor& feat_in,
                              const at::Tensor& act_in, const at::Tensor& decoder, const std::string& variant) {
  TORCH_CHECK(grad.is_cuda() && decoder.is_cuda() && decoder.device() == grad.device(),
              "feature_edges (cuda): grad and decoder must be on the same CUDA device");
  TORCH_CHECK(grad.dim() == 4 && decoder.dim() == 3 && decoder.size(1) == grad.size(1) &&
                  decoder.size(2) == grad.size(3),
              "feature_edges needs grad [B, n_out, n_pos, D] and decoder [F, n_out, D], got ", grad.sizes(),
              " and ", decoder.sizes());
  TORCH_CHECK(variant == "tiled" || variant == "rowwise", "feature_edges (cuda): variant must be 'tiled' or "
              "'rowwise', got '", variant, "'");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor pos = pos_in.to(grad.device(), at::kLong).contiguous();
  const at::Tensor feat = feat_in.to(grad.device(), at::kLong).contiguous();
  const at::Tensor act = act_in.to(grad.device(), at::kFloat).contiguous();
  const int64_t B = grad.size(0), n_out = grad.size(1), D = grad.size(3), n = feat.numel();
  TORCH_CHECK(pos.numel() == n && act.numel() == n, "pos, feat and act must have the same length");
  if (n == 0 || B == 0 || n_out == 0 || D == 0) return at::zeros({B, n}, grad.options().dtype(at::kFloat));
  TORCH_CHECK(n <= 0x7fffffff, "feature_edges (cuda): at most 2^31 - 1 features per call");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (variant == "rowwise") {
    auto out = at::zeros({B, n}, grad.options().dtype(at::kFloat));
    const dim3 grid((unsigned)n, (unsigned)((B + ROWS - 1) / ROWS));
    EDGES_CUDA_DISPATCH(grad, TG, EDGES_CUDA_DISPATCH(decoder, TD,
        feature_edges_kernel<TG, TD><<<grid, THREADS, 0, stream>>>(
            grad.const_data_ptr<TG>(), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
            decoder.const_data_ptr<TD>(), decoder.stride(0), decoder.stride(1), decoder.stride(2),
            pos.const_data_ptr<int64_t>(), feat.const_data_ptr<int64_t>(), act.const_data_ptr<float>(),
            out.data_ptr<float>(), B, n, n_out, D);
        C10_CUDA_KERNEL_LAUNCH_CHECK()));
    return out;
  }
  // the plan needs the positions on the host: one copy, which waits for the queue (SourceEdges makes its
  // plans once per prompt and calls feature_edges_tiled instead)
  const auto [order_cpu, tiles_cpu] = feature_tiles(pos.cpu());
  const at::Tensor order = order_cpu.to(grad.device());
  return feature_edges_tiled_cuda(grad, decoder, tiles_cpu.to(grad.device()), tiles_cpu.size(0), order,
                                  feat.index_select(0, order), act.index_select(0, order), n);
}

at::Tensor feature_edges_tiled_cuda(const at::Tensor& grad, const at::Tensor& decoder, const at::Tensor& tiles,
                                   int64_t n_tiles, const at::Tensor& order, const at::Tensor& feat,
                                   const at::Tensor& act, int64_t n_cols) {
  // Checks that need no device data: the plan's contents are trusted (made by feature_tiles; columns
  // written by the first n_tiles tiles are < n_cols)
  TORCH_CHECK(grad.is_cuda() && decoder.device() == grad.device() && tiles.device() == grad.device() &&
                  order.device() == grad.device() && feat.device() == grad.device() && act.device() == grad.device(),
              "feature_edges_tiled: every tensor must be on grad's CUDA device");
  TORCH_CHECK(grad.dim() == 4 && decoder.dim() == 3 && decoder.size(1) == grad.size(1) &&
                  decoder.size(2) == grad.size(3),
              "feature_edges needs grad [B, n_out, n_pos, D] and decoder [F, n_out, D], got ", grad.sizes(),
              " and ", decoder.sizes());
  TORCH_CHECK(tiles.dim() == 2 && tiles.size(1) == 3 && tiles.scalar_type() == at::kLong && tiles.is_contiguous() &&
                  n_tiles >= 0 && n_tiles <= tiles.size(0),
              "feature_edges_tiled: tiles must be a contiguous int64 [T, 3] plan with n_tiles <= T");
  const int64_t n = order.numel();
  TORCH_CHECK(order.dim() == 1 && feat.dim() == 1 && act.dim() == 1 && feat.numel() == n && act.numel() == n &&
                  order.scalar_type() == at::kLong && feat.scalar_type() == at::kLong &&
                  act.scalar_type() == at::kFloat && order.is_contiguous() && feat.is_contiguous() &&
                  act.is_contiguous(),
              "feature_edges_tiled: order, feat (int64) and act (float32) must be contiguous, of one length");
  TORCH_CHECK(n_cols >= 0 && n_cols <= n && n_cols <= 0x7fffffff, "feature_edges_tiled: n_cols must lie in [0, ",
              n, "]");
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t B = grad.size(0), n_out = grad.size(1), D = grad.size(3);
  auto out = at::zeros({B, n_cols}, grad.options().dtype(at::kFloat));
  if (n_tiles == 0 || B == 0 || n_out == 0 || D == 0) return out;
  TORCH_CHECK(n_tiles <= 0x7fffffff && (B + BT - 1) / BT <= 65535, "feature_edges (cuda): too many tiles");
  const dim3 grid((unsigned)n_tiles, (unsigned)((B + BT - 1) / BT));
  EDGES_CUDA_DISPATCH(grad, TG, EDGES_CUDA_DISPATCH(decoder, TD,
      feature_edges_tiled_kernel<TG, TD><<<grid, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad.const_data_ptr<TG>(), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
          decoder.const_data_ptr<TD>(), decoder.stride(0), decoder.stride(1), decoder.stride(2),
          tiles.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), feat.const_data_ptr<int64_t>(),
          act.const_data_ptr<float>(), out.data_ptr<float>(), B, n_cols, n_out, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK()));
  return out;
}
