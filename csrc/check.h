// LLC_CHECK(cond, parts...): TORCH_CHECK with the message concatenated here
// from strings and numbers, never through std::ostream. An extension's own
// ostream inserters can crash when the process's libstdc++ differs from the
// headers it was compiled with (seen under torch 2.11 on a Hopper image:
// every TORCH_CHECK that formatted a number segfaulted); a single std::string
// makes TORCH_CHECK skip its ostringstream.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <type_traits>

namespace llcfast {
namespace msg {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(bool b) { return b ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string piece(T v) {
  return std::to_string(v);
}
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
std::string piece(T v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", static_cast<double>(v));
  return buf;
}
inline std::string piece(c10::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}
inline std::string piece(at::ScalarType t) { return c10::toString(t); }
inline std::string piece(const at::Device& d) { return d.str(); }

template <typename... A>
std::string cat(const A&... parts) {
  std::string s;
  ((s += piece(parts)), ...);
  return s;
}

}  // namespace msg
}  // namespace llcfast

#define LLC_CHECK(cond, ...) TORCH_CHECK(cond, ::llcfast::msg::cat(__VA_ARGS__))
