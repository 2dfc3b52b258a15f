// Filling an [R, N] float32 tensor group by group from a counter-based
// generator: element 4*g + j of row r is lane j of gen(r, g). Shared by
// philox_normal_ (SGLD noise) and philox_rademacher_ (Hessian probes) on CPU
// and CUDA, so the layout of their outputs cannot drift apart.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "sgld.h"

#if defined(__CUDACC__)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace llcfast {

// SGLD noise of chain chain_offset + r at `step` (see philox.h).
struct NormalGen {
  uint64_t seed, step;
  uint32_t row_offset, group_offset;
  LLC_HD F4 operator()(int64_t row, int64_t grp) const {
    return normal4(seed, group_offset + static_cast<uint32_t>(grp), row_offset + static_cast<uint32_t>(row), step);
  }
};

// Rademacher probe row_offset + r of probe set `stream` (see philox.h).
struct RademacherGen {
  uint64_t seed, stream;
  uint32_t row_offset, group_offset;
  LLC_HD F4 operator()(int64_t row, int64_t grp) const {
    return rademacher4(seed, group_offset + static_cast<uint32_t>(grp), row_offset + static_cast<uint32_t>(row),
                       stream);
  }
};

template <typename Gen>
void fill_groups_cpu(at::Tensor& out, int64_t groups, const Gen& gen) {
  const int64_t rows = out.size(0), n = out.size(1);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows * groups, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t row = i / groups, grp = i % groups;
      const F4 r = gen(row, grp);
      const float v[4] = {r.x, r.y, r.z, r.w};
      const int lanes = static_cast<int>(std::min<int64_t>(4, n - grp * 4));
      for (int j = 0; j < lanes; ++j) o[row * n + grp * 4 + j] = v[j];
    }
  });
}

#if defined(__CUDACC__)
template <typename Gen>
__global__ void fill_groups_kernel(float* out, int64_t rows, int64_t n, Gen gen) {
  const int64_t groups = ceil_div(n, 4);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * groups; i += stride) {
    const int64_t row = i / groups, grp = i % groups;
    const F4 r = gen(row, grp);
    const float v[4] = {r.x, r.y, r.z, r.w};
    const int64_t lanes = min(static_cast<int64_t>(4), n - grp * 4);
    float* o = out + row * n + grp * 4;
    for (int j = 0; j < lanes; ++j) o[j] = v[j];
  }
}

template <typename Gen>
void fill_groups_cuda(at::Tensor& out, int64_t groups, const Gen& gen) {
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t work = out.size(0) * groups;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(work, 256), static_cast<int64_t>(sms) * 8));
  fill_groups_kernel<<<blocks, 256, 0, at::cuda::getCurrentCUDAStream()>>>(out.data_ptr<float>(), out.size(0),
                                                                            out.size(1), gen);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace llcfast
