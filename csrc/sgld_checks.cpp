// Argument checks shared by every backend of llcfast::sgld_step_. The Python
// wrappers check first with friendlier exceptions; these guard direct calls to
// torch.ops.llcfast.* so that no input can reach a kernel out of bounds.
#include <ATen/ATen.h>

#include "sgld.h"

namespace llcfast {

namespace {

void check_list_length(const char* name, size_t got, size_t want) {
  LLC_CHECK(got == want, "sgld_step_: ", name, " has ", got, " tensors but params has ", want,
            "; the lists must have one entry per parameter tensor");
}

void check_tensor(const char* name, size_t i, const at::Tensor& t, at::ScalarType dtype, const at::Device& device,
                  at::ScalarType or_dtype = at::ScalarType::Undefined) {
  LLC_CHECK(t.defined(), "sgld_step_: ", name, "[", i, "] is undefined");
  LLC_CHECK(t.scalar_type() == dtype || t.scalar_type() == or_dtype, "sgld_step_: ", name, "[", i, "] has dtype ",
            t.scalar_type(), "; allowed: ", dtype, or_dtype == at::ScalarType::Undefined ? "" : " or ",
            or_dtype == at::ScalarType::Undefined ? "" : c10::toString(or_dtype));
  LLC_CHECK(t.device() == device, "sgld_step_: ", name, "[", i, "] is on ", t.device(),
            " but params[0] is on ", device, "; all tensors must share one device");
  LLC_CHECK(t.is_contiguous(), "sgld_step_: ", name, "[", i,
            "] is not contiguous; pass .contiguous() tensors");
}

}  // namespace

int64_t check_sgld_inputs(const at::TensorList& params, const at::TensorList& grads,
                          const at::TensorList& centers, const c10::optional<at::TensorList>& masks,
                          const c10::optional<at::TensorList>& noise, const c10::optional<at::Tensor>& stats,
                          const c10::optional<at::Tensor>& step_tensor, int64_t seed, int64_t step,
                          int64_t chain_offset) {
  LLC_CHECK(!params.empty(), "sgld_step_: params is empty");
  LLC_CHECK(seed >= 0, "sgld_step_: seed must be >= 0, got ", seed);
  LLC_CHECK(step >= 0, "sgld_step_: step must be >= 0, got ", step);
  LLC_CHECK(chain_offset >= 0, "sgld_step_: chain_offset must be >= 0, got ", chain_offset);
  const size_t n = params.size();
  check_list_length("grads", grads.size(), n);
  check_list_length("centers", centers.size(), n);
  if (masks.has_value()) check_list_length("masks", masks->size(), n);
  if (noise.has_value()) check_list_length("noise", noise->size(), n);

  const at::Device device = params[0].device();
  LLC_CHECK(params[0].dim() >= 1, "sgld_step_: params[0] has no chain dimension; expected [C, ...]");
  const int64_t chains = params[0].size(0);
  LLC_CHECK(chains >= 1, "sgld_step_: params have ", chains, " chains; need at least 1");
  LLC_CHECK(chain_offset + chains <= (int64_t(1) << 32), "sgld_step_: chain indices exceed 2^32");
  int64_t total_groups = 0;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    check_tensor("params", i, p, at::kFloat, device);
    LLC_CHECK(p.dim() >= 1 && p.size(0) == chains, "sgld_step_: params[", i, "] has shape ", p.sizes(),
              "; expected a leading chain dimension of ", chains);
    check_tensor("grads", i, grads[i], at::kFloat, device, at::kBFloat16);
    LLC_CHECK(grads[i].sizes() == p.sizes(), "sgld_step_: grads[", i, "] has shape ", grads[i].sizes(),
              " but params[", i, "] has shape ", p.sizes());
    check_tensor("centers", i, centers[i], at::kFloat, device);
    LLC_CHECK(centers[i].sizes() == p.sizes().slice(1), "sgld_step_: centers[", i, "] has shape ",
              centers[i].sizes(), "; expected ", p.sizes().slice(1), " (params[", i, "] without its chain dimension)");
    if (masks.has_value()) {
      const at::Tensor& m = (*masks)[i];
      check_tensor("masks", i, m, at::kBool, device);
      LLC_CHECK(m.sizes() == p.sizes().slice(1), "sgld_step_: masks[", i, "] has shape ", m.sizes(),
                "; expected ", p.sizes().slice(1));
    }
    if (noise.has_value()) {
      const at::Tensor& z = (*noise)[i];
      check_tensor("noise", i, z, at::kFloat, device);
      LLC_CHECK(z.sizes() == p.sizes(), "sgld_step_: noise[", i, "] has shape ", z.sizes(), "; expected ",
                p.sizes());
    }
    total_groups += ceil_div(p.numel() / chains, 4);
  }
  LLC_CHECK(total_groups <= (int64_t(1) << 32),
            "sgld_step_: more than 2^34 elements per chain; the noise counter cannot address them");
  if (stats.has_value()) {
    const at::Tensor& s = *stats;
    LLC_CHECK(s.scalar_type() == at::kDouble, "sgld_step_: stats has dtype ", s.scalar_type(),
              "; allowed: float64");
    LLC_CHECK(s.device() == device, "sgld_step_: stats is on ", s.device(), " but params are on ", device);
    LLC_CHECK(s.is_contiguous() && s.dim() == 2 && s.size(0) == chains && s.size(1) == 3,
              "sgld_step_: stats must be a contiguous [", chains, ", 3] tensor, got ", s.sizes());
  }
  if (step_tensor.has_value()) {
    const at::Tensor& t = *step_tensor;
    LLC_CHECK(t.scalar_type() == at::kLong && t.numel() == 1 && t.device() == device,
              "sgld_step_: step_tensor must be a one-element int64 tensor on ", device, ", got ", t.scalar_type(),
              " ", t.sizes(), " on ", t.device());
  }
  return chains;
}

void check_bf16_copies(const at::TensorList& params, const at::TensorList& copies) {
  check_list_length("bf16_copies", copies.size(), params.size());
  for (size_t i = 0; i < copies.size(); ++i) {
    if (copies[i].numel() == 0) continue;  // none for this tensor
    check_tensor("bf16_copies", i, copies[i], at::kBFloat16, params[i].device());
    LLC_CHECK(copies[i].sizes() == params[i].sizes(), "sgld_step_: bf16_copies[", i, "] has shape ",
              copies[i].sizes(), " but params[", i, "] has shape ", params[i].sizes(),
              "; pass an empty tensor where a parameter has no copy");
  }
}

int64_t check_philox_out(const at::Tensor& out, int64_t seed, int64_t step, int64_t chain_offset,
                         int64_t group_offset, const char* op) {
  LLC_CHECK(out.scalar_type() == at::kFloat && out.dim() == 2 && out.is_contiguous(),
            op, ": out must be a contiguous float32 [C, N] tensor, got ", out.scalar_type(), " ",
            out.sizes());
  LLC_CHECK(seed >= 0 && step >= 0 && chain_offset >= 0 && group_offset >= 0,
            op, ": seed, step/stream, row offset and group_offset must be >= 0");
  LLC_CHECK(chain_offset + out.size(0) <= (int64_t(1) << 32), op, ": row index exceeds 2^32");
  const int64_t groups = ceil_div(out.size(1), 4);
  LLC_CHECK(group_offset + groups <= (int64_t(1) << 32), op, ": group index exceeds 2^32");
  return groups;
}

void check_multi_dot(const at::Tensor& out, const at::TensorList& a, const at::TensorList& b) {
  LLC_CHECK(out.scalar_type() == at::kDouble && out.dim() == 1 && out.is_contiguous(),
            "multi_dot_: out must be a contiguous float64 [R] tensor, got ", out.scalar_type(), " ", out.sizes());
  LLC_CHECK(a.size() == b.size(), "multi_dot_: a has ", static_cast<int64_t>(a.size()), " tensors but b has ",
            static_cast<int64_t>(b.size()));
  const int64_t rows = out.size(0);
  for (size_t i = 0; i < a.size(); ++i) {
    const int64_t idx = static_cast<int64_t>(i);
    LLC_CHECK(a[i].scalar_type() == at::kFloat && b[i].scalar_type() == at::kFloat,
              "multi_dot_: a[", idx, "] and b[", idx, "] must be float32");
    LLC_CHECK(a[i].is_contiguous() && b[i].is_contiguous(), "multi_dot_: a[", idx, "] and b[", idx,
              "] must be contiguous");
    LLC_CHECK(a[i].sizes() == b[i].sizes(), "multi_dot_: a[", idx, "] has shape ", a[i].sizes(), " but b[", idx,
              "] has ", b[i].sizes());
    LLC_CHECK(a[i].dim() >= 1 && a[i].size(0) == rows, "multi_dot_: a[", idx, "] must be [", rows,
              ", ...], got ", a[i].sizes());
    LLC_CHECK(a[i].device() == out.device() && b[i].device() == out.device(), "multi_dot_: a[", idx,
              "] and b[", idx, "] must be on out's device");
  }
}

namespace {

// A sampler's per-chain state list: same shapes as params, float32,
// contiguous, on params' device.
void check_state_list(const char* op, const char* name, const at::TensorList& state, const at::TensorList& params) {
  LLC_CHECK(state.size() == params.size(), op, ": ", name, " has ", static_cast<int64_t>(state.size()),
            " tensors but params has ", static_cast<int64_t>(params.size()));
  for (size_t i = 0; i < state.size(); ++i) {
    const int64_t idx = static_cast<int64_t>(i);
    LLC_CHECK(state[i].defined() && state[i].scalar_type() == at::kFloat && state[i].is_contiguous(), op, ": ", name,
              "[", idx, "] must be a contiguous float32 tensor");
    LLC_CHECK(state[i].device() == params[i].device(), op, ": ", name, "[", idx, "] is on ", state[i].device(),
              " but params[", idx, "] is on ", params[i].device());
    LLC_CHECK(state[i].sizes() == params[i].sizes(), op, ": ", name, "[", idx, "] has shape ", state[i].sizes(),
              " but params[", idx, "] has shape ", params[i].sizes());
  }
}

// SGNHT's thermostat: float32 [C] on params' device.
void check_thermostat(const at::Tensor& thermostat, int64_t chains, const at::Device& device) {
  LLC_CHECK(thermostat.defined() && thermostat.scalar_type() == at::kFloat && thermostat.is_contiguous() &&
                thermostat.dim() == 1 && thermostat.size(0) == chains,
            "sgnht_step_: thermostat must be a contiguous float32 [", chains, "] tensor, got ",
            thermostat.scalar_type(), " ", thermostat.sizes());
  LLC_CHECK(thermostat.device() == device, "sgnht_step_: thermostat is on ", thermostat.device(),
            " but params are on ", device);
}

}  // namespace

int64_t check_rmsprop_inputs(const at::TensorList& params, const at::TensorList& square_avg,
                             const at::TensorList& grads, const at::TensorList& centers,
                             const c10::optional<at::TensorList>& masks, const c10::optional<at::TensorList>& noise,
                             const c10::optional<at::Tensor>& stats, const c10::optional<at::Tensor>& step_tensor,
                             int64_t seed, int64_t step, int64_t chain_offset) {
  const int64_t chains =
      check_sgld_inputs(params, grads, centers, masks, noise, stats, step_tensor, seed, step, chain_offset);
  check_state_list("rmsprop_sgld_step_", "square_avg", square_avg, params);
  return chains;
}

int64_t check_sgnht_inputs(const at::TensorList& params, const at::TensorList& momentum, const at::Tensor& thermostat,
                           const at::TensorList& grads, const at::TensorList& centers,
                           const c10::optional<at::TensorList>& masks, const c10::optional<at::TensorList>& noise,
                           const c10::optional<at::Tensor>& stats, const c10::optional<at::Tensor>& step_tensor,
                           int64_t seed, int64_t step, int64_t chain_offset) {
  const int64_t chains =
      check_sgld_inputs(params, grads, centers, masks, noise, stats, step_tensor, seed, step, chain_offset);
  check_state_list("sgnht_step_", "momentum", momentum, params);
  check_thermostat(thermostat, chains, params[0].device());
  return chains;
}

std::vector<int64_t> group_offsets(const at::TensorList& params) {
  std::vector<int64_t> out(params.size());
  int64_t acc = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    out[i] = acc;
    acc += ceil_div(params[i].numel() / params[i].size(0), 4);
  }
  return out;
}

}  // namespace llcfast
