// Op schemas (one TORCH_LIBRARY block) and the Python module that reports what
// this build contains. Each backend registers its kernels in its own file.
#include <torch/extension.h>
#include <torch/library.h>

#if __has_include("build_config.h")
#include "build_config.h"
#endif
#ifndef LLCFAST_WITH_CUDA
#define LLCFAST_WITH_CUDA 0
#endif
#ifndef LLCFAST_CUDA_ARCHS
#define LLCFAST_CUDA_ARCHS ""
#endif
#ifndef LLCFAST_BUILD_TORCH
#define LLCFAST_BUILD_TORCH ""
#endif
#ifndef LLCFAST_BUILD_CUDA
#define LLCFAST_BUILD_CUDA ""
#endif

TORCH_LIBRARY(llcfast, m) {
  // In-place SGLD step over a list of chain-stacked tensors ([C, ...] each).
  // The noise step is step + step_tensor[0] when step_tensor (int64 [1], on
  // the params' device) is given, so a captured CUDA graph can advance it.
  // Grads may be bfloat16; bf16_copies (an empty tensor: none) get the new
  // parameters rounded to bfloat16 in the same pass.
  m.def(
      "sgld_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] centers, Tensor[]? masks, Tensor[]? noise, "
      "Tensor(b!)? stats, Tensor? step_tensor, int seed, int step, int chain_offset, float eps, float nbeta, "
      "float gamma, float weight_decay, float noise_scale, float bounding_box=0., Tensor(c!)[]? bf16_copies=None) "
      "-> ()");
  // RMSprop-preconditioned SGLD: square_avg ([C, ...] each) is the running
  // mean of g^2, updated in the same pass.
  m.def(
      "rmsprop_sgld_step_(Tensor(a!)[] params, Tensor(b!)[] square_avg, Tensor[] grads, Tensor[] centers, "
      "Tensor[]? masks, Tensor[]? noise, Tensor(c!)? stats, Tensor? step_tensor, int seed, int step, "
      "int chain_offset, float eps, float nbeta, float gamma, float weight_decay, float noise_scale, float alpha, "
      "float rms_eps, float bounding_box=0.) -> ()");
  // SGNHT: momentum ([C, ...] each) and thermostat ([C]) are updated in place.
  m.def(
      "sgnht_step_(Tensor(a!)[] params, Tensor(b!)[] momentum, Tensor(c!) thermostat, Tensor[] grads, "
      "Tensor[] centers, Tensor[]? masks, Tensor[]? noise, Tensor(d!)? stats, Tensor? step_tensor, int seed, "
      "int step, int chain_offset, float eps, float nbeta, float gamma, float weight_decay, float diffusion, "
      "float bounding_box=0.) -> ()");
  // Fills out [C, N] with the noise the step would draw for one tensor.
  m.def("philox_normal_(Tensor(a!) out, int seed, int step, int chain_offset, int group_offset) -> ()");
  // Fills out [R, N] with Rademacher probe signs for one tensor: row r is
  // probe row_offset + r of the probe set `stream`.
  m.def("philox_rademacher_(Tensor(a!) out, int seed, int stream, int row_offset, int group_offset) -> ()");
  // out[r] += sum_i <a[i][r], b[i][r]> (float64 accumulation) over a list of [R, ...] tensors.
  m.def("multi_dot_(Tensor(a!) out, Tensor[] a, Tensor[] b) -> ()");
  // One Lanczos step with full reorthogonalization for every row of basis
  // [R, m, N], given w = H basis[:, j]: writes (alpha_j, beta_j) to out
  // [R, 2], the residual to w and, when j + 1 < m, basis[:, j + 1].
  m.def("lanczos_step_(Tensor(a!) basis, Tensor(b!) w, int j, Tensor(c!) out) -> ()");
  // Per-row negative log-likelihood of targets under softmax(logits) and the
  // row's log-sum-exp ([...] each, float32; float64 for float64 logits).
  m.def("token_nll(Tensor logits, Tensor targets) -> (Tensor, Tensor)");
  // Its gradient with respect to logits, given d(loss)/d(nll) as grad.
  m.def("token_nll_backward(Tensor grad, Tensor logits, Tensor lse, Tensor targets) -> Tensor");
  // Both directions in one pass, where d(loss)/d(nll) is one number for
  // every row: (nll, lse) as token_nll gives them, and logits overwritten
  // with their gradient scale * (softmax(logits) - onehot(target)).
  m.def("token_nll_grad_(Tensor(a!) logits, Tensor targets, float scale) -> (Tensor, Tensor)");
  // Layer norm over the last dimension of x [C, R, D] with a weight and bias
  // [C, D] per chain: (y, mean [C, R], rstd [C, R]).
  m.def("chain_layer_norm(Tensor x, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // Its gradients (dx, dweight, dbias) given d(loss)/dy as grad.
  m.def("chain_layer_norm_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, Tensor weight) "
        "-> (Tensor, Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["cpu_kernels"] = true;
  d["cuda_kernels"] = static_cast<bool>(LLCFAST_WITH_CUDA);
  d["cuda_archs"] = std::string(LLCFAST_CUDA_ARCHS);
  d["built_with_torch"] = std::string(LLCFAST_BUILD_TORCH);
  d["built_with_cuda"] = std::string(LLCFAST_BUILD_CUDA);
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llcfast compiled kernels (ops are registered under torch.ops.llcfast)";
  m.def("build_info", &build_info, "What this build of llcfast._C contains");
}
