// llcfast::lanczos_step_: one step of Lanczos with full reorthogonalization
// (classical Gram-Schmidt, twice), for R independent rows at once.
//
// With V = basis[r, :j+1] (orthonormal) and w = H v_j on entry:
//   c1 = V w,             alpha = c1[j]
//   w <- w - V^T c1,      c2 = V w        (one pass: the update and the dots)
//   w <- w - V^T c2,      beta = |w|      (one pass: the update and the norm)
//   basis[r, j+1] = w / beta              (when j + 1 < m)
// Three passes over V is the least the recurrence allows: each pass needs the
// previous pass's reduction. Reductions accumulate in float64.
#pragma once
#include <ATen/core/Tensor.h>

#include "check.h"

namespace llcfast {

// Dynamic shared memory on CUDA holds two float64 coefficient vectors of
// length j + 1; this bound keeps them within the default 48 KiB. Longer runs
// use the pure-torch twin (llcfast.ops.lanczos_step_ routes them).
constexpr int64_t kLanczosMaxSteps = 2048;

// Validates basis [R, m, N] float32, w [R, N] float32, out [R, 2] float64
// (all contiguous, one device) and 0 <= j < m <= kLanczosMaxSteps.
void check_lanczos_step(const at::Tensor& basis, const at::Tensor& w, int64_t j, const at::Tensor& out);

}  // namespace llcfast
