// Shared between the CPU and CUDA implementations of llcfast::sgld_step_:
// the argument checks (so both backends reject bad input the same way) and the
// per-element update, written once.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <vector>

#include "check.h"
#include "philox.h"

namespace llcfast {

// Scalars of the update, folded once on the host in double precision so every
// backend (and the pure-torch twin) multiplies by the same float constants:
//   w' = w - (a*g + b*(w - w*) + e*w) + s*xi
struct SgldCoefficients {
  float a;  // eps/2 * nbeta
  float b;  // eps/2 * gamma
  float e;  // eps/2 * weight_decay
  float s;  // sqrt(eps) * noise_scale
};

inline SgldCoefficients fold_coefficients(double eps, double nbeta, double gamma,
                                          double weight_decay, double noise_scale) {
  const double vals[] = {eps, nbeta, gamma, weight_decay, noise_scale};
  const char* names[] = {"eps", "nbeta", "gamma", "weight_decay", "noise_scale"};
  for (int i = 0; i < 5; ++i) {
    LLC_CHECK(std::isfinite(vals[i]), "sgld_step_: ", names[i], " must be finite, got ", vals[i]);
  }
  LLC_CHECK(eps >= 0.0, "sgld_step_: eps must be >= 0, got ", eps);
  LLC_CHECK(noise_scale >= 0.0, "sgld_step_: noise_scale must be >= 0, got ", noise_scale);
  LLC_CHECK(gamma >= 0.0, "sgld_step_: gamma must be >= 0, got ", gamma);
  LLC_CHECK(weight_decay >= 0.0, "sgld_step_: weight_decay must be >= 0, got ", weight_decay);
  return SgldCoefficients{static_cast<float>(eps / 2.0 * nbeta), static_cast<float>(eps / 2.0 * gamma),
                          static_cast<float>(eps / 2.0 * weight_decay),
                          static_cast<float>(std::sqrt(eps) * noise_scale)};
}

// One element's update. Separate rounded ops in a fixed order, matching the
// twin's torch expression term by term.
LLC_HD float sgld_update(float w, float g, float center, float xi, const SgldCoefficients& k) {
  float t = rn_mul(k.a, g);
  t = rn_add(t, rn_mul(k.b, rn_sub(w, center)));
  t = rn_add(t, rn_mul(k.e, w));
  return rn_add(rn_sub(w, t), rn_mul(k.s, xi));
}

// Validates the tensor lists of one sgld_step_ call; returns the chain count.
int64_t check_sgld_inputs(const at::TensorList& params, const at::TensorList& grads,
                          const at::TensorList& centers, const c10::optional<at::TensorList>& masks,
                          const c10::optional<at::TensorList>& noise, const c10::optional<at::Tensor>& stats,
                          const c10::optional<at::Tensor>& step_tensor, int64_t seed, int64_t step,
                          int64_t chain_offset);

// Validates philox_normal_'s (or philox_rademacher_'s) output tensor and
// key; returns the group count.
int64_t check_philox_out(const at::Tensor& out, int64_t seed, int64_t step, int64_t chain_offset,
                         int64_t group_offset, const char* op = "philox_normal_");

// Validates multi_dot_'s operands: out [R] float64, a[i] and b[i] float32
// contiguous [R, ...] of equal shapes, all on out's device.
void check_multi_dot(const at::Tensor& out, const at::TensorList& a, const at::TensorList& b);

// Noise group offsets: tensor i's first element is global element
// 4 * group_offset[i]; every tensor starts on a fresh group of four.
std::vector<int64_t> group_offsets(const at::TensorList& params);

LLC_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace llcfast
