// CPU kernels for llcfast::token_nll, llcfast::token_nll_backward and
// llcfast::token_nll_grad_ (both at once, in place): one pass over each row
// per direction instead of log_softmax, gather and their backwards (a
// zero-filled scatter, then softmax's backward).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "token_nll.h"

namespace llcfast {
namespace {

// g * (softmax - onehot) of one row with log-sum-exp l, from src into dst
// (the same row where the gradient overwrites the logits).
template <typename scalar_t, typename acc_t>
void write_grad(const scalar_t* src, scalar_t* dst, int64_t vocab, int64_t target, acc_t g, acc_t l) {
  for (int64_t v = 0; v < vocab; ++v)
    dst[v] = static_cast<scalar_t>(g * (std::exp(static_cast<acc_t>(src[v]) - l) - (v == target ? 1 : 0)));
}

// Each row's (nll, lse); with `grad`, the row is then overwritten by
// scale * (softmax - onehot), in place (token_nll_grad_).
std::tuple<at::Tensor, at::Tensor> forward_rows(const at::Tensor& logits, const at::Tensor& targets, const char* op,
                                                bool grad, double scale) {
  const int64_t vocab = check_token_nll(logits, targets, op);
  at::Tensor nll = token_nll_output(logits, targets), lse = token_nll_output(logits, targets);
  const int64_t rows = targets.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_nll_forward_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* t = targets.data_ptr<int64_t>();
    acc_t* out_nll = nll.data_ptr<acc_t>();
    acc_t* out_lse = lse.data_ptr<acc_t>();
    const acc_t g = static_cast<acc_t>(scale);
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = x + r * vocab;
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t v = 0; v < vocab; ++v) m = std::max(m, static_cast<acc_t>(row[v]));
        acc_t s = 0;
        if (m != -std::numeric_limits<acc_t>::infinity())
          for (int64_t v = 0; v < vocab; ++v) s += std::exp(static_cast<acc_t>(row[v]) - m);
        const acc_t l = m + std::log(s);
        out_lse[r] = l;
        out_nll[r] = (t[r] >= 0 && t[r] < vocab) ? l - static_cast<acc_t>(row[t[r]])
                                                 : std::numeric_limits<acc_t>::quiet_NaN();
        if (grad) write_grad(row, row, vocab, t[r], g, l);
      }
    });
  });
  return {nll, lse};
}

std::tuple<at::Tensor, at::Tensor> token_nll_cpu(const at::Tensor& logits, const at::Tensor& targets) {
  return forward_rows(logits, targets, "token_nll", false, 0.0);
}

std::tuple<at::Tensor, at::Tensor> token_nll_grad_cpu(at::Tensor& logits, const at::Tensor& targets, double scale) {
  return forward_rows(logits, targets, "token_nll_grad_", true, scale);
}

at::Tensor token_nll_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse,
                                  const at::Tensor& targets) {
  check_token_nll_backward(grad, logits, lse, targets, "token_nll_backward");
  const int64_t vocab = logits.size(-1);
  at::Tensor out = at::empty_like(logits);
  const int64_t rows = targets.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "token_nll_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* t = targets.data_ptr<int64_t>();
    const acc_t* g = grad.data_ptr<acc_t>();
    const acc_t* l = lse.data_ptr<acc_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) write_grad(x + r * vocab, y + r * vocab, vocab, t[r], g[r], l[r]);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CPU, m) {
  m.impl("token_nll", &token_nll_cpu);
  m.impl("token_nll_backward", &token_nll_backward_cpu);
  m.impl("token_nll_grad_", &token_nll_grad_cpu);
}

}  // namespace llcfast
