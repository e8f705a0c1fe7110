// Torch bindings of the fused fake-quant kernels in fake_quant.cuh. Inputs arrive as contiguous
// [rows, cols] CUDA tensors (the Python side reshapes weights into groups and activations into tokens);
// LWC logits arrive as contiguous float32 vectors with one entry per row.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "fake_quant.cuh"
#include "vq.cuh"

namespace {

void check_matrix(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [rows, cols]");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16");
}

const float* logits_ptr(const std::optional<torch::Tensor>& t, const torch::Tensor& w, const char* name) {
  if (!t.has_value()) return nullptr;
  const int64_t rows = w.size(0);
  TORCH_CHECK(t->device() == w.device(), name, " must be on the same device as the weight");
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == rows, name,
              " must be a contiguous float32 CUDA tensor with one logit per row");
  return t->data_ptr<float>();
}

omniq::QGrid make_grid(int64_t bits, bool symmetric) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be in 2..8, got ", bits);
  return omniq::QGrid{static_cast<int>(bits), symmetric};
}

// Calls f(T*) with the CUDA element type matching the tensor's dtype.
template <typename F>
void dispatch(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: TORCH_CHECK(false, "unsupported dtype ", st);
  }
}

template <typename T>
T* ptr(const torch::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

torch::Tensor weight_forward(torch::Tensor w, std::optional<torch::Tensor> gamma, std::optional<torch::Tensor> beta,
                             int64_t bits, bool symmetric) {
  check_matrix(w, "weight");
  const c10::cuda::CUDAGuard guard(w.device());
  auto out = torch::empty_like(w);
  const auto g = make_grid(bits, symmetric);
  const float* gp = logits_ptr(gamma, w, "gamma");
  const float* bp = logits_ptr(beta, w, "beta");
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(w.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    omniq::launch_weight_fq_forward<T>(ptr<T>(w), gp, bp, ptr<T>(out), w.size(0), w.size(1), g, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<torch::Tensor> weight_backward(torch::Tensor grad_out, torch::Tensor w, std::optional<torch::Tensor> gamma,
                                           std::optional<torch::Tensor> beta, int64_t bits, bool symmetric,
                                           bool released) {
  check_matrix(w, "weight");
  check_matrix(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == w.sizes() && grad_out.scalar_type() == w.scalar_type(),
              "grad_out must match the weight's shape and dtype");
  const c10::cuda::CUDAGuard guard(w.device());
  const auto g = make_grid(bits, symmetric);
  const int64_t rows = w.size(0);
  const float* gp = logits_ptr(gamma, w, "gamma");
  const float* bp = logits_ptr(beta, w, "beta");
  auto grad_w = torch::empty_like(w);
  auto opts = w.options().dtype(at::kFloat);
  auto grad_gamma = gamma.has_value() ? torch::empty({rows}, opts) : torch::Tensor();
  auto grad_beta = beta.has_value() ? torch::empty({rows}, opts) : torch::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(w.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    omniq::launch_weight_fq_backward<T>(ptr<T>(grad_out), ptr<T>(w), gp, bp, ptr<T>(grad_w),
                                        gamma.has_value() ? grad_gamma.data_ptr<float>() : nullptr,
                                        beta.has_value() ? grad_beta.data_ptr<float>() : nullptr, rows, w.size(1), g,
                                        released, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_w, grad_gamma, grad_beta};
}

torch::Tensor token_forward(torch::Tensor x, int64_t bits, bool symmetric) {
  check_matrix(x, "activation");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty_like(x);
  const auto g = make_grid(bits, symmetric);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    omniq::launch_token_fq_forward<T>(ptr<T>(x), ptr<T>(out), x.size(0), x.size(1), g, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

torch::Tensor token_backward(torch::Tensor grad_out, torch::Tensor x, int64_t bits, bool symmetric, bool released) {
  check_matrix(x, "activation");
  check_matrix(grad_out, "grad_out");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "grad_out must match the activation's shape and dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  auto grad_x = torch::empty_like(x);
  const auto g = make_grid(bits, symmetric);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    omniq::launch_token_fq_backward<T>(ptr<T>(grad_out), ptr<T>(x), ptr<T>(grad_x), x.size(0), x.size(1), g, released,
                                       stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_x;
}

// ---- vector-quantized weights (vq.cuh) --------------------------------------------------------------------
// A weight arrives as its codebook parts, in order: indices int32 [ncols, rows] (column-major), centroids
// float32 [k, v], the input column of each part column (int64), and whether the part adds to what is there.

std::vector<omniq::VQPart> vq_parts(const std::vector<torch::Tensor>& idx, const std::vector<torch::Tensor>& centroids,
                                    const std::vector<torch::Tensor>& cols, const torch::Device& device) {
  TORCH_CHECK(idx.size() == centroids.size() && idx.size() == cols.size(), "one index, centroid and column tensor per part");
  std::vector<omniq::VQPart> parts;
  for (size_t i = 0; i < idx.size(); ++i) {
    const auto& ix = idx[i];
    const auto& cb = centroids[i];
    const auto& cl = cols[i];
    TORCH_CHECK(ix.device() == device && cb.device() == device && cl.device() == device, "part ", i, " must be on ", device);
    TORCH_CHECK(ix.scalar_type() == at::kInt && ix.dim() == 2 && ix.is_contiguous(), "indices must be contiguous int32 [ncols, rows]");
    TORCH_CHECK(cb.scalar_type() == at::kFloat && cb.dim() == 2 && cb.is_contiguous(), "centroids must be contiguous float32 [k, v]");
    TORCH_CHECK(cl.scalar_type() == at::kLong && cl.dim() == 1 && cl.numel() == ix.size(0), "columns must be int64 [ncols]");
    TORCH_CHECK(cb.size(1) >= 1 && cb.size(1) <= omniq::VQ_MAX_VECTOR, "vector length must be in 1..", omniq::VQ_MAX_VECTOR);
    parts.push_back(omniq::VQPart{ix.data_ptr<int32_t>(), cb.data_ptr<float>(), cl.data_ptr<int64_t>(), ix.size(1), ix.size(0),
                                  static_cast<int>(cb.size(1)), static_cast<int>(cb.size(0))});
  }
  return parts;
}

torch::Tensor vq_dequantize(std::vector<torch::Tensor> idx, std::vector<torch::Tensor> centroids, std::vector<torch::Tensor> cols,
                            std::vector<int64_t> accumulate, std::optional<torch::Tensor> mean, std::optional<torch::Tensor> std_,
                            int64_t out_features, int64_t in_features) {
  TORCH_CHECK(!idx.empty() && idx[0].is_cuda(), "indices must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(idx[0].device());
  auto parts = vq_parts(idx, centroids, cols, idx[0].device());
  TORCH_CHECK(accumulate.size() == parts.size(), "one accumulate flag per part");
  auto W = torch::empty({out_features, in_features}, idx[0].options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t i = 0; i < parts.size(); ++i) {
    TORCH_CHECK(parts[i].rows * parts[i].v == out_features, "part ", i, " does not cover ", out_features, " rows");
    omniq::launch_vq_lookup(parts[i], W.data_ptr<float>(), in_features, accumulate[i] != 0, stream);
  }
  if (mean.has_value()) {
    TORCH_CHECK(std_.has_value(), "mean and std come together");
    auto m = mean->contiguous(), s = std_->contiguous();
    TORCH_CHECK(m.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat && m.numel() == in_features && s.numel() == in_features,
                "mean and std must be float32 [in_features]");
    omniq::launch_vq_denormalize(W.data_ptr<float>(), m.data_ptr<float>(), s.data_ptr<float>(), out_features, in_features, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return W;
}

torch::Tensor vq_gemv(torch::Tensor x, std::vector<torch::Tensor> idx, std::vector<torch::Tensor> centroids,
                      std::vector<torch::Tensor> cols, std::optional<torch::Tensor> mean, std::optional<torch::Tensor> std_,
                      int64_t out_features) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "x must be a CUDA tensor [tokens, in_features]");
  const c10::cuda::CUDAGuard guard(x.device());
  auto parts = vq_parts(idx, centroids, cols, x.device());
  auto xs = x.to(at::kFloat).contiguous();
  std::optional<torch::Tensor> shift;
  if (mean.has_value()) {
    TORCH_CHECK(std_.has_value(), "mean and std come together");
    shift = xs.matmul(*mean);          // x . mean, per token
    xs = (xs * *std_).contiguous();    // the normalisation folded into the input
  }
  TORCH_CHECK(x.size(0) <= 65535, "vq_gemv takes at most 65535 tokens; dequantize and matmul beyond that");
  auto acc = torch::zeros({x.size(0), out_features}, xs.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t i = 0; i < parts.size(); ++i) {
    TORCH_CHECK(parts[i].rows * parts[i].v == out_features, "part ", i, " does not cover ", out_features, " rows");
    omniq::launch_vq_gemv(parts[i], xs.data_ptr<float>(), acc.data_ptr<float>(), x.size(0), x.size(1), out_features, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (shift.has_value()) acc.add_(shift->unsqueeze(1));
  return acc.to(x.scalar_type());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "omniq-lightning fused fake-quant kernels";
  m.def("weight_forward", &weight_forward, "weight fake-quant with LWC (forward)");
  m.def("weight_backward", &weight_backward, "weight fake-quant with LWC (backward; released: differentiable ranges)");
  m.def("token_forward", &token_forward, "per-token activation fake-quant (forward)");
  m.def("token_backward", &token_backward, "per-token activation fake-quant (backward; released: differentiable ranges)");
  m.def("vq_dequantize", &vq_dequantize, "vector-quantized weight -> float32 [out, in] (bit-exact with the torch reference)");
  m.def("vq_gemv", &vq_gemv, "x [tokens, in] @ W^T for a vector-quantized W, W never formed");
}
