// CUDA kernel for llcfast::philox_normal_: the SGLD step's noise on its own,
// so tests and diagnostics can see exactly what a step would draw.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "philox_fill.h"
#include "sgld.h"

namespace llcfast {
namespace {

void philox_normal_cuda(at::Tensor& out, int64_t seed, int64_t step, int64_t chain_offset, int64_t group_offset) {
  const int64_t groups = check_philox_out(out, seed, step, chain_offset, group_offset);
  fill_groups_cuda(out, groups, NormalGen{static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                                          static_cast<uint32_t>(chain_offset), static_cast<uint32_t>(group_offset)});
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CUDA, m) { m.impl("philox_normal_", &philox_normal_cuda); }

}  // namespace llcfast
