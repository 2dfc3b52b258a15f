// CUDA kernels for llcfast::token_nll and llcfast::token_nll_backward. One
// block per row: the forward reads the row once, keeping a running maximum
// and a rescaled sum of exponentials per thread (online softmax); the
// backward reads it once and writes the gradient once, in the logits' dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "token_nll.h"

namespace llcfast {
namespace {

constexpr int kMaxThreads = 256;

// Merges the running (max, sum of exp(x - max)) of two partial rows.
template <typename acc_t>
__device__ __forceinline__ void merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  const acc_t hi = m > m2 ? m : m2;
  if (hi == -INFINITY) return;  // both empty (or all -inf): nothing to add
  s = s * exp(m - hi) + s2 * exp(m2 - hi);
  m = hi;
}

template <typename scalar_t, typename acc_t>
__global__ void token_nll_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ t, acc_t* nll,
                                 acc_t* lse, int64_t vocab) {
  const int64_t row = blockIdx.x;
  const scalar_t* r = x + row * vocab;
  acc_t m = -INFINITY, s = 0;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
    const acc_t xv = static_cast<acc_t>(r[v]);
    if (xv > m) {
      s = (m == -INFINITY ? acc_t(0) : s * exp(m - xv)) + acc_t(1);
      m = xv;
    } else if (xv != -INFINITY) {
      s += exp(xv - m);
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1)
    merge(m, s, __shfl_down_sync(0xffffffffu, m, offset), __shfl_down_sync(0xffffffffu, s, offset));
  __shared__ acc_t warp_m[kMaxThreads / 32], warp_s[kMaxThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < warps; ++w) merge(m, s, warp_m[w], warp_s[w]);
    const acc_t l = m + log(s);
    const int64_t target = t[row];
    lse[row] = l;
    nll[row] = (target >= 0 && target < vocab) ? l - static_cast<acc_t>(r[target]) : acc_t(NAN);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void token_nll_backward_kernel(const acc_t* __restrict__ g, const scalar_t* __restrict__ x,
                                          const acc_t* __restrict__ lse, const int64_t* __restrict__ t,
                                          scalar_t* y, int64_t vocab) {
  const int64_t row = blockIdx.x;
  const acc_t gr = g[row], lr = lse[row];
  const int64_t target = t[row];
  const scalar_t* src = x + row * vocab;
  scalar_t* dst = y + row * vocab;
  for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x)
    dst[v] = static_cast<scalar_t>(gr * (exp(static_cast<acc_t>(src[v]) - lr) - (v == target ? acc_t(1) : acc_t(0))));
}

// Whole warps, no more threads than a row has elements (up to kMaxThreads).
int threads_for(int64_t vocab) {
  int threads = 32;
  while (threads < kMaxThreads && threads < vocab) threads *= 2;
  return threads;
}

std::tuple<at::Tensor, at::Tensor> token_nll_cuda(const at::Tensor& logits, const at::Tensor& targets) {
  const int64_t vocab = check_token_nll(logits, targets, "token_nll");
  at::Tensor nll = token_nll_output(logits, targets), lse = token_nll_output(logits, targets);
  const int64_t rows = targets.numel();
  if (rows == 0) return {nll, lse};
  LLC_CHECK(rows <= 2147483647LL, "token_nll: at most 2^31 - 1 rows per call, got ", rows);
  const c10::cuda::CUDAGuard guard(logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_nll_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    token_nll_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rows), threads_for(vocab), 0,
                                        at::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), nll.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
        vocab);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {nll, lse};
}

at::Tensor token_nll_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse,
                                   const at::Tensor& targets) {
  check_token_nll_backward(grad, logits, lse, targets, "token_nll_backward");
  const int64_t vocab = logits.size(-1);
  at::Tensor out = at::empty_like(logits);
  const int64_t rows = targets.numel();
  if (rows == 0) return out;
  LLC_CHECK(rows <= 2147483647LL, "token_nll_backward: at most 2^31 - 1 rows per call, got ", rows);
  const c10::cuda::CUDAGuard guard(logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_nll_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    token_nll_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned>(rows), threads_for(vocab), 0,
                                                 at::cuda::getCurrentCUDAStream()>>>(
        grad.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), targets.data_ptr<int64_t>(),
        out.data_ptr<scalar_t>(), vocab);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CUDA, m) {
  m.impl("token_nll", &token_nll_cuda);
  m.impl("token_nll_backward", &token_nll_backward_cuda);
}

}  // namespace llcfast
