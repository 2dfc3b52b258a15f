// Shared between the CPU and CUDA kernels of llcfast::chain_layer_norm and
// llcfast::chain_layer_norm_backward: the argument checks (both backends
// reject bad input the same way) and the output allocation.
//
// chain_layer_norm(x [C, R, D], weight [C, D], bias [C, D]?, eps)
//     -> (y [C, R, D], mean [C, R], rstd [C, R]):
//   each row of chain c normalized over D, then y = xhat * weight[c] + bias[c]
// chain_layer_norm_backward(grad [C, R, D], x, mean, rstd, weight)
//     -> (dx [C, R, D], dweight [C, D], dbias [C, D])
// Statistics run in float (double for double x); mean and rstd are float32
// (float64 for float64 x), y and the gradients have x's and weight's dtype.
#pragma once
#include <ATen/ATen.h>

#include "check.h"

namespace llcfast {

inline at::ScalarType chain_norm_acc(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_chain_norm_params(const at::Tensor& x, const at::Tensor& p, const char* name, const char* op) {
  LLC_CHECK(p.dim() == 2 && p.size(0) == x.size(0) && p.size(1) == x.size(2), op, ": ", name,
            " must have shape [chains, features] = ", c10::IntArrayRef{x.size(0), x.size(2)}, ", got ", p.sizes());
  LLC_CHECK(p.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(), ", got ",
            p.scalar_type());
  LLC_CHECK(p.device() == x.device() && p.is_contiguous(), op, ": ", name, " must be contiguous and on x's device");
}

inline void check_chain_layer_norm(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                   const char* op) {
  LLC_CHECK(x.dim() == 3, op, ": x must be [chains, rows, features], got shape ", x.sizes());
  LLC_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16 ||
                x.scalar_type() == at::kHalf,
            op, ": x must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  LLC_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  LLC_CHECK(x.size(2) >= 1, op, ": the feature dimension is empty");
  check_chain_norm_params(x, weight, "weight", op);
  if (bias.has_value() && bias->defined()) check_chain_norm_params(x, *bias, "bias", op);
}

inline void check_chain_layer_norm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                            const at::Tensor& rstd, const at::Tensor& weight, const char* op) {
  check_chain_layer_norm(x, weight, c10::nullopt, op);
  LLC_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() && grad.is_contiguous() &&
                grad.device() == x.device(),
            op, ": grad must be contiguous with x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
            grad.sizes(), " ", grad.scalar_type());
  for (const at::Tensor* t : {&mean, &rstd}) {
    LLC_CHECK(t->sizes() == x.sizes().slice(0, 2) && t->scalar_type() == chain_norm_acc(x) && t->is_contiguous() &&
                  t->device() == x.device(),
              op, ": mean and rstd must be contiguous ", chain_norm_acc(x), " of shape ", x.sizes().slice(0, 2),
              ", got ", t->sizes(), " ", t->scalar_type());
  }
}

// mean and rstd: [C, R] in the accumulation dtype.
inline at::Tensor chain_norm_stat(const at::Tensor& x) {
  return at::empty({x.size(0), x.size(1)}, x.options().dtype(chain_norm_acc(x)));
}

}  // namespace llcfast
