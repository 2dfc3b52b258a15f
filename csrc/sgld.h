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

// The samplers beyond plain SGLD share the SGLD kernels' walk over tensors,
// chains and noise groups; they differ in the per-element update and in the
// state they carry (RMSprop's running mean of g^2, SGNHT's momentum).
enum class Sampler : int { kSgld = 0, kRmsprop = 1, kSgnht = 2 };

// Every scalar a step needs, folded on the host in double precision.
struct StepScalars {
  SgldCoefficients k;  // SGLD and RMSprop-SGLD: eps/2-scaled (a, b, e, s)
  float box;           // bounding box half-width; 0 = none
  float alpha;         // RMSprop: V <- alpha*V + (1 - alpha)*g*g
  float one_m_alpha;
  float rms_eps;       // RMSprop: G = 1 / (sqrt(V) + rms_eps)
  // SGNHT: p <- p - (fa*g + fb*(w - w*) + fe*w) - xi*p + fs*N, w <- w + p
  float fa, fb, fe, fs;
};

inline void check_box(double box, const char* op) {
  LLC_CHECK(std::isfinite(box) && box >= 0.0, op, ": bounding_box must be finite and >= 0 (0 = none), got ", box);
}

inline StepScalars sgld_scalars(double eps, double nbeta, double gamma, double weight_decay, double noise_scale,
                                double box) {
  check_box(box, "sgld_step_");
  StepScalars s{};
  s.k = fold_coefficients(eps, nbeta, gamma, weight_decay, noise_scale);
  s.box = static_cast<float>(box);
  return s;
}

inline StepScalars rmsprop_scalars(double eps, double nbeta, double gamma, double weight_decay, double noise_scale,
                                   double alpha, double rms_eps, double box) {
  StepScalars s = sgld_scalars(eps, nbeta, gamma, weight_decay, noise_scale, box);
  LLC_CHECK(std::isfinite(alpha) && alpha >= 0.0 && alpha < 1.0, "rmsprop_sgld_step_: alpha must be in [0, 1), got ",
            alpha);
  LLC_CHECK(std::isfinite(rms_eps) && rms_eps > 0.0, "rmsprop_sgld_step_: rms_eps must be > 0, got ", rms_eps);
  s.alpha = static_cast<float>(alpha);
  s.one_m_alpha = static_cast<float>(1.0 - alpha);
  s.rms_eps = static_cast<float>(rms_eps);
  return s;
}

inline StepScalars sgnht_scalars(double eps, double nbeta, double gamma, double weight_decay, double diffusion,
                                 double box) {
  // The SGLD checks cover eps, nbeta, gamma and weight_decay; diffusion plays noise_scale's part.
  StepScalars s = sgld_scalars(eps, nbeta, gamma, weight_decay, 1.0, box);
  LLC_CHECK(std::isfinite(diffusion) && diffusion >= 0.0, "sgnht_step_: diffusion must be >= 0, got ", diffusion);
  s.fa = static_cast<float>(eps * nbeta);
  s.fb = static_cast<float>(eps * gamma);
  s.fe = static_cast<float>(eps * weight_decay);
  s.fs = static_cast<float>(std::sqrt(2.0 * diffusion * eps));
  return s;
}

// Clamp to [c - box, c + box]; NaN passes through (as torch.clamp), so a
// diverged chain is still seen as diverged.
LLC_HD float box_clamp(float w, float c, float box) {
  const float lo = rn_sub(c, box), hi = rn_add(c, box);
  return w < lo ? lo : (w > hi ? hi : w);
}

// The force term of SGLD and RMSprop-SGLD (before preconditioning).
LLC_HD float sgld_force(float w, float g, float center, const SgldCoefficients& k) {
  float t = rn_mul(k.a, g);
  t = rn_add(t, rn_mul(k.b, rn_sub(w, center)));
  return rn_add(t, rn_mul(k.e, w));
}

// RMSprop-SGLD: updates v in place and returns the new w; *noise_out gets the
// noise actually added (for the stats).
LLC_HD float rmsprop_update(float w, float g, float center, float xi, float& v, const StepScalars& s,
                            float* noise_out) {
  v = rn_add(rn_mul(s.alpha, v), rn_mul(rn_mul(s.one_m_alpha, g), g));
  const float G = rn_div(1.0f, rn_add(rn_sqrt(v), s.rms_eps));
  const float nt = rn_mul(rn_sqrt(G), rn_mul(s.k.s, xi));
  *noise_out = nt;
  float out = rn_add(rn_sub(w, rn_mul(G, sgld_force(w, g, center, s.k))), nt);
  return s.box > 0.0f ? box_clamp(out, center, s.box) : out;
}

// SGNHT: updates the momentum p in place (reflected where the box stops w)
// and returns the new w.
LLC_HD float sgnht_update(float w, float g, float center, float xi, float& p, float thermostat,
                          const StepScalars& s) {
  float t = rn_mul(s.fa, g);
  t = rn_add(t, rn_mul(s.fb, rn_sub(w, center)));
  t = rn_add(t, rn_mul(s.fe, w));
  float q = rn_sub(p, t);
  q = rn_sub(q, rn_mul(thermostat, p));
  q = rn_add(q, rn_mul(s.fs, xi));
  float out = rn_add(w, q);
  if (s.box > 0.0f) {
    const bool inside = fabsf(rn_sub(out, center)) < s.box;
    out = box_clamp(out, center, s.box);
    if (!inside) q = -q;
  }
  p = q;
  return out;
}

// check_sgld_inputs plus each sampler's state (and SGNHT's thermostat), for
// the CPU and CUDA ops alike; return the chain count.
int64_t check_rmsprop_inputs(const at::TensorList& params, const at::TensorList& square_avg,
                             const at::TensorList& grads, const at::TensorList& centers,
                             const c10::optional<at::TensorList>& masks, const c10::optional<at::TensorList>& noise,
                             const c10::optional<at::Tensor>& stats, const c10::optional<at::Tensor>& step_tensor,
                             int64_t seed, int64_t step, int64_t chain_offset);
int64_t check_sgnht_inputs(const at::TensorList& params, const at::TensorList& momentum, const at::Tensor& thermostat,
                           const at::TensorList& grads, const at::TensorList& centers,
                           const c10::optional<at::TensorList>& masks, const c10::optional<at::TensorList>& noise,
                           const c10::optional<at::Tensor>& stats, const c10::optional<at::Tensor>& step_tensor,
                           int64_t seed, int64_t step, int64_t chain_offset);

// SGNHT's thermostat step after the fused pass: xi += energy / count - eps,
// count = moving elements per chain. Shared by the CPU and CUDA ops.
void update_thermostat(at::Tensor& thermostat, const at::Tensor& energy, at::TensorList params,
                       const c10::optional<at::TensorList>& masks, double eps);

// Validates the tensor lists of one sgld_step_ call (grads float32 or
// bfloat16, the others float32); returns the chain count.
int64_t check_sgld_inputs(const at::TensorList& params, const at::TensorList& grads,
                          const at::TensorList& centers, const c10::optional<at::TensorList>& masks,
                          const c10::optional<at::TensorList>& noise, const c10::optional<at::Tensor>& stats,
                          const c10::optional<at::Tensor>& step_tensor, int64_t seed, int64_t step,
                          int64_t chain_offset);

// Validates sgld_step_'s bf16_copies: one per parameter tensor, each empty
// (no copy) or bfloat16, contiguous and shaped like its parameter.
void check_bf16_copies(const at::TensorList& params, const at::TensorList& copies);

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
