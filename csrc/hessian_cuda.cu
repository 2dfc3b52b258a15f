// CUDA kernels for llcfast::philox_rademacher_ (Hessian probes) and
// llcfast::multi_dot_ (per-row dot products across a list of tensors).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "philox_fill.h"
#include "sgld.h"

namespace llcfast {
namespace {

void philox_rademacher_cuda(at::Tensor& out, int64_t seed, int64_t stream, int64_t row_offset,
                            int64_t group_offset) {
  const int64_t groups = check_philox_out(out, seed, stream, row_offset, group_offset, "philox_rademacher_");
  fill_groups_cuda(out, groups, RademacherGen{static_cast<uint64_t>(seed), static_cast<uint64_t>(stream),
                                              static_cast<uint32_t>(row_offset), static_cast<uint32_t>(group_offset)});
}

// Up to kDotTable tensors per launch, passed by value as a kernel parameter.
constexpr int kDotTable = 64;
struct DotTable {
  const float* a[kDotTable];
  const float* b[kDotTable];
  int64_t per_row[kDotTable];
  int count;
};

constexpr int kDotThreads = 256;
constexpr int64_t kMaxGridY = 65535;

// blockIdx.y is the row; the blocks along x stride over every tensor's
// elements of that row; each block adds its partial sum to out[row] once.
__global__ void multi_dot_kernel(const __grid_constant__ DotTable table, double* out, int64_t row0) {
  const int64_t row = row0 + blockIdx.y;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double acc = 0.0;
  for (int t = 0; t < table.count; ++t) {
    const int64_t n = table.per_row[t];
    const float* x = table.a[t] + row * n;
    const float* y = table.b[t] + row * n;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride)
      acc += static_cast<double>(x[e]) * static_cast<double>(y[e]);
  }
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  __shared__ double warp_sums[kDotThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < kDotThreads / 32 ? warp_sums[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) atomicAdd(out + row, acc);
  }
}

void multi_dot_cuda(at::Tensor& out, at::TensorList a, at::TensorList b) {
  check_multi_dot(out, a, b);
  const int64_t rows = out.size(0);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  DotTable table{};
  int64_t largest = 0;
  auto launch = [&]() {
    if (table.count == 0) return;
    // Enough blocks along x to fill the GPU about four times over, no more
    // than the largest tensor needs.
    const int64_t want = std::max<int64_t>(1, (static_cast<int64_t>(sms) * 4 + rows - 1) / rows);
    const int64_t need = std::max<int64_t>(1, ceil_div(largest, kDotThreads));
    for (int64_t row0 = 0; row0 < rows; row0 += kMaxGridY) {
      const dim3 grid(static_cast<unsigned>(std::min(want, need)),
                      static_cast<unsigned>(std::min<int64_t>(kMaxGridY, rows - row0)));
      multi_dot_kernel<<<grid, kDotThreads, 0, at::cuda::getCurrentCUDAStream()>>>(table, out.data_ptr<double>(),
                                                                                   row0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    table = DotTable{};
    largest = 0;
  };
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].numel() == 0) continue;
    table.a[table.count] = a[i].data_ptr<float>();
    table.b[table.count] = b[i].data_ptr<float>();
    table.per_row[table.count] = a[i].numel() / rows;
    largest = std::max(largest, table.per_row[table.count]);
    if (++table.count == kDotTable) launch();
  }
  launch();
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CUDA, m) {
  m.impl("philox_rademacher_", &philox_rademacher_cuda);
  m.impl("multi_dot_", &multi_dot_cuda);
}

}  // namespace llcfast
