/* kvserve: std::format for libstdc++ without <format> (GCC 12).
 * mlx-c's private/io.h only formats "{}" placeholders into error messages,
 * so a sequential "{}" substitution through ostringstream is enough.
 * Injected with -include before every mlx-c source. */
#ifndef KVSERVE_FORMAT_COMPAT_H
#define KVSERVE_FORMAT_COMPAT_H
#ifdef __cplusplus
#if __has_include(<format>) && defined(__cpp_lib_format)
#include <format>
#else
#include <sstream>
#include <string>
#include <string_view>
#include <utility>

namespace kvserve_compat {
inline void format_rest(std::ostringstream& out, std::string_view fmt) {
  out << fmt;
}
template <class T, class... Rest>
void format_rest(std::ostringstream& out, std::string_view fmt, T&& value, Rest&&... rest) {
  auto at = fmt.find("{}");
  if (at == std::string_view::npos) {
    out << fmt;
    return;
  }
  out << fmt.substr(0, at) << std::forward<T>(value);
  format_rest(out, fmt.substr(at + 2), std::forward<Rest>(rest)...);
}
} // namespace kvserve_compat

namespace std {
template <class... Args>
inline std::string format(std::string_view fmt, Args&&... args) {
  std::ostringstream out;
  kvserve_compat::format_rest(out, fmt, std::forward<Args>(args)...);
  return out.str();
}
} // namespace std
#endif
#endif
#endif
