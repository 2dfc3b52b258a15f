// CPU kernel for llcfast::lanczos_step_ (see lanczos.h), and the input check
// shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "lanczos.h"

namespace llcfast {

void check_lanczos_step(const at::Tensor& basis, const at::Tensor& w, int64_t j, const at::Tensor& out) {
  LLC_CHECK(basis.scalar_type() == at::kFloat && basis.dim() == 3 && basis.is_contiguous(),
            "lanczos_step_: basis must be a contiguous float32 [R, m, N] tensor, got ", basis.scalar_type(), " ",
            basis.sizes());
  const int64_t rows = basis.size(0), m = basis.size(1), n = basis.size(2);
  LLC_CHECK(m >= 1 && m <= kLanczosMaxSteps, "lanczos_step_: basis holds m = ", m,
            " vectors per row; allowed 1..", kLanczosMaxSteps);
  LLC_CHECK(n >= 1, "lanczos_step_: basis vectors must have at least one element, got N = ", n);
  LLC_CHECK(j >= 0 && j < m, "lanczos_step_: j = ", j, " must index a basis vector, 0 <= j < ", m);
  LLC_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(0) == rows &&
                w.size(1) == n,
            "lanczos_step_: w must be a contiguous float32 [", rows, ", ", n, "] tensor, got ", w.scalar_type(),
            " ", w.sizes());
  LLC_CHECK(out.scalar_type() == at::kDouble && out.is_contiguous() && out.dim() == 2 && out.size(0) == rows &&
                out.size(1) == 2,
            "lanczos_step_: out must be a contiguous float64 [", rows, ", 2] tensor, got ", out.scalar_type(), " ",
            out.sizes());
  LLC_CHECK(w.device() == basis.device() && out.device() == basis.device(),
            "lanczos_step_: basis, w and out must be on one device, got ", basis.device(), ", ", w.device(), ", ",
            out.device());
}

namespace {

// Fixed element blocks, summed in block order, so results do not depend on
// the thread count.
constexpr int64_t kBlock = 1 << 12;

struct Piece { int64_t row, begin, len; };

// One pass over every (row, block) piece. With sub (else nullptr) the block
// of w first becomes w - V^T sub[row]; then dots[piece][k] = <V_k, w> for
// k < count (when dots is given) and sq[piece] = <w, w> (when sq is given).
void pass(const float* basis, float* w, int64_t m, int64_t n, int64_t count, const std::vector<Piece>& pieces,
          const double* sub, double* dots, double* sq) {
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t p0, int64_t p1) {
    std::vector<double> acc(kBlock);
    for (int64_t p = p0; p < p1; ++p) {
      const Piece& pc = pieces[p];
      const float* v = basis + pc.row * m * n + pc.begin;
      float* x = w + pc.row * n + pc.begin;
      if (sub != nullptr) {
        const double* c = sub + pc.row * count;
        for (int64_t e = 0; e < pc.len; ++e) acc[e] = x[e];
        for (int64_t k = 0; k < count; ++k) {
          const float* vk = v + k * n;
          for (int64_t e = 0; e < pc.len; ++e) acc[e] -= c[k] * static_cast<double>(vk[e]);
        }
        for (int64_t e = 0; e < pc.len; ++e) x[e] = static_cast<float>(acc[e]);
      }
      if (dots != nullptr) {
        for (int64_t k = 0; k < count; ++k) {
          const float* vk = v + k * n;
          double s = 0.0;
          for (int64_t e = 0; e < pc.len; ++e) s += static_cast<double>(vk[e]) * static_cast<double>(x[e]);
          dots[p * count + k] = s;
        }
      }
      if (sq != nullptr) {
        double s = 0.0;
        for (int64_t e = 0; e < pc.len; ++e) s += static_cast<double>(x[e]) * static_cast<double>(x[e]);
        sq[p] = s;
      }
    }
  });
}

void lanczos_step_cpu(at::Tensor& basis, at::Tensor& w, int64_t j, at::Tensor& out) {
  check_lanczos_step(basis, w, j, out);
  const int64_t rows = basis.size(0), m = basis.size(1), n = basis.size(2), count = j + 1;
  std::vector<Piece> pieces;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t s = 0; s < n; s += kBlock) pieces.push_back({r, s, std::min(kBlock, n - s)});
  const int64_t np = static_cast<int64_t>(pieces.size());
  std::vector<double> dots(np * count), c1(rows * count), c2(rows * count), sq(np), norm2(rows);
  auto gather = [&](std::vector<double>& into) {
    std::fill(into.begin(), into.end(), 0.0);
    for (int64_t p = 0; p < np; ++p)
      for (int64_t k = 0; k < count; ++k) into[pieces[p].row * count + k] += dots[p * count + k];
  };
  float* V = basis.data_ptr<float>();
  float* x = w.data_ptr<float>();
  pass(V, x, m, n, count, pieces, nullptr, dots.data(), nullptr);
  gather(c1);
  pass(V, x, m, n, count, pieces, c1.data(), dots.data(), nullptr);
  gather(c2);
  pass(V, x, m, n, count, pieces, c2.data(), nullptr, sq.data());
  for (int64_t p = 0; p < np; ++p) norm2[pieces[p].row] += sq[p];
  double* o = out.data_ptr<double>();
  for (int64_t r = 0; r < rows; ++r) {
    const double beta = std::sqrt(norm2[r]);
    o[2 * r] = c1[r * count + j];
    o[2 * r + 1] = beta;
    if (j + 1 < m) {
      const double inv = 1.0 / std::max(beta, 1e-300);
      float* next = V + (r * m + j + 1) * n;
      const float* res = x + r * n;
      at::parallel_for(0, n, kBlock, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e) next[e] = static_cast<float>(static_cast<double>(res[e]) * inv);
      });
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CPU, m) {
  m.impl("lanczos_step_", &lanczos_step_cpu);
}

}  // namespace llcfast
