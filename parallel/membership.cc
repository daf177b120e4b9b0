#include "parallel/membership.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "kernels/core/mutex.h"

namespace sy::parallel {
namespace {

using Clock = std::chrono::steady_clock;

// Ranks kept in the table after they died or left (for GetMembership).
constexpr size_t kKeepFormer = 64;

void PushString(const std::string& s, std::vector<int32_t>* w) {
  w->push_back(static_cast<int32_t>(s.size()));
  const size_t at = w->size();
  w->resize(at + (s.size() + 3) / 4, 0);
  if (!s.empty()) std::memcpy(w->data() + at, s.data(), s.size());
}

}  // namespace

const char* RankStateName(RankState state) {
  switch (state) {
    case RankState::kJoining: return "joining";
    case RankState::kServing: return "serving";
    case RankState::kDraining: return "draining";
    case RankState::kGone: return "gone";
    case RankState::kDead: return "dead";
  }
  return "unknown";
}

int EpochView::comm_rank_of(int32_t id) const {
  for (size_t r = 0; r < members.size(); ++r)
    if (members[r] == id) return static_cast<int>(r);
  return -1;
}

std::vector<int32_t> EncodeEpochView(const EpochView& view) {
  std::vector<int32_t> w;
  w.push_back(static_cast<int32_t>(view.epoch & 0x7fffffff));
  w.push_back(static_cast<int32_t>(view.epoch >> 31));
  w.push_back(static_cast<int32_t>(view.members.size()));
  w.insert(w.end(), view.members.begin(), view.members.end());
  PushString(view.store_prefix, &w);
  PushString(view.placement_json, &w);
  return w;
}

absl::StatusOr<EpochView> DecodeEpochView(std::span<const int32_t> words) {
  size_t at = 0;
  auto bad = [](const char* what) {
    return absl::InvalidArgumentError(absl::StrCat("epoch view: bad ", what));
  };
  if (words.size() < 3 || words[0] < 0 || words[1] < 0) return bad("header");
  EpochView v;
  v.epoch = static_cast<int64_t>(words[0]) | (static_cast<int64_t>(words[1]) << 31);
  const int32_t n = words[2];
  at = 3;
  if (n < 1 || static_cast<size_t>(n) > words.size() - at) return bad("member count");
  v.members.assign(words.begin() + at, words.begin() + at + n);
  at += n;
  for (std::string* s : {&v.store_prefix, &v.placement_json}) {
    if (at >= words.size()) return bad("string length");
    const int64_t len = words[at++];
    const size_t nw = static_cast<size_t>((len + 3) / 4);
    if (len < 0 || nw > words.size() - at) return bad("string");
    s->assign(reinterpret_cast<const char*>(words.data() + at), static_cast<size_t>(len));
    at += nw;
  }
  if (at != words.size()) return bad("trailing words");
  if (v.members[0] != 0) return bad("leader (comm rank 0 must be rank 0)");
  return v;
}

std::string ReadyKey(const EpochView& view, int comm_rank) {
  return absl::StrCat(view.store_prefix, "/ready/", comm_rank);
}

Membership::Membership(MembershipOptions options) : options_(std::move(options)) {
  Member leader;
  leader.id = 0;
  leader.address = options_.leader_address;
  leader.state = RankState::kServing;
  leader.kv_blocks = options_.leader_kv_blocks;
  leader.joined_at = leader.last_heartbeat = Clock::now();
  members_[0] = leader;
  view_.epoch = 1;
  view_.members = {0};
  view_.store_prefix = "epoch-1";
}

Membership::Member* Membership::Find(int32_t id) {
  auto it = members_.find(id);
  return it == members_.end() ? nullptr : &it->second;
}

const Membership::Member* Membership::Find(int32_t id) const {
  auto it = members_.find(id);
  return it == members_.end() ? nullptr : &it->second;
}

void Membership::SetNotify(std::function<void()> notify) {
  // Held while a notification runs: once this returns, the old callback is not running.
  sy::MutexLock lock(&notify_mu_);
  notify_ = std::move(notify);
}

void Membership::Notify() {
  sy::MutexLock lock(&notify_mu_);
  if (notify_) notify_();
}

absl::StatusOr<int32_t> Membership::AddJoining(const std::string& address, uint64_t instance,
                                               int64_t kv_blocks) {
  int32_t id = 0;
  {
    sy::MutexLock lock(&mu_);
    if (reforming_)
      return absl::AbortedError(absl::StrCat("the group is re-forming after the failure of epoch ",
                                             broken_epoch_, "; join again in a moment"));
    int live = 0;
    for (const auto& [mid, m] : members_) {
      if (m.state == RankState::kDead || m.state == RankState::kGone) continue;
      ++live;
      if (instance != 0 && m.instance == instance)
        return absl::AlreadyExistsError(absl::StrCat(
            "this process already joined as rank ", mid, " (", RankStateName(m.state), ")"));
    }
    if (options_.max_ranks > 0 && live >= options_.max_ranks)
      return absl::ResourceExhaustedError(absl::StrCat(
          "the group has its maximum of ", options_.max_ranks, " ranks (--max-ranks)"));
    if (kv_blocks < 1)
      return absl::InvalidArgumentError("the joining rank brings no KV cache block");
    Member m;
    m.id = id = next_id_++;
    m.address = address;
    m.instance = instance;
    m.kv_blocks = kv_blocks;
    m.joined_at = m.last_heartbeat = Clock::now();
    members_[id] = m;
  }
  Notify();
  return id;
}

absl::StatusOr<EpochView> Membership::AwaitJoin(int32_t id, std::chrono::milliseconds timeout) {
  sy::MutexLock lock(&mu_);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    Member* m = Find(id);
    if (m == nullptr) return absl::NotFoundError(absl::StrCat("no rank ", id));
    if (m->join_result.has_value()) return *m->join_result;
    if (cv_.WaitUntil(&mu_, deadline)) {
      m = Find(id);
      if (m != nullptr && m->join_result.has_value()) return *m->join_result;
      return absl::DeadlineExceededError("the leader has not placed the joining rank yet");
    }
  }
}

absl::StatusOr<EpochView> Membership::AwaitRestart(int32_t id, int64_t after_epoch,
                                                   std::chrono::milliseconds timeout) {
  {
    sy::MutexLock lock(&mu_);
    Member* m = Find(id);
    if (m == nullptr) return absl::NotFoundError(absl::StrCat("no rank ", id));
    m->checked_in = std::max(m->checked_in, after_epoch);
    m->last_heartbeat = Clock::now();
    cv_.SignalAll();  // WaitForSurvivors
  }
  Notify();
  sy::MutexLock lock(&mu_);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    Member* m = Find(id);
    if (m == nullptr) return absl::NotFoundError(absl::StrCat("no rank ", id));
    if (m->state == RankState::kDead || m->state == RankState::kGone)
      return absl::FailedPreconditionError(absl::StrCat(
          "fenced: rank ", id, " is ", RankStateName(m->state), " (epoch ", view_.epoch,
          "); join again as a new rank"));
    if (restart_.epoch > after_epoch && restart_.comm_rank_of(id) >= 0) return restart_;
    if (cv_.WaitUntil(&mu_, deadline))
      return absl::DeadlineExceededError(absl::StrCat(
          "no re-formed epoch after ", after_epoch, " within ", timeout.count(), " ms"));
  }
}

absl::StatusOr<HeartbeatReply> Membership::Heartbeat(int32_t id) {
  sy::MutexLock lock(&mu_);
  Member* m = Find(id);
  if (m == nullptr) return absl::NotFoundError(absl::StrCat("no rank ", id));
  m->last_heartbeat = Clock::now();
  HeartbeatReply r;
  r.epoch = view_.epoch;
  r.broken_epoch = broken_epoch_;
  r.fenced = m->state == RankState::kDead || m->state == RankState::kGone;
  return r;
}

absl::Status Membership::CheckInstance(int32_t id, uint64_t instance) const {
  sy::MutexLock lock(&mu_);
  const Member* m = Find(id);
  if (m == nullptr || (instance != 0 && m->instance != instance))
    return absl::NotFoundError(absl::StrCat("no rank ", id, " of this process in the group (the "
                                            "leader restarted?): join again"));
  return absl::OkStatus();
}

absl::Status Membership::RequestDrain(int32_t id) {
  {
    sy::MutexLock lock(&mu_);
    Member* m = Find(id);
    if (m == nullptr) return absl::NotFoundError(absl::StrCat("no rank ", id, " in the group"));
    if (id == 0)
      return absl::FailedPreconditionError(
          "rank 0 is the leader: it cannot be drained out of its own group (SIGTERM to the "
          "leader drains the whole daemon)");
    if (m->state == RankState::kDraining) return absl::OkStatus();
    if (m->state != RankState::kServing)
      return absl::FailedPreconditionError(
          absl::StrCat("rank ", id, " is ", RankStateName(m->state), ", not serving"));
    m->state = RankState::kDraining;
  }
  SY_LOG(INFO) << "membership: rank " << id << " drains";
  Notify();
  return absl::OkStatus();
}

std::vector<std::pair<int32_t, int64_t>> Membership::PendingJoins() const {
  sy::MutexLock lock(&mu_);
  std::vector<std::pair<int32_t, int64_t>> out;
  for (const auto& [id, m] : members_)
    if (m.state == RankState::kJoining && !m.join_result.has_value())
      out.emplace_back(id, m.kv_blocks);
  return out;
}

std::vector<int32_t> Membership::Draining() const {
  sy::MutexLock lock(&mu_);
  std::vector<int32_t> out;
  for (const auto& [id, m] : members_)
    if (m.state == RankState::kDraining) out.push_back(id);
  return out;
}

void Membership::PublishJoin(const std::vector<int32_t>& ids, const EpochView& view) {
  sy::MutexLock lock(&mu_);
  for (int32_t id : ids)
    if (Member* m = Find(id)) m->join_result = view;
  cv_.SignalAll();
}

void Membership::RefuseJoin(const std::vector<int32_t>& ids, const absl::Status& status) {
  sy::MutexLock lock(&mu_);
  for (int32_t id : ids) {
    Member* m = Find(id);
    if (m == nullptr) continue;
    // A rank already told its epoch learns the refusal when that epoch never forms.
    m->state = RankState::kGone;
    if (!m->join_result.has_value()) m->join_result = status;
  }
  cv_.SignalAll();
}

void Membership::Commit(const EpochView& view) {
  sy::MutexLock lock(&mu_);
  for (auto& [id, m] : members_) {
    const bool member = view.comm_rank_of(id) >= 0;
    if (member && m.state == RankState::kJoining) m.state = RankState::kServing;
    if (!member && (m.state == RankState::kServing || m.state == RankState::kDraining) &&
        view_.comm_rank_of(id) >= 0) {
      m.state = RankState::kGone;
      m.home_seqs = m.kv_blocks_used = m.expert_slots = 0;
      m.tokens_per_second = 0;
    }
  }
  view_ = view;
  reforming_ = false;
  next_epoch_ = std::max(next_epoch_, view.epoch + 1);
  // Forget the oldest former ranks.
  std::vector<int32_t> former;
  for (const auto& [id, m] : members_)
    if (m.state == RankState::kDead || m.state == RankState::kGone) former.push_back(id);
  for (size_t i = 0; i + kKeepFormer < former.size(); ++i) members_.erase(former[i]);
  cv_.SignalAll();
}

void Membership::BreakEpoch(int64_t epoch) {
  sy::MutexLock lock(&mu_);
  broken_epoch_ = std::max(broken_epoch_, epoch);
  reforming_ = true;
  cv_.SignalAll();
}

std::vector<int32_t> Membership::WaitForSurvivors(const EpochView& view,
                                                  std::chrono::milliseconds max_wait) {
  sy::MutexLock lock(&mu_);
  const auto deadline = Clock::now() + max_wait;
  for (;;) {
    const auto now = Clock::now();
    std::vector<int32_t> in;
    bool waiting = false;
    for (int32_t id : view.members) {
      if (id == 0) continue;
      const Member* m = Find(id);
      if (m == nullptr || m->state == RankState::kDead || m->state == RankState::kGone) continue;
      if (m->checked_in >= view.epoch) {
        in.push_back(id);
      } else if (now - m->last_heartbeat < options_.heartbeat_timeout) {
        waiting = true;  // alive, not checked in yet
      }
    }
    if (!waiting || now >= deadline) return in;
    cv_.WaitUntil(&mu_, std::min(deadline, now + std::chrono::milliseconds(20)));
  }
}

void Membership::PublishRestart(const EpochView& view) {
  sy::MutexLock lock(&mu_);
  restart_ = view;
  next_epoch_ = std::max(next_epoch_, view.epoch + 1);
  cv_.SignalAll();
}

void Membership::MarkDead(const std::vector<int32_t>& ids) {
  sy::MutexLock lock(&mu_);
  for (int32_t id : ids)
    if (Member* m = Find(id)) {
      m->state = RankState::kDead;
      m->home_seqs = m->kv_blocks_used = m->expert_slots = 0;
      m->tokens_per_second = 0;
    }
  cv_.SignalAll();
}

int64_t Membership::NextEpoch() {
  sy::MutexLock lock(&mu_);
  return next_epoch_++;
}

int64_t Membership::epoch() const {
  sy::MutexLock lock(&mu_);
  return view_.epoch;
}

EpochView Membership::view() const {
  sy::MutexLock lock(&mu_);
  return view_;
}

std::chrono::steady_clock::time_point Membership::joined_at(int32_t id) const {
  sy::MutexLock lock(&mu_);
  const Member* m = Find(id);
  return m != nullptr ? m->joined_at : Clock::time_point{};
}

int64_t Membership::kv_blocks(int32_t id) const {
  sy::MutexLock lock(&mu_);
  const Member* m = Find(id);
  return m != nullptr ? m->kv_blocks : 0;
}

std::string Membership::address(int32_t id) const {
  sy::MutexLock lock(&mu_);
  const Member* m = Find(id);
  return m != nullptr ? m->address : "";
}

int Membership::serving_ranks() const {
  sy::MutexLock lock(&mu_);
  return view_.world_size();
}

void Membership::SetUsage(int32_t id, int64_t home_seqs, int64_t kv_blocks_used,
                          int64_t expert_slots, double tokens_per_second) {
  sy::MutexLock lock(&mu_);
  Member* m = Find(id);
  if (m == nullptr) return;
  m->home_seqs = home_seqs;
  m->kv_blocks_used = kv_blocks_used;
  m->expert_slots = expert_slots;
  m->tokens_per_second = tokens_per_second;
}

MembershipSnapshot Membership::Snapshot() const {
  sy::MutexLock lock(&mu_);
  MembershipSnapshot s;
  s.epoch = view_.epoch;
  s.reforming = reforming_;
  const auto now = Clock::now();
  for (const auto& [id, m] : members_) {
    RankInfo r;
    r.id = id;
    r.address = m.address;
    r.state = m.state;
    r.comm_rank = view_.comm_rank_of(id);
    r.kv_blocks = m.kv_blocks;
    r.kv_blocks_used = m.kv_blocks_used;
    r.home_seqs = m.home_seqs;
    r.expert_slots = m.expert_slots;
    r.tokens_per_second = m.tokens_per_second;
    r.heartbeat_age_s = id == 0 ? 0 : std::chrono::duration<double>(now - m.last_heartbeat).count();
    s.ranks.push_back(r);
  }
  return s;
}

}  // namespace sy::parallel
