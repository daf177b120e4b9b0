// BatchScheduler policy, step by step: the fixture plays the model (every sequence whose chunk
// reaches its last token gets one new token) and each test asserts the batch of every
// iteration, in the style of TensorRT-LLM's microBatchSchedulerTest.
#include "scheduler/batch_scheduler.h"

#include <map>
#include <string>
#include <utility>

#include "gtest/gtest.h"

namespace sy::scheduler {
namespace {

// (sequence id, tokens this step) in batch order.
using Plan = std::vector<std::pair<int64_t, int64_t>>;

class BatchSchedulerTest : public ::testing::Test {
 protected:
  void Init(int64_t num_blocks, int64_t block_size, int64_t max_seqs, int64_t max_tokens) {
    pools_ = std::make_unique<KvPools>(block_size);
    pools_->Add(0, num_blocks);
    SchedulerOptions o;
    o.max_num_seqs = max_seqs;
    o.max_num_batched_tokens = max_tokens;
    sched_ = std::make_unique<BatchScheduler>(o, pools_.get());
  }

  Sequence* Add(int64_t prompt_len, int64_t max_new_tokens) {
    Request r;
    r.prompt.assign(prompt_len, 3);
    r.params.max_new_tokens = max_new_tokens;
    auto seq = std::make_unique<Sequence>(next_id_++, std::move(r), nullptr);
    Sequence* p = seq.get();
    sched_->Add(std::move(seq));
    return p;
  }

  // One iteration: schedule, "run", give each completed chunk a token, finish sequences at
  // their max_new_tokens. Returns the batch as (id, tokens).
  Plan Step(std::vector<int64_t>* preempted = nullptr) {
    ScheduledBatch b = sched_->Schedule();
    Plan plan;
    for (const auto& e : b.entries) {
      plan.push_back({e.seq->id, e.num_tokens});
      // The table covers the chunk.
      EXPECT_GE(static_cast<int64_t>(e.seq->block_table.size()) * pools_->block_size(),
                e.seq->num_computed + e.num_tokens);
      EXPECT_EQ(e.compute_logits, e.seq->num_computed + e.num_tokens == e.seq->num_tokens());
    }
    if (preempted) {
      preempted->clear();
      for (Sequence* s : b.preempted) preempted->push_back(s->id);
    }
    sched_->CommitStep(b);
    std::vector<Sequence*> done;
    for (const auto& e : b.entries) {
      if (!e.compute_logits) continue;
      e.seq->tokens.push_back(7);
      if (e.seq->num_output_tokens() >= e.seq->request.params.max_new_tokens)
        done.push_back(e.seq);
    }
    for (Sequence* s : done) sched_->Remove(s);
    return plan;
  }

  std::unique_ptr<KvPools> pools_;
  std::unique_ptr<BatchScheduler> sched_;
  int64_t next_id_ = 0;
};

TEST_F(BatchSchedulerTest, ChunksPrefillUnderTheTokenBudgetAndPutsDecodesFirst) {
  Init(/*num_blocks=*/64, /*block_size=*/4, /*max_seqs=*/8, /*max_tokens=*/8);
  Add(10, 3);  // seq 0
  Add(6, 2);   // seq 1
  //          it1        it2          it3             it4
  // seq 0:  [8 prefill] [2 prefill*] [1 decode*]     [1 decode*]   (* = samples a token)
  // seq 1:   -          [6 prefill*] [1 decode*]     done
  // seq 2:   -           -           [6 of 20]        [7 of 14]
  EXPECT_EQ(Step(), (Plan{{0, 8}}));
  EXPECT_EQ(Step(), (Plan{{0, 2}, {1, 6}}));
  Add(20, 1);  // seq 2 arrives
  EXPECT_EQ(Step(), (Plan{{0, 1}, {1, 1}, {2, 6}}));
  EXPECT_EQ(Step(), (Plan{{0, 1}, {2, 7}}));
  EXPECT_EQ(Step(), (Plan{{2, 7}}));  // seq 0 finished after 3 tokens
  EXPECT_TRUE(sched_->empty());
  EXPECT_EQ(pools_->num_free_blocks(), 64);
}

TEST_F(BatchSchedulerTest, MaxNumSeqsCapsTheBatchAndAdmissionIsFcfs) {
  Init(64, 4, /*max_seqs=*/2, /*max_tokens=*/100);
  Add(3, 2);
  Add(3, 2);
  Add(3, 2);
  EXPECT_EQ(Step(), (Plan{{0, 3}, {1, 3}}));
  EXPECT_EQ(Step(), (Plan{{0, 1}, {1, 1}}));  // both finish
  EXPECT_EQ(Step(), (Plan{{2, 3}}));
  EXPECT_EQ(Step(), (Plan{{2, 1}}));
  EXPECT_TRUE(sched_->empty());
}

TEST_F(BatchSchedulerTest, PreemptsTheNewestRunningSequenceByRecomputeWhenBlocksRunOut) {
  // 4 blocks of 2 positions: two sequences of 3 prompt tokens fill the cache after one token.
  Init(/*num_blocks=*/4, /*block_size=*/2, 8, 100);
  Sequence* a = Add(3, 4);
  Sequence* b = Add(3, 4);
  std::vector<int64_t> pre;
  EXPECT_EQ(Step(&pre), (Plan{{0, 3}, {1, 3}}));  // 2 blocks each, cache full
  EXPECT_EQ(Step(&pre), (Plan{{0, 1}, {1, 1}}));  // position 3 fits in block 2 of each
  EXPECT_TRUE(pre.empty());
  // Position 4 needs a third block: seq 1 (newest) is preempted and seq 0 takes its block.
  EXPECT_EQ(Step(&pre), (Plan{{0, 1}}));
  EXPECT_EQ(pre, (std::vector<int64_t>{1}));
  EXPECT_EQ(b->num_computed, 0);
  EXPECT_TRUE(b->block_table.empty());
  EXPECT_EQ(b->num_tokens(), 5);  // prompt + 2 tokens survive for recompute
  EXPECT_EQ(a->num_output_tokens(), 3);
  // Seq 0 decodes its last token (block 3 covers position 5); seq 1 recomputes what fits in
  // the one free block.
  EXPECT_EQ(Step(&pre), (Plan{{0, 1}, {1, 2}}));
  EXPECT_TRUE(pre.empty());
  // Seq 0 is done and freed: seq 1 recomputes the rest of its 5 tokens and samples.
  EXPECT_EQ(Step(&pre), (Plan{{1, 3}}));
  EXPECT_EQ(Step(&pre), (Plan{{1, 1}}));  // fourth token, done
  EXPECT_TRUE(sched_->empty());
  EXPECT_EQ(sched_->num_preemptions(), 1);
  EXPECT_EQ(pools_->num_free_blocks(), 4);
}

TEST_F(BatchSchedulerTest, ALoneSequenceThatCannotGrowPreemptsItself) {
  // 2 blocks of 2: the decode of position 4 needs a third block nobody can give.
  Init(2, 2, 8, 100);
  Sequence* a = Add(3, 4);
  std::vector<int64_t> pre;
  EXPECT_EQ(Step(&pre), (Plan{{0, 3}}));
  EXPECT_EQ(Step(&pre), (Plan{{0, 1}}));
  EXPECT_EQ(Step(&pre), (Plan{}));
  EXPECT_EQ(pre, (std::vector<int64_t>{0}));
  EXPECT_EQ(a->status, SequenceStatus::kWaiting);
  EXPECT_EQ(pools_->num_free_blocks(), 2);
}

TEST_F(BatchSchedulerTest, ALongPromptIsPrefilledInBudgetSizedChunks) {
  // 4 blocks of 4 = 16 positions, 6 tokens per step: each prompt of 12 takes two steps.
  Init(4, 4, 8, /*max_tokens=*/6);
  Add(12, 1);
  Add(12, 1);
  EXPECT_EQ(Step(), (Plan{{0, 6}}));
  EXPECT_EQ(Step(), (Plan{{0, 6}}));  // seq 0 samples its one token and is done
  EXPECT_EQ(Step(), (Plan{{1, 6}}));
  EXPECT_EQ(Step(), (Plan{{1, 6}}));
  EXPECT_TRUE(sched_->empty());
}

TEST_F(BatchSchedulerTest, APrefillChunkShrinksToTheFreeBlocks) {
  // 3 blocks of 4 = 12 positions, 8 tokens per step.
  Init(3, 4, 8, /*max_tokens=*/8);
  Add(6, 2);  // 0
  Add(6, 2);  // 1
  std::vector<int64_t> pre;
  //          it1           it2           it3          it4
  // seq 0:  [6 prefill*]  [1 decode*]    done
  // seq 1:  [2 of 6]      [2 of 6]      [2 of 6*]    [1 decode*]
  // seq 1's chunks are cut by the budget (it1) and then by the one block it can still use.
  EXPECT_EQ(Step(&pre), (Plan{{0, 6}, {1, 2}}));
  EXPECT_EQ(Step(&pre), (Plan{{0, 1}, {1, 2}}));
  EXPECT_TRUE(pre.empty());
  EXPECT_EQ(Step(&pre), (Plan{{1, 2}}));
  EXPECT_EQ(Step(&pre), (Plan{{1, 1}}));
  EXPECT_TRUE(sched_->empty());
  EXPECT_EQ(pools_->num_free_blocks(), 3);
}

TEST_F(BatchSchedulerTest, RemovingARunningSequenceReturnsItsBlocks) {
  Init(8, 4, 8, 100);
  Sequence* a = Add(10, 5);
  Add(5, 5);
  Step();
  EXPECT_EQ(pools_->num_free_blocks(), 8 - 3 - 2);
  sched_->Remove(a);
  EXPECT_EQ(pools_->num_free_blocks(), 8 - 2);
  EXPECT_EQ(sched_->num_running(), 1);
}

}  // namespace
}  // namespace sy::scheduler
