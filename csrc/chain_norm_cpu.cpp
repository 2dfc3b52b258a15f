// CPU kernels for llcfast::chain_layer_norm and its backward: layer norm
// with a weight and bias per chain, in one pass over the rows each way
// (plus one over the columns for the weight's and bias's gradients), where
// vmap of layer_norm over chains runs an unweighted norm, a multiply and an
// add forward and seven kernels backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "chain_norm.h"

namespace llcfast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_layer_norm_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                    const c10::optional<at::Tensor>& bias,
                                                                    double eps) {
  check_chain_layer_norm(x, weight, bias, "chain_layer_norm");
  at::Tensor y = at::empty_like(x), mean = chain_norm_stat(x), rstd = chain_norm_stat(x);
  const int64_t rows_per_chain = x.size(1), features = x.size(2), rows = x.size(0) * rows_per_chain;
  const bool has_bias = bias.has_value() && bias->defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "chain_layer_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = xp + r * features;
        acc_t sum = 0;
        for (int64_t d = 0; d < features; ++d) sum += static_cast<acc_t>(row[d]);
        const acc_t m = sum / features;
        acc_t sq = 0;
        for (int64_t d = 0; d < features; ++d) {
          const acc_t v = static_cast<acc_t>(row[d]) - m;
          sq += v * v;
        }
        const acc_t inv = acc_t(1) / std::sqrt(sq / features + static_cast<acc_t>(eps));
        const int64_t c = r / rows_per_chain;
        const scalar_t* w = wp + c * features;
        const scalar_t* b = bp ? bp + c * features : nullptr;
        scalar_t* out = yp + r * features;
        for (int64_t d = 0; d < features; ++d) {
          acc_t v = (static_cast<acc_t>(row[d]) - m) * inv * static_cast<acc_t>(w[d]);
          if (b) v += static_cast<acc_t>(b[d]);
          out[d] = static_cast<scalar_t>(v);
        }
        mp[r] = m;
        rp[r] = inv;
      }
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chain_layer_norm_backward_cpu(const at::Tensor& grad,
                                                                             const at::Tensor& x,
                                                                             const at::Tensor& mean,
                                                                             const at::Tensor& rstd,
                                                                             const at::Tensor& weight) {
  check_chain_layer_norm_backward(grad, x, mean, rstd, weight, "chain_layer_norm_backward");
  at::Tensor dx = at::empty_like(x), dweight = at::empty_like(weight), dbias = at::empty_like(weight);
  const int64_t chains = x.size(0), rows_per_chain = x.size(1), features = x.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "chain_layer_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const acc_t* mp = mean.data_ptr<acc_t>();
    const acc_t* rp = rstd.data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    // dx = rstd * (g*w - mean_d(g*w) - xhat * mean_d(g*w*xhat)), row by row
    at::parallel_for(0, chains * rows_per_chain, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* g = gp + r * features;
        const scalar_t* row = xp + r * features;
        const scalar_t* w = wp + (r / rows_per_chain) * features;
        const acc_t m = mp[r], inv = rp[r];
        acc_t s1 = 0, s2 = 0;
        for (int64_t d = 0; d < features; ++d) {
          const acc_t gw = static_cast<acc_t>(g[d]) * static_cast<acc_t>(w[d]);
          s1 += gw;
          s2 += gw * (static_cast<acc_t>(row[d]) - m) * inv;
        }
        s1 /= features;
        s2 /= features;
        scalar_t* out = dxp + r * features;
        for (int64_t d = 0; d < features; ++d) {
          const acc_t gw = static_cast<acc_t>(g[d]) * static_cast<acc_t>(w[d]);
          out[d] = static_cast<scalar_t>(inv * (gw - s1 - (static_cast<acc_t>(row[d]) - m) * inv * s2));
        }
      }
    });
    // dweight = sum over rows of g * xhat, dbias = sum of g: strips of columns per chain
    constexpr int64_t kStrip = 64;
    const int64_t strips = (features + kStrip - 1) / kStrip;
    scalar_t* dwp = dweight.data_ptr<scalar_t>();
    scalar_t* dbp = dbias.data_ptr<scalar_t>();
    at::parallel_for(0, chains * strips, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> sw(kStrip), sb(kStrip);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c = t / strips, d0 = (t % strips) * kStrip, width = std::min(kStrip, features - d0);
        std::fill(sw.begin(), sw.end(), acc_t(0));
        std::fill(sb.begin(), sb.end(), acc_t(0));
        for (int64_t i = 0; i < rows_per_chain; ++i) {
          const int64_t r = c * rows_per_chain + i;
          const scalar_t* g = gp + r * features + d0;
          const scalar_t* row = xp + r * features + d0;
          const acc_t m = mp[r], inv = rp[r];
          for (int64_t d = 0; d < width; ++d) {
            const acc_t gv = static_cast<acc_t>(g[d]);
            sw[d] += gv * (static_cast<acc_t>(row[d]) - m) * inv;
            sb[d] += gv;
          }
        }
        for (int64_t d = 0; d < width; ++d) {
          dwp[c * features + d0 + d] = static_cast<scalar_t>(sw[d]);
          dbp[c * features + d0 + d] = static_cast<scalar_t>(sb[d]);
        }
      }
    });
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(llcfast, CPU, m) {
  m.impl("chain_layer_norm", &chain_layer_norm_cpu);
  m.impl("chain_layer_norm_backward", &chain_layer_norm_backward_cpu);
}

}  // namespace llcfast
