// Attribution edge kernels on CUDA. Same contract as csrc/edges.cpp:
//     out[b, i] = act[i] * sum_o decoder[feat[i], o, :] . grad[b, o, pos[i], :]
//   grad [B, n_out, n_pos, D], decoder [F, n_out, D]: any strides, float32 / bfloat16 / float16 / float64;
//   accumulation and output in float32.
//
// One thread block per (feature, tile of ROWS batch rows). The block stages the feature's decoder row in
// shared memory, CHUNK floats at a time, with consecutive threads reading consecutive elements (coalesced),
// so each decoder row is read from global memory once per row tile. Each warp then owns ROWS / WARPS batch
// rows: its lanes stride along D (coalesced gradient reads where D has unit stride), and a shuffle
// reduction folds the 32 partial sums of each row.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

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

#define EDGES_CUDA_DISPATCH(tensor, T, ...)                                                       \
  switch ((tensor).scalar_type()) {                                                               \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }                                     \
    case at::kBFloat16: { using T = at::BFloat16; __VA_ARGS__; break; }                           \
    case at::kHalf: { using T = at::Half; __VA_ARGS__; break; }                                   \
    case at::kDouble: { using T = double; __VA_ARGS__; break; }                                   \
    default: TORCH_CHECK(false, "edge kernels: unsupported dtype ", (tensor).scalar_type());       \
  }

}  // namespace

at::Tensor feature_edges_cuda(const at::Tensor& grad, const at::Tensor& pos_in, const at::Tensor& feat_in,
                              const at::Tensor& act_in, const at::Tensor& decoder) {
  TORCH_CHECK(grad.is_cuda() && decoder.is_cuda() && decoder.device() == grad.device(),
              "feature_edges (cuda): grad and decoder must be on the same CUDA device");
  TORCH_CHECK(grad.dim() == 4 && decoder.dim() == 3 && decoder.size(1) == grad.size(1) &&
                  decoder.size(2) == grad.size(3),
              "feature_edges needs grad [B, n_out, n_pos, D] and decoder [F, n_out, D], got ", grad.sizes(),
              " and ", decoder.sizes());
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor pos = pos_in.to(grad.device(), at::kLong).contiguous();
  const at::Tensor feat = feat_in.to(grad.device(), at::kLong).contiguous();
  const at::Tensor act = act_in.to(grad.device(), at::kFloat).contiguous();
  const int64_t B = grad.size(0), n_out = grad.size(1), D = grad.size(3), n = feat.numel();
  TORCH_CHECK(pos.numel() == n && act.numel() == n, "pos, feat and act must have the same length");
  auto out = at::zeros({B, n}, grad.options().dtype(at::kFloat));
  if (n == 0 || B == 0 || n_out == 0 || D == 0) return out;
  TORCH_CHECK(n <= 0x7fffffff, "feature_edges (cuda): at most 2^31 - 1 features per call");
  const dim3 grid((unsigned)n, (unsigned)((B + ROWS - 1) / ROWS));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  EDGES_CUDA_DISPATCH(grad, TG, EDGES_CUDA_DISPATCH(decoder, TD,
      feature_edges_kernel<TG, TD><<<grid, THREADS, 0, stream>>>(
          grad.const_data_ptr<TG>(), grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3),
          decoder.const_data_ptr<TD>(), decoder.stride(0), decoder.stride(1), decoder.stride(2),
          pos.const_data_ptr<int64_t>(), feat.const_data_ptr<int64_t>(), act.const_data_ptr<float>(),
          out.data_ptr<float>(), B, n, n_out, D);
      C10_CUDA_KERNEL_LAUNCH_CHECK()));
  return out;
}

// Sources with one vector each are features with feature id = position = row and activation 1.
at::Tensor vector_edges_cuda(const at::Tensor& grad, const at::Tensor& vectors) {
  TORCH_CHECK(grad.dim() == 3 && vectors.dim() == 2 && grad.size(1) == vectors.size(0) &&
                  grad.size(2) == vectors.size(1),
              "vector_edges needs grad [B, R, D] and vectors [R, D], got ", grad.sizes(), " and ", vectors.sizes());
  const auto rows = at::arange(grad.size(1), grad.options().dtype(at::kLong));
  const auto ones = at::ones({grad.size(1)}, grad.options().dtype(at::kFloat));
  return feature_edges_cuda(grad.unsqueeze(1), rows, rows, ones, vectors.unsqueeze(1));
}
