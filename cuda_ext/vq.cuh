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
// one vector row r of one token and keeps its v partial sums in registers; the part's codebook (the lookup
// table) is staged in shared memory when it fits.
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

// W[(r*v + t), cols[c]] = (or +=) centroids[idx[c][r]][t]; W is float32 [out, in] row-major.
__global__ void vq_lookup_kernel(VQPart p, float* __restrict__ W, int64_t in_features, bool accumulate) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.rows * p.ncols) return;
  const int64_t c = i / p.rows, r = i % p.rows;  // consecutive threads: consecutive rows of one column
  const int64_t col = p.cols[c];
  const float* centroid = p.centroids + static_cast<int64_t>(p.idx[i]) * p.v;
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

// acc[token, r*v + t] (+)= sum_c centroids[idx[c][r]][t] * xs[token, cols[c]]; acc float32 [tokens, out],
// xs float32 [tokens, in]. Grid: (ceil(rows / threads), tokens).
__global__ void vq_gemv_kernel(VQPart p, const float* __restrict__ xs, float* __restrict__ acc, int64_t in_features,
                               int64_t out_features, bool accumulate, bool staged) {
  extern __shared__ float table[];
  const float* book = p.centroids;
  if (staged) {
    for (int i = threadIdx.x; i < p.k * p.v; i += blockDim.x) table[i] = p.centroids[i];
    __syncthreads();
    book = table;
  }
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t token = blockIdx.y;
  if (r >= p.rows) return;
  float sum[VQ_MAX_VECTOR];
  for (int t = 0; t < p.v; ++t) sum[t] = 0.0f;
  const float* x = xs + token * in_features;
  for (int64_t c = 0; c < p.ncols; ++c) {
    const float xv = x[p.cols[c]];
    const float* centroid = book + static_cast<int64_t>(p.idx[c * p.rows + r]) * p.v;
    for (int t = 0; t < p.v; ++t) sum[t] += centroid[t] * xv;
  }
  float* y = acc + token * out_features + r * p.v;
  for (int t = 0; t < p.v; ++t) y[t] = accumulate ? y[t] + sum[t] : sum[t];
}

inline void launch_vq_gemv(const VQPart& p, const float* xs, float* acc, int64_t tokens, int64_t in_features,
                           int64_t out_features, bool accumulate, cudaStream_t s) {
  if (p.rows == 0 || tokens == 0) return;
  const bool staged = static_cast<int64_t>(p.k) * p.v <= VQ_SMEM_FLOATS;
  const dim3 grid(static_cast<unsigned>((p.rows + VQ_THREADS - 1) / VQ_THREADS), static_cast<unsigned>(tokens));
  const size_t smem = staged ? sizeof(float) * p.k * p.v : 0;
  vq_gemv_kernel<<<grid, VQ_THREADS, smem, s>>>(p, xs, acc, in_features, out_features, accumulate, staged);
}

}  // namespace omniq
