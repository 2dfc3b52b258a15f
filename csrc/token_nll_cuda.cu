// CUDA kernels for llcfast::token_nll, llcfast::token_nll_backward and
// llcfast::token_nll_grad_. One block per row: the forward reads the row
// once, keeping a running maximum and a rescaled sum of exponentials per
// thread (online softmax); the backward reads it once and writes the
// gradient once, in the logits' dtype; token_nll_grad_ does both in place.
// Both move 16 bytes an access where the rows allow it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
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

// Adds one element to the running (max, sum): -inf adds nothing, +inf and
// NaN take the row to +inf and NaN as log-sum-exp does.
template <typename acc_t>
__device__ __forceinline__ void add_one(acc_t& m, acc_t& s, acc_t xv) {
  if (xv > m) {
    s = (m == -INFINITY ? acc_t(0) : s * exp(m - xv)) + acc_t(1);
    m = xv;
  } else if (xv != -INFINITY) {
    s += exp(xv - m);
  }
}

// VEC elements moved by one 16-byte access (VEC 1: one element, for rows
// whose length or address does not allow wider ones). Scalar loads of 2-byte
// logits kept the H100 at about 0.84 TB/s on the paper's LM.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// This thread's running (max, sum of exp(x - max)) over its packs of a row.
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void thread_partial(const scalar_t* r, int64_t vocab, acc_t& m, acc_t& s) {
  const auto* packs = reinterpret_cast<const Pack<scalar_t, VEC>*>(r);
  m = -INFINITY;
  s = 0;
  for (int64_t j = threadIdx.x; j < vocab / VEC; j += blockDim.x) {
    const Pack<scalar_t, VEC> p = packs[j];
    acc_t xs[VEC];
    acc_t hi = static_cast<acc_t>(p.v[0]);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      xs[i] = static_cast<acc_t>(p.v[i]);
      hi = xs[i] > hi ? xs[i] : hi;
    }
    if (isfinite(hi)) {  // one rescale for the pack, then its exponentials
      if (hi > m) {
        s = m == -INFINITY ? acc_t(0) : s * exp(m - hi);
        m = hi;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) s += exp(xs[i] - m);
    } else {  // all -inf, or a +inf or NaN: element by element, as VEC 1 would
#pragma unroll
      for (int i = 0; i < VEC; ++i) add_one(m, s, xs[i]);
    }
  }
}

// The row's log-sum-exp from every thread's partial, valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ acc_t block_lse(acc_t m, acc_t s) {
  for (int offset = 16; offset > 0; offset >>= 1)
    merge(m, s, __shfl_down_sync(0xffffffffu, m, offset), __shfl_down_sync(0xffffffffu, s, offset));
  __shared__ acc_t warp_m[kMaxThreads / 32], warp_s[kMaxThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < warps; ++w) merge(m, s, warp_m[w], warp_s[w]);
  return m + log(s);
}

// g * (softmax - onehot) of one row's packs, from src into dst (the same
// row where the gradient overwrites the logits).
template <typename scalar_t, typename acc_t, int VEC>
__device__ __forceinline__ void write_grad(const scalar_t* src, scalar_t* dst, int64_t vocab, int64_t target,
                                           acc_t g, acc_t l) {
  const auto* in = reinterpret_cast<const Pack<scalar_t, VEC>*>(src);
  auto* out = reinterpret_cast<Pack<scalar_t, VEC>*>(dst);
  for (int64_t j = threadIdx.x; j < vocab / VEC; j += blockDim.x) {
    const Pack<scalar_t, VEC> p = in[j];
    Pack<scalar_t, VEC> q;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t v = j * VEC + i;
      q.v[i] = static_cast<scalar_t>(g * (exp(static_cast<acc_t>(p.v[i]) - l) - (v == target ? acc_t(1) : acc_t(0))));
    }
    out[j] = q;
  }
}

// Each row's (nll, lse); with GRAD (token_nll_grad_) the row is then
// overwritten by scale * (softmax - onehot), its second read coming soon
// after the first, from cache.
template <typename scalar_t, typename acc_t, int VEC, bool GRAD>
__global__ void token_nll_kernel(scalar_t* x, const int64_t* __restrict__ t, acc_t* nll, acc_t* lse, int64_t vocab,
                                 acc_t scale) {
  const int64_t row = blockIdx.x;
  scalar_t* r = x + row * vocab;
  const int64_t target = t[row];
  acc_t m, s;
  thread_partial<scalar_t, acc_t, VEC>(r, vocab, m, s);
  const acc_t l = block_lse(m, s);
  __shared__ acc_t row_lse;
  if (threadIdx.x == 0) {  // the target's logit is read before any thread overwrites it
    lse[row] = l;
    nll[row] = (target >= 0 && target < vocab) ? l - static_cast<acc_t>(r[target]) : acc_t(NAN);
    row_lse = l;
  }
  if (GRAD) {
    __syncthreads();
    write_grad<scalar_t, acc_t, VEC>(r, r, vocab, target, scale, row_lse);
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void token_nll_backward_kernel(const acc_t* __restrict__ g, const scalar_t* __restrict__ x,
                                          const acc_t* __restrict__ lse, const int64_t* __restrict__ t,
                                          scalar_t* y, int64_t vocab) {
  const int64_t row = blockIdx.x;
  write_grad<scalar_t, acc_t, VEC>(x + row * vocab, y + row * vocab, vocab, t[row], g[row], lse[row]);
}

// Whole warps, no more threads than a row has packs (up to kMaxThreads).
int threads_for(int64_t packs) {
  int threads = 32;
  while (threads < kMaxThreads && threads < packs) threads *= 2;
  return threads;
}

// 16 bytes a pack where every row starts on a 16-byte boundary, else 1 element.
template <typename scalar_t>
bool packs_fit(int64_t vocab, std::initializer_list<const void*> bases) {
  constexpr int64_t vec = 16 / sizeof(scalar_t);
  if (vocab % vec != 0) return false;
  for (const void* base : bases)
    if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  return true;
}

template <typename scalar_t, typename acc_t, int VEC, bool GRAD>
void launch_forward(const at::Tensor& logits, const at::Tensor& targets, at::Tensor& nll, at::Tensor& lse,
                    int64_t rows, int64_t vocab, double scale) {
  token_nll_kernel<scalar_t, acc_t, VEC, GRAD><<<static_cast<unsigned>(rows), threads_for(vocab / VEC), 0,
                                                 at::cuda::getCurrentCUDAStream()>>>(
      logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), nll.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), vocab,
      static_cast<acc_t>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int VEC>
void launch_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse,
                     const at::Tensor& targets, at::Tensor& out, int64_t rows, int64_t vocab) {
  token_nll_backward_kernel<scalar_t, acc_t, VEC><<<static_cast<unsigned>(rows), threads_for(vocab / VEC), 0,
                                                    at::cuda::getCurrentCUDAStream()>>>(
      grad.data_ptr<acc_t>(), logits.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), targets.data_ptr<int64_t>(),
      out.data_ptr<scalar_t>(), vocab);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Each row's (nll, lse); with `grad`, the rows overwritten in place by
// scale * (softmax - onehot) (token_nll_grad_).
template <bool GRAD>
std::tuple<at::Tensor, at::Tensor> forward_rows(const at::Tensor& logits, const at::Tensor& targets, const char* op,
                                                double scale) {
  const int64_t vocab = check_token_nll(logits, targets, op);
  at::Tensor nll = token_nll_output(logits, targets), lse = token_nll_output(logits, targets);
  const int64_t rows = targets.numel();
  if (rows == 0) return {nll, lse};
  LLC_CHECK(rows <= 2147483647LL, op, ": at most 2^31 - 1 rows per call, got ", rows);
  const c10::cuda::CUDAGuard guard(logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_nll_forward_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int vec = 16 / sizeof(scalar_t);
    if (packs_fit<scalar_t>(vocab, {logits.data_ptr()}))
      launch_forward<scalar_t, acc_t, vec, GRAD>(logits, targets, nll, lse, rows, vocab, scale);
    else
      launch_forward<scalar_t, acc_t, 1, GRAD>(logits, targets, nll, lse, rows, vocab, scale);
  });
  return {nll, lse};
}

std::tuple<at::Tensor, at::Tensor> token_nll_cuda(const at::Tensor& logits, const at::Tensor& targets) {
  return forward_rows<false>(logits, targets, "token_nll", 0.0);
}

std::tuple<at::Tensor, at::Tensor> token_nll_grad_cuda(at::Tensor& logits, const at::Tensor& targets, double scale) {
  return forward_rows<true>(logits, targets, "token_nll_grad_", scale);
}

at::Tensor token_nll_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse,
                                   const at::Tensor& targets) {
  check_token_nll_backward(grad, logits, lse, targets, "token_nll_backward");
  const int64_t vocab = logits.size(-1);
  at::Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const int64_t rows = targets.numel();
  if (rows == 0) return out;
  LLC_CHECK(rows <= 2147483647LL, "token_nll_backward: at most 2^31 - 1 rows per call, got ", rows);
  const c10::cuda::CUDAGuard guard(logits.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_nll_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int vec = 16 / sizeof(scalar_t);
    if (packs_fit<scalar_t>(vocab, {logits.data_ptr(), out.data_ptr()}))
      launch_backward<scalar_t, acc_t, vec>(grad, logits, lse, targets, out, rows, vocab);
    else
      launch_backward<scalar_t, acc_t, 1>(grad, logits, lse, targets, out, rows, vocab);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CUDA, m) {
  m.impl("token_nll", &token_nll_cuda);
  m.impl("token_nll_backward", &token_nll_backward_cuda);
  m.impl("token_nll_grad_", &token_nll_grad_cuda);
}

}  // namespace llcfast
