// libFuzzer target: the safetensors header parser on arbitrary bytes. Every accepted header
// must describe tensors that lie inside the file.
//
//   CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DSY_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
//   ninja -C build-fuzz safetensors_fuzz && ./build-fuzz/tests/fuzz/safetensors_fuzz -max_total_time=60
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto h = sy::model::ParseSafetensorsHeader(data, size, "fuzz.safetensors");
  if (h.ok()) {
    for (const auto& [name, info] : h->tensors) {
      if (h->data_start + info.end > size || info.begin > info.end) std::abort();
      if (static_cast<uint64_t>(info.numel()) * sy::DTypeSize(info.dtype) != info.end - info.begin) std::abort();
    }
  }
  return 0;
}
