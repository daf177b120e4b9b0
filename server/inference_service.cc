#include "server/inference_service.h"

#include <algorithm>
#include <deque>
#include <memory>

#include "absl/strings/str_cat.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "kernels/core/logging.h"
#include "kernels/core/mutex.h"
#include "kernels/core/status.h"
#include "server/generate_request.h"
#include "server/grpc_status.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;
namespace {

v1::FinishReason ToProto(scheduler::FinishReason r) {
  switch (r) {
    case scheduler::FinishReason::kStop: return v1::FINISH_REASON_STOP;
    case scheduler::FinishReason::kLength: return v1::FINISH_REASON_LENGTH;
    case scheduler::FinishReason::kAbort: return v1::FINISH_REASON_ABORT;
    case scheduler::FinishReason::kNone: break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

// A request's bytes as M; INVALID_ARGUMENT when they are not one.
template <typename M>
absl::Status Parse(const grpc::ByteBuffer* in, M* out) {
  grpc::ByteBuffer copy(*in);  // Deserialize consumes its buffer (the copy shares the slices)
  if (grpc::SerializationTraits<M>::Deserialize(&copy, out).ok()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("request: not a valid ", M::descriptor()->full_name(),
                   " (malformed protobuf, or invalid UTF-8 in a string field)"));
}

template <typename M>
grpc::Status Serialize(const M& msg, grpc::ByteBuffer* out) {
  bool own = false;
  return grpc::SerializationTraits<M>::Serialize(msg, out, &own);
}

}  // namespace

// One Generate call: the engine's sink and the gRPC write reactor. Owned by shared_ptrs held
// by itself (until OnDone) and by the engine (until OnFinish returns), so neither side can
// see it destroyed. Writes: a queue and one write in flight; after Finish nothing is written.
class GenerateStream final : public grpc::ServerWriteReactor<grpc::ByteBuffer>,
                             public scheduler::RequestSink {
 public:
  GenerateStream(bool stream, ServerMetrics* metrics, std::shared_ptr<std::atomic<int64_t>> active)
      : stream_(stream), metrics_(metrics), active_(std::move(active)) {
    ++*active_;
  }

  void Bind(std::shared_ptr<GenerateStream> self) { self_ = std::move(self); }

  // Ends the call before it reached the engine (bad input, queue full, not serving).
  void FailNow(const absl::Status& status) {
    if (metrics_ != nullptr) metrics_->RequestFailed(status.code());
    Enqueue(nullptr, ToGrpcStatus(status));
  }

  // RequestSink (engine thread).
  void OnTokens(std::span<const int32_t> ids, const std::string& text) override {
    if (!stream_) return;
    sy::MutexLock lock(&mu_);
    if (finish_called_ || finish_pending_) return;
    // A client that reads slower than we generate gets its chunks merged.
    if (!queue_.empty() && queue_.back().has_chunk()) {
      v1::GenerateChunk* c = queue_.back().mutable_chunk();
      c->mutable_token_ids()->Add(ids.begin(), ids.end());
      c->mutable_text()->append(text);
    } else {
      v1::GenerateResponse r;
      r.mutable_chunk()->mutable_token_ids()->Add(ids.begin(), ids.end());
      r.mutable_chunk()->set_text(text);
      queue_.push_back(std::move(r));
    }
    PumpLocked();
  }

  void OnFinish(const scheduler::Completion& c) override {
    if (!c.status.ok() && metrics_ != nullptr) metrics_->RequestFailed(c.status.code());
    auto r = std::make_unique<v1::GenerateResponse>();
    v1::GenerateCompletion* out = r->mutable_completion();
    out->set_request_id(c.request_id);
    out->mutable_token_ids()->Add(c.output_ids.begin(), c.output_ids.end());
    out->set_text(c.text);
    out->set_finish_reason(ToProto(c.finish_reason));
    out->set_prompt_tokens(static_cast<int32_t>(c.prompt_tokens));
    out->set_completion_tokens(static_cast<int32_t>(c.output_ids.size()));
    // An aborted request still gets its completion (finish reason abort) before the error
    // status, so a client sees what was generated.
    Enqueue(std::move(r), ToGrpcStatus(c.status));
  }

  bool IsCancelled() const override { return cancelled_.load(); }

  // Reactor (gRPC threads).
  void OnWriteDone(bool ok) override {
    sy::MutexLock lock(&mu_);
    write_in_flight_ = false;
    if (!ok) {  // the stream broke: the client is gone
      cancelled_ = true;
      queue_.clear();
      if (!finish_pending_) {
        finish_pending_ = true;
        final_ = grpc::Status(grpc::StatusCode::CANCELLED, "write failed");
      }
    }
    PumpLocked();
  }
  void OnCancel() override {
    cancelled_ = true;
    sy::MutexLock lock(&mu_);
    queue_.clear();
    if (!finish_pending_) {
      finish_pending_ = true;
      final_ = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    }
    PumpLocked();
  }
  void OnDone() override {
    cancelled_ = true;
    --*active_;
    std::shared_ptr<GenerateStream> keep = std::move(self_);  // may free us on return
  }

 private:
  void Enqueue(std::unique_ptr<v1::GenerateResponse> last, grpc::Status status) {
    sy::MutexLock lock(&mu_);
    if (finish_pending_) return;
    if (last) queue_.push_back(std::move(*last));
    finish_pending_ = true;
    final_ = std::move(status);
    PumpLocked();
  }

  // Starts the next write, or Finish once the queue is empty and the end is known.
  // gRPC runs reactions on its own threads, never inside StartWrite/Finish, so holding mu_
  // here cannot deadlock.
  void PumpLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (write_in_flight_ || finish_called_) return;
    if (!queue_.empty()) {
      current_.Clear();
      grpc::Status s = Serialize(queue_.front(), &current_);
      queue_.pop_front();
      if (!s.ok()) {  // cannot happen for a message we built; end the call rather than hang
        queue_.clear();
        finish_called_ = true;
        Finish(grpc::Status(grpc::StatusCode::INTERNAL, "could not serialize a response"));
        return;
      }
      write_in_flight_ = true;
      StartWrite(&current_);
    } else if (finish_pending_) {
      finish_called_ = true;
      Finish(final_);
    }
  }

  const bool stream_;
  ServerMetrics* metrics_;
  std::shared_ptr<std::atomic<int64_t>> active_;
  std::atomic<bool> cancelled_{false};
  std::shared_ptr<GenerateStream> self_;
  sy::Mutex mu_;
  std::deque<v1::GenerateResponse> queue_ ABSL_GUARDED_BY(mu_);
  grpc::ByteBuffer current_ ABSL_GUARDED_BY(mu_);  // the write in flight
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_ ABSL_GUARDED_BY(mu_);
};

InferenceService::InferenceService(const InferenceServiceOptions& options,
                                   ServerMetrics* metrics)
    : options_(options), metrics_(metrics) {}

void InferenceService::SetReady(scheduler::Engine* engine, const model::Tokenizer* tokenizer,
                                const v1::ModelInfo& info) {
  {
    sy::MutexLock lock(&mu_);
    model_info_ = info;
  }
  if (tokenizer != nullptr && engine != nullptr)
    max_prompt_bytes_ = MaxPromptBytes(*tokenizer, engine->limits().context_length);
  tokenizer_.store(tokenizer);
  engine_.store(engine);
}

void InferenceService::SetDraining() { draining_ = true; }

absl::Status InferenceService::ToRequest(const v1::GenerateRequest& in,
                                         scheduler::Engine* engine,
                                         scheduler::Request* out) const {
  GenerateRequestContext ctx;
  ctx.tokenizer = tokenizer_.load();
  ctx.max_prompt_bytes = max_prompt_bytes_.load();
  ctx.context_length = engine->limits().context_length;
  ctx.default_max_new_tokens = options_.default_max_new_tokens;
  SY_RETURN_IF_ERROR(ToEngineRequest(in, ctx, out));
  out->id = in.request_id().empty() ? absl::StrCat("req-", next_request_id_.fetch_add(1) + 0)
                                    : in.request_id();
  return absl::OkStatus();
}

absl::Status InferenceService::CheckKey(grpc::CallbackServerContext* context) const {
  if (options_.api_keys.empty()) return absl::OkStatus();
  const std::string peer = context->peer();
  SY_RETURN_IF_ERROR(limiter_.Admit(peer));
  const auto& md = context->client_metadata();
  auto it = md.find("authorization");
  if (it != md.end() &&
      BearerMatches(absl::string_view(it->second.data(), it->second.size()), options_.api_keys))
    return absl::OkStatus();
  limiter_.Failed(peer);
  return absl::UnauthenticatedError(
      "Inference needs metadata 'authorization: Bearer <API key>' with a key of the server's "
      "--api-key-file");
}

grpc::ServerWriteReactor<grpc::ByteBuffer>* InferenceService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* bytes) {
  v1::GenerateRequest request;
  absl::Status s = CheckKey(context);
  if (s.ok()) s = Parse(bytes, &request);
  auto stream = std::make_shared<GenerateStream>(!request.has_stream() || request.stream(),
                                                 metrics_, active_streams_);
  stream->Bind(stream);
  if (!s.ok()) {
    stream->FailNow(s);
    return stream.get();
  }
  StartGeneration(context, request, stream);
  return stream.get();
}

void InferenceService::StartGeneration(grpc::CallbackServerContext* context,
                                       const v1::GenerateRequest& request,
                                       const std::shared_ptr<GenerateStream>& stream) {
  scheduler::Engine* engine = engine_.load();
  if (engine == nullptr || draining_.load()) {
    stream->FailNow(absl::UnavailableError(engine == nullptr
                                               ? "the model is still loading; retry shortly"
                                               : "the server is draining; retry elsewhere"));
    return;
  }
  scheduler::Request r;
  absl::Status s = ToRequest(request, engine, &r);
  if (s.ok()) {
    const auto deadline = context->deadline();
    if (deadline != std::chrono::system_clock::time_point::max()) {
      const auto left = deadline - std::chrono::system_clock::now();
      r.deadline = scheduler::Clock::now() +
                   std::chrono::duration_cast<scheduler::Clock::duration>(left);
    }
    r.sink = stream;
    s = engine->Submit(std::move(r));
  }
  if (!s.ok()) stream->FailNow(s);
}

grpc::ServerUnaryReactor* InferenceService::GetModelInfo(grpc::CallbackServerContext* context,
                                                         const grpc::ByteBuffer* bytes,
                                                         grpc::ByteBuffer* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  v1::GetModelInfoRequest request;
  absl::Status s = CheckKey(context);
  if (s.ok()) s = Parse(bytes, &request);
  if (s.ok() && engine_.load() == nullptr) s = absl::UnavailableError("the model is still loading");
  if (!s.ok()) {
    reactor->Finish(ToGrpcStatus(s));
    return reactor;
  }
  v1::ModelInfo info;
  {
    sy::MutexLock lock(&mu_);
    info = model_info_;
  }
  reactor->Finish(Serialize(info, response));
  return reactor;
}

void InferenceService::SetGroupInfo(std::function<GroupInfo()> info) {
  sy::MutexLock lock(&group_mu_);
  group_info_ = std::move(info);
}

grpc::ServerUnaryReactor* InferenceService::GetServerInfo(grpc::CallbackServerContext* context,
                                                          const grpc::ByteBuffer* bytes,
                                                          grpc::ByteBuffer* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  v1::GetServerInfoRequest request;
  absl::Status s = CheckKey(context);
  if (s.ok()) s = Parse(bytes, &request);
  reactor->Finish(s.ok() ? Serialize(CurrentServerInfo(), response) : ToGrpcStatus(s));
  return reactor;
}

v1::ServerInfo InferenceService::CurrentServerInfo() const {
  v1::ServerInfo info;
  v1::ServerInfo* response = &info;
  response->set_version("switchyard 0.1");
  response->set_uptime_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  GroupInfo group;
  {
    sy::MutexLock lock(&group_mu_);
    if (group_info_) group = group_info_();
  }
  response->set_world_size(group.world_size);
  response->set_placement_epoch(group.placement_epoch);
  response->set_serving(serving());
  if (const scheduler::Engine* e = engine_.load()) {
    const scheduler::EngineStats st = e->stats();
    response->set_requests_running(st.running);
    response->set_requests_waiting(st.waiting);
    response->set_max_queue(e->options().max_queue);
    response->set_kv_block_size(e->options().block_size);
    response->set_kv_blocks_total(st.kv_blocks_total);
    response->set_kv_blocks_free(st.kv_blocks_free);
    response->set_max_num_seqs(e->options().scheduler.max_num_seqs);
    response->set_max_num_batched_tokens(e->options().scheduler.max_num_batched_tokens);
    response->set_requests_total(st.requests_total);
  }
  return info;
}

}  // namespace sy::server
