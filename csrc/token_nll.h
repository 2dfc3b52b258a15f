// Shared between the CPU and CUDA kernels of llcfast::token_nll and
// llcfast::token_nll_backward: the argument checks (both backends reject bad
// input the same way) and the output allocation.
//
// token_nll(logits [..., V], targets [...]) -> (nll [...], lse [...]):
//   lse = log sum_v exp(logits[..., v]),  nll = lse - logits[..., target]
// token_nll_backward(grad [...], logits, lse, targets) -> grad_logits:
//   grad * (exp(logits - lse) - [v == target])
// token_nll_grad_(logits [..., V], targets [...], scale) -> (nll, lse), with
//   logits overwritten by scale * (exp(logits - lse) - [v == target])
// Sums run in float (double for double logits); a target outside [0, V)
// gives a NaN nll, since a device-side check would stall the stream.
#pragma once
#include <ATen/ATen.h>

#include "check.h"

namespace llcfast {

inline int64_t check_token_nll(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  LLC_CHECK(logits.dim() >= 1, op, ": logits must have a vocabulary dimension, got shape ", logits.sizes());
  LLC_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble ||
                logits.scalar_type() == at::kBFloat16 || logits.scalar_type() == at::kHalf,
            op, ": logits must be float32, float64, bfloat16 or float16, got ", logits.scalar_type());
  LLC_CHECK(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ", targets.scalar_type());
  LLC_CHECK(targets.sizes() == logits.sizes().slice(0, logits.dim() - 1), op, ": targets must have shape ",
            logits.sizes().slice(0, logits.dim() - 1), " (logits without the last dimension), got ",
            targets.sizes());
  LLC_CHECK(targets.device() == logits.device(), op, ": targets are on ", targets.device(), ", logits on ",
            logits.device());
  LLC_CHECK(logits.is_contiguous() && targets.is_contiguous(), op, ": logits and targets must be contiguous");
  const int64_t vocab = logits.size(-1);
  LLC_CHECK(vocab >= 1, op, ": the vocabulary dimension is empty");
  return vocab;
}

inline void check_token_nll_backward(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& lse,
                                     const at::Tensor& targets, const char* op) {
  check_token_nll(logits, targets, op);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad, &lse}) {
    LLC_CHECK(t->scalar_type() == acc, op, ": grad and lse must be ", acc, " for ", logits.scalar_type(),
              " logits, got ", t->scalar_type());
    LLC_CHECK(t->sizes() == targets.sizes(), op, ": grad and lse must have the targets' shape ", targets.sizes(),
              ", got ", t->sizes());
    LLC_CHECK(t->device() == logits.device() && t->is_contiguous(), op,
              ": grad and lse must be contiguous and on the logits' device");
  }
}

// nll and lse: the targets' shape, float32 (float64 for float64 logits).
inline at::Tensor token_nll_output(const at::Tensor& logits, const at::Tensor& targets) {
  return at::empty(targets.sizes(), logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble
                                                                                              : at::kFloat));
}

}  // namespace llcfast
