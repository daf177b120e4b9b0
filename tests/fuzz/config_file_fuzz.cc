// libFuzzer target: the `--config FILE` of `switchyard serve` (server/flags.h: `name = value`
// lines). Any file gives the flags or an error naming the line, never a crash.
//   ./build-fuzz/tests/fuzz/config_file_fuzz -max_total_time=600
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "server/flags.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = "/tmp/sy-config-fuzz-" + std::to_string(getpid());
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return 0;
  std::fwrite(data, 1, size, f);
  std::fclose(f);
  std::string model, host;
  int64_t port = 0, blocks = 0;
  double timeout = 0;
  bool flag = false;
  sy::server::FlagSet flags("serve", "fuzz");
  flags.Add("model", &model, "");
  flags.Add("host", &host, "");
  flags.Add("port", &port, "");
  flags.Add("kv-cache-bytes", &blocks, "");
  flags.Add("drain-timeout", &timeout, "");
  flags.Add("ignore-eos", &flag, "");
  std::string arg0 = "--config=" + path;
  char* argv[] = {arg0.data(), nullptr};
  flags.Parse(1, argv).IgnoreError();
  return 0;
}
