// `switchyard loadgen`: load a running server and print vLLM-style serving figures.
#include <cstdio>

#include "server/commands.h"
#include "server/flags.h"
#include "server/loadgen.h"
#include "server/secrets.h"

namespace sy::server {

int LoadgenCommand(int argc, char** argv) {
  LoadgenOptions o;
  int64_t seed = 0;
  FlagSet flags("loadgen",
                "Send --requests generations of --prompt-len random tokens, each asking for\n"
                "--max-new-tokens tokens, with --concurrency streams (closed loop) or at --rate\n"
                "requests/s (Poisson, at most --concurrency in flight); print throughput, TTFT,\n"
                "TPOT, ITL and E2E latency (mean, p50, p90, p99) and errors by code.");
  flags.Add("addr", &o.addr, "server address HOST:PORT");
  AddTlsClientFlags(flags, &o.tls);
  ApiKeyOption key;
  AddApiKeyFlag(flags, &key);
  flags.Add("concurrency", &o.concurrency, "streams in flight");
  flags.Add("requests", &o.requests, "requests to send");
  flags.Add("prompt-len", &o.prompt_len, "prompt tokens per request");
  flags.Add("max-new-tokens", &o.max_new_tokens, "tokens per request (EOS ignored)");
  flags.Add("rate", &o.rate, "requests/s (Poisson); 0: closed loop");
  flags.Add("seed", &seed, "prompt seed");
  flags.Add("wait-ready", &o.wait_ready_s, "seconds to wait for health SERVING");
  flags.Add("timeout", &o.timeout_s, "per-request deadline in seconds");
  if (int rc = flags.ParseOrExitCode(argc, argv); rc >= 0) return rc;
  absl::Status s;
  o.seed = static_cast<uint64_t>(seed);
  absl::StatusOr<std::string> k = key.Read();
  if (!k.ok()) {
    std::fprintf(stderr, "loadgen: %s\n", std::string(k.status().message()).c_str());
    return 2;
  }
  o.api_key = *k;
  auto rep = RunLoadgen(o);
  if (!rep.ok()) {
    std::fprintf(stderr, "loadgen: %s\n", rep.status().ToString().c_str());
    return 1;
  }
  std::printf("%s", rep->Table().c_str());
  return rep->requests_failed == 0 ? 0 : 1;
}

}  // namespace sy::server
