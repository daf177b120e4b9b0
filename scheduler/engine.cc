#include "scheduler/engine.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/mutex.h"
#include "kernels/core/status.h"
#include "kernels/core/thread_pool.h"

namespace sy::scheduler {
namespace {

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// Bytes at the end of `text` (after `from`) that could be the start of a stop string and so
// must not be streamed yet. Never splits a UTF-8 character.
size_t HoldBack(const std::string& text, size_t from, const std::vector<std::string>& stops) {
  size_t hold = 0;
  for (const std::string& s : stops) {
    const size_t max_len = std::min(s.size() - 1, text.size() - from);
    for (size_t len = max_len; len > hold; --len) {
      if (text.compare(text.size() - len, len, s, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  size_t cut = text.size() - hold;
  while (cut > from && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return text.size() - cut;
}

}  // namespace

int64_t NumBlocksForBytes(const model::ModelConfig& config, int64_t bytes, int64_t block_size) {
  const int64_t per_block = model::KvCache::BytesPerBlock(config, block_size);
  return per_block > 0 ? std::max<int64_t>(0, bytes / per_block) : 0;
}

Engine::Engine(std::unique_ptr<StepExecutor> executor, const model::Tokenizer* tokenizer,
               const EngineOptions& options, EngineObserver* observer)
    : executor_(std::move(executor)),
      tokenizer_(tokenizer),
      options_(options),
      observer_(observer),
      pools_(options.block_size),
      scheduler_(options.scheduler, &pools_) {
  pools_.Add(0, options.num_blocks);
  const model::ModelConfig& c = executor_->config();
  limits_.vocab_size = c.vocab_size;
  limits_.context_length =
      std::min(c.max_position_embeddings, options.num_blocks * options.block_size);
  eos_ids_ = c.eos_token_ids;
  if (eos_ids_.empty() && tokenizer_ != nullptr && tokenizer_->eos_id())
    eos_ids_.push_back(*tokenizer_->eos_id());
  kv_free_ = pools_.num_free_blocks();
  kv_total_ = pools_.num_blocks();
}

Engine::~Engine() { Stop(); }

void Engine::Start() {
  SY_CHECK(!thread_.joinable());
  executor_->SetWakeup([this] {
    sy::MutexLock lock(&mu_);
    wake_ = true;
    cv_.SignalAll();
  });
  thread_ = std::thread([this] { Loop(); });
}

absl::Status Engine::Submit(Request request) {
  SY_RETURN_IF_ERROR(ValidateRequest(request, limits_));
  SY_CHECK(request.sink != nullptr);
  sy::MutexLock lock(&mu_);
  if (!accepting_ || stopping_)
    return absl::UnavailableError("the server is shutting down and takes no new requests");
  if (static_cast<int64_t>(intake_.size()) + num_waiting_.load() >= options_.max_queue)
    return absl::ResourceExhaustedError(absl::StrCat(
        "the request queue is full (", options_.max_queue, " requests waiting); retry later"));
  intake_.push_back(std::move(request));
  ++requests_total_;
  cv_.Signal();
  return absl::OkStatus();
}

void Engine::StopAccepting() {
  sy::MutexLock lock(&mu_);
  accepting_ = false;
}

bool Engine::WaitIdle(std::chrono::milliseconds timeout) {
  sy::MutexLock lock(&mu_);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!(intake_.empty() && !busy_) && !idle_cv_.WaitUntil(&mu_, deadline)) {
  }
  return intake_.empty() && !busy_;
}

void Engine::Stop() {
  {
    sy::MutexLock lock(&mu_);
    accepting_ = false;
    stopping_ = true;
    cv_.SignalAll();
  }
  if (thread_.joinable()) thread_.join();
  executor_->SetWakeup(nullptr);  // the executor's threads outlive this engine's members
  // Anything the thread did not get to (or a never-started engine's intake).
  std::deque<Request> left;
  {
    sy::MutexLock lock(&mu_);
    left.swap(intake_);
  }
  for (Request& r : left) {
    Completion c;
    c.request_id = r.id;
    c.finish_reason = FinishReason::kAbort;
    c.prompt_tokens = static_cast<int64_t>(r.prompt.size());
    c.status = absl::UnavailableError("the server shut down before the request ran");
    r.sink->OnFinish(c);
  }
}

EngineStats Engine::stats() const {
  EngineStats s;
  s.running = num_running_.load();
  {
    sy::MutexLock lock(&mu_);
    s.waiting = static_cast<int64_t>(intake_.size()) + num_waiting_.load();
  }
  s.kv_blocks_total = kv_total_.load();
  s.kv_blocks_free = kv_free_.load();
  s.recovered = recovered_.load();
  s.requests_total = requests_total_.load();
  s.steps = steps_.load();
  s.preemptions = preemptions_.load();
  return s;
}

void Engine::Loop() {
  for (;;) {
    {
      sy::MutexLock lock(&mu_);
      busy_ = !scheduler_.empty();
      if (!busy_) idle_cv_.SignalAll();
      while (!stopping_ && !wake_ && intake_.empty() && scheduler_.empty()) cv_.Wait(&mu_);
      if (stopping_) break;
      wake_ = false;
    }
    // Intake first: a request submitted after a pool change was queued (a join that status
    // already shows) is admitted knowing that change.
    DrainIntake();
    ApplyPoolEvents();
    AbortCancelled();
    if (!scheduler_.empty() && Step()) {
      PublishIdleness();  // EndStep published the gauges, before the sinks heard
    } else {
      PublishStats();
    }
  }
  for (Sequence* seq : scheduler_.AllSequences())
    Finish(seq, FinishReason::kAbort, absl::UnavailableError("the server shut down"));
  PublishStats();
  sy::MutexLock lock(&mu_);
  busy_ = false;
  idle_cv_.SignalAll();
}

void Engine::DrainIntake() {
  std::deque<Request> batch;
  {
    sy::MutexLock lock(&mu_);
    batch.swap(intake_);
    busy_ = true;
    // Counted as waiting from here until admitted, so the queue bound holds meanwhile.
    num_waiting_ += static_cast<int64_t>(batch.size());
  }
  for (Request& r : batch) {
    scheduler_.Add(std::make_unique<Sequence>(next_seq_id_++, std::move(r), tokenizer_));
  }
}

namespace {
// How far ahead of a request's deadline a cancel still counts as the deadline (the gRPC
// deadline and ours are converted between clocks, and the cancel can arrive a little early).
constexpr std::chrono::milliseconds kDeadlineSlack(50);
}  // namespace

void Engine::AbortCancelled() {
  const Clock::time_point now = Clock::now();
  for (Sequence* seq : scheduler_.AllSequences()) {
    if (seq->request.sink->IsCancelled()) {
      // gRPC cancels a call when its deadline expires, usually before this check sees the
      // deadline pass; a cancel that arrives within kDeadlineSlack of the deadline is the
      // deadline, and is reported (and counted in metrics) as DEADLINE_EXCEEDED.
      if (now + kDeadlineSlack >= seq->request.deadline) {
        Finish(seq, FinishReason::kAbort,
               absl::DeadlineExceededError("the request's deadline passed"));
      } else {
        Finish(seq, FinishReason::kAbort, absl::CancelledError("the client cancelled the request"));
      }
    } else if (now >= seq->request.deadline) {
      Finish(seq, FinishReason::kAbort,
             absl::DeadlineExceededError("the request's deadline passed"));
    }
  }
}

void Engine::ApplyPoolEvents() {
  for (const PoolEvent& ev : executor_->TakePoolEvents()) {
    switch (ev.kind) {
      case PoolEvent::Kind::kAdded:
        if (!pools_.Has(ev.pool)) pools_.Add(ev.pool, ev.num_blocks);
        break;
      case PoolEvent::Kind::kDraining:
        if (pools_.Has(ev.pool)) pools_.SetAccepting(ev.pool, false);
        break;
      case PoolEvent::Kind::kEvict:
      case PoolEvent::Kind::kLost:
      case PoolEvent::Kind::kRemoved: {
        if (!pools_.Has(ev.pool)) break;
        pools_.SetAccepting(ev.pool, false);
        const std::vector<Sequence*> moved = scheduler_.PreemptPool(ev.pool);
        preemptions_ += static_cast<int64_t>(moved.size());
        if (ev.kind == PoolEvent::Kind::kLost) recovered_ += static_cast<int64_t>(moved.size());
        if (!moved.empty())
          SY_LOG(INFO) << moved.size() << " sequence(s) of rank " << ev.pool
                       << (ev.kind == PoolEvent::Kind::kLost ? " (lost)" : " (drained)")
                       << " go back to the queue to be prefilled on another rank";
        if (ev.kind != PoolEvent::Kind::kEvict) pools_.Remove(ev.pool);
        break;
      }
    }
  }
}

bool Engine::Step() {
  const Clock::time_point start = Clock::now();
  StepStats st;
  ScheduledBatch batch = Schedule(&st);
  if (batch.empty() || !RunBatch(batch)) return false;
  scheduler_.CommitStep(batch);
  const std::vector<Sequence*> finished = Postprocess(batch, &st);
  EndStep(finished, start, &st);
  return true;
}

bool Engine::RunBatch(const ScheduledBatch& batch) {
  const absl::Status status = Run(batch);
  if (status.code() == absl::StatusCode::kAborted) {
    // The group changed under the step: nothing ran. The pool events say what moved.
    SY_LOG(WARNING) << "step not run, scheduling again: " << status;
    return false;
  }
  if (!status.ok()) {
    SY_LOG(ERROR) << "step failed: " << status;
    for (const ScheduledSequence& e : batch.entries)
      Finish(e.seq, FinishReason::kAbort, sy::Annotate(status, "model step"));
    return false;
  }
  return true;
}

void Engine::EndStep(const std::vector<Sequence*>& finished, Clock::time_point start,
                     StepStats* st) {
  // Every figure (counters, gauges) shows the step and its finished requests gone before any
  // client hears that its request ended: a scrape right after a completion adds up.
  std::vector<Retired> retired;
  retired.reserve(finished.size());
  for (Sequence* seq : finished) retired.push_back(Retire(seq, seq->finish_reason, absl::OkStatus()));
  ++steps_;
  preemptions_ += st->num_preempted;
  st->seconds = Seconds(Clock::now() - start);
  st->running = scheduler_.num_running();
  st->waiting = scheduler_.num_waiting();
  const int64_t total = pools_.num_blocks();
  st->kv_usage = total > 0 ? 1.0 - static_cast<double>(pools_.num_free_blocks()) / total : 0.0;
  if (observer_ != nullptr) observer_->OnStep(*st);
  PublishStats(/*may_be_idle=*/false);  // idle only once the sinks below have their ends
  for (Retired& r : retired) r.sink->OnFinish(r.completion);
}

ScheduledBatch Engine::Schedule(StepStats* st) {
  ScheduledBatch batch = scheduler_.Schedule();
  // Publish admissions now: a client can see its first token before this step ends, and a
  // stale waiting count would refuse the next request with a full queue that is not full.
  num_waiting_ = scheduler_.num_waiting();
  num_running_ = scheduler_.num_running();
  st->num_preempted = static_cast<int64_t>(batch.preempted.size());
  st->num_seqs = static_cast<int64_t>(batch.entries.size());
  st->num_decode_tokens = batch.num_decode();
  st->num_prefill_tokens = batch.num_tokens() - st->num_decode_tokens;
  return batch;
}

absl::Status Engine::Run(const ScheduledBatch& batch) {
  inputs_.clear();
  homes_.clear();
  samples_.clear();
  for (const ScheduledSequence& e : batch.entries) {
    Sequence* s = e.seq;
    model::SequenceInput in;
    in.tokens = std::span<const int32_t>(s->tokens.data() + s->num_computed, e.num_tokens);
    in.start_pos = s->num_computed;
    in.block_table = s->block_table;
    in.compute_logits = e.compute_logits;
    inputs_.push_back(in);
    homes_.push_back(s->home);
    samples_.push_back(SampleSpec{s->request.params.sampling,
                                  static_cast<uint64_t>(s->num_output_tokens())});
  }
  return executor_->Execute(inputs_, homes_, samples_, &sampled_);
}

std::vector<Sequence*> Engine::Postprocess(const ScheduledBatch& batch, StepStats* st) {
  // The executor sampled where the logits were: one token per entry that wants one.
  sampling_.clear();
  for (size_t i = 0; i < batch.entries.size(); ++i)
    if (WantsToken(inputs_[i])) sampling_.push_back(batch.entries[i].seq);
  const int64_t num_sampled = static_cast<int64_t>(sampling_.size());
  SY_CHECK_EQ(num_sampled, static_cast<int64_t>(sampled_.size()));
  const Clock::time_point now = Clock::now();
  std::vector<Sequence*> finished;
  for (int64_t i = 0; i < num_sampled; ++i)
    if (AppendToken(sampling_[i], sampled_[i], now)) finished.push_back(sampling_[i]);
  st->num_generated = num_sampled;
  return finished;
}

bool Engine::AppendToken(Sequence* seq, int32_t tok, Clock::time_point now) {
  seq->tokens.push_back(tok);
  if (observer_ != nullptr) {
    if (seq->first_token == Clock::time_point{})
      observer_->OnFirstToken(Seconds(now - seq->request.arrival));
    else
      observer_->OnTokenGap(Seconds(now - seq->last_token));
  }
  if (seq->first_token == Clock::time_point{}) seq->first_token = now;
  seq->last_token = now;

  const GenerationParams& p = seq->request.params;
  if (seq->decoder) seq->text += seq->decoder->Add(tok);

  FinishReason reason = FinishReason::kNone;
  bool cut_by_stop_string = false;
  if (std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), tok) != p.stop_token_ids.end() ||
      (!p.ignore_eos && std::find(eos_ids_.begin(), eos_ids_.end(), tok) != eos_ids_.end())) {
    reason = FinishReason::kStop;
  } else if (!p.stop_strings.empty()) {
    // Only the new text (plus a stop string's length before it) can hold a new match.
    size_t longest = 0;
    for (const std::string& s : p.stop_strings) longest = std::max(longest, s.size());
    const size_t from = seq->text_sent > longest ? seq->text_sent - longest : 0;
    size_t best = std::string::npos;
    for (const std::string& s : p.stop_strings) best = std::min(best, seq->text.find(s, from));
    if (best != std::string::npos) {
      seq->text.resize(best);
      reason = FinishReason::kStop;
      cut_by_stop_string = true;
    }
  }
  if (reason == FinishReason::kNone &&
      (seq->num_output_tokens() >= p.max_new_tokens ||
       seq->num_tokens() >= limits_.context_length))
    reason = FinishReason::kLength;
  if (reason != FinishReason::kNone && seq->decoder && !cut_by_stop_string)
    seq->text += seq->decoder->Flush();

  size_t end = seq->text.size();
  if (reason == FinishReason::kNone && !p.stop_strings.empty())
    end -= HoldBack(seq->text, seq->text_sent, p.stop_strings);
  std::string delta;
  if (end > seq->text_sent) {
    delta = seq->text.substr(seq->text_sent, end - seq->text_sent);
    seq->text_sent = end;
  }
  seq->request.sink->OnTokens(std::span<const int32_t>(&seq->tokens.back(), 1), delta);
  seq->finish_reason = reason;
  return reason != FinishReason::kNone;
}

void Engine::Finish(Sequence* seq, FinishReason reason, absl::Status status) {
  Retired r = Retire(seq, reason, std::move(status));
  r.sink->OnFinish(r.completion);
}

Engine::Retired Engine::Retire(Sequence* seq, FinishReason reason, absl::Status status) {
  std::unique_ptr<Sequence> owned = scheduler_.Remove(seq);
  Completion c;
  c.request_id = owned->request.id;
  c.output_ids.assign(owned->tokens.begin() + owned->num_prompt_tokens, owned->tokens.end());
  c.text = std::move(owned->text);
  c.finish_reason = reason;
  c.prompt_tokens = owned->num_prompt_tokens;
  c.status = status;
  if (observer_ != nullptr) {
    RequestStats rs;
    rs.finish_reason = reason;
    rs.code = status.code();
    const Clock::time_point now = Clock::now();
    if (owned->first_scheduled != Clock::time_point{})
      rs.queue_seconds = Seconds(owned->first_scheduled - owned->request.arrival);
    rs.e2e_seconds = Seconds(now - owned->request.arrival);
    rs.prompt_tokens = owned->num_prompt_tokens;
    rs.generation_tokens = owned->num_output_tokens();
    observer_->OnRequestDone(rs);
  }
  return {std::move(owned->request.sink), std::move(c)};
}

void Engine::PublishStats(bool may_be_idle) {
  num_running_ = scheduler_.num_running();
  kv_free_ = pools_.num_free_blocks();
  kv_total_ = pools_.num_blocks();
  usage_.clear();
  for (int32_t id : pools_.ids()) {
    const BatchScheduler::PoolLoad load = scheduler_.LoadOf(id);
    usage_.push_back({id, load.num_seqs, load.used_blocks, pools_.pool(id).num_blocks()});
  }
  executor_->ReportPools(usage_);
  {
    sy::MutexLock lock(&mu_);
    num_waiting_ = scheduler_.num_waiting();
  }
  if (may_be_idle) PublishIdleness();
}

void Engine::PublishIdleness() {
  sy::MutexLock lock(&mu_);
  busy_ = !scheduler_.empty();
  if (!busy_ && intake_.empty()) idle_cv_.SignalAll();
}

}  // namespace sy::scheduler
