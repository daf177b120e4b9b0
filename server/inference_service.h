// InferenceService: switchyard.v1.Inference over gRPC's callback API (DESIGN.md §2 step 1, §6).
//
// Generate validates and converts the request (text is tokenized here, on the gRPC thread),
// then hands it to Engine::Submit with a GenerateStream as its sink. GenerateStream is a
// ServerWriteReactor with its own queue and at most one write in flight; the engine thread
// pushes chunks into it and never waits on the network (a slow client's chunks are merged).
// Until SetReady() (model loading) and after SetDraining(), Generate answers UNAVAILABLE.
//
// Thread safety: all methods are called on gRPC threads concurrently; SetReady/SetDraining
// from the daemon's thread. The engine and tokenizer must outlive the gRPC server.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "absl/base/thread_annotations.h"
#include "model/tokenizer.h"
#include "scheduler/engine.h"
#include "server/metrics.h"
#include "switchyard/v1/inference.grpc.pb.h"

namespace sy::server {

struct InferenceServiceOptions {
  int64_t default_max_new_tokens = 256;  // when a request leaves max_new_tokens unset
};

// What GetServerInfo reports of the rank group (ranks in the epoch in force, placement epoch).
struct GroupInfo {
  int32_t num_ranks = 1;
  int64_t placement_epoch = 0;
};

class InferenceService final : public switchyard::v1::Inference::CallbackService {
 public:
  InferenceService(const InferenceServiceOptions& options, ServerMetrics* metrics);

  // The model is loaded: serve. `info` is what GetModelInfo returns.
  void SetReady(scheduler::Engine* engine, const model::Tokenizer* tokenizer,
                const switchyard::v1::ModelInfo& info);
  void SetDraining();
  // Where GetServerInfo reads the group's figures (any thread; unset: one rank, epoch 0).
  void SetGroupInfo(std::function<GroupInfo()> info);
  // Generate calls not yet done (OnDone not run); Drain waits for 0 before stopping the server
  // so the last completions reach their clients.
  int64_t active_streams() const { return active_streams_->load(); }
  bool serving() const { return engine_.load() != nullptr && !draining_.load(); }

  grpc::ServerWriteReactor<switchyard::v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context,
      const switchyard::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const switchyard::v1::GetModelInfoRequest* request,
                                         switchyard::v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const switchyard::v1::GetServerInfoRequest* request,
                                          switchyard::v1::ServerInfo* response) override;

 private:
  // Builds the engine request from the proto (InvalidArgument naming the field).
  absl::Status ToRequest(const switchyard::v1::GenerateRequest& in, scheduler::Engine* engine,
                         scheduler::Request* out) const;

  InferenceServiceOptions options_;
  ServerMetrics* metrics_;
  std::atomic<scheduler::Engine*> engine_{nullptr};
  std::atomic<const model::Tokenizer*> tokenizer_{nullptr};
  // Longest text (bytes) that could fit the context; longer ones are refused untokenized.
  std::atomic<size_t> max_prompt_bytes_{SIZE_MAX};
  std::atomic<bool> draining_{false};
  // Shared with the streams, which may outlive the service by a moment.
  std::shared_ptr<std::atomic<int64_t>> active_streams_ = std::make_shared<std::atomic<int64_t>>(0);
  mutable std::atomic<int64_t> next_request_id_{0};
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  mutable std::mutex mu_;
  switchyard::v1::ModelInfo model_info_ ABSL_GUARDED_BY(mu_);
  std::mutex group_mu_;
  std::function<GroupInfo()> group_info_ ABSL_GUARDED_BY(group_mu_);
};

}  // namespace sy::server
