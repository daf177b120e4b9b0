#include "scheduler/batch_scheduler.h"

#include <algorithm>
#include <optional>

#include "kernels/core/logging.h"

namespace sy::scheduler {

int64_t ScheduledBatch::num_tokens() const {
  int64_t n = 0;
  for (const auto& e : entries) n += e.num_tokens;
  return n;
}

int64_t ScheduledBatch::num_decode() const {
  int64_t n = 0;
  for (const auto& e : entries)
    if (e.num_tokens == 1 && e.seq->num_computed > 0 &&
        e.seq->num_computed >= e.seq->num_prompt_tokens)
      ++n;
  return n;
}

BatchScheduler::BatchScheduler(const SchedulerOptions& options, KvPools* pools)
    : options_(options), pools_(pools) {
  SY_CHECK(options.max_num_seqs > 0 && options.max_num_batched_tokens > 0);
}

void BatchScheduler::Add(std::unique_ptr<Sequence> seq) {
  seq->status = SequenceStatus::kWaiting;
  waiting_.push_back(std::move(seq));
}

std::vector<Sequence*> BatchScheduler::AllSequences() const {
  std::vector<Sequence*> all;
  for (const auto& s : running_) all.push_back(s.get());
  for (const auto& s : waiting_) all.push_back(s.get());
  return all;
}

void BatchScheduler::Preempt(Sequence* seq) {
  auto it = std::find_if(running_.begin(), running_.end(),
                         [seq](const auto& p) { return p.get() == seq; });
  SY_CHECK(it != running_.end());
  std::unique_ptr<Sequence> owned = std::move(*it);
  running_.erase(it);
  pools_->pool(owned->home).Free(&owned->block_table);
  pools_->AddSequence(owned->home, -1);
  owned->home = -1;
  owned->num_computed = 0;
  owned->status = SequenceStatus::kWaiting;
  ++owned->num_preemptions;
  ++num_preemptions_;
  // Back to the waiting queue in arrival order (it is older than anything that never ran).
  auto pos = std::find_if(waiting_.begin(), waiting_.end(),
                          [&](const auto& w) { return w->id > owned->id; });
  waiting_.insert(pos, std::move(owned));
}

ScheduledBatch BatchScheduler::Schedule() {
  ScheduledBatch batch;
  int64_t budget = options_.max_num_batched_tokens;
  auto in_batch = [&](const Sequence* s) {
    for (const auto& e : batch.entries)
      if (e.seq == s) return true;
    return false;
  };

  // 1. Decodes, oldest first. Preemption removes sequences from running_, so walk a snapshot
  // and skip the ones preempted meanwhile.
  std::vector<Sequence*> decodes;
  for (const auto& owned : running_)
    if (owned->num_pending() == 1) decodes.push_back(owned.get());
  for (Sequence* seq : decodes) {
    if (seq->status != SequenceStatus::kRunning) continue;  // preempted as a victim
    if (static_cast<int64_t>(batch.entries.size()) >= options_.max_num_seqs || budget < 1) break;
    bool self_preempted = false;
    while (!pools_->pool(seq->home).Allocate(&seq->block_table, seq->num_tokens())) {
      Sequence* victim = nullptr;
      for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
        if (it->get() != seq && (*it)->home == seq->home && !in_batch(it->get())) {
          victim = it->get();
          break;
        }
      }
      if (victim == nullptr) victim = seq;
      Preempt(victim);
      batch.preempted.push_back(victim);
      if (victim == seq) { self_preempted = true; break; }
    }
    if (self_preempted) continue;
    batch.entries.push_back({seq, 1, true});
    budget -= 1;
  }

  // 2a. Running sequences part-way through their prefill, oldest first.
  std::vector<Sequence*> prefills;
  for (const auto& owned : running_)
    if (owned->num_pending() > 1) prefills.push_back(owned.get());
  for (Sequence* seq : prefills) {
    if (seq->status != SequenceStatus::kRunning || in_batch(seq)) continue;
    if (static_cast<int64_t>(batch.entries.size()) >= options_.max_num_seqs || budget < 1) break;
    BlockManager& blocks = pools_->pool(seq->home);
    auto capacity = [&] {  // positions this sequence could still cover
      return (static_cast<int64_t>(seq->block_table.size()) + blocks.num_free_blocks()) *
                 blocks.block_size() - seq->num_computed;
    };
    // A prefill that cannot move at all preempts newer sequences, or partial prefills could
    // hold the whole cache between them and none would ever finish.
    while (capacity() <= 0) {
      Sequence* victim = nullptr;
      for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
        if (it->get() != seq && (*it)->home == seq->home && !in_batch(it->get()) &&
            (*it)->id > seq->id) {
          victim = it->get();
          break;
        }
      }
      if (victim == nullptr) break;
      Preempt(victim);
      batch.preempted.push_back(victim);
    }
    const int64_t n = std::min({seq->num_pending(), budget, capacity()});
    if (n <= 0) continue;
    SY_CHECK(blocks.Allocate(&seq->block_table, seq->num_computed + n));
    batch.entries.push_back({seq, n, seq->num_computed + n == seq->num_tokens()});
    budget -= n;
  }

  // 2b. Admit waiting sequences, strictly FCFS. Not in a step that had to preempt: the
  // blocks just freed belong to the preempted, who come back first.
  while (batch.preempted.empty() && !waiting_.empty() && budget > 0 &&
         static_cast<int64_t>(batch.entries.size()) < options_.max_num_seqs) {
    Sequence* seq = waiting_.front().get();
    const std::optional<int32_t> home = pools_->PickHome(MaxPositions(*seq));
    if (!home) break;
    BlockManager& blocks = pools_->pool(*home);
    int64_t n = std::min(seq->num_pending(), budget);
    n = std::min(n, blocks.num_free_blocks() * blocks.block_size());
    if (n <= 0) break;
    SY_CHECK(blocks.Allocate(&seq->block_table, n));
    seq->home = *home;
    pools_->AddSequence(*home, +1);
    seq->status = SequenceStatus::kRunning;
    if (seq->first_scheduled == Clock::time_point{}) seq->first_scheduled = Clock::now();
    std::unique_ptr<Sequence> owned = std::move(waiting_.front());
    waiting_.pop_front();
    // Keep running_ sorted by arrival: a recomputed (preempted) sequence is older than some.
    auto pos = std::find_if(running_.begin(), running_.end(),
                            [&](const auto& r) { return r->id > owned->id; });
    running_.insert(pos, std::move(owned));
    batch.entries.push_back({seq, n, n == seq->num_tokens()});
    budget -= n;
  }
  return batch;
}

void BatchScheduler::CommitStep(const ScheduledBatch& batch) {
  for (const auto& e : batch.entries) {
    e.seq->num_computed += e.num_tokens;
    SY_CHECK_LE(e.seq->num_computed, e.seq->num_tokens());
  }
}

std::unique_ptr<Sequence> BatchScheduler::Remove(Sequence* seq) {
  std::unique_ptr<Sequence> owned;
  auto it = std::find_if(running_.begin(), running_.end(),
                         [seq](const auto& p) { return p.get() == seq; });
  if (it != running_.end()) {
    owned = std::move(*it);
    running_.erase(it);
  } else {
    auto wit = std::find_if(waiting_.begin(), waiting_.end(),
                            [seq](const auto& p) { return p.get() == seq; });
    SY_CHECK(wit != waiting_.end()) << "sequence " << seq->id << " is not scheduled";
    owned = std::move(*wit);
    waiting_.erase(wit);
  }
  if (owned->home >= 0) {
    pools_->pool(owned->home).Free(&owned->block_table);
    pools_->AddSequence(owned->home, -1);
  }
  owned->home = -1;
  owned->status = SequenceStatus::kFinished;
  return owned;
}

std::vector<Sequence*> BatchScheduler::PreemptPool(int32_t pool) {
  std::vector<Sequence*> victims;
  for (const auto& s : running_)
    if (s->home == pool) victims.push_back(s.get());
  for (Sequence* s : victims) Preempt(s);
  return victims;
}

BatchScheduler::PoolLoad BatchScheduler::LoadOf(int32_t pool) const {
  PoolLoad load;
  for (const auto& s : running_) {
    if (s->home != pool) continue;
    ++load.num_seqs;
    load.used_blocks += static_cast<int64_t>(s->block_table.size());
  }
  return load;
}

int64_t BatchScheduler::MaxPositions(const Sequence& seq) {
  return std::max(seq.num_tokens(), seq.num_prompt_tokens + seq.request.params.max_new_tokens);
}

}  // namespace sy::scheduler

