// CUDA kernel for llcfast::philox_normal_: the SGLD step's noise on its own,
// so tests and diagnostics can see exactly what a step would draw.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "sgld.h"

namespace llcfast {
namespace {

__global__ void philox_normal_kernel(float* out, int64_t chains, int64_t n, uint64_t seed, uint64_t step,
                                     uint32_t chain_offset, uint32_t group_offset) {
  const int64_t groups = ceil_div(n, 4);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < chains * groups; i += stride) {
    const int64_t ch = i / groups, grp = i % groups;
    const F4 r = normal4(seed, group_offset + static_cast<uint32_t>(grp), chain_offset + static_cast<uint32_t>(ch), step);
    const float v[4] = {r.x, r.y, r.z, r.w};
    const int64_t lanes = min(static_cast<int64_t>(4), n - grp * 4);
    float* o = out + ch * n + grp * 4;
    for (int j = 0; j < lanes; ++j) o[j] = v[j];
  }
}

void philox_normal_cuda(at::Tensor& out, int64_t seed, int64_t step, int64_t chain_offset, int64_t group_offset) {
  const int64_t groups = check_philox_out(out, seed, step, chain_offset, group_offset);
  const int64_t chains = out.size(0), n = out.size(1);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t work = chains * groups;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(work, 256), static_cast<int64_t>(sms) * 8));
  philox_normal_kernel<<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), chains, n, static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
      static_cast<uint32_t>(chain_offset), static_cast<uint32_t>(group_offset));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CUDA, m) { m.impl("philox_normal_", &philox_normal_cuda); }

}  // namespace llcfast
