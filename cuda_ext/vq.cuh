// Vector-quantized weights (VPTQ, omniq_lightning/quant/vq.py): dequantization and a codebook-lookup GEMV.
//
// Torch-free like fake_quant.cuh (nvcc compiles it alone in CI). The torch reference is
// VectorQuantizedWeight.dequantize: one codebook part ("main", "residual" or "outlier") covers a set of
// input columns `cols`; vector r of part column c holds rows [r*v, (r+1)*v) of input column cols[c], and is
// centroid idx[c][r] (indices stored column-major, [ncols, rows], so that a warp reads them coalesced).
// Parts are applied in order: main assigns, residual adds, outlier assigns its columns; then each input
// column j is de-normalised as w * std[j] + mean[j]. The kernels round each float operation separately
// (__fadd_rn, __fmul_rn: no FMA contraction), as torch does, so the result equals the reference bit for bit.
//
// The GEMV (y = x W^T for a few tokens, decoding) never forms W: with xs = x * std (per input column) and
// m = x . mean, y[o] = sum over parts and columns of centroid[idx][o - r*v] * xs[cols[c]] + m. One thread owns
// one vector row r of one token over one slice of the columns and keeps its v partial sums in registers; the
// slices' sums meet by atomic adds; the part's codebook (the lookup table) is staged in shared memory when it fits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace omniq {

constexpr int VQ_THREADS = 256;
constexpr int VQ_MAX_VECTOR = 16;
constexpr int VQ_SMEM_FLOATS = 12288;  // 48 KiB of float centroids

struct VQPart {
  const int32_t* idx;        // [ncols, rows], centroid index of every vector
  const float* centroids;    // [k, v]
  const int64_t* cols;       // [ncols], the input column of each part column
  int64_t rows;              // out_features / v
  int64_t ncols;
  int v;
  int k;
};

// W[(r*v + t), cols[c]] = (or +=) centroids[idx[c][r]][t]; W is float32 [out, in] row-major. Consecutive threads
// take consecutive part columns of one vector row, so that their writes (v floats each, the bulk of the traffic)
// land side by side in a row of W wherever the part's columns are contiguous.
__global__ void vq_lookup_kernel(VQPart p, float* __restrict__ W, int64_t in_features, bool accumulate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.rows * p.ncols) return;
  const int64_t r = i / p.ncols, c = i % p.ncols;
  const int64_t col = p.cols[c];
  const float* centroid = p.centroids + static_cast<int64_t>(p.idx[c * p.rows + r]) * p.v;
  for (int t = 0; t < p.v; ++t) {
    float* dst = W + (r * p.v + t) * in_features + col;
    *dst = accumulate ? __fadd_rn(*dst, centroid[t]) : centroid[t];
  }
}

// W[o, j] = W[o, j] * std[j] + mean[j], two roundings (torch: a multiply, then an add).
__global__ void vq_denormalize_kernel(float* __restrict__ W, const float* __restrict__ mean,
                                      const float* __restrict__ std, int64_t out_features, int64_t in_features) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= out_features * in_features) return;
  const int64_t j = i % in_features;
  W[i] = __fadd_rn(__fmul_rn(W[i], std[j]), mean[j]);
}

inline void launch_vq_lookup(const VQPart& p, float* W, int64_t in_features, bool accumulate, cudaStream_t s) {
  const int64_t n = p.rows * p.ncols;
  if (n == 0) return;
  vq_lookup_kernel<<<static_cast<unsigned>((n + VQ_THREADS - 1) / VQ_THREADS), VQ_THREADS, 0, s>>>(
      p, W, in_features, accumulate);
}

inline void launch_vq_denormalize(float* W, const float* mean, const float* std, int64_t out_features,
                                  int64_t in_features, cudaStream_t s) {
  const int64_t n = out_features * in_features;
  if (n == 0) return;
  vq_denormalize_kernel<<<static_cast<unsigned>((n + VQ_THREADS - 1) / VQ_THREADS), VQ_THREADS, 0, s>>>(
      W, mean, std, out_features, in_features);
}

// acc[token, r*v + t] += sum_c centroids[idx[c][r]][t] * xs[token, cols[c]]; acc float32 [tokens, out], zeroed
// before the first part; xs float32 [tokens, in]. Grid: (ceil(rows / threads), column splits, tokens): each block
// sums one slice of the part's columns (split-K, so that a single token still fills the device: SmolLM2's
// 576-wide q has 144 vector rows, one block) and adds its partial sums atomically. V is the vector length as a
// compile-time constant, so the v partial sums stay in registers.
template <int V>
__global__ void vq_gemv_kernel(VQPart p, const float* __restrict__ xs, float* __restrict__ acc, int64_t in_features,
                               int64_t out_features, int64_t cols_per_split, bool staged) {
  extern __shared__ float table[];
  const float* book = p.centroids;
  if (staged) {
    for (int i = threadIdx.x; i < p.k * V; i += blockDim.x) table[i] = p.centroids[i];
    __syncthreads();
    book = table;
  }
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t token = blockIdx.z;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t c1 = c0 + cols_per_split < p.ncols ? c0 + cols_per_split : p.ncols;
  if (r >= p.rows) return;
  float sum[V];
#pragma unroll
  for (int t = 0; t < V; ++t) sum[t] = 0.0f;
  const float* x = xs + token * in_features;
  for (int64_t c = c0; c < c1; ++c) {
    const float xv = x[p.cols[c]];
    const float* centroid = book + static_cast<int64_t>(p.idx[c * p.rows + r]) * V;
#pragma unroll
    for (int t = 0; t < V; ++t) sum[t] += centroid[t] * xv;
  }
  float* y = acc + token * out_features + r * V;
#pragma unroll
  for (int t = 0; t < V; ++t) atomicAdd(y + t, sum[t]);
}

constexpr int64_t VQ_GEMV_TARGET_BLOCKS = 1024;  // several waves on a 132-SM H100/H200
constexpr int64_t VQ_GEMV_MIN_COLS = 16;         // columns one block sums at least

template <int V>
inline void launch_vq_gemv_v(const VQPart& p, const float* xs, float* acc, int64_t tokens, int64_t in_features,
                             int64_t out_features, cudaStream_t s) {
  const bool staged = static_cast<int64_t>(p.k) * V <= VQ_SMEM_FLOATS;
  const int64_t row_blocks = (p.rows + VQ_THREADS - 1) / VQ_THREADS;
  int64_t splits = (VQ_GEMV_TARGET_BLOCKS + row_blocks * tokens - 1) / (row_blocks * tokens);
  const int64_t max_splits = (p.ncols + VQ_GEMV_MIN_COLS - 1) / VQ_GEMV_MIN_COLS;
  splits = splits < 1 ? 1 : (splits > max_splits ? max_splits : splits);
  const int64_t cols_per_split = (p.ncols + splits - 1) / splits;
  splits = (p.ncols + cols_per_split - 1) / cols_per_split;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits), static_cast<unsigned>(tokens));
  const size_t smem = staged ? sizeof(float) * p.k * V : 0;
  vq_gemv_kernel<V><<<grid, VQ_THREADS, smem, s>>>(p, xs, acc, in_features, out_features, cols_per_split, staged);
}

// Adds one part's products into acc (zeroed by the caller). tokens <= 65535 (the grid's z limit).
inline void launch_vq_gemv(const VQPart& p, const float* xs, float* acc, int64_t tokens, int64_t in_features,
                           int64_t out_features, cudaStream_t s) {
  if (p.rows == 0 || p.ncols == 0 || tokens == 0) return;
  switch (p.v) {
#define OMNIQ_VQ_CASE(N) \
  case N:                \
    return launch_vq_gemv_v<N>(p, xs, acc, tokens, in_features, out_features, s);
    OMNIQ_VQ_CASE(1) OMNIQ_VQ_CASE(2) OMNIQ_VQ_CASE(3) OMNIQ_VQ_CASE(4) OMNIQ_VQ_CASE(5) OMNIQ_VQ_CASE(6)
    OMNIQ_VQ_CASE(7) OMNIQ_VQ_CASE(8) OMNIQ_VQ_CASE(9) OMNIQ_VQ_CASE(10) OMNIQ_VQ_CASE(11) OMNIQ_VQ_CASE(12)
    OMNIQ_VQ_CASE(13) OMNIQ_VQ_CASE(14) OMNIQ_VQ_CASE(15) OMNIQ_VQ_CASE(16)
#undef OMNIQ_VQ_CASE
    default:
      return;  // the binding refuses v > VQ_MAX_VECTOR before launching
  }
}

}  // namespace omniq
