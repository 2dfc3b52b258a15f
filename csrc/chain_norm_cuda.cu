// CUDA kernels for llcfast::chain_layer_norm and its backward. A warp per
// row: the forward reads the row for its mean, again (from cache) for the
// variance and once more to write y; the backward's dx kernel reads g and x
// for the row's two sums and again to write dx. The weight's and bias's
// gradients are column sums over each chain's rows: blocks of 32 columns x 8
// row lanes write partial sums per slice of rows, which torch adds up, so
// the result does not depend on timing (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "chain_norm.h"

namespace llcfast {
namespace {

constexpr int kRowsPerBlock = 8;  // warps per block in the row kernels
constexpr int kLanes = 8;         // row lanes per block in the column kernel

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void chain_layer_norm_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                        const scalar_t* __restrict__ b, scalar_t* __restrict__ y,
                                        acc_t* __restrict__ mean, acc_t* __restrict__ rstd, int64_t rows,
                                        int64_t rows_per_chain, int64_t features, acc_t eps) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;  // the whole warp leaves together: the shuffles below see full warps
  const int lane = threadIdx.x % 32;
  const scalar_t* row = x + r * features;
  acc_t s = 0;
  for (int64_t d = lane; d < features; d += 32) s += static_cast<acc_t>(row[d]);
  const acc_t m = warp_sum(s) / features;
  acc_t q = 0;
  for (int64_t d = lane; d < features; d += 32) {
    const acc_t v = static_cast<acc_t>(row[d]) - m;
    q += v * v;
  }
  const acc_t inv = acc_t(1) / sqrt(warp_sum(q) / features + eps);
  const int64_t c = r / rows_per_chain;
  const scalar_t* wc = w + c * features;
  const scalar_t* bc = b ? b + c * features : nullptr;
  scalar_t* out = y + r * features;
  for (int64_t d = lane; d < features; d += 32) {
    acc_t v = (static_cast<acc_t>(row[d]) - m) * inv * static_cast<acc_t>(wc[d]);
    if (bc) v += static_cast<acc_t>(bc[d]);
    out[d] = static_cast<scalar_t>(v);
  }
  if (lane == 0) {
    mean[r] = m;
    rstd[r] = inv;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void chain_layer_norm_dx_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                           const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                           const scalar_t* __restrict__ w, scalar_t* __restrict__ dx, int64_t rows,
                                           int64_t rows_per_chain, int64_t features) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = threadIdx.x % 32;
  const scalar_t* g = grad + r * features;
  const scalar_t* row = x + r * features;
  const scalar_t* wc = w + (r / rows_per_chain) * features;
  const acc_t m = mean[r], inv = rstd[r];
  acc_t s1 = 0, s2 = 0;
  for (int64_t d = lane; d < features; d += 32) {
    const acc_t gw = static_cast<acc_t>(g[d]) * static_cast<acc_t>(wc[d]);
    s1 += gw;
    s2 += gw * (static_cast<acc_t>(row[d]) - m) * inv;
  }
  s1 = warp_sum(s1) / features;
  s2 = warp_sum(s2) / features;
  scalar_t* out = dx + r * features;
  for (int64_t d = lane; d < features; d += 32) {
    const acc_t gw = static_cast<acc_t>(g[d]) * static_cast<acc_t>(wc[d]);
    out[d] = static_cast<scalar_t>(inv * (gw - s1 - (static_cast<acc_t>(row[d]) - m) * inv * s2));
  }
}

// grid (column tiles of 32, row slices, chains), block (32, kLanes):
// partial[c, slice, d] = sums over the slice's rows of g * xhat and of g.
template <typename scalar_t, typename acc_t>
__global__ void chain_layer_norm_dw_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                           const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                           acc_t* __restrict__ partial_w, acc_t* __restrict__ partial_b,
                                           int64_t rows_per_chain, int64_t features) {
  const int64_t c = blockIdx.z, slice = blockIdx.y, slices = gridDim.y;
  const int64_t d = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  acc_t sw = 0, sb = 0;
  if (d < features) {
    for (int64_t i = slice * kLanes + threadIdx.y; i < rows_per_chain; i += slices * kLanes) {
      const int64_t r = c * rows_per_chain + i;
      const acc_t gv = static_cast<acc_t>(grad[r * features + d]);
      sw += gv * (static_cast<acc_t>(x[r * features + d]) - mean[r]) * rstd[r];
      sb += gv;
    }
  }
  __shared__ acc_t shared_w[kLanes][33], shared_b[kLanes][33];
  shared_w[threadIdx.y][threadIdx.x] = sw;
  shared_b[threadIdx.y][threadIdx.x] = sb;
  __syncthreads();
  if (threadIdx.y == 0 && d < features) {
    for (int k = 1; k < kLanes; ++k) {
      sw += shared_w[k][threadIdx.x];
      sb += shared_b[k][threadIdx.x];
    }
    const int64_t at = (c * slices + slice) * features + d;
    partial_w[at] = sw;
    partial_b[at] = sb;
  }
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_layer_norm_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                     const c10::optional<at::Tensor>& bias,
                                                                     double eps) {
  check_chain_layer_norm(x, weight, bias, "chain_layer_norm");
  at::Tensor y = at::empty_like(x), mean = chain_norm_stat(x), rstd = chain_norm_stat(x);
  const int64_t rows = x.size(0) * x.size(1);
  if (rows == 0) return {y, mean, rstd};
  LLC_CHECK(rows <= 8LL * 2147483647LL, "chain_layer_norm: too many rows for one call: ", rows);
  const bool has_bias = bias.has_value() && bias->defined();
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "chain_layer_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    chain_layer_norm_kernel<scalar_t, acc_t><<<row_blocks(rows), 32 * kRowsPerBlock, 0,
                                               at::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), has_bias ? bias->data_ptr<scalar_t>() : nullptr,
        y.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), rows, x.size(1), x.size(2),
        static_cast<acc_t>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_layer_norm_backward_cuda(const at::Tensor& grad,
                                                                              const at::Tensor& x,
                                                                              const at::Tensor& mean,
                                                                              const at::Tensor& rstd,
                                                                              const at::Tensor& weight) {
  check_chain_layer_norm_backward(grad, x, mean, rstd, weight, "chain_layer_norm_backward");
  const int64_t chains = x.size(0), rows_per_chain = x.size(1), features = x.size(2), rows = chains * rows_per_chain;
  at::Tensor dx = at::empty_like(x);
  if (rows == 0) return {dx, at::zeros_like(weight), at::zeros_like(weight)};
  LLC_CHECK(rows <= 8LL * 2147483647LL && chains <= 65535, "chain_layer_norm_backward: too many rows or chains for "
            "one call: ", rows, " rows, ", chains, " chains");
  const c10::cuda::CUDAGuard guard(x.device());
  // Enough row slices for about four blocks per multiprocessor, none empty.
  const int64_t tiles = (features + 31) / 32;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t slices = std::max<int64_t>(
      1, std::min<int64_t>({(4 * sms + chains * tiles - 1) / (chains * tiles), (rows_per_chain + kLanes - 1) / kLanes,
                            65535}));
  at::Tensor partial_w = at::empty({chains, slices, features}, mean.options());
  at::Tensor partial_b = at::empty({chains, slices, features}, mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "chain_layer_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto stream = at::cuda::getCurrentCUDAStream();
    chain_layer_norm_dx_kernel<scalar_t, acc_t><<<row_blocks(rows), 32 * kRowsPerBlock, 0, stream>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
        weight.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), rows, rows_per_chain, features);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(slices), static_cast<unsigned>(chains));
    chain_layer_norm_dw_kernel<scalar_t, acc_t><<<grid, dim3(32, kLanes), 0, stream>>>(
        grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(),
        partial_w.data_ptr<acc_t>(), partial_b.data_ptr<acc_t>(), rows_per_chain, features);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, partial_w.sum(1).to(weight.scalar_type()), partial_b.sum(1).to(weight.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CUDA, m) {
  m.impl("chain_layer_norm", &chain_layer_norm_cuda);
  m.impl("chain_layer_norm_backward", &chain_layer_norm_backward_cuda);
}

}  // namespace llcfast
