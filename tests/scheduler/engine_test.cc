// Engine: the step loop with a fixture model. PagedTokenModel plays the model through the real
// StepExecutor seam: it stores each position's token in the block the block table names, and
// its "logits" pick the next token from the tokens it reads back through the block table.
// A wrong block table, a lost block or a bad recompute therefore changes the output, which
// the tests compare against the same rule applied to the plain token list.
#include "scheduler/engine.h"

#include <atomic>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include "gtest/gtest.h"

namespace sy::scheduler {
namespace {

constexpr int64_t kVocab = 97;

// Reference next token: a hash of every token so far.
int32_t NextToken(const std::vector<int32_t>& tokens) {
  uint64_t h = 1469598103934665603ull;
  for (int32_t t : tokens) h = (h ^ static_cast<uint64_t>(t)) * 1099511628211ull;
  return static_cast<int32_t>(h % kVocab);
}

class PagedTokenModel : public StepExecutor {
 public:
  PagedTokenModel(int64_t num_blocks, int64_t block_size, int64_t context)
      : slots_(num_blocks * block_size, -1), block_size_(block_size) {
    config_.vocab_size = kVocab;
    config_.max_position_embeddings = context;
    config_.eos_token_ids = {};
  }
  const model::ModelConfig& config() const override { return config_; }
  absl::Status Execute(std::span<const model::SequenceInput> batch, std::span<const int32_t> homes,
                       std::span<const SampleSpec> samples, std::vector<int32_t>* tokens) override {
    ++steps;
    int64_t rows = 0;
    for (const auto& in : batch) rows += WantsToken(in);
    std::vector<float> logits(rows * kVocab, 0.f);
    std::vector<float>* logits_ptr = &logits;
    std::vector<SampleSpec> specs;
    int64_t row = 0;
    for (size_t b = 0; b < batch.size(); ++b) {
      const model::SequenceInput& in = batch[b];
      max_batch = std::max<int64_t>(max_batch, static_cast<int64_t>(batch.size()));
      const int64_t end = in.start_pos + static_cast<int64_t>(in.tokens.size());
      if (static_cast<int64_t>(in.block_table.size()) * block_size_ < end)
        return absl::InternalError("block table too short");
      for (size_t i = 0; i < in.tokens.size(); ++i) Slot(in.block_table, in.start_pos + i) = in.tokens[i];
      if (!WantsToken(in)) continue;
      std::vector<int32_t> seen;
      for (int64_t p = 0; p < end; ++p) seen.push_back(Slot(in.block_table, p));
      (*logits_ptr)[row * kVocab + NextToken(seen)] = 1.f;
      specs.push_back(b < samples.size() ? samples[b] : SampleSpec{});
      ++row;
    }
    tokens->resize(specs.size());
    SampleRows(specs, logits.data(), kVocab, tokens->data());
    return absl::OkStatus();
  }
  std::atomic<int64_t> steps{0};
  std::atomic<int64_t> max_batch{0};

 private:
  int32_t& Slot(std::span<const int32_t> table, int64_t pos) {
    return slots_[table[pos / block_size_] * block_size_ + pos % block_size_];
  }
  model::ModelConfig config_;
  std::vector<int32_t> slots_;
  int64_t block_size_;
};

class CollectingSink : public RequestSink {
 public:
  void OnTokens(std::span<const int32_t> ids, const std::string& text) override {
    std::lock_guard<std::mutex> lock(mu);
    streamed.insert(streamed.end(), ids.begin(), ids.end());
    if (cancel_after > 0 && static_cast<int64_t>(streamed.size()) >= cancel_after) cancelled = true;
  }
  void OnFinish(const Completion& c) override {
    std::lock_guard<std::mutex> lock(mu);
    completion = c;
    done = true;
    cv.notify_all();
  }
  bool IsCancelled() const override { return cancelled; }
  bool WaitDone(std::chrono::seconds timeout = std::chrono::seconds(30)) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, timeout, [&] { return done; });
  }

  std::mutex mu;
  std::condition_variable cv;
  std::vector<int32_t> streamed;
  Completion completion;
  bool done = false;
  std::atomic<bool> cancelled{false};
  int64_t cancel_after = 0;
};

std::vector<int32_t> Reference(std::vector<int32_t> prompt, int64_t n) {
  std::vector<int32_t> out;
  for (int64_t i = 0; i < n; ++i) {
    out.push_back(NextToken(prompt));
    prompt.push_back(out.back());
  }
  return out;
}

struct Fixture {
  Fixture(int64_t num_blocks, int64_t block_size, int64_t max_seqs, int64_t max_tokens,
          int64_t max_queue = 256) {
    EngineOptions o;
    o.num_blocks = num_blocks;
    o.block_size = block_size;
    o.scheduler.max_num_seqs = max_seqs;
    o.scheduler.max_num_batched_tokens = max_tokens;
    o.max_queue = max_queue;
    auto m = std::make_unique<PagedTokenModel>(num_blocks, block_size, 4096);
    model = m.get();
    engine = std::make_unique<Engine>(std::move(m), nullptr, o);
  }
  PagedTokenModel* model;
  std::unique_ptr<Engine> engine;
};

Request MakeRequest(std::vector<int32_t> prompt, int64_t max_new, std::shared_ptr<RequestSink> sink) {
  Request r;
  r.prompt = std::move(prompt);
  r.params.max_new_tokens = max_new;
  r.sink = std::move(sink);
  return r;
}

TEST(EngineTest, ConcurrentRequestsGetTheirReferenceTokensUnderPreemption) {
  // 24 blocks of 4 = 96 positions for 32 requests of up to 30 tokens: the cache cannot hold
  // them all, so the scheduler batches, chunks and preempts.
  Fixture f(/*num_blocks=*/24, /*block_size=*/4, /*max_seqs=*/16, /*max_tokens=*/32);
  f.engine->Start();
  std::vector<std::shared_ptr<CollectingSink>> sinks;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 32; ++i) {
    std::vector<int32_t> prompt;
    for (int j = 0; j < 5 + i % 13; ++j) prompt.push_back((i * 31 + j * 7) % kVocab);
    prompts.push_back(prompt);
    sinks.push_back(std::make_shared<CollectingSink>());
    ASSERT_TRUE(f.engine->Submit(MakeRequest(prompt, 4 + i % 9, sinks.back())).ok());
  }
  for (int i = 0; i < 32; ++i) {
    ASSERT_TRUE(sinks[i]->WaitDone()) << i;
    const Completion& c = sinks[i]->completion;
    EXPECT_TRUE(c.status.ok()) << c.status;
    EXPECT_EQ(c.finish_reason, FinishReason::kLength);
    EXPECT_EQ(c.output_ids, Reference(prompts[i], 4 + i % 9)) << "request " << i;
    EXPECT_EQ(sinks[i]->streamed, c.output_ids);
    EXPECT_EQ(c.prompt_tokens, static_cast<int64_t>(prompts[i].size()));
  }
  EXPECT_TRUE(f.engine->WaitIdle(std::chrono::seconds(5)));
  EngineStats s = f.engine->stats();
  EXPECT_EQ(s.kv_blocks_free, 24);
  EXPECT_GT(s.preemptions, 0);
  EXPECT_GT(f.model->max_batch.load(), 1);
}

TEST(EngineTest, StopTokenIdsFinishWithReasonStop) {
  Fixture f(64, 4, 8, 64);
  f.engine->Start();
  std::vector<int32_t> prompt = {1, 2, 3};
  std::vector<int32_t> ref = Reference(prompt, 10);
  auto sink = std::make_shared<CollectingSink>();
  Request r = MakeRequest(prompt, 10, sink);
  r.params.stop_token_ids = {ref[3]};
  ASSERT_TRUE(f.engine->Submit(std::move(r)).ok());
  ASSERT_TRUE(sink->WaitDone());
  // Stops at the first occurrence of the stop token, which is included.
  size_t first = std::find(ref.begin(), ref.end(), ref[3]) - ref.begin();
  EXPECT_EQ(sink->completion.finish_reason, FinishReason::kStop);
  EXPECT_EQ(sink->completion.output_ids, std::vector<int32_t>(ref.begin(), ref.begin() + first + 1));
}

TEST(EngineTest, ACancelledRequestIsAbortedAndItsBlocksFreed) {
  Fixture f(64, 4, 8, 64);
  f.engine->Start();
  auto sink = std::make_shared<CollectingSink>();
  sink->cancel_after = 3;
  ASSERT_TRUE(f.engine->Submit(MakeRequest({5, 6, 7, 8, 9}, 200, sink)).ok());
  ASSERT_TRUE(sink->WaitDone());
  EXPECT_EQ(sink->completion.finish_reason, FinishReason::kAbort);
  EXPECT_EQ(sink->completion.status.code(), absl::StatusCode::kCancelled);
  EXPECT_LT(sink->completion.output_ids.size(), 200u);
  EXPECT_TRUE(f.engine->WaitIdle(std::chrono::seconds(5)));
  EXPECT_EQ(f.engine->stats().kv_blocks_free, 64);
  EXPECT_EQ(f.engine->stats().running, 0);
}

TEST(EngineTest, ARequestPastItsDeadlineIsAborted) {
  Fixture f(64, 4, 8, 64);
  auto sink = std::make_shared<CollectingSink>();
  Request r = MakeRequest({5, 6, 7}, 100, sink);
  r.deadline = Clock::now() - std::chrono::milliseconds(1);
  ASSERT_TRUE(f.engine->Submit(std::move(r)).ok());
  f.engine->Start();
  ASSERT_TRUE(sink->WaitDone());
  EXPECT_EQ(sink->completion.status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(sink->completion.finish_reason, FinishReason::kAbort);
  EXPECT_TRUE(f.engine->WaitIdle(std::chrono::seconds(5)));
  EXPECT_EQ(f.engine->stats().kv_blocks_free, 64);
}

TEST(EngineTest, AFullQueueRefusesWithResourceExhausted) {
  Fixture f(64, 4, 8, 64, /*max_queue=*/3);  // not started: nothing leaves the queue
  std::vector<std::shared_ptr<CollectingSink>> sinks;
  for (int i = 0; i < 3; ++i) {
    sinks.push_back(std::make_shared<CollectingSink>());
    ASSERT_TRUE(f.engine->Submit(MakeRequest({1, 2}, 4, sinks.back())).ok());
  }
  auto extra = std::make_shared<CollectingSink>();
  absl::Status s = f.engine->Submit(MakeRequest({1, 2}, 4, extra));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  // Once started the queue drains and new requests are taken again.
  f.engine->Start();
  for (auto& k : sinks) ASSERT_TRUE(k->WaitDone());
  EXPECT_TRUE(f.engine->Submit(MakeRequest({1, 2}, 4, extra)).ok());
  ASSERT_TRUE(extra->WaitDone());
  EXPECT_TRUE(extra->completion.status.ok());
}

TEST(EngineTest, DrainFinishesRunningRequestsAndRefusesNewOnes) {
  Fixture f(64, 4, 8, 64);
  f.engine->Start();
  auto sink = std::make_shared<CollectingSink>();
  ASSERT_TRUE(f.engine->Submit(MakeRequest({3, 4}, 50, sink)).ok());
  f.engine->StopAccepting();
  auto late = std::make_shared<CollectingSink>();
  EXPECT_EQ(f.engine->Submit(MakeRequest({3, 4}, 5, late)).code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(f.engine->WaitIdle(std::chrono::seconds(30)));
  ASSERT_TRUE(sink->done);
  EXPECT_EQ(sink->completion.finish_reason, FinishReason::kLength);
  EXPECT_EQ(sink->completion.output_ids, Reference({3, 4}, 50));
  f.engine->Stop();
}

TEST(EngineTest, StopAbortsWhatIsLeft) {
  Fixture f(64, 4, 8, 64);
  auto sink = std::make_shared<CollectingSink>();
  ASSERT_TRUE(f.engine->Submit(MakeRequest({3, 4}, 50, sink)).ok());
  f.engine->Stop();  // never started
  ASSERT_TRUE(sink->done);
  EXPECT_EQ(sink->completion.finish_reason, FinishReason::kAbort);
  EXPECT_EQ(sink->completion.status.code(), absl::StatusCode::kUnavailable);
}

TEST(EngineTest, ContextLengthIsCappedByTheKvCache) {
  Fixture f(/*num_blocks=*/8, /*block_size=*/4, 8, 64);
  EXPECT_EQ(f.engine->limits().context_length, 32);
  auto sink = std::make_shared<CollectingSink>();
  absl::Status s = f.engine->Submit(MakeRequest(std::vector<int32_t>(20, 1), 13, sink));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("max_new_tokens"), std::string::npos) << s;
}

// An executor of pools: another thread (the rank group's controller) queues a pool event and
// then a client submits, at the moment the engine has just taken its pool events — the worst
// interleaving for "a request sent after a join is visible can be homed on the new rank".
class RacingPools : public StepExecutor {
 public:
  RacingPools() {
    config_.vocab_size = kVocab;
    config_.max_position_embeddings = 4096;
  }
  const model::ModelConfig& config() const override { return config_; }
  absl::Status Execute(std::span<const model::SequenceInput> batch, std::span<const int32_t> homes,
                       std::span<const SampleSpec> samples, std::vector<int32_t>* tokens) override {
    tokens->clear();
    std::lock_guard<std::mutex> lock(mu);
    for (size_t b = 0; b < batch.size(); ++b) {
      if (batch[b].start_pos == 0) home_of_first_token[batch[b].tokens[0]] = homes[b];
      if (WantsToken(batch[b])) tokens->push_back(1);
    }
    ++steps;
    return absl::OkStatus();
  }
  std::vector<PoolEvent> TakePoolEvents() override {
    std::vector<PoolEvent> out;
    std::function<void()> race;
    {
      std::lock_guard<std::mutex> lock(mu);
      out.swap(events);
      if (steps > 0) race.swap(on_next_take);  // once a sequence runs
    }
    if (race) race();  // after the engine's read: what it did not see
    return out;
  }
  void Queue(PoolEvent e) {
    std::lock_guard<std::mutex> lock(mu);
    events.push_back(e);
  }
  void SetWakeup(std::function<void()> w) override {
    std::lock_guard<std::mutex> lock(mu);
    wake = std::move(w);
  }

  std::mutex mu;
  std::vector<PoolEvent> events;
  std::function<void()> on_next_take;
  std::map<int32_t, int32_t> home_of_first_token;
  std::function<void()> wake;
  std::atomic<int64_t> steps{0};

 private:
  model::ModelConfig config_;
};

TEST(EngineTest, ARequestSentAfterAPoolJoinedCanBeHomedThere) {
  auto exec = std::make_unique<RacingPools>();
  RacingPools* pools = exec.get();
  EngineOptions o;
  o.num_blocks = 64;
  o.block_size = 4;
  Engine engine(std::move(exec), nullptr, o);
  engine.Start();
  {
    std::lock_guard<std::mutex> lock(pools->mu);
    EXPECT_TRUE(pools->wake) << "the engine set its wake-up";
  }
  auto a = std::make_shared<CollectingSink>();
  auto b = std::make_shared<CollectingSink>();
  {
    // Fires at the engine's first read of pool events after A's first step (A, 200 tokens
    // long, still runs when B is admitted).
    std::lock_guard<std::mutex> lock(pools->mu);
    pools->on_next_take = [&] {
      pools->Queue({PoolEvent::Kind::kAdded, 1, 64});  // the join is in force...
      EXPECT_TRUE(engine.Submit(MakeRequest({20, 21}, 5, b)).ok());  // ...and then B arrives
    };
  }
  ASSERT_TRUE(engine.Submit(MakeRequest({10, 11}, 200, a)).ok());
  ASSERT_TRUE(b->WaitDone());
  EXPECT_TRUE(b->completion.status.ok()) << b->completion.status;
  {
    std::lock_guard<std::mutex> lock(pools->mu);
    ASSERT_EQ(pools->home_of_first_token.count(20), 1u);
    // Pool 0 holds A; the joined pool 1 has no sequence: the fewest.
    EXPECT_EQ(pools->home_of_first_token[20], 1);
    EXPECT_EQ(pools->home_of_first_token[10], 0);
  }
  engine.Stop();
  std::lock_guard<std::mutex> lock(pools->mu);
  EXPECT_FALSE(pools->wake) << "a stopped engine leaves no wake-up behind in the executor";
}

}  // namespace
}  // namespace sy::scheduler
