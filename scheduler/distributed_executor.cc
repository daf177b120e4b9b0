#include "scheduler/distributed_executor.h"

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/status.h"
#include "scheduler/rank_control.h"

namespace sy::scheduler {
namespace {

// Largest plan accepted by a rank (words); guards against a desynchronised size broadcast.
constexpr int64_t kMaxPlanWords = int64_t{1} << 28;

absl::Status AsUnavailable(const absl::Status& s, const std::string& context) {
  if (s.ok()) return s;
  if (s.code() == absl::StatusCode::kUnavailable) return sy::Annotate(s, context);
  return absl::UnavailableError(absl::StrCat(context, ": ", s.ToString()));
}

// Sends `rows` logits rows [rows, vocab] f32 of this rank to rank 0 (an all-to-all-v where
// only rank 0 receives). On rank 0, recv gets every rank's rows back to back in rank order.
absl::Status GatherRowsToLeader(parallel::Communicator* comm, const float* own, int64_t vocab,
                                std::span<const int64_t> rows_per_rank, float* recv) {
  const int world = comm->world_size(), rank = comm->rank();
  const int64_t row_bytes = vocab * static_cast<int64_t>(sizeof(float));
  std::vector<int64_t> send_counts(world, 0), zeros(world, 0), recv_counts(world, 0),
      recv_offsets(world, 0);
  send_counts[0] = rows_per_rank[rank] * row_bytes;
  if (rank == 0) {
    int64_t off = 0;
    for (int p = 0; p < world; ++p) {
      recv_counts[p] = rows_per_rank[p] * row_bytes;
      recv_offsets[p] = off;
      off += recv_counts[p];
    }
  }
  float dummy = 0;
  return comm->AllToAllV(own != nullptr ? static_cast<const void*>(own) : &dummy, send_counts,
                         zeros, recv != nullptr ? static_cast<void*>(recv) : &dummy,
                         recv_counts, recv_offsets);
}

}  // namespace

std::vector<std::vector<int32_t>> ExpertsOfRank(const parallel::ExpertPlacement& placement,
                                                int rank) {
  std::vector<std::vector<int32_t>> out(placement.num_layers());
  const int S = placement.slots_per_rank();
  for (int l = 0; l < placement.num_layers(); ++l) {
    std::set<int32_t> experts;
    for (int s = rank * S; s < (rank + 1) * S; ++s)
      if (placement.expert_of(l, s) >= 0) experts.insert(placement.expert_of(l, s));
    out[l].assign(experts.begin(), experts.end());
  }
  return out;
}

absl::StatusOr<std::unique_ptr<DistributedStepExecutor>> DistributedStepExecutor::Create(
    model::MoeModel* model, parallel::Communicator* comm,
    std::unique_ptr<parallel::Communicator> owned_comm,
    std::shared_ptr<const parallel::ExpertPlacement> placement, int64_t num_blocks,
    int64_t block_size, std::function<void(const absl::Status&)> on_failure) {
  if (comm->rank() != 0)
    return absl::InvalidArgumentError("the distributed executor runs on rank 0 only");
  SY_ASSIGN_OR_RETURN(auto dispatcher, parallel::MakeExpertParallelDispatcher(comm, placement));
  std::unique_ptr<DistributedStepExecutor> e(
      new DistributedStepExecutor(model, comm, num_blocks, block_size));
  e->owned_comm_ = std::move(owned_comm);
  e->dispatcher_ = std::move(dispatcher);
  e->on_failure_ = std::move(on_failure);
  e->placement_ = placement;
  model->SetDispatcher(e->dispatcher_.get());
  e->pump_ = std::thread([p = e.get()] { p->Pump(); });
  return e;
}

DistributedStepExecutor::DistributedStepExecutor(model::MoeModel* model,
                                                 parallel::Communicator* comm,
                                                 int64_t num_blocks, int64_t block_size)
    : model_(model),
      comm_(comm),
      cache_(model->config(), num_blocks, block_size),
      keepalive_(std::max<std::chrono::milliseconds>(std::chrono::milliseconds(10),
                                                     comm->timeout() / 4)) {
  stats_.world_size = comm->world_size();
  stats_.rank_tokens.assign(comm->world_size(), 0);
  stats_.rank_kv_blocks.assign(comm->world_size(), 0);
  for (int r = 1; r < comm->world_size(); ++r)
    initial_pools_.push_back({PoolEvent::Kind::kAdded, r, num_blocks});
}

DistributedStepExecutor::~DistributedStepExecutor() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    cv_.notify_all();
  }
  if (pump_.joinable()) pump_.join();
  model_->SetDispatcher(nullptr);
}

void DistributedStepExecutor::Pump() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait_for(lock, keepalive_, [&] { return stop_ || job_ || !controls_.empty(); });
    // A waiting step goes first, then control plans (so the phases of a placement switch
    // interleave with the steps of a busy engine).
    if (!job_ && !controls_.empty()) {
      std::function<void(bool)> control = std::move(controls_.front());
      controls_.pop_front();
      lock.unlock();
      control(true);
      lock.lock();
      continue;
    }
    if (job_) {
      lock.unlock();
      absl::Status s = broken_.load() ? absl::UnavailableError("the rank group is down")
                                      : RunPlan(PlanKind::kStep);
      lock.lock();
      job_status_ = s;
      job_ = false;
      done_ = true;
      cv_.notify_all();
      continue;
    }
    if (stop_) {
      for (auto& control : controls_) control(false);  // refused: shutting down
      controls_.clear();
      lock.unlock();
      if (!broken_.load()) {
        absl::Status s = RunPlan(PlanKind::kShutdown);
        if (!s.ok()) SY_LOG(WARNING) << "sending the shutdown plan to the ranks: " << s;
      }
      return;
    }
    if (broken_.load()) continue;
    lock.unlock();
    absl::Status s = RunPlan(PlanKind::kKeepAlive);
    if (!s.ok()) Fail(AsUnavailable(s, "keep-alive to the ranks"));
    lock.lock();
  }
}

absl::Status DistributedStepExecutor::RunPlan(PlanKind kind) {
  std::span<const PlannedSequence> seqs;
  if (kind == PlanKind::kStep) seqs = job_seqs_;
  EncodePlan(kind, seqs, &words_);
  int64_t n = static_cast<int64_t>(words_.size());
  SY_RETURN_IF_ERROR(comm_->Broadcast(&n, sizeof(n), 0));
  SY_RETURN_IF_ERROR(comm_->Broadcast(words_.data(), n * sizeof(int32_t), 0));
  if (kind != PlanKind::kStep) return absl::OkStatus();

  own_inputs_.clear();
  for (const PlannedSequence& s : seqs)
    if (s.home_rank == 0) own_inputs_.push_back(s.input);
  SY_RETURN_IF_ERROR(model_->Forward(own_inputs_, cache_, &own_logits_));
  const int world = comm_->world_size();
  const int64_t vocab = model_->config().vocab_size;
  const std::vector<int64_t> rows = LogitRowsPerRank(seqs, world);
  int64_t total = 0;
  std::vector<int64_t> next_row(world, 0);
  for (int p = 0; p < world; ++p) {
    next_row[p] = total;
    total += rows[p];
  }
  gathered_.resize(total * vocab);
  SY_RETURN_IF_ERROR(GatherRowsToLeader(comm_, own_logits_.data(), vocab, rows, gathered_.data()));
  // Back to input order: rank p's rows arrive in plan order of its sequences.
  job_logits_->resize(total * vocab);
  int64_t out_row = 0;
  for (const PlannedSequence& s : seqs) {
    if (!s.input.compute_logits || s.input.tokens.empty()) continue;
    const int64_t src = next_row[s.home_rank]++;
    std::copy_n(gathered_.data() + src * vocab, vocab, job_logits_->data() + out_row * vocab);
    ++out_row;
  }
  return absl::OkStatus();
}

std::vector<PoolEvent> DistributedStepExecutor::TakePoolEvents() {
  return std::move(initial_pools_);
}

void DistributedStepExecutor::ReportPools(std::span<const PoolUsage> usage) {
  std::lock_guard<std::mutex> lock(stats_mu_);
  for (const PoolUsage& u : usage)
    if (u.pool >= 0 && u.pool < stats_.world_size) stats_.rank_kv_blocks[u.pool] = u.used_blocks;
}

absl::Status DistributedStepExecutor::Execute(std::span<const model::SequenceInput> batch,
                                              std::span<const int32_t> homes,
                                              std::vector<float>* logits) {
  if (broken_.load()) {
    std::lock_guard<std::mutex> lock(stats_mu_);
    return absl::UnavailableError(
        absl::StrCat("the rank group is down: ", broken_status_.message()));
  }
  const int world = comm_->world_size();
  planned_.clear();
  std::vector<int64_t> tokens(world, 0);
  for (size_t i = 0; i < batch.size(); ++i) {
    const int32_t home = i < homes.size() ? homes[i] : 0;
    if (home < 0 || home >= world)
      return absl::InternalError(absl::StrCat("home rank ", home, " is not in the group"));
    planned_.push_back(PlannedSequence{home, batch[i]});
    tokens[home] += static_cast<int64_t>(batch[i].tokens.size());
  }
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    for (int r = 0; r < world; ++r) stats_.rank_tokens[r] += tokens[r];
  }
  absl::Status status;
  {
    std::unique_lock<std::mutex> lock(mu_);
    job_seqs_ = planned_;
    job_logits_ = logits;
    job_ = true;
    done_ = false;
    cv_.notify_all();
    cv_.wait(lock, [&] { return done_; });
    status = job_status_;
  }
  if (!status.ok()) {
    status = AsUnavailable(status, "multi-rank step");
    Fail(status);
    return status;
  }
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    ++stats_.steps;
  }
  if (stats_observer_) stats_observer_(stats());
  return absl::OkStatus();
}

void DistributedStepExecutor::Fail(const absl::Status& status) {
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    if (broken_.load()) return;
    broken_status_ = status;
    stats_.broken = true;
    broken_.store(true);
  }
  SY_LOG(ERROR) << "rank group failed: " << status;
  if (stats_observer_) stats_observer_(stats());
  if (on_failure_) on_failure_(status);
}

DistributedStats DistributedStepExecutor::stats() const {
  DistributedStats s;
  {
    std::lock_guard<std::mutex> lock(stats_mu_);
    s = stats_;
  }
  s.dispatch = dispatcher_->stats();
  return s;
}

absl::Status RunRankLoop(parallel::Communicator* comm, model::MoeModel* model,
                         model::KvCache* cache, const std::atomic<bool>* stop) {
  const int rank = comm->rank(), world = comm->world_size();
  const int64_t vocab = model->config().vocab_size;
  parallel::ExpertLoadRecorder recorder(LoadOptionsForModel(*model));
  model->SetLoadRecorder(&recorder);
  struct Unset {
    model::MoeModel* m;
    ~Unset() { m->SetLoadRecorder(nullptr); }
  } unset{model};
  std::vector<int32_t> words;
  std::vector<model::SequenceInput> inputs;
  std::vector<float> logits;
  for (;;) {
    if (stop != nullptr && stop->load()) return absl::CancelledError("rank loop stopped");
    int64_t n = 0;
    SY_RETURN_IF_ERROR(sy::Annotate(comm->Broadcast(&n, sizeof(n), 0), "waiting for a step plan"));
    if (n < 3 || n > kMaxPlanWords)
      return absl::InternalError(absl::StrCat("rank ", rank, ": bad step plan size ", n));
    words.resize(n);
    SY_RETURN_IF_ERROR(sy::Annotate(comm->Broadcast(words.data(), n * sizeof(int32_t), 0),
                                    "receiving a step plan"));
    SY_ASSIGN_OR_RETURN(DecodedPlan plan, DecodePlan(words));
    if (plan.kind == PlanKind::kShutdown) return absl::OkStatus();
    if (plan.kind == PlanKind::kKeepAlive) continue;
    if (plan.kind == PlanKind::kPlacement || plan.kind == PlanKind::kLoadStats) {
      SY_RETURN_IF_ERROR(HandleControlPlan(comm, model, &recorder, plan));
      continue;
    }
    inputs.clear();
    for (const PlannedSequence& s : plan.seqs)
      if (s.home_rank == rank) inputs.push_back(s.input);
    SY_RETURN_IF_ERROR(sy::Annotate(model->Forward(inputs, *cache, &logits),
                                    absl::StrCat("rank ", rank, " step")));
    const std::vector<int64_t> rows = LogitRowsPerRank(plan.seqs, world);
    SY_RETURN_IF_ERROR(sy::Annotate(GatherRowsToLeader(comm, logits.data(), vocab, rows, nullptr),
                                    "sending logits to rank 0"));
  }
}

}  // namespace sy::scheduler
