// CPU kernels for llcfast::sgld_step_ and llcfast::philox_normal_.
//
// Work is split into fixed blocks of noise groups, independent of the thread
// count; per-block partial statistics are summed in block order, so results
// (stats included) are identical for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "philox_fill.h"
#include "sgld.h"

namespace llcfast {

namespace {

constexpr int64_t kGroupsPerBlock = 1024;

struct BlockRef {
  int64_t tensor;
  int64_t first_group;  // within the tensor
};

void sgld_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList centers,
                   c10::optional<at::TensorList> masks, c10::optional<at::TensorList> noise,
                   const c10::optional<at::Tensor>& stats, const c10::optional<at::Tensor>& step_tensor,
                   int64_t seed, int64_t step, int64_t chain_offset, double eps, double nbeta, double gamma,
                   double weight_decay, double noise_scale) {
  const int64_t chains =
      check_sgld_inputs(params, grads, centers, masks, noise, stats, step_tensor, seed, step, chain_offset);
  if (step_tensor.has_value()) step += step_tensor->item<int64_t>();
  const SgldCoefficients k = fold_coefficients(eps, nbeta, gamma, weight_decay, noise_scale);
  const std::vector<int64_t> goff = group_offsets(params);

  std::vector<BlockRef> blocks;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t groups = ceil_div(params[i].numel() / chains, 4);
    for (int64_t g = 0; g < groups; g += kGroupsPerBlock) blocks.push_back({static_cast<int64_t>(i), g});
  }
  const bool want_stats = stats.has_value();
  std::vector<double> partial(want_stats ? blocks.size() * chains * 3 : 0, 0.0);

  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t ti = blocks[b].tensor;
      const int64_t n = params[ti].numel() / chains;
      float* p = params[ti].data_ptr<float>();
      const float* g = grads[ti].data_ptr<float>();
      const float* c = centers[ti].data_ptr<float>();
      const bool* m = masks.has_value() ? (*masks)[ti].data_ptr<bool>() : nullptr;
      const float* z = noise.has_value() ? (*noise)[ti].data_ptr<float>() : nullptr;
      double* acc = want_stats ? &partial[b * chains * 3] : nullptr;
      const int64_t g_end = std::min(blocks[b].first_group + kGroupsPerBlock, ceil_div(n, 4));
      for (int64_t grp = blocks[b].first_group; grp < g_end; ++grp) {
        const int64_t e0 = grp * 4;
        const int lanes = static_cast<int>(std::min<int64_t>(4, n - e0));
        for (int64_t ch = 0; ch < chains; ++ch) {
          float xi[4];
          if (z == nullptr) {
            const F4 r = normal4(static_cast<uint64_t>(seed), static_cast<uint32_t>(goff[ti] + grp),
                                 static_cast<uint32_t>(chain_offset + ch), static_cast<uint64_t>(step));
            xi[0] = r.x; xi[1] = r.y; xi[2] = r.z; xi[3] = r.w;
          }
          float* pc = p + ch * n + e0;
          const float* gc = g + ch * n + e0;
          for (int j = 0; j < lanes; ++j) {
            if (m != nullptr && !m[e0 + j]) continue;
            const float x = (z != nullptr) ? z[ch * n + e0 + j] : xi[j];
            const float w = pc[j];
            if (acc != nullptr) {
              const double d = static_cast<double>(w) - static_cast<double>(c[e0 + j]);
              const double sx = static_cast<double>(rn_mul(k.s, x));
              acc[ch * 3 + 0] += static_cast<double>(gc[j]) * gc[j];
              acc[ch * 3 + 1] += d * d;
              acc[ch * 3 + 2] += sx * sx;
            }
            pc[j] = sgld_update(w, gc[j], c[e0 + j], x, k);
          }
        }
      }
    }
  });

  if (want_stats) {
    at::Tensor s = stats->contiguous();
    double* out = s.data_ptr<double>();
    for (size_t b = 0; b < blocks.size(); ++b)
      for (int64_t i = 0; i < chains * 3; ++i) out[i] += partial[b * chains * 3 + i];
  }
}

void philox_normal_cpu(at::Tensor& out, int64_t seed, int64_t step, int64_t chain_offset, int64_t group_offset) {
  const int64_t groups = check_philox_out(out, seed, step, chain_offset, group_offset);
  fill_groups_cpu(out, groups, NormalGen{static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                                         static_cast<uint32_t>(chain_offset), static_cast<uint32_t>(group_offset)});
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CPU, m) {
  m.impl("sgld_step_", &sgld_step_cpu);
  m.impl("philox_normal_", &philox_normal_cpu);
}

}  // namespace llcfast
