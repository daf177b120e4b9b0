// Helpers shared by the server tests: a tiny synthetic checkpoint in a temp folder, a plain
// greedy reference (the loop `switchyard run` uses), an in-process daemon on 127.0.0.1 with
// OS-picked ports, client stubs, and an HTTP GET for /metrics.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "model/kv_cache.h"
#include "model/moe_model.h"
#include "model/sampler.h"
#include "model/synthetic.h"
#include "server/daemon.h"
#include "switchyard/v1/inference.grpc.pb.h"

namespace sy::server::testing {

namespace v1 = ::switchyard::v1;
using HealthStatus = grpc::health::v1::HealthCheckResponse;

// A fresh folder under the test temp dir, removed on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& name) {
    const char* base = std::getenv("TEST_TMPDIR");
    path_ = std::filesystem::path(base ? base : std::filesystem::temp_directory_path().string()) /
            (name + "-" + std::to_string(getpid()));
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string path() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

// The tiny Mixtral preset (vocab 512, context 4096), f32, with tokenizer.json.
inline std::string WriteTinyModel(const TempDir& dir, uint64_t seed = 7) {
  model::SyntheticOptions o;
  o.arch = model::Arch::kMixtral;
  o.preset = "tiny";
  o.seed = seed;
  o.out_dir = dir.path() + "/tiny";
  absl::Status s = model::WriteSyntheticCheckpoint(o);
  EXPECT_TRUE(s.ok()) << s;
  return o.out_dir;
}

// Greedy tokens of one sequence alone: prefill the prompt, then one token per step, with
// its own cache — the loop of `switchyard run` (EOS ignored).
inline std::vector<int32_t> ReferenceGreedy(model::MoeModel& m, const std::vector<int32_t>& prompt,
                                            int64_t n) {
  const int64_t block_size = 16;
  const int64_t total = static_cast<int64_t>(prompt.size()) + n;
  const int64_t num_blocks = (total + block_size - 1) / block_size;
  model::KvCache cache(m.config(), num_blocks, block_size);
  std::vector<int32_t> table(num_blocks);
  for (int64_t b = 0; b < num_blocks; ++b) table[b] = static_cast<int32_t>(b);
  std::vector<int32_t> out, feed = prompt;
  std::vector<float> logits;
  int64_t pos = 0;
  for (int64_t i = 0; i < n; ++i) {
    model::SequenceInput in;
    in.tokens = feed;
    in.start_pos = pos;
    in.block_table = table;
    absl::Status s = m.Forward({&in, 1}, cache, &logits);
    EXPECT_TRUE(s.ok()) << s;
    if (!s.ok()) return out;
    pos += static_cast<int64_t>(feed.size());
    out.push_back(model::Greedy(logits.data(), m.config().vocab_size));
    feed = {out.back()};
  }
  return out;
}

inline ServeOptions TestServeOptions(const std::string& model_dir) {
  ServeOptions o;
  o.model = model_dir;
  o.host = "127.0.0.1";
  o.port = 0;
  o.metrics_port = -1;  // tests that scrape set 0
  o.kv_cache_bytes = 4 << 20;
  o.max_num_seqs = 32;
  o.max_num_batched_tokens = 256;
  o.max_message_bytes = 1 << 20;
  o.drain_timeout_s = 30;
  return o;
}

inline std::shared_ptr<grpc::Channel> Connect(int port) {
  return grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                             grpc::InsecureChannelCredentials());
}

struct StreamResult {
  grpc::Status status;
  std::vector<int32_t> chunk_ids;
  std::string chunk_text;
  int num_chunks = 0;
  bool has_completion = false;
  v1::GenerateCompletion completion;
};

inline StreamResult RunGenerate(v1::Inference::Stub& stub, const v1::GenerateRequest& req,
                                double timeout_s = 120) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
  StreamResult r;
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
    if (resp.has_chunk()) {
      ++r.num_chunks;
      r.chunk_ids.insert(r.chunk_ids.end(), resp.chunk().token_ids().begin(),
                         resp.chunk().token_ids().end());
      r.chunk_text += resp.chunk().text();
    } else if (resp.has_completion()) {
      r.has_completion = true;
      r.completion = resp.completion();
    }
  }
  r.status = reader->Finish();
  return r;
}

inline v1::GenerateRequest IdsRequest(const std::vector<int32_t>& ids, int max_new,
                                      bool ignore_eos = true) {
  v1::GenerateRequest req;
  for (int32_t id : ids) req.mutable_token_ids()->add_ids(id);
  req.mutable_sampling()->set_max_new_tokens(max_new);
  req.mutable_sampling()->set_ignore_eos(ignore_eos);
  return req;
}

inline HealthStatus::ServingStatus CheckHealth(const std::shared_ptr<grpc::Channel>& ch,
                                               const std::string& service = "") {
  auto stub = grpc::health::v1::Health::NewStub(ch);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckRequest req;
  req.set_service(service);
  HealthStatus resp;
  grpc::Status s = stub->Check(&ctx, req, &resp);
  if (!s.ok()) return HealthStatus::UNKNOWN;
  return resp.status();
}

inline v1::ServerInfo GetServerInfo(v1::Inference::Stub& stub) {
  grpc::ClientContext ctx;
  v1::ServerInfo info;
  grpc::Status s = stub.GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info);
  EXPECT_TRUE(s.ok()) << s.error_message();
  return info;
}

// Polls until every KV block is free again (or the timeout); returns the last info.
inline v1::ServerInfo WaitForAllBlocksFree(v1::Inference::Stub& stub, double timeout_s = 30) {
  const auto until = std::chrono::steady_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  v1::ServerInfo info;
  do {
    info = GetServerInfo(stub);
    if (info.kv_blocks_free() == info.kv_blocks_total() && info.requests_running() == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  } while (std::chrono::steady_clock::now() < until);
  return info;
}

// A TCP connection to 127.0.0.1:port (-1 on failure).
inline int ConnectTcp(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Body of GET http://127.0.0.1:port/path ("" on failure).
inline std::string HttpGet(int port, const std::string& path) {
  const int fd = ConnectTcp(port);
  if (fd < 0) return "";
  const std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (write(fd, req.data(), req.size()) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return "";
  }
  std::string resp;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) resp.append(buf, n);
  close(fd);
  const size_t body = resp.find("\r\n\r\n");
  return body == std::string::npos ? "" : resp.substr(body + 4);
}

// Value of the sample `name` (with labels, exactly as printed) in Prometheus text; -1 if absent.
inline double MetricValue(const std::string& text, const std::string& name) {
  size_t pos = 0;
  while ((pos = text.find(name + " ", pos)) != std::string::npos) {
    if (pos == 0 || text[pos - 1] == '\n') return std::stod(text.substr(pos + name.size() + 1));
    pos += name.size();
  }
  return -1;
}

}  // namespace sy::server::testing
