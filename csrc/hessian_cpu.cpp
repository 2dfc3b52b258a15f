// CPU kernels for llcfast::philox_rademacher_ (Hessian probes) and
// llcfast::multi_dot_ (per-row dot products across a list of tensors).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "philox_fill.h"
#include "sgld.h"

namespace llcfast {
namespace {

void philox_rademacher_cpu(at::Tensor& out, int64_t seed, int64_t stream, int64_t row_offset, int64_t group_offset) {
  const int64_t groups = check_philox_out(out, seed, stream, row_offset, group_offset, "philox_rademacher_");
  fill_groups_cpu(out, groups, RademacherGen{static_cast<uint64_t>(seed), static_cast<uint64_t>(stream),
                                             static_cast<uint32_t>(row_offset), static_cast<uint32_t>(group_offset)});
}

// Fixed blocks of elements per (tensor, row), summed in a fixed order, so the
// result does not depend on the thread count.
constexpr int64_t kDotBlock = 1 << 14;

void multi_dot_cpu(at::Tensor& out, at::TensorList a, at::TensorList b) {
  check_multi_dot(out, a, b);
  const int64_t rows = out.size(0);
  struct Piece { const float* x; const float* y; int64_t len; int64_t row; };
  std::vector<Piece> pieces;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].numel() == 0) continue;
    const int64_t per_row = a[i].numel() / rows;
    const float* x = a[i].data_ptr<float>();
    const float* y = b[i].data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t s = 0; s < per_row; s += kDotBlock)
        pieces.push_back({x + r * per_row + s, y + r * per_row + s, std::min(kDotBlock, per_row - s), r});
  }
  std::vector<double> partial(pieces.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      double acc = 0.0;
      const Piece& pc = pieces[p];
      for (int64_t e = 0; e < pc.len; ++e) acc += static_cast<double>(pc.x[e]) * static_cast<double>(pc.y[e]);
      partial[p] = acc;
    }
  });
  double* o = out.data_ptr<double>();
  for (size_t p = 0; p < pieces.size(); ++p) o[pieces[p].row] += partial[p];
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CPU, m) {
  m.impl("philox_rademacher_", &philox_rademacher_cpu);
  m.impl("multi_dot_", &multi_dot_cpu);
}

}  // namespace llcfast
