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

// Per-chain accumulators: g^2, (w - w*)^2, noise^2 (the stats) and, for
// SGNHT, the kinetic energy sum of p^2 after the step.
constexpr int kSlots = 4;

template <Sampler S>
void step_cpu(at::TensorList params, c10::optional<at::TensorList> state, const at::Tensor* thermostat,
              at::TensorList grads, at::TensorList centers, c10::optional<at::TensorList> masks,
              c10::optional<at::TensorList> noise, const c10::optional<at::Tensor>& stats, double* energy_out,
              int64_t chains, int64_t seed, int64_t step, int64_t chain_offset, const StepScalars& k,
              const c10::optional<at::TensorList>& copies = c10::nullopt) {
  const std::vector<int64_t> goff = group_offsets(params);
  std::vector<BlockRef> blocks;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t groups = ceil_div(params[i].numel() / chains, 4);
    for (int64_t g = 0; g < groups; g += kGroupsPerBlock) blocks.push_back({static_cast<int64_t>(i), g});
  }
  const bool want_stats = stats.has_value();
  const bool want_acc = want_stats || S == Sampler::kSgnht;
  std::vector<double> partial(want_acc ? blocks.size() * chains * kSlots : 0, 0.0);
  const float* xi_t = thermostat != nullptr ? thermostat->data_ptr<float>() : nullptr;

  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t ti = blocks[b].tensor;
      const int64_t n = params[ti].numel() / chains;
      float* p = params[ti].data_ptr<float>();
      float* st = state.has_value() ? (*state)[ti].data_ptr<float>() : nullptr;
      // bf16 gradients widen exactly to float32
      const bool g_bf16 = grads[ti].scalar_type() == at::kBFloat16;
      const float* g = g_bf16 ? nullptr : grads[ti].data_ptr<float>();
      const c10::BFloat16* gb = g_bf16 ? grads[ti].data_ptr<c10::BFloat16>() : nullptr;
      c10::BFloat16* cp = copies.has_value() && (*copies)[ti].numel() > 0
                              ? (*copies)[ti].data_ptr<c10::BFloat16>() : nullptr;
      const float* c = centers[ti].data_ptr<float>();
      const bool* m = masks.has_value() ? (*masks)[ti].data_ptr<bool>() : nullptr;
      const float* z = noise.has_value() ? (*noise)[ti].data_ptr<float>() : nullptr;
      double* acc = want_acc ? &partial[b * chains * kSlots] : nullptr;
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
          float* sc = st != nullptr ? st + ch * n + e0 : nullptr;
          float gc[4];
          for (int j = 0; j < lanes; ++j) gc[j] = g_bf16 ? static_cast<float>(gb[ch * n + e0 + j]) : g[ch * n + e0 + j];
          for (int j = 0; j < lanes; ++j) {
            if (m != nullptr && !m[e0 + j]) continue;
            const float x = (z != nullptr) ? z[ch * n + e0 + j] : xi[j];
            const float w = pc[j];
            float added = 0.0f;
            float out;
            if (S == Sampler::kSgld) {
              added = rn_mul(k.k.s, x);
              out = sgld_update(w, gc[j], c[e0 + j], x, k.k);
              if (k.box > 0.0f) out = box_clamp(out, c[e0 + j], k.box);
            } else if (S == Sampler::kRmsprop) {
              out = rmsprop_update(w, gc[j], c[e0 + j], x, sc[j], k, &added);
            } else {
              added = rn_mul(k.fs, x);
              out = sgnht_update(w, gc[j], c[e0 + j], x, sc[j], xi_t[ch], k);
            }
            if (acc != nullptr) {
              if (want_stats) {
                const double d = static_cast<double>(w) - static_cast<double>(c[e0 + j]);
                acc[ch * kSlots + 0] += static_cast<double>(gc[j]) * gc[j];
                acc[ch * kSlots + 1] += d * d;
                acc[ch * kSlots + 2] += static_cast<double>(added) * added;
              }
              if (S == Sampler::kSgnht) acc[ch * kSlots + 3] += static_cast<double>(sc[j]) * sc[j];
            }
            pc[j] = out;
          }
          // every lane, masked ones too; rounds to nearest even, as .to(torch.bfloat16)
          if (cp != nullptr)
            for (int j = 0; j < lanes; ++j) cp[ch * n + e0 + j] = c10::BFloat16(pc[j]);
        }
      }
    }
  });

  if (want_acc) {
    double* out = want_stats ? stats->data_ptr<double>() : nullptr;
    for (size_t b = 0; b < blocks.size(); ++b)
      for (int64_t ch = 0; ch < chains; ++ch) {
        const double* a = &partial[(b * chains + ch) * kSlots];
        if (out != nullptr)
          for (int i = 0; i < 3; ++i) out[ch * 3 + i] += a[i];
        if (energy_out != nullptr) energy_out[ch] += a[3];
      }
  }
}

void sgld_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList centers,
                   c10::optional<at::TensorList> masks, c10::optional<at::TensorList> noise,
                   const c10::optional<at::Tensor>& stats, const c10::optional<at::Tensor>& step_tensor,
                   int64_t seed, int64_t step, int64_t chain_offset, double eps, double nbeta, double gamma,
                   double weight_decay, double noise_scale, double bounding_box,
                   c10::optional<at::TensorList> bf16_copies) {
  const int64_t chains =
      check_sgld_inputs(params, grads, centers, masks, noise, stats, step_tensor, seed, step, chain_offset);
  if (bf16_copies.has_value()) check_bf16_copies(params, *bf16_copies);
  if (step_tensor.has_value()) step += step_tensor->item<int64_t>();
  const StepScalars k = sgld_scalars(eps, nbeta, gamma, weight_decay, noise_scale, bounding_box);
  step_cpu<Sampler::kSgld>(params, c10::nullopt, nullptr, grads, centers, masks, noise, stats, nullptr, chains, seed,
                           step, chain_offset, k, bf16_copies);
}

void rmsprop_sgld_step_cpu(at::TensorList params, at::TensorList square_avg, at::TensorList grads,
                           at::TensorList centers, c10::optional<at::TensorList> masks,
                           c10::optional<at::TensorList> noise, const c10::optional<at::Tensor>& stats,
                           const c10::optional<at::Tensor>& step_tensor, int64_t seed, int64_t step,
                           int64_t chain_offset, double eps, double nbeta, double gamma, double weight_decay,
                           double noise_scale, double alpha, double rms_eps, double bounding_box) {
  const int64_t chains = check_rmsprop_inputs(params, square_avg, grads, centers, masks, noise, stats, step_tensor,
                                              seed, step, chain_offset);
  if (step_tensor.has_value()) step += step_tensor->item<int64_t>();
  const StepScalars k = rmsprop_scalars(eps, nbeta, gamma, weight_decay, noise_scale, alpha, rms_eps, bounding_box);
  step_cpu<Sampler::kRmsprop>(params, square_avg, nullptr, grads, centers, masks, noise, stats, nullptr, chains,
                              seed, step, chain_offset, k);
}

void sgnht_step_cpu(at::TensorList params, at::TensorList momentum, at::Tensor thermostat, at::TensorList grads,
                    at::TensorList centers, c10::optional<at::TensorList> masks,
                    c10::optional<at::TensorList> noise, const c10::optional<at::Tensor>& stats,
                    const c10::optional<at::Tensor>& step_tensor, int64_t seed, int64_t step, int64_t chain_offset,
                    double eps, double nbeta, double gamma, double weight_decay, double diffusion,
                    double bounding_box) {
  const int64_t chains = check_sgnht_inputs(params, momentum, thermostat, grads, centers, masks, noise, stats,
                                            step_tensor, seed, step, chain_offset);
  if (step_tensor.has_value()) step += step_tensor->item<int64_t>();
  const StepScalars k = sgnht_scalars(eps, nbeta, gamma, weight_decay, diffusion, bounding_box);
  at::Tensor energy = at::zeros({chains}, thermostat.options().dtype(at::kDouble));
  step_cpu<Sampler::kSgnht>(params, momentum, &thermostat, grads, centers, masks, noise, stats,
                            energy.data_ptr<double>(), chains, seed, step, chain_offset, k);
  update_thermostat(thermostat, energy, params, masks, eps);
}

void philox_normal_cpu(at::Tensor& out, int64_t seed, int64_t step, int64_t chain_offset, int64_t group_offset) {
  const int64_t groups = check_philox_out(out, seed, step, chain_offset, group_offset);
  fill_groups_cpu(out, groups, NormalGen{static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                                         static_cast<uint32_t>(chain_offset), static_cast<uint32_t>(group_offset)});
}

}  // namespace

void update_thermostat(at::Tensor& thermostat, const at::Tensor& energy, at::TensorList params,
                       const c10::optional<at::TensorList>& masks, double eps) {
  // xi <- xi + mean(p^2) - eps per chain, the mean over the chain's moving
  // elements; device-side ops only, so a captured CUDA graph can hold it.
  at::Tensor count;
  if (masks.has_value()) {
    count = at::zeros({}, energy.options());
    for (const at::Tensor& m : *masks) count = count + m.sum(at::kDouble);
    count = count.clamp_min(1.0);
  } else {
    int64_t n = 0;
    for (const at::Tensor& p : params) n += p.numel() / p.size(0);
    count = at::full({}, static_cast<double>(std::max<int64_t>(n, 1)), energy.options());
  }
  thermostat.add_((energy / count - eps).to(at::kFloat));
}

TORCH_LIBRARY_IMPL(llcfast, CPU, m) {
  m.impl("sgld_step_", &sgld_step_cpu);
  m.impl("rmsprop_sgld_step_", &rmsprop_sgld_step_cpu);
  m.impl("sgnht_step_", &sgnht_step_cpu);
  m.impl("philox_normal_", &philox_normal_cpu);
}

}  // namespace llcfast
