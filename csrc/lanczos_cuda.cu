// CUDA kernel for llcfast::lanczos_step_ (see lanczos.h).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "lanczos.h"
#include "sgld.h"

namespace llcfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGridY = 65535;

// One pass over a row's elements in tiles of kThreads. With sub, each element
// of w first becomes w - sum_k sub[k] V_k (float64 sum), written back. Then,
// with dots, warp q adds <V_k, tile> for its own k (k = q mod kWarps) into a
// shared float64 accumulator that only it touches, and every block adds its
// accumulators to dots[row] once at the end; with sq, <w, w> likewise.
// The second read of a tile's V (for the dots) follows the first closely
// enough to hit cache, so each pass streams V from memory about once.
__global__ void lanczos_pass_kernel(const float* __restrict__ basis, float* __restrict__ w, int64_t m, int64_t n,
                                    int count, int64_t row0, const double* __restrict__ sub,
                                    double* __restrict__ dots, double* __restrict__ sq) {
  extern __shared__ double shared[];
  double* coeff = shared;          // [count] this row's sub
  double* acc = shared + count;    // [count] this block's dot sums
  __shared__ float tile[kThreads];
  __shared__ double warp_sq[kWarps];
  const int64_t row = row0 + blockIdx.y;
  const float* v = basis + row * m * n;
  float* x = w + row * n;
  for (int k = threadIdx.x; k < count; k += kThreads) {
    if (sub != nullptr) coeff[k] = sub[row * count + k];
    acc[k] = 0.0;
  }
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double my_sq = 0.0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kThreads; base < n;
       base += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t e = base + threadIdx.x;
    float val = 0.f;
    if (e < n) {
      val = x[e];
      if (sub != nullptr) {
        double a = val;
        for (int k = 0; k < count; ++k) a -= coeff[k] * static_cast<double>(v[k * n + e]);
        val = static_cast<float>(a);
        x[e] = val;
      }
      my_sq += static_cast<double>(val) * static_cast<double>(val);
    }
    if (dots != nullptr) {
      tile[threadIdx.x] = val;
      __syncthreads();
      const int64_t len = std::min<int64_t>(kThreads, n - base);
      for (int k = warp; k < count; k += kWarps) {
        const float* vk = v + k * n + base;
        double s = 0.0;
        for (int i = lane; i < len; i += 32) s += static_cast<double>(vk[i]) * static_cast<double>(tile[i]);
        for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
        if (lane == 0) acc[k] += s;
      }
      __syncthreads();
    }
  }
  if (dots != nullptr) {
    for (int k = threadIdx.x; k < count; k += kThreads) atomicAdd(dots + row * count + k, acc[k]);
  }
  if (sq != nullptr) {
    for (int off = 16; off > 0; off >>= 1) my_sq += __shfl_down_sync(0xffffffffu, my_sq, off);
    if (lane == 0) warp_sq[warp] = my_sq;
    __syncthreads();
    if (warp == 0) {
      my_sq = lane < kWarps ? warp_sq[lane] : 0.0;
      for (int off = 16; off > 0; off >>= 1) my_sq += __shfl_down_sync(0xffffffffu, my_sq, off);
      if (lane == 0) atomicAdd(sq + row, my_sq);
    }
  }
}

// basis[row, j+1] = w[row] / beta, and out[row] = (alpha, beta).
__global__ void lanczos_finish_kernel(float* __restrict__ basis, const float* __restrict__ w, int64_t m, int64_t n,
                                      int64_t j, int64_t row0, const double* __restrict__ c1,
                                      const double* __restrict__ norm2, double* __restrict__ out) {
  const int64_t row = row0 + blockIdx.y;
  const double beta = sqrt(norm2[row]);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    out[2 * row] = c1[row * (j + 1) + j];
    out[2 * row + 1] = beta;
  }
  if (j + 1 >= m) return;
  const double inv = 1.0 / fmax(beta, 1e-300);
  float* next = basis + (row * m + j + 1) * n;
  const float* res = w + row * n;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    next[e] = static_cast<float>(static_cast<double>(res[e]) * inv);
}

void lanczos_step_cuda(at::Tensor& basis, at::Tensor& w, int64_t j, at::Tensor& out) {
  check_lanczos_step(basis, w, j, out);
  const int64_t rows = basis.size(0), m = basis.size(1), n = basis.size(2);
  if (rows == 0) return;
  const int count = static_cast<int>(j + 1);
  const c10::cuda::CUDAGuard guard(basis.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  // scratch: c1 [R, count], c2 [R, count], |w|^2 [R]
  at::Tensor scratch = at::zeros({rows * (2 * count + 1)}, basis.options().dtype(at::kDouble));
  double* c1 = scratch.data_ptr<double>();
  double* c2 = c1 + rows * count;
  double* norm2 = c2 + rows * count;
  const float* V = basis.data_ptr<float>();
  float* x = w.data_ptr<float>();
  const size_t smem = 2 * static_cast<size_t>(count) * sizeof(double);
  // About four blocks per SM in all, no more than the row's tiles need.
  const int64_t blocks_x = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(n, kThreads), ceil_div(static_cast<int64_t>(sms) * 4, rows)));
  for (int64_t row0 = 0; row0 < rows; row0 += kMaxGridY) {
    const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(std::min(kMaxGridY, rows - row0)));
    lanczos_pass_kernel<<<grid, kThreads, smem, stream>>>(V, x, m, n, count, row0, nullptr, c1, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    lanczos_pass_kernel<<<grid, kThreads, smem, stream>>>(V, x, m, n, count, row0, c1, c2, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    lanczos_pass_kernel<<<grid, kThreads, smem, stream>>>(V, x, m, n, count, row0, c2, nullptr, norm2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    lanczos_finish_kernel<<<grid, kThreads, 0, stream>>>(basis.data_ptr<float>(), x, m, n, j, row0, c1, norm2,
                                                         out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CUDA, m) {
  m.impl("lanczos_step_", &lanczos_step_cuda);
}

}  // namespace llcfast
