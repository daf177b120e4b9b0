// RankGroup: an elastic rank group inside one test process. The leader's
// DistributedStepExecutor over a parallel::Membership, and every other rank a thread running
// a scheduler::RankRunner with its own model share and KV pool, as `switchyard worker` runs
// one. Communicators: LocalCommunicator groups met through a LocalRendezvous, or Gloo over
// loopback TCP through the membership's rendezvous store (the worker processes' code path).
// Ranks join (Join), drain (Drain) and die (Kill: no more heartbeats, its communicator
// aborted, it never checks in) while the leader serves.
#pragma once

#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernels/core/logging.h"
#include "model/moe_model.h"
#include "parallel/transport.h"
#include "parallel/local_communicator.h"
#include "parallel/membership.h"
#include "scheduler/distributed_executor.h"
#include "scheduler/rank_runner.h"

namespace sy::scheduler::testing {

class RankGroup {
 public:
  struct Options {
    int world = 1;  // ranks at start, the leader included
    std::chrono::milliseconds timeout{10000};
    std::string comm = "local";  // local (threads), tcp or gloo (sockets on 127.0.0.1)
    int64_t num_blocks = 64;
    int64_t block_size = 4;
    std::chrono::milliseconds drain_timeout{10000};
    std::chrono::milliseconds heartbeat_interval{50};
    std::chrono::milliseconds heartbeat_timeout{600};
    bool two_batch_overlap = false;  // EpDispatchOptions::two_batch_overlap of every rank
  };

  RankGroup(const std::string& dir, Options o) : dir_(dir), o_(o), rendezvous_(o.timeout) {
    auto cfg = model::ModelConfig::FromFile(dir + "/config.json");
    SY_CHECK(cfg.ok()) << cfg.status();
    config_ = *cfg;
    parallel::MembershipOptions mo;
    mo.heartbeat_timeout = o.heartbeat_timeout;
    mo.leader_address = "leader";
    mo.leader_kv_blocks = o.num_blocks;
    membership_ = std::make_unique<parallel::Membership>(mo);
    client_ = std::make_unique<parallel::LocalMembershipClient>(membership_.get());
    if (o.comm != "local") {
      auto f = parallel::ProcessCommunicatorFactory(o.comm, membership_->store(), "127.0.0.1",
                                                    o.timeout);
      SY_CHECK(f.ok()) << f.status();
      factory_ = *f;
    } else {
      factory_ = [this](const std::string& prefix, int rank, int world) {
        return absl::StatusOr<std::unique_ptr<parallel::Communicator>>(
            rendezvous_.Join(prefix, rank, world));
      };
    }
    const auto placement = parallel::ExpertPlacement::Contiguous(
        static_cast<int>(config_.num_layers), static_cast<int>(config_.num_experts), o.world);
    parallel::EpochView first;
    first.epoch = 1;
    first.store_prefix = "epoch-1";
    first.members = {0};
    first.placement_json = placement.ToJson();
    std::vector<Rank*> starting;
    for (int r = 1; r < o.world; ++r) {
      auto id = membership_->AddJoining("thread", 0, o.num_blocks);
      SY_CHECK(id.ok()) << id.status();
      first.members.push_back(*id);
      starting.push_back(NewRank(*id, parallel::ExpertsOfRank(placement, r)));
    }
    for (Rank* rank : starting) {
      rank->thread = std::thread([rank, first] { rank->result = rank->runner->Run(first, false); });
    }
    model::LoadOptions lo;
    lo.experts_per_layer = parallel::ExpertsOfRank(placement, 0);
    auto m = model::MoeModel::Load(dir, lo);
    SY_CHECK(m.ok()) << m.status();
    leader_model_ = std::move(*m);
    GroupOptions go;
    go.num_blocks = o.num_blocks;
    go.block_size = o.block_size;
    go.timeout = o.timeout;
    go.drain_timeout = o.drain_timeout;
    go.join_timeout = o.timeout;
    go.make_comm = factory_;
    go.dispatch.two_batch_overlap = o.two_batch_overlap;
    std::unique_ptr<parallel::Communicator> comm;
    if (o.world > 1) {
      auto c = factory_(first.store_prefix, 0, o.world);
      SY_CHECK(c.ok()) << c.status();
      comm = std::move(*c);
    }
    auto e = DistributedStepExecutor::Create(leader_model_.get(), membership_.get(), go, first,
                                             std::move(comm));
    SY_CHECK(e.ok()) << e.status();
    executor_ = std::move(*e);
    exec_ = executor_.get();
  }

  ~RankGroup() {
    executor_.reset();  // sends the shutdown plan (unless an Engine took the executor)
    std::lock_guard<std::mutex> lock(mu_);
    // Ranks leave on the shutdown plan; one that does not within a moment is stopped.
    const auto grace = std::chrono::steady_clock::now() + std::chrono::seconds(3);
    for (auto& r : ranks_) {
      while (r->runner->exit() == RankExit::kRunning && std::chrono::steady_clock::now() < grace)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      if (r->runner->exit() == RankExit::kRunning) r->runner->Kill();
      if (r->thread.joinable()) r->thread.join();
    }
  }

  DistributedStepExecutor* executor() { return exec_; }
  // Hands the executor to an Engine; destroy the engine before the group.
  std::unique_ptr<StepExecutor> TakeExecutor() { return std::move(executor_); }
  parallel::Membership& membership() { return *membership_; }

  // A new rank asks to join (its model loaded with no expert yet, as a worker does); returns
  // its id. It enters the group in the background.
  int32_t Join(int64_t num_blocks = 0) {
    if (num_blocks == 0) num_blocks = o_.num_blocks;
    auto id = membership_->AddJoining("thread", 0, num_blocks);
    SY_CHECK(id.ok()) << id.status();
    Rank* rank = NewRank(*id, std::vector<std::vector<int32_t>>(config_.num_layers), num_blocks);
    parallel::Membership* m = membership_.get();
    const int32_t rid = *id;
    rank->thread = std::thread([rank, m, rid] {
      auto view = m->AwaitJoin(rid, std::chrono::seconds(60));
      if (!view.ok()) {
        rank->result = view.status();
        return;
      }
      rank->result = rank->runner->Run(*view, true);
    });
    return rid;
  }

  // The rank stops at once and for good, telling nobody (as kill -9 would).
  void Kill(int32_t id) { Find(id)->runner->Kill(); }
  absl::Status Drain(int32_t id) { return membership_->RequestDrain(id); }

  // Waits until `n` ranks serve in the epoch in force and no change is in flight.
  bool WaitWorld(int n, std::chrono::milliseconds timeout = std::chrono::seconds(60)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (membership_->serving_ranks() == n && membership_->PendingJoins().empty() &&
          !membership_->Snapshot().reforming)
        return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }

  // Waits for the rank's thread to end; its Run status.
  absl::Status WaitExit(int32_t id) {
    Rank* r = Find(id);
    if (r->thread.joinable()) r->thread.join();
    return r->result;
  }
  RankExit exit(int32_t id) { return Find(id)->runner->exit(); }

 private:
  struct Rank {
    int32_t id = 0;
    std::unique_ptr<model::MoeModel> model;
    std::unique_ptr<RankRunner> runner;
    std::thread thread;
    absl::Status result;
  };

  Rank* NewRank(int32_t id, const std::vector<std::vector<int32_t>>& experts, int64_t num_blocks = 0) {
    auto r = std::make_unique<Rank>();
    r->id = id;
    model::LoadOptions lo;
    lo.experts_per_layer = experts;
    auto m = model::MoeModel::Load(dir_, lo);
    SY_CHECK(m.ok()) << m.status();
    r->model = std::move(*m);
    RankRunnerOptions ro;
    ro.id = id;
    ro.model = r->model.get();
    ro.num_blocks = num_blocks > 0 ? num_blocks : o_.num_blocks;
    ro.block_size = o_.block_size;
    ro.make_comm = factory_;
    ro.dispatch.two_batch_overlap = o_.two_batch_overlap;
    ro.store = membership_->store();
    ro.client = client_.get();
    ro.heartbeat_interval = o_.heartbeat_interval;
    ro.restart_timeout = o_.timeout;
    r->runner = std::make_unique<RankRunner>(ro);
    std::lock_guard<std::mutex> lock(mu_);
    ranks_.push_back(std::move(r));
    return ranks_.back().get();
  }
  Rank* Find(int32_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& r : ranks_)
      if (r->id == id) return r.get();
    SY_CHECK(false) << "no rank " << id;
    return nullptr;
  }

  std::string dir_;
  Options o_;
  model::ModelConfig config_;
  parallel::LocalRendezvous rendezvous_;
  parallel::CommunicatorFactory factory_;
  std::unique_ptr<parallel::Membership> membership_;
  std::unique_ptr<parallel::LocalMembershipClient> client_;
  std::unique_ptr<model::MoeModel> leader_model_;
  std::unique_ptr<DistributedStepExecutor> executor_;
  DistributedStepExecutor* exec_ = nullptr;
  std::mutex mu_;
  std::vector<std::unique_ptr<Rank>> ranks_;
};

}  // namespace sy::scheduler::testing
