// `switchyard generate --addr HOST:PORT "text"`: a client that streams one answer to the
// terminal (text as it arrives, or ids with --ids-only), then the finish reason on stderr.
#include <cmath>
#include <cstdio>

#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "grpcpp/grpcpp.h"
#include "server/commands.h"
#include "server/flags.h"
#include "server/secrets.h"
#include "server/tls.h"
#include "switchyard/v1/inference.grpc.pb.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;

int GenerateCommand(int argc, char** argv) {
  std::string addr = "127.0.0.1:50051", prompt_ids, stop;
  int64_t max_new_tokens = -1, top_k = 0, seed = 0;
  double temperature = 0, top_p = 1, timeout_s = 600;
  bool ids_only = false, ignore_eos = false, no_stream = false;
  FlagSet flags("generate", "Stream one generation from a running `switchyard serve` to stdout.\n"
                            "usage: switchyard generate [flags] \"prompt text\"");
  flags.Add("addr", &addr, "server address HOST:PORT");
  flags.Add("prompt-ids", &prompt_ids, "comma-separated token ids instead of text");
  flags.Add("max-new-tokens", &max_new_tokens, "tokens to generate; -1: the server's default");
  flags.Add("temperature", &temperature, "0 = greedy");
  flags.Add("top-p", &top_p, "nucleus sampling in (0, 1]");
  flags.Add("top-k", &top_k, "keep the k best tokens; 0 = all");
  flags.Add("seed", &seed, "sampling seed");
  flags.Add("stop", &stop, "stop string");
  flags.Add("ignore-eos", &ignore_eos, "keep going past end-of-sequence");
  flags.Add("ids-only", &ids_only, "print token ids (space-separated) instead of text");
  flags.Add("no-stream", &no_stream, "ask for the completion only");
  flags.Add("timeout", &timeout_s, "deadline in seconds");
  TlsClientOptions tls;
  AddTlsClientFlags(flags, &tls);
  ApiKeyOption key;
  AddApiKeyFlag(flags, &key);
  if (int rc = flags.ParseOrExitCode(argc, argv); rc >= 0) return rc;
  absl::StatusOr<std::string> api_key = key.Read();
  if (!api_key.ok()) {
    std::fprintf(stderr, "generate: %s\n", std::string(api_key.status().message()).c_str());
    return 2;
  }
  absl::Status s;
  v1::GenerateRequest req;
  if (!prompt_ids.empty()) {
    for (absl::string_view part : absl::StrSplit(prompt_ids, ',', absl::SkipWhitespace())) {
      int32_t id;
      if (!absl::SimpleAtoi(part, &id)) {
        std::fprintf(stderr, "generate: --prompt-ids: '%s' is not an integer\n", std::string(part).c_str());
        return 2;
      }
      req.mutable_token_ids()->add_ids(id);
    }
  } else if (!flags.positional().empty()) {
    req.set_text(absl::StrJoin(flags.positional(), " "));
  } else {
    std::fprintf(stderr, "generate: give a prompt (text, or --prompt-ids)\n");
    return 2;
  }
  v1::SamplingParams* sp = req.mutable_sampling();
  sp->set_temperature(static_cast<float>(temperature));
  sp->set_top_p(static_cast<float>(top_p));
  sp->set_top_k(static_cast<int32_t>(top_k));
  sp->set_seed(static_cast<uint64_t>(seed));
  if (max_new_tokens >= 0) sp->set_max_new_tokens(static_cast<int32_t>(max_new_tokens));
  if (!stop.empty()) sp->add_stop(stop);
  sp->set_ignore_eos(ignore_eos);
  req.set_stream(!no_stream);

  auto channel = MakeChannel(addr, tls);
  if (!channel.ok()) {
    std::fprintf(stderr, "generate: %s\n", std::string(channel.status().message()).c_str());
    return 2;
  }
  auto stub = v1::Inference::NewStub(*channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
  if (!api_key->empty()) ctx.AddMetadata("authorization", "Bearer " + *api_key);
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  v1::GenerateCompletion done;
  bool printed_ids = false;
  while (reader->Read(&resp)) {
    if (resp.has_chunk()) {
      if (ids_only) {
        for (int32_t id : resp.chunk().token_ids()) {
          std::printf(printed_ids ? " %d" : "%d", id);
          printed_ids = true;
        }
      } else {
        std::fwrite(resp.chunk().text().data(), 1, resp.chunk().text().size(), stdout);
      }
      std::fflush(stdout);
    } else if (resp.has_completion()) {
      done = resp.completion();
    }
  }
  grpc::Status st = reader->Finish();
  if (no_stream) {
    if (ids_only) std::printf("%s", absl::StrJoin(done.token_ids(), " ").c_str());
    else std::printf("%s", done.text().c_str());
  }
  std::printf("\n");
  if (!st.ok()) {
    std::fprintf(stderr, "generate: %s: %s\n", std::to_string(st.error_code()).c_str(),
                 st.error_message().c_str());
    return 1;
  }
  std::fprintf(stderr, "[%s, %d prompt + %d completion tokens]\n",
               v1::FinishReason_Name(done.finish_reason()).c_str(), done.prompt_tokens(),
               done.completion_tokens());
  return 0;
}

}  // namespace sy::server
