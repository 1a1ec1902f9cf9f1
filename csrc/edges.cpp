// Attribution edge kernels on the CPU (C++/OpenMP), exposed to Python as `circuits._edges`.
//
// feature_edges: for the active features of one source layer
//     out[b, i] = act[i] * sum_o decoder[feat[i], o, :] . grad[b, o, pos[i], :]
//   grad    [B, n_out, n_pos, D]  any strides, float32 / bfloat16 / float16 (read in place)
//   decoder [F, n_out, D]         any strides, float32 / bfloat16 / float16 (read in place)
//   pos, feat [n] int64; act [n] float32; out [B, n] float32
//
// Why it is fast: features active at the same position share their gradient rows, so one position's
// edges are a small matrix product [B, D] x [D, k]. Work items are (chunk of <= 128 features at one
// position, block of batch rows). An item copies its decoder rows, in K blocks of <= 1024, into a float32
// panel transposed for an outer-product micro-kernel: the copy converts the dtype, absorbs any strides and
// is reused by every batch row of the item. float32 gradient rows are read in place (other dtypes or a
// non-unit stride along D are converted row by row). The micro-kernel keeps a tile of 6 batch rows x 32
// features in registers, so its inner loop is vector loads, broadcasts and FMAs only; decoder rows of the
// next block and gradient rows of the next tile are prefetched. Memory beyond the output: per thread one
// panel of at most 1024 x 128 floats and a conversion buffer, never n x n_out x D.
#include <torch/extension.h>

#include "tiles.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int KC = 1024;        // K block: floats of one decoder row per packed panel (6 gradient rows fit L1)
constexpr int MAX_FEATS = 128;  // features per work item
constexpr int MAX_ROWS = 256;   // batch rows per work item

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#define PREFETCH(address) __builtin_prefetch((address), 0, 2)
#else
#define ALWAYS_INLINE inline
#define PREFETCH(address) ((void)0)
#endif

// -- the micro-kernel -----------------------------------------------------------------------------
// C[MR][NV*W] += G^T A over kc steps: G = MR gradient rows read in place (one scalar per row and step,
// broadcast), A = the decoder rows of the item's features packed transposed, [kc][lda] (features along the
// vector lanes). Written with GCC/Clang vector extensions so one source serves SSE2, AVX2 and AVX-512:
// the wrappers below compile it under different target attributes and the best is picked at run time.
#if defined(__GNUC__)
template <int MR, int NV, int W, bool PREFETCH = false>
ALWAYS_INLINE void micro_tile(const float* const* __restrict g, const float* __restrict A, int lda, int kc,
                              float* __restrict C, int ldc, const float* const* __restrict next = nullptr) {
  typedef float V __attribute__((vector_size(W * 4), aligned(4)));
  const float* row[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) row[r] = g[r];
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int d = 0; d < kc; ++d, A += lda) {
    if constexpr (PREFETCH) {
      // the next tile's gradient rows are far apart in memory (one row per target): fetch them early,
      // one cache line per row every 16 steps
      if ((d & 15) == 0)
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) PREFETCH(next[r] + d);
    }
    V a[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) a[v] = *reinterpret_cast<const V*>(A + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V x = row[r][d] - V{};  // broadcast (x - 0 == x exactly, so this compiles to a plain splat)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += x * a[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<V*>(C + r * ldc + v * W) += acc[r][v];
}
#else
template <int MR, int NV, int W, bool PREFETCH_NEXT = false>
inline void micro_tile(const float* const* g, const float* A, int lda, int kc, float* C, int ldc,
                       const float* const* = nullptr) {
  for (int d = 0; d < kc; ++d)
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NV * W; ++c) C[r * ldc + c] += g[r][d] * A[d * lda + c];
}
#endif

// One micro-tile of nv <= NV vectors (a run-time width, dispatched to the compiled ones).
template <int MR, int NV, int W>
ALWAYS_INLINE void tile(int nv, bool prefetch, const float* const* g, const float* A, int lda, int kc, float* C,
                        const float* const* next) {
  switch (nv * 2 + (prefetch ? 1 : 0)) {
    case 2: micro_tile<MR, 1, W, false>(g, A, lda, kc, C, lda); break;
    case 3: micro_tile<MR, 1, W, true>(g, A, lda, kc, C, lda, next); break;
    case 4: if constexpr (NV >= 2) micro_tile<MR, 2, W, false>(g, A, lda, kc, C, lda); break;
    case 5: if constexpr (NV >= 2) micro_tile<MR, 2, W, true>(g, A, lda, kc, C, lda, next); break;
    case 6: if constexpr (NV >= 3) micro_tile<MR, 3, W, false>(g, A, lda, kc, C, lda); break;
    case 7: if constexpr (NV >= 3) micro_tile<MR, 3, W, true>(g, A, lda, kc, C, lda, next); break;
    case 8: if constexpr (NV >= 4) micro_tile<MR, 4, W, false>(g, A, lda, kc, C, lda); break;
    case 9: if constexpr (NV >= 4) micro_tile<MR, 4, W, true>(g, A, lda, kc, C, lda, next); break;
    default: break;
  }
}

// C[n_rows_pad][n_feat_pad] += rows . A for all tiles. rows: n_rows pointers to kc floats each; the last
// row is repeated to fill a tile (C has room for it), and narrower tiles take the feature tail.
template <int MR, int NV, int W>
ALWAYS_INLINE void block_product(const float* const* rows, int n_rows, const float* A, int n_feat_pad, int kc,
                                 float* C) {
  for (int r0 = 0; r0 < n_rows; r0 += MR) {
    const float *g[MR], *next[MR];
    for (int r = 0; r < MR; ++r) {
      g[r] = rows[std::min(r0 + r, n_rows - 1)];
      next[r] = rows[std::min(r0 + MR + r, n_rows - 1)];
    }
    float* c = C + (int64_t)r0 * n_feat_pad;
    // tiles of NV vectors, except that a last tile of one vector (too few accumulators to hide the FMA
    // latency) is avoided by splitting NV + 1 into (NV - 1) + 2; the first tile prefetches the next rows
    int v0 = 0;
    for (int left = n_feat_pad / W; left > 0;) {
      const int nv = left == NV + 1 ? NV - 1 : std::min(left, NV);
      tile<MR, NV, W>(nv, v0 == 0, g, A + v0, n_feat_pad, kc, c + v0, next);
      v0 += nv * W;
      left -= nv;
    }
  }
}

using BlockFn = void (*)(const float* const*, int, const float*, int, int, float*);

struct Kernel {
  const char* name;
  int mr, w;  // rows per tile, feature lanes per vector
  BlockFn block;
};

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// 256-bit vectors even with AVX-512: the 32 registers allow a 6 x 32 tile, and 8-lane feature tails waste less
__attribute__((target("avx512f,avx512vl,fma"))) void block_avx512(const float* const* rows, int n_rows,
                                                                   const float* A, int nf, int kc, float* C) {
  block_product<6, 4, 8>(rows, n_rows, A, nf, kc, C);
}
__attribute__((target("avx2,fma"))) void block_avx2(const float* const* rows, int n_rows, const float* A, int nf,
                                                     int kc, float* C) {
  block_product<6, 2, 8>(rows, n_rows, A, nf, kc, C);
}
#endif
void block_generic(const float* const* rows, int n_rows, const float* A, int nf, int kc, float* C) {
  block_product<4, 3, 4>(rows, n_rows, A, nf, kc, C);
}

Kernel pick_kernel() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  const char* forced = std::getenv("GEMMA_CIRCUITS_SIMD");  // for tests and benchmarks: avx512|avx2|generic
  const std::string want = forced ? forced : "";
  if ((want.empty() || want == "avx512") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
    return {"avx512", 6, 8, block_avx512};
  if ((want.empty() || want == "avx512" || want == "avx2") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return {"avx2", 6, 8, block_avx2};
#endif
  return {"generic", 4, 4, block_generic};
}

const Kernel& kernel() {
  static const Kernel k = pick_kernel();
  return k;
}

// -- aligned per-thread scratch -------------------------------------------------------------------
struct Scratch {
  float* p = nullptr;
  size_t n = 0;
  float* get(size_t want) {
    if (want > n) {
      std::free(p);
      n = (want + 15) / 16 * 16;
      p = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
      TORCH_CHECK(p != nullptr, "edge kernel: out of memory for a ", n, "-float panel");
    }
    return p;
  }
  ~Scratch() { std::free(p); }
};

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// -- packing: any dtype, any strides -> float32 ---------------------------------------------------
// Decoder rows of one item, transposed to [kc][n_pad] (features along the vector lanes; padding is zero).
template <typename T>
void pack_decoder_t(const T* base, const int64_t* offsets, int n, int n_pad, int64_t stride_d, int64_t d0, int kc,
                    float* out) {
  // 8 rows at a time, so that each step writes 8 adjacent floats of the transposed panel
  constexpr int R = 8;
  for (int j0 = 0; j0 < n_pad; j0 += R) {
    const T* src[R];
    int m = std::min(R, n - j0);
    for (int r = 0; r < R; ++r) src[r] = r < m ? base + offsets[j0 + r] + d0 * stride_d : nullptr;
    float* dst = out + j0;
    if (m == R && stride_d == 1) {
      for (int d = 0; d < kc; ++d, dst += n_pad)
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) dst[r] = static_cast<float>(src[r][d]);
    } else {
      for (int d = 0; d < kc; ++d, dst += n_pad)
        for (int r = 0; r < std::min(R, n_pad - j0); ++r)
          dst[r] = r < m ? static_cast<float>(src[r][d * stride_d]) : 0.f;
    }
  }
}

// kc elements of one gradient row as contiguous float32.
template <typename T>
void convert_row_t(const T* src, int64_t stride_d, int kc, float* dst) {
  if (stride_d == 1) {
    for (int d = 0; d < kc; ++d) dst[d] = static_cast<float>(src[d]);
  } else {
    for (int d = 0; d < kc; ++d) dst[d] = static_cast<float>(src[d * stride_d]);
  }
}

#define EDGES_DISPATCH(tensor, T, ...)                                                            \
  switch ((tensor).scalar_type()) {                                                               \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }                                     \
    case at::kBFloat16: { using T = at::BFloat16; __VA_ARGS__; break; }                           \
    case at::kHalf: { using T = at::Half; __VA_ARGS__; break; }                                   \
    case at::kDouble: { using T = double; __VA_ARGS__; break; }                                   \
    default: TORCH_CHECK(false, "edge kernels: unsupported dtype ", (tensor).scalar_type());       \
  }

void check_float_type(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || s == at::kDouble, name,
              " must be float32, bfloat16, float16 or float64, got ", s);
}

int num_threads() { return std::max(1, at::get_num_threads()); }

// -- feature_edges ------------------------------------------------------------------------------------
struct Item {
  int64_t start;  // into the position-sorted order
  int n_feat;
  int64_t pos;
  int64_t b0;
  int n_rows;
};

at::Tensor feature_edges(const at::Tensor& grad, const at::Tensor& pos_in, const at::Tensor& feat_in,
                         const at::Tensor& act_in, const at::Tensor& decoder) {
  TORCH_CHECK(grad.device().is_cpu() && decoder.device().is_cpu(), "feature_edges (cpp): CPU tensors only");
  TORCH_CHECK(grad.dim() == 4, "grad must be [B, n_out, n_pos, D], got ", grad.sizes());
  TORCH_CHECK(decoder.dim() == 3, "decoder must be [F, n_out, D], got ", decoder.sizes());
  check_float_type(grad, "grad");
  check_float_type(decoder, "decoder");
  const int64_t B = grad.size(0), n_out = grad.size(1), n_pos = grad.size(2), D = grad.size(3);
  const int64_t F = decoder.size(0);
  TORCH_CHECK(decoder.size(1) == n_out && decoder.size(2) == D, "decoder ", decoder.sizes(),
              " does not match grad ", grad.sizes(), " (need [F, n_out, D])");
  const at::Tensor pos = pos_in.to(at::kLong).contiguous();
  const at::Tensor feat = feat_in.to(at::kLong).contiguous();
  const at::Tensor act = act_in.to(at::kFloat).contiguous();
  const int64_t n = feat.numel();
  TORCH_CHECK(pos.numel() == n && act.numel() == n, "pos, feat and act must have the same length");
  if (n == 0 || B == 0 || n_out == 0 || D == 0) return at::zeros({B, n}, grad.options().dtype(at::kFloat));
  auto out = at::empty({B, n}, grad.options().dtype(at::kFloat));  // every entry is written below
  const int64_t* P = pos.const_data_ptr<int64_t>();
  const int64_t* Fi = feat.const_data_ptr<int64_t>();
  const float* A = act.const_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(P[i] >= 0 && P[i] < n_pos, "pos[", i, "] = ", P[i], " is outside [0, ", n_pos, ")");
    TORCH_CHECK(Fi[i] >= 0 && Fi[i] < F, "feat[", i, "] = ", Fi[i], " is outside [0, ", F, ")");
  }
  float* O = out.data_ptr<float>();

  // counting sort by position (stable): features at one position share their gradient rows
  std::vector<int64_t> count(n_pos + 1, 0), order(n);
  for (int64_t i = 0; i < n; ++i) ++count[P[i] + 1];
  for (int64_t p = 0; p < n_pos; ++p) count[p + 1] += count[p];
  {
    std::vector<int64_t> fill(count.begin(), count.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[fill[P[i]]++] = i;
  }
  int64_t n_chunks = 0;
  for (int64_t p = 0; p < n_pos; ++p) n_chunks += (count[p + 1] - count[p] + MAX_FEATS - 1) / MAX_FEATS;
  // Each item packs its decoder rows once and reuses them for all its batch rows, so items take as many
  // rows as possible, split only to give every thread several items.
  const int threads = num_threads();
  int64_t rows = std::min<int64_t>(B, MAX_ROWS);
  while (rows > 16 && n_chunks * ((B + rows - 1) / rows) < 4 * threads) rows = (rows + 1) / 2;
  std::vector<Item> items;
  for (int64_t p = 0; p < n_pos; ++p)
    for (int64_t s = count[p]; s < count[p + 1]; s += MAX_FEATS)
      for (int64_t b0 = 0; b0 < B; b0 += rows)
        items.push_back({s, (int)std::min<int64_t>(MAX_FEATS, count[p + 1] - s), p, b0,
                         (int)std::min<int64_t>(rows, B - b0)});

  const Kernel& K = kernel();
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1), gs2 = grad.stride(2), gs3 = grad.stride(3);
  const int64_t ds0 = decoder.stride(0), ds1 = decoder.stride(1), ds2 = decoder.stride(2);
  // gradients are read in place when they are float32 with unit stride along D; otherwise converted per item
  const bool grad_in_place = grad.scalar_type() == at::kFloat && (gs3 == 1 || D == 1);
  const float* grad_f = grad_in_place ? grad.const_data_ptr<float>() : nullptr;
  const int64_t n_items = (int64_t)items.size();
  const char* dec_bytes = static_cast<const char*>(decoder.const_data_ptr());
  const int64_t elem = decoder.element_size();
  auto prefetch_decoder = [&](const Item& w, int64_t o, int64_t d0) {
    if (ds2 != 1) return;
    const int64_t bytes = std::min<int64_t>(KC, D - d0) * elem;
    for (int j = 0; j < w.n_feat; ++j) {
      const char* row = dec_bytes + (Fi[order[w.start + j]] * ds0 + o * ds1 + d0) * elem;
      for (int64_t b = 0; b < bytes; b += 64) PREFETCH(row + b);
    }
  };

#pragma omp parallel num_threads(threads)
  {
    // kept per thread across calls: OpenMP threads persist, and fresh large buffers would page-fault every call
    static thread_local Scratch a_buf, g_buf, c_buf;
    std::vector<int64_t> dec_off(MAX_FEATS);
    std::vector<const float*> row_ptr(MAX_ROWS);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item& w = items[it];
      const int nf_pad = round_up(w.n_feat, K.w), nb_pad = round_up(w.n_rows, K.mr);
      float* C = c_buf.get((size_t)nf_pad * nb_pad);
      std::memset(C, 0, sizeof(float) * nf_pad * nb_pad);
      for (int64_t o = 0; o < n_out; ++o) {
        for (int j = 0; j < w.n_feat; ++j) dec_off[j] = Fi[order[w.start + j]] * ds0 + o * ds1;
        for (int64_t d0 = 0; d0 < D; d0 += KC) {
          const int kc = (int)std::min<int64_t>(KC, D - d0);
          // decoder rows are scattered across a large matrix: while this block computes, fetch the next
          // block's rows (the next K block, output layer or item)
          if (d0 + KC < D) prefetch_decoder(w, o, d0 + KC);
          else if (o + 1 < n_out) prefetch_decoder(w, o + 1, 0);
          else if (it + 1 < n_items) prefetch_decoder(items[it + 1], 0, 0);
          float* Ap = a_buf.get((size_t)kc * nf_pad);
          EDGES_DISPATCH(decoder, T,
                         pack_decoder_t(decoder.const_data_ptr<T>(), dec_off.data(), w.n_feat, nf_pad, ds2, d0, kc, Ap));
          const int64_t row0 = w.b0 * gs0 + o * gs1 + w.pos * gs2;
          if (grad_in_place) {
            for (int c = 0; c < w.n_rows; ++c) row_ptr[c] = grad_f + row0 + c * gs0 + d0;
          } else {
            float* Gp = g_buf.get((size_t)w.n_rows * kc);
            EDGES_DISPATCH(grad, T, for (int c = 0; c < w.n_rows; ++c) {
              convert_row_t(grad.const_data_ptr<T>() + row0 + c * gs0 + d0 * gs3, gs3, kc, Gp + (int64_t)c * kc);
              row_ptr[c] = Gp + (int64_t)c * kc;
            });
          }
          K.block(row_ptr.data(), w.n_rows, Ap, nf_pad, kc, C);
        }
      }
      for (int c = 0; c < w.n_rows; ++c) {
        float* orow = O + (w.b0 + c) * n;
        const float* crow = C + (int64_t)c * nf_pad;
        for (int j = 0; j < w.n_feat; ++j) {
          const int64_t col = order[w.start + j];
          orow[col] = A[col] * crow[j];
        }
      }
    }
  }
  return out;
}

// -- influence: one transposed pass over CSR rows ---------------------------------------------------
// out[indices[k]] += |data[k]| * row_weight[r] for every entry k of row r, accumulated in float64: the step
// of attribution's influence estimate, in one pass over the edges without a copy of |data| (scipy needs an
// absolute copy, a CSR built around it, and a transposed product).
template <typename I>
void abs_rmatvec_t(const I* indptr, const I* indices, const float* data, const double* row_weight, int64_t rows,
                   double* out, int64_t n_out) {
  // rows split by edge count among threads, each summing into its own copy of out (out is small: the
  // sources), added to out only when every column was inside it
  const int64_t nnz = indptr[rows];
  const int threads = (int)std::min<int64_t>(num_threads(), std::max<int64_t>(1, nnz / (1 << 20)));
  std::vector<std::vector<double>> partial(threads, std::vector<double>(n_out, 0.0));
  std::vector<int64_t> bad(threads, 0);
  std::vector<char> seen_bad(threads, 0);  // a column outside out was seen (and skipped)
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
  for (int t = 0; t < threads; ++t) {
    double* acc = partial[t].data();
    const int64_t lo = nnz * t / threads, hi = nnz * (t + 1) / threads;  // this thread's rows: starting in [lo, hi)
    int64_t r = std::upper_bound(indptr, indptr + rows + 1, (I)lo) - indptr - 1;
    for (; r < rows && (int64_t)indptr[r] < hi; ++r) {
      if ((int64_t)indptr[r] < lo && t > 0) continue;  // started in the previous thread's range
      const double w = row_weight[r];
      if (w == 0.0) continue;
      for (int64_t k = indptr[r]; k < (int64_t)indptr[r + 1]; ++k) {
        const int64_t c = indices[k];
        if (c < 0 || c >= n_out) {
          bad[t] = c;
          seen_bad[t] = 1;
          continue;
        }
        acc[c] += std::fabs((double)data[k]) * w;
      }
    }
  }
  for (int t = 0; t < threads; ++t)
    TORCH_CHECK(!seen_bad[t], "abs_rmatvec: column ", bad[t], " is outside [0, ", n_out, ")");
  for (const auto& p : partial)
    for (int64_t c = 0; c < n_out; ++c) out[c] += p[c];
}

void abs_rmatvec(const at::Tensor& indptr, const at::Tensor& indices, const at::Tensor& data,
                 const at::Tensor& row_weight, at::Tensor& out) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&indptr, &indices, &data, &row_weight, &out})
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 1 && t->is_contiguous(),
                "abs_rmatvec: contiguous 1-d CPU tensors only");
  TORCH_CHECK(indptr.scalar_type() == indices.scalar_type() &&
                  (indptr.scalar_type() == at::kInt || indptr.scalar_type() == at::kLong),
              "abs_rmatvec: indptr and indices must both be int32 or both int64");
  TORCH_CHECK(data.scalar_type() == at::kFloat && row_weight.scalar_type() == at::kDouble &&
                  out.scalar_type() == at::kDouble, "abs_rmatvec: data float32, row_weight and out float64");
  const int64_t rows = row_weight.numel();
  TORCH_CHECK(indptr.numel() == rows + 1, "abs_rmatvec: indptr has ", indptr.numel(), " entries for ", rows, " rows");
  const at::Tensor ends = indptr.to(at::kLong);
  const int64_t* E = ends.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(E[r] >= 0 && E[r] <= E[r + 1], "abs_rmatvec: indptr must be non-decreasing from 0");
  TORCH_CHECK(E[rows] <= data.numel() && data.numel() == indices.numel(),
              "abs_rmatvec: indptr points past the ", data.numel(), " entries");
  if (indptr.scalar_type() == at::kInt)
    abs_rmatvec_t(indptr.const_data_ptr<int32_t>(), indices.const_data_ptr<int32_t>(), data.const_data_ptr<float>(),
                  row_weight.const_data_ptr<double>(), rows, out.data_ptr<double>(), out.numel());
  else
    abs_rmatvec_t(indptr.const_data_ptr<int64_t>(), indices.const_data_ptr<int64_t>(), data.const_data_ptr<float>(),
                  row_weight.const_data_ptr<double>(), rows, out.data_ptr<double>(), out.numel());
}

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> feature_tiles(const at::Tensor& pos_in) {
  TORCH_CHECK(pos_in.device().is_cpu() && pos_in.dim() == 1, "feature_tiles: pos must be a 1-d CPU tensor, got ",
              pos_in.sizes(), " on ", pos_in.device());
  const at::Tensor pos = pos_in.to(at::kLong).contiguous();
  const int64_t n = pos.numel();
  const int64_t* P = pos.const_data_ptr<int64_t>();
  at::Tensor order = at::arange(n, pos.options());
  int64_t* O = order.data_ptr<int64_t>();
  std::stable_sort(O, O + n, [P](int64_t a, int64_t b) { return P[a] < P[b]; });
  std::vector<int64_t> tiles;
  for (int64_t run = 0; run < n;) {  // one run of equal positions, cut into tiles
    const int64_t p = P[O[run]];
    TORCH_CHECK(p >= 0, "feature_tiles: pos[", O[run], "] = ", p, " is negative");
    int64_t end = run;
    while (end < n && P[O[end]] == p) ++end;
    for (int64_t s = run; s < end; s += kTileFeatures)
      tiles.insert(tiles.end(), {s, std::min<int64_t>(kTileFeatures, end - s), p});
    run = end;
  }
  const int64_t n_tiles = (int64_t)tiles.size() / 3;
  return {order, at::from_blob(tiles.data(), {n_tiles, 3}, at::kLong).clone()};
}

#ifdef WITH_CUDA
at::Tensor feature_edges_cuda(const at::Tensor& grad, const at::Tensor& pos, const at::Tensor& feat,
                              const at::Tensor& act, const at::Tensor& decoder, const std::string& variant);
at::Tensor feature_edges_tiled_cuda(const at::Tensor& grad, const at::Tensor& decoder, const at::Tensor& tiles,
                                   int64_t n_tiles, const at::Tensor& order, const at::Tensor& feat,
                                   const at::Tensor& act, int64_t n_cols);
#endif

namespace {
// `variant` picks the CUDA kernel (tiled, or rowwise); the CPU has one
at::Tensor feature_edges_any(const at::Tensor& grad, const at::Tensor& pos, const at::Tensor& feat,
                             const at::Tensor& act, const at::Tensor& decoder, const std::string& variant) {
#ifdef WITH_CUDA
  if (grad.is_cuda()) return feature_edges_cuda(grad, pos, feat, act, decoder, variant);
#endif
  return feature_edges(grad, pos, feat, act, decoder);
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gemma-circuits attribution edge kernels (C++/OpenMP, optional CUDA)";
  // the kernels release the GIL: other Python threads (progress bars, data loading) keep running
  m.def("feature_edges", &feature_edges_any, "out[b,i] = act[i] * sum_o decoder[feat[i],o,:] . grad[b,o,pos[i],:]",
        py::arg("grad"), py::arg("pos"), py::arg("feat"), py::arg("act"), py::arg("decoder"),
        py::arg("variant") = "tiled", py::call_guard<py::gil_scoped_release>());
  m.def("feature_tiles", &feature_tiles, "(order, tiles [n_tiles, 3]: first sorted index, length, position) "
        "of the tiled CUDA kernel for features at positions pos (CPU)", py::arg("pos"));
  m.attr("TILE_FEATURES") = kTileFeatures;
#ifdef WITH_CUDA
  m.def("feature_edges_tiled", &feature_edges_tiled_cuda, "the tiled CUDA kernel on a plan from feature_tiles: "
        "feat and act in position order, the first n_tiles tiles, output [B, n_cols] at columns order[i]",
        py::arg("grad"), py::arg("decoder"), py::arg("tiles"), py::arg("n_tiles"), py::arg("order"), py::arg("feat"),
        py::arg("act"), py::arg("n_cols"), py::call_guard<py::gil_scoped_release>());
#endif
  m.def("abs_rmatvec", &abs_rmatvec, "out[indices[k]] += |data[k]| * row_weight[r] over the entries k of CSR row r",
        py::arg("indptr"), py::arg("indices"), py::arg("data"), py::arg("row_weight"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>());
  m.def("has_cuda", &has_cuda, "built with the CUDA kernels");
  m.def("has_openmp", &openmp_enabled, "built with OpenMP");
  m.def("simd", []() { return std::string(kernel().name); }, "the micro-kernel chosen for this CPU");
}
