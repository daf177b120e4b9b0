// InferenceService: switchyard.v1.Inference over gRPC's callback API (DESIGN.md §2 step 1, §6).
//
// Every method takes its request as raw bytes and parses it itself, so a request that is not
// valid protobuf (or has invalid UTF-8 in a string) is INVALID_ARGUMENT, not gRPC's own
// UNIMPLEMENTED. With API keys (`serve --api-key-file`) every call needs metadata
// "authorization: Bearer KEY" (UNAUTHENTICATED otherwise; a peer that fails 10 times in 10 s is
// refused for 10 s); health and reflection stay open.
// Generate validates and converts the request (text is tokenized here, on the gRPC thread,
// once its byte length shows it can fit the context), then hands it to Engine::Submit with a
// GenerateStream as its sink. GenerateStream is a ServerWriteReactor with its own queue and at
// most one write in flight; the engine thread pushes chunks into it and never waits on the
// network (a slow client's chunks are merged). Until SetReady() (model loading) and after
// SetDraining(), Generate answers UNAVAILABLE.
//
// Thread safety: all methods are called on gRPC threads concurrently; SetReady/SetDraining
// from the daemon's thread. The engine and tokenizer must outlive the gRPC server.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "kernels/core/mutex.h"
#include "model/tokenizer.h"
#include "scheduler/engine.h"
#include "server/metrics.h"
#include "server/secrets.h"
#include "switchyard/v1/inference.grpc.pb.h"

namespace sy::server {

struct InferenceServiceOptions {
  int64_t default_max_new_tokens = 256;  // when a request leaves max_new_tokens unset
  std::vector<std::string> api_keys;     // empty: no key needed
};

// What GetServerInfo reports of the rank group (ranks in the epoch in force, placement epoch).
struct GroupInfo {
  int32_t world_size = 1;
  int64_t placement_epoch = 0;
};

class GenerateStream;  // inference_service.cc: one Generate call's reactor and engine sink

// Every method of Inference on the callback API, taking and giving raw bytes.
using InferenceRawService = switchyard::v1::Inference::WithRawCallbackMethod_Generate<
    switchyard::v1::Inference::WithRawCallbackMethod_GetModelInfo<
        switchyard::v1::Inference::WithRawCallbackMethod_GetServerInfo<
            switchyard::v1::Inference::Service>>>;

class InferenceService final : public InferenceRawService {
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

  // Failed API key checks go to `f` too (a metric's counter); call before serving.
  void set_on_auth_failure(std::function<void()> f) { limiter_.set_on_failure(std::move(f)); }
  int64_t auth_failures() const { return limiter_.failures(); }

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const grpc::ByteBuffer* request,
                                         grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const grpc::ByteBuffer* request,
                                          grpc::ByteBuffer* response) override;

 private:
  // OK, or UNAUTHENTICATED / RESOURCE_EXHAUSTED when API keys are set and the call has none.
  absl::Status CheckKey(grpc::CallbackServerContext* context) const;
  void StartGeneration(grpc::CallbackServerContext* context,
                       const switchyard::v1::GenerateRequest& request,
                       const std::shared_ptr<GenerateStream>& stream);
  switchyard::v1::ServerInfo CurrentServerInfo() const;

  // Builds the engine request from the proto (InvalidArgument naming the field).
  absl::Status ToRequest(const switchyard::v1::GenerateRequest& in, scheduler::Engine* engine,
                         scheduler::Request* out) const;

  InferenceServiceOptions options_;
  ServerMetrics* metrics_;
  mutable AuthLimiter limiter_;
  std::atomic<scheduler::Engine*> engine_{nullptr};
  std::atomic<const model::Tokenizer*> tokenizer_{nullptr};
  // Longest text (bytes) that could fit the context; longer ones are refused untokenized.
  std::atomic<size_t> max_prompt_bytes_{SIZE_MAX};
  std::atomic<bool> draining_{false};
  // Shared with the streams, which may outlive the service by a moment.
  std::shared_ptr<std::atomic<int64_t>> active_streams_ = std::make_shared<std::atomic<int64_t>>(0);
  mutable std::atomic<int64_t> next_request_id_{0};
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  mutable sy::Mutex mu_;
  switchyard::v1::ModelInfo model_info_ ABSL_GUARDED_BY(mu_);
  mutable sy::Mutex group_mu_;
  std::function<GroupInfo()> group_info_ ABSL_GUARDED_BY(group_mu_);
};

}  // namespace sy::server
