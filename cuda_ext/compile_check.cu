// Compile check for CI: nvcc builds every kernel in fake_quant.cuh and vq.cuh for each supported dtype without
// torch (the CPU torch wheel cannot build the bindings). `nvcc -arch=sm_80 -c compile_check.cu` must pass.
#include "fake_quant.cuh"
#include "vq.cuh"  // not templated: compiled as it stands

namespace omniq {
#define OMNIQ_INSTANTIATE(T)                                                                              \
  template void launch_weight_fq_forward<T>(const T*, const float*, const float*, T*, int64_t, int64_t, QGrid, \
                                            cudaStream_t);                                                \
  template void launch_weight_fq_backward<T>(const T*, const T*, const float*, const float*, T*, float*,     \
                                             float*, int64_t, int64_t, QGrid, bool, cudaStream_t);       \
  template void launch_token_fq_forward<T>(const T*, T*, int64_t, int64_t, QGrid, cudaStream_t);           \
  template void launch_token_fq_backward<T>(const T*, const T*, T*, int64_t, int64_t, QGrid, bool, cudaStream_t);

OMNIQ_INSTANTIATE(float)
OMNIQ_INSTANTIATE(__half)
OMNIQ_INSTANTIATE(__nv_bfloat16)
#undef OMNIQ_INSTANTIATE
}  // namespace omniq
