// libFuzzer target: what the /metrics port makes of any bytes a client sends
// (server/metrics_http.h RouteMetricsRequest). It must answer with one of its status codes,
// serve the exposition only for GET or HEAD /metrics, and never crash.
//
//   CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DSY_FUZZ=ON
//   -DCMAKE_BUILD_TYPE=RelWithDebInfo ninja -C build-fuzz metrics_http_fuzz &&
//   ./build-fuzz/tests/fuzz/metrics_http_fuzz -max_total_time=60
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "server/metrics_http.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view request(reinterpret_cast<const char*>(data), size);
  const sy::server::MetricsHttpRoute r = sy::server::RouteMetricsRequest(request);
  switch (r.status) {
    case 200:
      if (!r.metrics) std::abort();
      if (request.substr(0, 4) != "GET " && request.substr(0, 5) != "HEAD ") std::abort();
      break;
    case 400:
    case 404:
    case 405:
      if (r.metrics) std::abort();
      break;
    default:
      std::abort();
  }
  return 0;
}
