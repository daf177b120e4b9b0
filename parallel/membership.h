// Membership: who is in the serving rank group, in which epoch, in which state (DESIGN.md §5;
// the contract is parallel/MEMBERSHIP.md). The leader holds the one Membership of a group; it
// alone changes it. Ranks reach it through a MembershipClient: the leader's Cluster service
// over gRPC (worker processes), or directly (ranks that are threads of the leader's process).
//
// Names: a rank's ID is stable for the life of the rank process's membership (the leader is
// 0; joiners get 1, 2, 3, ... in join order, never reused). A membership EPOCH is one fixed
// set of members with one communicator: its COMM RANK order is members[] of its EpochView
// (the leader is always comm rank 0). An id that is declared dead never comes back; the
// process, if it lives, must join again and gets a new id.
//
// Who calls what (every method is thread-safe):
//   Cluster service / in-process ranks: AddJoining, AwaitJoin, AwaitRestart, Heartbeat,
//     RequestDrain (also Admin.DrainRank), the rendezvous store();
//   the leader's executor (scheduler/distributed_executor.h): everything else.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/core/mutex.h"
#include "parallel/communicator.h"
#include "parallel/rendezvous_store.h"

namespace sy::parallel {

enum class RankState : int32_t { kJoining = 0, kServing = 1, kDraining = 2, kGone = 3, kDead = 4 };
const char* RankStateName(RankState state);

// One membership epoch: its members in comm rank order and how they connect.
struct EpochView {
  int64_t epoch = 0;
  std::vector<int32_t> members;  // rank id of each comm rank; members[0] == 0 (the leader)
  std::string store_prefix;      // rendezvous key prefix of the epoch's communicator
  std::string placement_json;    // the expert placement the epoch serves with (members.size() ranks)

  int world_size() const { return static_cast<int>(members.size()); }
  // The comm rank of rank id `id` in this epoch, -1 when it is not a member.
  int comm_rank_of(int32_t id) const;
};
// Wire form (control plans): int32 words. Decode: INVALID_ARGUMENT when malformed.
std::vector<int32_t> EncodeEpochView(const EpochView& view);
absl::StatusOr<EpochView> DecodeEpochView(std::span<const int32_t> words);

// The store key a rank sets once its communicator for `view` is connected.
std::string ReadyKey(const EpochView& view, int comm_rank);

// Builds the communicator of comm rank `rank` in a group of `world_size` that meets under
// `prefix`. Blocks until every rank of that group is connected; UNAVAILABLE after the
// time-out. Thread-safe (background builds run beside the serving communicator).
using CommunicatorFactory = std::function<absl::StatusOr<std::unique_ptr<Communicator>>(
    const std::string& prefix, int rank, int world_size)>;

struct HeartbeatReply {
  int64_t epoch = 0;         // the epoch in force
  int64_t broken_epoch = 0;  // the last epoch declared broken (0: none): stop waiting in it
  bool fenced = false;       // this id was declared dead or has left: it must not serve
};

// What the leader shows of one rank (Admin.GetMembership, `switchyard status`).
struct RankInfo {
  int32_t id = 0;
  std::string address;
  RankState state = RankState::kJoining;
  int comm_rank = -1;          // in the epoch in force; -1 when not a member
  int64_t kv_blocks = 0;       // its KV pool
  int64_t kv_blocks_used = 0;
  int64_t home_seqs = 0;       // running sequences homed there
  int64_t expert_slots = 0;    // non-empty expert slots over MoE layers
  double tokens_per_second = 0;
  double heartbeat_age_s = 0;  // since its last heartbeat (0 for the leader)
};

struct MembershipSnapshot {
  int64_t epoch = 0;
  bool reforming = false;
  std::vector<RankInfo> ranks;  // by id; dead and gone ranks too (the last 64)
};

struct MembershipOptions {
  int max_ranks = 0;  // 0: unlimited; the leader included
  // A rank whose last heartbeat is older than this counts as dead once its epoch broke.
  std::chrono::milliseconds heartbeat_timeout{1000};
  std::string leader_address;
  int64_t leader_kv_blocks = 0;
};

class Membership {
 public:
  explicit Membership(MembershipOptions options);

  // ---- rank side --------------------------------------------------------------------------
  // A process asks to join: its address, a per-process nonce (a second join from the same
  // process is ALREADY_EXISTS), its KV pool. Returns its new id (state joining).
  // RESOURCE_EXHAUSTED past max_ranks; ABORTED while the group re-forms (retry).
  absl::StatusOr<int32_t> AddJoining(const std::string& address, uint64_t instance,
                                     int64_t kv_blocks);
  // Waits for the epoch a joining id will enter (published by the leader), or the leader's
  // refusal; DEADLINE_EXCEEDED after `timeout` (the join stays pending: wait again, or
  // RefuseJoin to give up on it).
  absl::StatusOr<EpochView> AwaitJoin(int32_t id, std::chrono::milliseconds timeout);
  // A rank whose epoch failed checks in and waits for the re-formed epoch that has it
  // (epoch > after_epoch). FAILED_PRECONDITION when the id was declared dead or has left
  // (fenced: join again as a new rank); DEADLINE_EXCEEDED after `timeout`.
  absl::StatusOr<EpochView> AwaitRestart(int32_t id, int64_t after_epoch,
                                         std::chrono::milliseconds timeout);
  // Liveness. NOT_FOUND for an unknown id.
  absl::StatusOr<HeartbeatReply> Heartbeat(int32_t id);
  // NOT_FOUND unless rank `id` joined with `instance` (0: no check): a process of another
  // leader's group that reuses an id is not that rank.
  absl::Status CheckInstance(int32_t id, uint64_t instance) const;
  // Starts draining a serving rank. NOT_FOUND (unknown id), FAILED_PRECONDITION (the leader;
  // a rank that is not serving).
  absl::Status RequestDrain(int32_t id);
  RendezvousStore* store() { return &store_; }

  // ---- leader side (the executor) -----------------------------------------------------------
  // Called when there is work for the leader's membership controller (a join, a drain, a
  // check-in); must not call back into the Membership. Once SetNotify returns, the previous
  // callback is not running and will not run again.
  void SetNotify(std::function<void()> notify);
  // Joining ids that have no epoch yet, with their KV pools.
  std::vector<std::pair<int32_t, int64_t>> PendingJoins() const;
  // Draining ids.
  std::vector<int32_t> Draining() const;
  // The joining ids enter `view` (AwaitJoin returns it).
  void PublishJoin(const std::vector<int32_t>& ids, const EpochView& view);
  // The joining ids are refused (AwaitJoin returns `status`); they are dropped.
  void RefuseJoin(const std::vector<int32_t>& ids, const absl::Status& status);
  // `view` is in force: its members serve (joining -> serving; draining ones stay draining),
  // the other ranks that were in the previous epoch are gone.
  void Commit(const EpochView& view);
  // The epoch in force failed: heartbeats say so, joins get ABORTED until the next Commit.
  void BreakEpoch(int64_t epoch);
  // Waits until every member of `view` but the leader has checked in for it (AwaitRestart
  // with after_epoch >= view.epoch), or its heartbeat is older than heartbeat_timeout, or
  // `max_wait` passed. Returns the ids that checked in, in view order.
  std::vector<int32_t> WaitForSurvivors(const EpochView& view, std::chrono::milliseconds max_wait);
  // The re-formed epoch: AwaitRestart returns it to its members.
  void PublishRestart(const EpochView& view);
  void MarkDead(const std::vector<int32_t>& ids);
  // A new epoch number (never reused).
  int64_t NextEpoch();
  int64_t epoch() const;
  EpochView view() const;  // the epoch in force
  std::chrono::steady_clock::time_point joined_at(int32_t id) const;
  int64_t kv_blocks(int32_t id) const;
  std::string address(int32_t id) const;
  int serving_ranks() const;  // members of the epoch in force

  // Live figures for the snapshot, set by the executor.
  void SetUsage(int32_t id, int64_t home_seqs, int64_t kv_blocks_used, int64_t expert_slots,
                double tokens_per_second);
  MembershipSnapshot Snapshot() const;

 private:
  struct Member {
    int32_t id = 0;
    std::string address;
    uint64_t instance = 0;
    RankState state = RankState::kJoining;
    int64_t kv_blocks = 0;
    std::chrono::steady_clock::time_point joined_at{}, last_heartbeat{};
    int64_t checked_in = 0;  // the last broken epoch this rank checked in for
    std::optional<absl::StatusOr<EpochView>> join_result;  // set by PublishJoin / RefuseJoin
    int64_t home_seqs = 0, kv_blocks_used = 0, expert_slots = 0;
    double tokens_per_second = 0;
  };
  Member* Find(int32_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  const Member* Find(int32_t id) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Notify();

  const MembershipOptions options_;
  MemoryRendezvousStore store_;
  mutable sy::Mutex mu_;
  sy::CondVar cv_;
  std::map<int32_t, Member> members_ ABSL_GUARDED_BY(mu_);
  int32_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t next_epoch_ ABSL_GUARDED_BY(mu_) = 2;
  EpochView view_ ABSL_GUARDED_BY(mu_);          // in force
  EpochView restart_ ABSL_GUARDED_BY(mu_);       // the last re-formed epoch published
  int64_t broken_epoch_ ABSL_GUARDED_BY(mu_) = 0;
  bool reforming_ ABSL_GUARDED_BY(mu_) = false;
  sy::Mutex notify_mu_;  // never held with mu_
  std::function<void()> notify_ ABSL_GUARDED_BY(notify_mu_);
};

// How a rank that is not the leader reaches the Membership (server/ has the gRPC one).
class MembershipClient {
 public:
  virtual ~MembershipClient() = default;
  virtual absl::StatusOr<EpochView> AwaitRestart(int32_t id, int64_t after_epoch,
                                                 std::chrono::milliseconds timeout) = 0;
  virtual absl::StatusOr<HeartbeatReply> Heartbeat(int32_t id) = 0;
  // Asks the leader to drain this rank (SIGTERM on a worker).
  virtual absl::Status Leave(int32_t id) = 0;
};

// For ranks that are threads of the leader's process.
class LocalMembershipClient final : public MembershipClient {
 public:
  explicit LocalMembershipClient(Membership* m) : m_(m) {}
  absl::StatusOr<EpochView> AwaitRestart(int32_t id, int64_t after_epoch,
                                         std::chrono::milliseconds timeout) override {
    return m_->AwaitRestart(id, after_epoch, timeout);
  }
  absl::StatusOr<HeartbeatReply> Heartbeat(int32_t id) override { return m_->Heartbeat(id); }
  absl::Status Leave(int32_t id) override { return m_->RequestDrain(id); }

 private:
  Membership* m_;
};

}  // namespace sy::parallel
