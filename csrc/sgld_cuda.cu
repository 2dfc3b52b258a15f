// CUDA kernel for llcfast::sgld_step_: one launch walks every tensor of the
// list (multi-tensor apply through a pointer table passed by value) and every
// chain. A thread owns one noise group of four elements: it reads the centre
// (and mask) once and loops over the chains, so w* is read once per step
// whatever the chain count. 16-byte loads where the table says alignment allows
// (8-byte for bf16 gradients and copies).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "sgld.h"

namespace llcfast {
namespace {

constexpr int kThreads = 256;

struct Entry {
  float* p;             // [C, n]
  float* s;             // [C, n] sampler state (RMSprop's V, SGNHT's momentum) or null
  const void* g;        // [C, n] float32, or bfloat16 where g_bf16
  const float* c;       // [n]
  const bool* m;        // [n] or null
  const float* z;       // [C, n] or null
  uint16_t* copy;       // [C, n] bfloat16 bits of the new w, or null
  int64_t n;            // elements per chain
  int64_t first;        // first launch-wide group index owned by this tensor
  uint32_t noise_group; // global noise group of the tensor's element 0
  int16_t vec;          // vector accesses legal for every chain row
  int16_t g_bf16;
};

template <int MaxT>
struct Table {
  Entry t[MaxT];
  int64_t total_groups;
  int32_t count;
};

struct Launch {
  StepScalars k;
  uint64_t seed;
  uint64_t step;
  uint32_t chain_offset;
  int32_t chains;
  double* stats;                // [C, 3] or null
  const int64_t* step_counter;  // added to step when not null (device memory)
  const float* thermostat;      // SGNHT: [C]
  double* energy;               // SGNHT: [C], sum of p^2 after the step
};

// Per-chain block accumulators: g^2, (w - w*)^2, noise^2, SGNHT's energy.
constexpr int kSlots = 4;

__device__ __forceinline__ float4 load4(const float* ptr, bool vec, int lanes) {
  if (vec) return *reinterpret_cast<const float4*>(ptr);
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  for (int j = 0; j < lanes; ++j) v[j] = ptr[j];
  return make_float4(v[0], v[1], v[2], v[3]);
}

__device__ __forceinline__ void store4(float* ptr, float4 v, bool vec, int lanes) {
  if (vec) {
    *reinterpret_cast<float4*>(ptr) = v;
    return;
  }
  const float a[4] = {v.x, v.y, v.z, v.w};
  for (int j = 0; j < lanes; ++j) ptr[j] = a[j];
}

// A bfloat16 widens to float32 exactly: its bits are the float's top half.
__device__ __forceinline__ float4 load_grad4(const Entry& E, int64_t row, bool vec, int lanes) {
  if (!E.g_bf16) return load4(static_cast<const float*>(E.g) + row, vec, lanes);
  const uint16_t* ptr = static_cast<const uint16_t*>(E.g) + row;
  uint32_t lo = 0, hi = 0;  // elements 0, 1 and 2, 3, little end first
  if (vec) {
    const uint2 u = *reinterpret_cast<const uint2*>(ptr);
    lo = u.x;
    hi = u.y;
  } else {
    uint32_t b[4] = {0u, 0u, 0u, 0u};
    for (int j = 0; j < lanes; ++j) b[j] = ptr[j];
    lo = b[0] | (b[1] << 16);
    hi = b[2] | (b[3] << 16);
  }
  return make_float4(__uint_as_float(lo << 16), __uint_as_float(lo & 0xffff0000u), __uint_as_float(hi << 16),
                     __uint_as_float(hi & 0xffff0000u));
}

// Rounds to nearest even through c10::BFloat16, as torch's .to(torch.bfloat16).
__device__ __forceinline__ void store_copy4(uint16_t* ptr, const float* v, bool vec, int lanes) {
  uint32_t b[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) b[j] = c10::BFloat16(v[j]).x;
  if (vec) {
    *reinterpret_cast<uint2*>(ptr) = make_uint2(b[0] | (b[1] << 16), b[2] | (b[3] << 16));
    return;
  }
  for (int j = 0; j < lanes; ++j) ptr[j] = static_cast<uint16_t>(b[j]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <int MaxT, Sampler S, bool kMask, bool kNoise, bool kStats>
__global__ void __launch_bounds__(kThreads) sgld_kernel(const __grid_constant__ Table<MaxT> tab, const Launch L) {
  constexpr bool kAcc = kStats || S == Sampler::kSgnht;
  extern __shared__ double block_stats[];  // [C * kSlots], only when kAcc
  if (kAcc) {
    for (int i = threadIdx.x; i < L.chains * kSlots; i += blockDim.x) block_stats[i] = 0.0;
    __syncthreads();
  }
  const uint64_t step = L.step + (L.step_counter != nullptr ? static_cast<uint64_t>(*L.step_counter) : 0u);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Every thread of a block runs the same number of iterations (inactive ones
  // contribute zeros) so the warp reductions below see full warps.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < tab.total_groups; base += stride) {
    const int64_t gi = base + threadIdx.x;
    const bool active = gi < tab.total_groups;
    int lo = 0;
    if (active) {
      int hi = tab.count - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (tab.t[mid].first <= gi) lo = mid; else hi = mid - 1;
      }
    }
    const Entry& E = tab.t[lo];
    const int64_t local = active ? gi - E.first : 0;
    const int64_t e0 = local * 4;
    const int lanes = active ? static_cast<int>(min(static_cast<int64_t>(4), E.n - e0)) : 0;
    const bool vec = E.vec && lanes == 4;
    float4 cen = make_float4(0.f, 0.f, 0.f, 0.f);
    bool mv[4] = {true, true, true, true};
    if (active) {
      cen = load4(E.c + e0, vec, lanes);
      if (kMask && E.m != nullptr) {
        for (int j = 0; j < 4; ++j) mv[j] = j < lanes && E.m[e0 + j];
      }
    }
    for (int ch = 0; ch < L.chains; ++ch) {
      float sg = 0.f, sd = 0.f, sn = 0.f, se = 0.f;
      if (active) {
        const int64_t row = static_cast<int64_t>(ch) * E.n + e0;
        const float4 w = load4(E.p + row, vec, lanes);
        const float4 g = load_grad4(E, row, vec, lanes);
        float4 st = make_float4(0.f, 0.f, 0.f, 0.f);
        if (S != Sampler::kSgld) st = load4(E.s + row, vec, lanes);
        float sa[4] = {st.x, st.y, st.z, st.w};
        const float therm = S == Sampler::kSgnht ? L.thermostat[ch] : 0.f;
        float4 xi;
        if (kNoise && E.z != nullptr) {
          xi = load4(E.z + row, vec, lanes);
        } else {
          const F4 r = normal4(L.seed, E.noise_group + static_cast<uint32_t>(local), L.chain_offset + ch, step);
          xi = make_float4(r.x, r.y, r.z, r.w);
        }
        const float wa[4] = {w.x, w.y, w.z, w.w}, ga[4] = {g.x, g.y, g.z, g.w};
        const float ca[4] = {cen.x, cen.y, cen.z, cen.w}, xa[4] = {xi.x, xi.y, xi.z, xi.w};
        float out[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const bool moves = (kMask ? mv[j] : true) && j < lanes;
          float added = 0.f;
          if (!moves) {
            out[j] = wa[j];
          } else if (S == Sampler::kSgld) {
            added = rn_mul(L.k.k.s, xa[j]);
            out[j] = sgld_update(wa[j], ga[j], ca[j], xa[j], L.k.k);
            if (L.k.box > 0.f) out[j] = box_clamp(out[j], ca[j], L.k.box);
          } else if (S == Sampler::kRmsprop) {
            out[j] = rmsprop_update(wa[j], ga[j], ca[j], xa[j], sa[j], L.k, &added);
          } else {
            added = rn_mul(L.k.fs, xa[j]);
            out[j] = sgnht_update(wa[j], ga[j], ca[j], xa[j], sa[j], therm, L.k);
            se += sa[j] * sa[j];
          }
          if (kStats && moves) {
            const float d = wa[j] - ca[j];
            sg += ga[j] * ga[j];
            sd += d * d;
            sn += added * added;
          }
        }
        store4(E.p + row, make_float4(out[0], out[1], out[2], out[3]), vec, lanes);
        if (E.copy != nullptr) store_copy4(E.copy + row, out, vec, lanes);
        if (S != Sampler::kSgld) store4(E.s + row, make_float4(sa[0], sa[1], sa[2], sa[3]), vec, lanes);
      }
      if (kStats) {
        sg = warp_sum(sg);
        sd = warp_sum(sd);
        sn = warp_sum(sn);
        if ((threadIdx.x & 31) == 0) {
          atomicAdd(&block_stats[ch * kSlots + 0], static_cast<double>(sg));
          atomicAdd(&block_stats[ch * kSlots + 1], static_cast<double>(sd));
          atomicAdd(&block_stats[ch * kSlots + 2], static_cast<double>(sn));
        }
      }
      if (S == Sampler::kSgnht) {
        se = warp_sum(se);
        if ((threadIdx.x & 31) == 0) atomicAdd(&block_stats[ch * kSlots + 3], static_cast<double>(se));
      }
    }
  }
  if (kAcc) {
    __syncthreads();
    for (int i = threadIdx.x; i < L.chains * kSlots; i += blockDim.x) {
      const int slot = i % kSlots, ch = i / kSlots;
      if (slot < 3) {
        if (kStats) atomicAdd(&L.stats[ch * 3 + slot], block_stats[i]);
      } else if (S == Sampler::kSgnht) {
        atomicAdd(&L.energy[ch], block_stats[i]);
      }
    }
  }
}

template <int MaxT, Sampler S, bool kMask, bool kNoise, bool kStats>
void launch(const Table<MaxT>& tab, const Launch& L, cudaStream_t stream, int device) {
  auto kernel = sgld_kernel<MaxT, S, kMask, kNoise, kStats>;
  constexpr bool kAcc = kStats || S == Sampler::kSgnht;
  const size_t shmem = kAcc ? sizeof(double) * kSlots * L.chains : 0;
  // Occupancy depends on the instantiation and, with accumulators, on the
  // chain count (shared memory); cache the common case per device.
  static int cached_per_sm[64] = {0};
  int per_sm = (!kAcc && device < 64) ? cached_per_sm[device] : 0;
  if (per_sm == 0) {
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shmem));
    per_sm = std::max(per_sm, 1);
    if (!kAcc && device < 64) cached_per_sm[device] = per_sm;
  }
  const int sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  const int64_t needed = ceil_div(tab.total_groups, kThreads);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, static_cast<int64_t>(sms) * per_sm)));
  kernel<<<blocks, kThreads, shmem, stream>>>(tab, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int MaxT>
void launch_table(const Table<MaxT>& tab, const Launch& L, Sampler sampler, bool mask, bool noise,
                  cudaStream_t stream, int device) {
  const bool stats = L.stats != nullptr;
  // For SGLD each combination of optional inputs is its own instantiation so
  // the common case (no mask, Philox noise, no stats) carries no dead
  // branches; the other samplers test mask and noise pointers at run time,
  // which keeps the instantiation count (and build time) down.
  if (sampler == Sampler::kRmsprop) {
    stats ? launch<MaxT, Sampler::kRmsprop, true, true, true>(tab, L, stream, device)
          : launch<MaxT, Sampler::kRmsprop, true, true, false>(tab, L, stream, device);
  } else if (sampler == Sampler::kSgnht) {
    stats ? launch<MaxT, Sampler::kSgnht, true, true, true>(tab, L, stream, device)
          : launch<MaxT, Sampler::kSgnht, true, true, false>(tab, L, stream, device);
  } else if (mask) {
    if (noise) stats ? launch<MaxT, Sampler::kSgld, true, true, true>(tab, L, stream, device) : launch<MaxT, Sampler::kSgld, true, true, false>(tab, L, stream, device);
    else stats ? launch<MaxT, Sampler::kSgld, true, false, true>(tab, L, stream, device) : launch<MaxT, Sampler::kSgld, true, false, false>(tab, L, stream, device);
  } else {
    if (noise) stats ? launch<MaxT, Sampler::kSgld, false, true, true>(tab, L, stream, device) : launch<MaxT, Sampler::kSgld, false, true, false>(tab, L, stream, device);
    else stats ? launch<MaxT, Sampler::kSgld, false, false, true>(tab, L, stream, device) : launch<MaxT, Sampler::kSgld, false, false, false>(tab, L, stream, device);
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }
bool aligned8(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 7u) == 0; }

// Fills a table with entries [begin, end) and launches it with the smallest
// table type that holds them.
template <int MaxT>
void launch_range(const std::vector<Entry>& entries, size_t begin, size_t end, const Launch& L, Sampler sampler,
                  bool mask, bool noise, cudaStream_t stream, int device) {
  Table<MaxT> tab;
  tab.count = static_cast<int32_t>(end - begin);
  int64_t total = 0;
  for (size_t i = begin; i < end; ++i) {
    tab.t[i - begin] = entries[i];
    tab.t[i - begin].first = total;
    total += ceil_div(entries[i].n, 4);
  }
  tab.total_groups = total;
  if (total > 0) launch_table<MaxT>(tab, L, sampler, mask, noise, stream, device);
}

constexpr int kSmallTable = 16;
constexpr int kMediumTable = 64;
// The largest table and the launch scalars stay under the 32,764-byte
// kernel-parameter limit (CUDA >= 12.1, Volta and newer).
constexpr int kLargeTable = 384;
static_assert(sizeof(Table<kLargeTable>) + sizeof(Launch) <= 32764, "sgld kernel parameters exceed 32,764 bytes");

// The host side shared by the three ops: builds the tensor table and
// launches. state and thermostat/energy are null for plain SGLD.
void step_cuda(Sampler sampler, at::TensorList params, const at::TensorList* state, at::TensorList grads,
               at::TensorList centers, const c10::optional<at::TensorList>& masks,
               const c10::optional<at::TensorList>& noise, const c10::optional<at::Tensor>& stats,
               const c10::optional<at::Tensor>& step_tensor, const float* thermostat, double* energy,
               int64_t chains, int64_t seed, int64_t step, int64_t chain_offset, const StepScalars& k,
               const c10::optional<at::TensorList>& copies = c10::nullopt) {
  LLC_CHECK(chains <= 4096, "at most 4096 chains per call on CUDA, got ", chains);
  const int device = params[0].device().index();
  const std::vector<int64_t> goff = group_offsets(params);

  std::vector<Entry> entries;
  entries.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel() / chains;
    if (n == 0) continue;
    Entry e{};
    e.p = params[i].data_ptr<float>();
    e.s = state != nullptr ? (*state)[i].data_ptr<float>() : nullptr;
    e.g_bf16 = grads[i].scalar_type() == at::kBFloat16;
    e.g = grads[i].data_ptr();
    e.c = centers[i].data_ptr<float>();
    e.m = masks.has_value() ? (*masks)[i].data_ptr<bool>() : nullptr;
    e.z = noise.has_value() ? (*noise)[i].data_ptr<float>() : nullptr;
    e.copy = copies.has_value() && (*copies)[i].numel() > 0
                 ? reinterpret_cast<uint16_t*>((*copies)[i].data_ptr<c10::BFloat16>()) : nullptr;
    e.n = n;
    e.noise_group = static_cast<uint32_t>(goff[i]);
    e.vec = (n % 4 == 0) && aligned16(e.p) && (e.g_bf16 ? aligned8(e.g) : aligned16(e.g)) && aligned16(e.c) &&
            (e.z == nullptr || aligned16(e.z)) && (e.s == nullptr || aligned16(e.s)) &&
            (e.copy == nullptr || aligned8(e.copy));
    entries.push_back(e);
  }
  Launch L{k, static_cast<uint64_t>(seed), static_cast<uint64_t>(step), static_cast<uint32_t>(chain_offset),
           static_cast<int32_t>(chains), stats.has_value() ? stats->data_ptr<double>() : nullptr,
           step_tensor.has_value() ? step_tensor->data_ptr<int64_t>() : nullptr, thermostat, energy};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool has_mask = masks.has_value(), has_noise = noise.has_value();
  const size_t count = entries.size();
  if (count <= static_cast<size_t>(kSmallTable)) {
    launch_range<kSmallTable>(entries, 0, count, L, sampler, has_mask, has_noise, stream, device);
  } else if (count <= static_cast<size_t>(kMediumTable)) {
    launch_range<kMediumTable>(entries, 0, count, L, sampler, has_mask, has_noise, stream, device);
  } else {
    for (size_t b = 0; b < count; b += kLargeTable)
      launch_range<kLargeTable>(entries, b, std::min(count, b + kLargeTable), L, sampler, has_mask, has_noise,
                                stream, device);
  }
}

void sgld_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList centers,
                    c10::optional<at::TensorList> masks, c10::optional<at::TensorList> noise,
                    const c10::optional<at::Tensor>& stats, const c10::optional<at::Tensor>& step_tensor,
                    int64_t seed, int64_t step, int64_t chain_offset, double eps, double nbeta, double gamma,
                    double weight_decay, double noise_scale, double bounding_box,
                    c10::optional<at::TensorList> bf16_copies) {
  const int64_t chains =
      check_sgld_inputs(params, grads, centers, masks, noise, stats, step_tensor, seed, step, chain_offset);
  if (bf16_copies.has_value()) check_bf16_copies(params, *bf16_copies);
  const StepScalars k = sgld_scalars(eps, nbeta, gamma, weight_decay, noise_scale, bounding_box);
  const c10::cuda::CUDAGuard guard(params[0].device());
  step_cuda(Sampler::kSgld, params, nullptr, grads, centers, masks, noise, stats, step_tensor, nullptr, nullptr,
            chains, seed, step, chain_offset, k, bf16_copies);
}

void rmsprop_sgld_step_cuda(at::TensorList params, at::TensorList square_avg, at::TensorList grads,
                            at::TensorList centers, c10::optional<at::TensorList> masks,
                            c10::optional<at::TensorList> noise, const c10::optional<at::Tensor>& stats,
                            const c10::optional<at::Tensor>& step_tensor, int64_t seed, int64_t step,
                            int64_t chain_offset, double eps, double nbeta, double gamma, double weight_decay,
                            double noise_scale, double alpha, double rms_eps, double bounding_box) {
  const int64_t chains = check_rmsprop_inputs(params, square_avg, grads, centers, masks, noise, stats, step_tensor,
                                              seed, step, chain_offset);
  const StepScalars k = rmsprop_scalars(eps, nbeta, gamma, weight_decay, noise_scale, alpha, rms_eps, bounding_box);
  const c10::cuda::CUDAGuard guard(params[0].device());
  step_cuda(Sampler::kRmsprop, params, &square_avg, grads, centers, masks, noise, stats, step_tensor, nullptr,
            nullptr, chains, seed, step, chain_offset, k);
}

void sgnht_step_cuda(at::TensorList params, at::TensorList momentum, at::Tensor thermostat, at::TensorList grads,
                     at::TensorList centers, c10::optional<at::TensorList> masks,
                     c10::optional<at::TensorList> noise, const c10::optional<at::Tensor>& stats,
                     const c10::optional<at::Tensor>& step_tensor, int64_t seed, int64_t step,
                     int64_t chain_offset, double eps, double nbeta, double gamma, double weight_decay,
                     double diffusion, double bounding_box) {
  const int64_t chains = check_sgnht_inputs(params, momentum, thermostat, grads, centers, masks, noise, stats,
                                            step_tensor, seed, step, chain_offset);
  const StepScalars k = sgnht_scalars(eps, nbeta, gamma, weight_decay, diffusion, bounding_box);
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::Tensor energy = at::zeros({chains}, thermostat.options().dtype(at::kDouble));
  step_cuda(Sampler::kSgnht, params, &momentum, grads, centers, masks, noise, stats, step_tensor,
            thermostat.data_ptr<float>(), energy.data_ptr<double>(), chains, seed, step, chain_offset, k);
  update_thermostat(thermostat, energy, params, masks, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CUDA, m) {
  m.impl("sgld_step_", &sgld_step_cuda);
  m.impl("rmsprop_sgld_step_", &rmsprop_sgld_step_cuda);
  m.impl("sgnht_step_", &sgnht_step_cuda);
}

}  // namespace llcfast
