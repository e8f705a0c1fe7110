// Fused fake-quantization kernels: weight fake-quant with Learnable Weight Clipping (forward and
// backward) and dynamic per-token activation fake-quant (forward and backward).
//
// Torch-free on purpose: nvcc compiles this header alone (cuda_ext/compile_check.cu) in CI, and the
// torch bindings (cuda_ext/fake_quant.cu) only launch these kernels. The numerics mirror the
// pure-PyTorch reference in omniq_lightning/quant/functional.py, which documents the conventions:
// float32 arithmetic, round half to even, scale clamped below at SCALE_EPS, straight-through rounding,
// ranges taken from the values of each row: detached, or ("released", as the released OmniQuant code)
// differentiable, the row's min and max passing their gradient to the elements holding them.
//
// Layout: the input is a contiguous [rows, cols] matrix. A row is one quantization group (a group of
// a weight row, a whole output channel, or one token). One warp owns one row: it reduces the row's
// min and max with shuffles, then streams the row again to quantize (forward) or to form gradients
// and their per-row sums (backward). Reads are coalesced (lane i takes columns i, i+32, ...).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace omniq {

constexpr float SCALE_EPS = 1e-5f;
constexpr int WARP = 32;
constexpr int WARPS_PER_BLOCK = 8;
constexpr int THREADS = WARP * WARPS_PER_BLOCK;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Same expression as torch's CUDA sigmoid for float: 1 / (1 + exp(-x)).
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

struct QGrid {
  int bits;
  bool symmetric;
  __device__ __forceinline__ float qmin() const { return symmetric ? -float(1 << (bits - 1)) : 0.0f; }
  __device__ __forceinline__ float qmax() const {
    return symmetric ? float((1 << (bits - 1)) - 1) : float((1 << bits) - 1);
  }
  // The scale is range * (1 / qmax), not range / qmax: ATen computes a CUDA tensor divided by a scalar as a
  // multiply by the float reciprocal, and the reference writes the multiply explicitly, so that the reference
  // on the CPU, the reference on CUDA and these kernels all get the same scale, bit for bit.
  __device__ __forceinline__ float inv_qmax() const { return 1.0f / qmax(); }
};

// Scale and zero point of the grid covering [lo, hi]; `clamped` tells whether the scale hit SCALE_EPS
// (its gradient is then zero), `lo_wins` (symmetric only) which bound set max(|hi|, |lo|).
struct RowParams {
  float scale, zero;
  bool clamped;
};

__device__ __forceinline__ RowParams row_params(float lo, float hi, QGrid g) {
  RowParams p;
  float raw;
  if (g.symmetric) {
    raw = fmaxf(fabsf(hi), fabsf(lo)) * g.inv_qmax();
    p.scale = fmaxf(raw, SCALE_EPS);
    p.zero = 0.0f;
  } else {
    raw = (hi - lo) * g.inv_qmax();
    p.scale = fmaxf(raw, SCALE_EPS);
    p.zero = rintf(-lo / p.scale);
  }
  p.clamped = raw < SCALE_EPS;
  return p;
}

// A weight group's range on an asymmetric grid holds 0 (as GPTQ widens it), so its zero point is one of the codes.
__device__ __forceinline__ void widen_to_zero(float& lo, float& hi, QGrid g) {
  if (!g.symmetric) {
    lo = fminf(lo, 0.0f);
    hi = fmaxf(hi, 0.0f);
  }
}

template <typename T>
__device__ __forceinline__ void row_min_max(const T* row, int64_t cols, int lane, float& lo, float& hi) {
  float mn = INFINITY, mx = -INFINITY;
  for (int64_t c = lane; c < cols; c += WARP) {
    const float v = to_float(row[c]);
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
  }
  lo = warp_min(mn);
  hi = warp_max(mx);
}

__device__ __forceinline__ float fake_quant_value(float x, const RowParams& p, QGrid g) {
  const float q = fminf(fmaxf(rintf(x / p.scale) + p.zero, g.qmin()), g.qmax());
  return (q - p.zero) * p.scale;
}

// Forward: out = fake_quant(w) per row, with LWC bounds when gamma/beta are given (one logit per row).
template <typename T>
__global__ void __launch_bounds__(THREADS) weight_fq_forward_kernel(const T* __restrict__ w,
                                                                    const float* __restrict__ gamma,
                                                                    const float* __restrict__ beta,
                                                                    T* __restrict__ out, int64_t rows,
                                                                    int64_t cols, QGrid g) {
  const int lane = threadIdx.x % WARP;
  const int64_t r = int64_t(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.x / WARP;
  if (r >= rows) return;
  const T* row = w + r * cols;
  float lo, hi;
  row_min_max(row, cols, lane, lo, hi);
  widen_to_zero(lo, hi, g);
  if (gamma != nullptr) hi = sigmoid(gamma[r]) * hi;
  if (beta != nullptr) lo = sigmoid(beta[r]) * lo;
  const RowParams p = row_params(lo, hi, g);
  T* orow = out + r * cols;
  for (int64_t c = lane; c < cols; c += WARP) orow[c] = from_float<T>(fake_quant_value(to_float(row[c]), p, g));
}

// Gradient of a row's max and min to the elements holding them (ties share it, as torch's amax/amin do),
// added to their straight-through gradient: the "released" range convention. All lanes hold the sums.
template <typename T>
__device__ __forceinline__ void add_range_gradient(const T* row, const T* grow, T* gout, int64_t cols, int lane,
                                                   float lo_raw, float hi_raw, float d_hi_raw, float d_lo_raw,
                                                   float n_hi, float n_lo, const RowParams& p, QGrid g) {
  const float qmin = g.qmin(), qmax = g.qmax();
  for (int64_t c = lane; c < cols; c += WARP) {
    const float x = to_float(row[c]);
    if (x != hi_raw && x != lo_raw) continue;
    const float t = rintf(x / p.scale) + p.zero;
    float v = (t >= qmin && t <= qmax) ? to_float(grow[c]) : 0.0f;
    if (x == hi_raw) v += d_hi_raw / n_hi;
    if (x == lo_raw) v += d_lo_raw / n_lo;
    gout[c] = from_float<T>(v);
  }
}

// dL/dhi and dL/dlo from dL/d(range), where scale = range * (1/qmax): asymmetric range = hi - lo;
// symmetric range = max(|hi|, |lo|), ties sharing the gradient equally (as torch.maximum does).
__device__ __forceinline__ void range_to_bounds(float d_range, float lo, float hi, QGrid g, float& d_hi, float& d_lo) {
  if (g.symmetric) {
    const float ahi = fabsf(hi), alo = fabsf(lo);
    const float w_hi = ahi > alo ? 1.0f : (ahi < alo ? 0.0f : 0.5f);
    const float sgn_hi = hi > 0.0f ? 1.0f : (hi < 0.0f ? -1.0f : 0.0f);
    const float sgn_lo = lo > 0.0f ? 1.0f : (lo < 0.0f ? -1.0f : 0.0f);
    d_hi = d_range * w_hi * sgn_hi;
    d_lo = d_range * (1.0f - w_hi) * sgn_lo;
  } else {
    d_hi = d_range;
    d_lo = -d_range;
  }
}

// Backward of the weight fake-quant. grad_w is straight-through (zero where the grid clamps); grad_gamma and
// grad_beta are the exact gradients of the LWC bounds, reduced over the row. `released`: the zero point has
// no gradient and the row's min and max pass their gradient on to the elements holding them.
template <typename T>
__global__ void __launch_bounds__(THREADS) weight_fq_backward_kernel(
    const T* __restrict__ grad_out, const T* __restrict__ w, const float* __restrict__ gamma,
    const float* __restrict__ beta, T* __restrict__ grad_w, float* __restrict__ grad_gamma,
    float* __restrict__ grad_beta, int64_t rows, int64_t cols, QGrid g, bool released) {
  const int lane = threadIdx.x % WARP;
  const int64_t r = int64_t(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.x / WARP;
  if (r >= rows) return;
  const T* row = w + r * cols;
  const T* grow = grad_out + r * cols;
  float row_lo, row_hi;
  row_min_max(row, cols, lane, row_lo, row_hi);
  float lo_raw = row_lo, hi_raw = row_hi;
  widen_to_zero(lo_raw, hi_raw, g);
  const float sg = gamma != nullptr ? sigmoid(gamma[r]) : 1.0f;
  const float sb = beta != nullptr ? sigmoid(beta[r]) : 1.0f;
  const float hi = gamma != nullptr ? sg * hi_raw : hi_raw;
  const float lo = beta != nullptr ? sb * lo_raw : lo_raw;
  const RowParams p = row_params(lo, hi, g);
  const float qmin = g.qmin(), qmax = g.qmax();

  float g_scale = 0.0f;  // sum of dL/dy * dy/dscale
  float g_lo = 0.0f;     // sum of dL/dy * dy/dlo through the zero point (detached ranges, asymmetric, clamped)
  float n_hi = 0.0f, n_lo = 0.0f;  // how many elements hold the max and the min
  T* gw = grad_w + r * cols;
  for (int64_t c = lane; c < cols; c += WARP) {
    const float x = to_float(row[c]);
    const float dy = to_float(grow[c]);
    const float u = x / p.scale;
    const float t = rintf(u) + p.zero;
    const bool inside = t >= qmin && t <= qmax;
    gw[c] = from_float<T>(inside ? dy : 0.0f);
    if (inside) {
      g_scale += dy * (rintf(u) - u);
    } else {
      const float q = t < qmin ? qmin : qmax;
      if (g.symmetric) {
        g_scale += dy * q;
      } else if (released) {
        g_scale += dy * (q - p.zero);
      } else {
        g_scale += dy * ((q - p.zero) - lo / p.scale);
        g_lo += dy;
      }
    }
    n_hi += x == row_hi ? 1.0f : 0.0f;
    n_lo += x == row_lo ? 1.0f : 0.0f;
  }
  if (grad_gamma == nullptr && grad_beta == nullptr && !released) return;
  g_scale = warp_sum(g_scale);
  g_lo = warp_sum(g_lo);

  float d_hi, d_lo;
  range_to_bounds(p.clamped ? 0.0f : g_scale * g.inv_qmax(), lo, hi, g, d_hi, d_lo);
  d_lo += g_lo;
  if (lane == 0) {
    if (grad_gamma != nullptr) grad_gamma[r] = d_hi * (1.0f - sg) * sg * hi_raw;
    if (grad_beta != nullptr) grad_beta[r] = d_lo * (1.0f - sb) * sb * lo_raw;
  }
  if (!released) return;
  // through the widening (clamp(max=0) / clamp(min=0)): a bound passes its gradient while on its side of 0
  const float pass_lo = g.symmetric || row_lo <= 0.0f ? 1.0f : 0.0f;
  const float pass_hi = g.symmetric || row_hi >= 0.0f ? 1.0f : 0.0f;
  __syncwarp();  // this warp's straight-through writes above are visible to the lanes that overwrite them
  add_range_gradient(row, grow, gw, cols, lane, row_lo, row_hi, (gamma != nullptr ? d_hi * sg : d_hi) * pass_hi,
                     (beta != nullptr ? d_lo * sb : d_lo) * pass_lo, warp_sum(n_hi), warp_sum(n_lo), p, g);
}

// Dynamic per-token activation fake-quant: one row per token.
template <typename T>
__global__ void __launch_bounds__(THREADS) token_fq_forward_kernel(const T* __restrict__ x, T* __restrict__ out,
                                                                   int64_t rows, int64_t cols, QGrid g) {
  const int lane = threadIdx.x % WARP;
  const int64_t r = int64_t(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.x / WARP;
  if (r >= rows) return;
  const T* row = x + r * cols;
  float lo, hi;
  row_min_max(row, cols, lane, lo, hi);
  const RowParams p = row_params(lo, hi, g);
  T* orow = out + r * cols;
  for (int64_t c = lane; c < cols; c += WARP) orow[c] = from_float<T>(fake_quant_value(to_float(row[c]), p, g));
}

// Backward of the per-token fake-quant: straight-through (the gradient passes where the value is on the
// grid); `released` adds the gradient of each token's min and max, as the range of a differentiable scale.
template <typename T>
__global__ void __launch_bounds__(THREADS) token_fq_backward_kernel(const T* __restrict__ grad_out,
                                                                    const T* __restrict__ x,
                                                                    T* __restrict__ grad_x, int64_t rows,
                                                                    int64_t cols, QGrid g, bool released) {
  const int lane = threadIdx.x % WARP;
  const int64_t r = int64_t(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.x / WARP;
  if (r >= rows) return;
  const T* row = x + r * cols;
  float lo, hi;
  row_min_max(row, cols, lane, lo, hi);
  const RowParams p = row_params(lo, hi, g);
  const float qmin = g.qmin(), qmax = g.qmax();
  const T* grow = grad_out + r * cols;
  T* gx = grad_x + r * cols;
  float g_scale = 0.0f, n_hi = 0.0f, n_lo = 0.0f;
  for (int64_t c = lane; c < cols; c += WARP) {
    const float v = to_float(row[c]);
    const float u = v / p.scale;
    const float t = rintf(u) + p.zero;
    const bool inside = t >= qmin && t <= qmax;
    gx[c] = inside ? grow[c] : from_float<T>(0.0f);
    if (released) {
      const float dy = to_float(grow[c]);
      g_scale += inside ? dy * (rintf(u) - u) : dy * ((t < qmin ? qmin : qmax) - p.zero);
      n_hi += v == hi ? 1.0f : 0.0f;
      n_lo += v == lo ? 1.0f : 0.0f;
    }
  }
  if (!released) return;
  float d_hi, d_lo;
  range_to_bounds(p.clamped ? 0.0f : warp_sum(g_scale) * g.inv_qmax(), lo, hi, g, d_hi, d_lo);
  __syncwarp();
  add_range_gradient(row, grow, gx, cols, lane, lo, hi, d_hi, d_lo, warp_sum(n_hi), warp_sum(n_lo), p, g);
}

inline unsigned int blocks_for_rows(int64_t rows) {
  return static_cast<unsigned int>((rows + WARPS_PER_BLOCK - 1) / WARPS_PER_BLOCK);
}

template <typename T>
void launch_weight_fq_forward(const T* w, const float* gamma, const float* beta, T* out, int64_t rows,
                              int64_t cols, QGrid g, cudaStream_t stream) {
  if (rows == 0) return;
  weight_fq_forward_kernel<T><<<blocks_for_rows(rows), THREADS, 0, stream>>>(w, gamma, beta, out, rows, cols, g);
}

template <typename T>
void launch_weight_fq_backward(const T* grad_out, const T* w, const float* gamma, const float* beta, T* grad_w,
                               float* grad_gamma, float* grad_beta, int64_t rows, int64_t cols, QGrid g,
                               bool released, cudaStream_t stream) {
  if (rows == 0) return;
  weight_fq_backward_kernel<T><<<blocks_for_rows(rows), THREADS, 0, stream>>>(
      grad_out, w, gamma, beta, grad_w, grad_gamma, grad_beta, rows, cols, g, released);
}

template <typename T>
void launch_token_fq_forward(const T* x, T* out, int64_t rows, int64_t cols, QGrid g, cudaStream_t stream) {
  if (rows == 0) return;
  token_fq_forward_kernel<T><<<blocks_for_rows(rows), THREADS, 0, stream>>>(x, out, rows, cols, g);
}

template <typename T>
void launch_token_fq_backward(const T* grad_out, const T* x, T* grad_x, int64_t rows, int64_t cols, QGrid g,
                              bool released, cudaStream_t stream) {
  if (rows == 0) return;
  token_fq_backward_kernel<T><<<blocks_for_rows(rows), THREADS, 0, stream>>>(grad_out, x, grad_x, rows, cols, g,
                                                                             released);
}

}  // namespace omniq
