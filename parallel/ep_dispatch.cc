#include "parallel/ep_dispatch.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "kernels/core/dtype.h"
#include "kernels/core/logging.h"
#include "kernels/core/mutex.h"
#include "kernels/core/status.h"
#include "kernels/cpu/row_kernels.h"

namespace sy::parallel {

using kernels::cpu::RowCopyF32;
using kernels::cpu::RowSum;
using kernels::cpu::RowToBf16;
using kernels::cpu::SumRows;

void AddDispatchStats(EpDispatchStats* sum, const EpDispatchStats& d) {
  sum->calls += d.calls;
  sum->tokens += d.tokens;
  sum->rows_sent += d.rows_sent;
  sum->pairs_computed += d.pairs_computed;
  sum->dispatch_bytes += d.dispatch_bytes;
  sum->combine_bytes += d.combine_bytes;
  sum->counts_seconds += d.counts_seconds;
  sum->dispatch_seconds += d.dispatch_seconds;
  sum->combine_seconds += d.combine_seconds;
  sum->layout_seconds += d.layout_seconds;
  sum->pack_seconds += d.pack_seconds;
  sum->group_seconds += d.group_seconds;
  sum->expert_seconds += d.expert_seconds;
  sum->presum_seconds += d.presum_seconds;
  sum->merge_seconds += d.merge_seconds;
}
namespace {

// One (row, expert) entry on the wire; 12 bytes, read and written with memcpy because the
// pairs follow bf16 rows and need not be 4-byte aligned.
struct WirePair {
  int32_t row;
  int32_t local_slot;
  float weight;
};
static_assert(sizeof(WirePair) == 12);

// Counts exchanged per destination in the counts all-to-all.
struct WireCounts {
  int64_t rows;
  int64_t pairs;
  int64_t sender_last_load;  // pairs the sender computed in its previous call (-1: none yet)
  int64_t placement_epoch;   // the sender's placement epoch; all must agree
};

// Seconds since *t0; restarts *t0 (consecutive phases share one clock read).
double Lap(std::chrono::steady_clock::time_point* t0) {
  const auto now = std::chrono::steady_clock::now();
  const double s = std::chrono::duration<double>(now - *t0).count();
  *t0 = now;
  return s;
}

}  // namespace

absl::Status ChooseSlots(const ExpertPlacement& placement, int layer, int rank,
                         const int32_t* topk_ids, int64_t num_tokens, int64_t num_topk,
                         int32_t* slots) {
  struct Route {
    bool ready = false;
    std::vector<int32_t> own, remote;
    std::vector<double> share, current;  // smooth weighted round robin state over `remote`
    double total = 0;
    int64_t next_own = 0;
    int start = 0;
  };
  const int num_experts = placement.num_experts();
  if (layer < 0 || layer >= placement.num_layers())
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " not in the placement (", placement.num_layers(),
                     " layers)"));
  std::vector<Route> routes(num_experts);
  for (int64_t i = 0; i < num_tokens * num_topk; ++i) {
    const int32_t e = topk_ids[i];
    if (e < 0 || e >= num_experts)
      return absl::InvalidArgumentError(absl::StrCat("router picked expert ", e, " of ",
                                                     num_experts, " (layer ", layer, ")"));
    Route& r = routes[e];
    if (!r.ready) {
      r.ready = true;
      for (int32_t s : placement.replicas_of(layer, e))
        (placement.rank_of_slot(s) == rank ? r.own : r.remote).push_back(s);
      for (int32_t s : r.remote) r.share.push_back(std::max(0.f, placement.share_of(layer, s)));
      r.total = std::accumulate(r.share.begin(), r.share.end(), 0.0);
      if (r.total <= 0) {  // no usable shares: even split
        std::fill(r.share.begin(), r.share.end(), 1.0);
        r.total = static_cast<double>(r.share.size());
      }
      r.current.assign(r.remote.size(), 0.0);
      if (!r.remote.empty()) r.start = rank % static_cast<int>(r.remote.size());
    }
    if (!r.own.empty()) {
      slots[i] = r.own[r.next_own++ % r.own.size()];
      continue;
    }
    // Smooth weighted round robin (as nginx's upstream balancer): every pick adds each
    // replica's share to its credit and takes the largest credit, which spreads picks in
    // proportion to the shares with the smallest possible deviation at every prefix.
    const int n = static_cast<int>(r.remote.size());
    int best = -1;
    for (int j = 0; j < n; ++j) {
      const int idx = (r.start + j) % n;
      r.current[idx] += r.share[idx];
      if (best < 0 || r.current[idx] > r.current[best]) best = idx;
    }
    r.current[best] -= r.total;
    slots[i] = r.remote[best];
  }
  return absl::OkStatus();
}

namespace {

class EpDispatcher final : public ExpertParallelDispatcher {
 public:
  EpDispatcher(Communicator* comm, std::shared_ptr<const ExpertPlacement> placement,
               EpDispatchOptions options)
      : comm_(comm), placement_(std::move(placement)), options_(options) {
    const int n = comm_->world_size();
    stats_.world_size = n;
    stats_.last_rank_load.assign(n, 0);
    stats_.total_rank_load.assign(n, 0);
  }

  int64_t num_local_slots(int) const override { return placement_->slots_per_rank(); }
  int32_t local_slot_expert(int layer, int64_t slot) const override {
    return placement_->expert_of(layer,
                                 comm_->rank() * placement_->slots_per_rank() +
                                     static_cast<int>(slot));
  }

  EpDispatchStats stats() const override {
    sy::MutexLock lock(&stats_mu_);
    return stats_;
  }

  absl::Status SetPlacement(std::shared_ptr<const ExpertPlacement> placement) override {
    if (placement->world_size() != comm_->world_size())
      return absl::InvalidArgumentError(
          absl::StrCat("placement for ", placement->world_size(), " ranks, communicator has ",
                       comm_->world_size()));
    placement_ = std::move(placement);
    return absl::OkStatus();
  }

  int micro_batches() const override { return options_.two_batch_overlap ? 2 : 1; }

  absl::Status Dispatch(int layer, const float* x, int64_t num_tokens, int64_t hidden,
                        const int32_t* topk_ids, const float* topk_weights, int64_t num_topk,
                        ExpertRows* rows) override {
    SY_RETURN_IF_ERROR(
        StartDispatch(0, layer, x, num_tokens, hidden, topk_ids, topk_weights, num_topk));
    return FinishDispatch(0, rows);
  }
  absl::Status Combine(int layer, float* out) override {
    SY_RETURN_IF_ERROR(StartCombine(0, layer, out));
    return FinishCombine(0, layer, out);
  }
  absl::Status StartDispatch(int lane, int layer, const float* x, int64_t num_tokens,
                             int64_t hidden, const int32_t* topk_ids, const float* topk_weights,
                             int64_t num_topk) override;
  absl::Status FinishDispatch(int lane, ExpertRows* rows) override;
  absl::Status StartCombine(int lane, int layer, float* out) override;
  absl::Status FinishCombine(int lane, int layer, float* out) override;

 private:
  bool bf16() const { return options_.wire_dtype == WireDType::kBF16; }
  size_t ElemBytes() const { return bf16() ? 2 : 4; }
  void PutRow(const float* src, int64_t hidden, char* dst) const {
    if (bf16()) {
      RowToBf16(src, hidden, reinterpret_cast<uint16_t*>(dst));
    } else {
      RowCopyF32(src, hidden, reinterpret_cast<float*>(dst));
    }
  }
  // fn(begin, end) over [0, n), on the pool when there is one and the work is worth it.
  void For(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) const {
    if (n <= 0) return;
    if (options_.pool != nullptr && n > grain) {
      options_.pool->ParallelFor(n, grain, fn);
    } else {
      fn(0, n);
    }
  }

  // One micro-batch's layer between StartDispatch and FinishCombine.
  struct Call {
    bool started = false;    // StartDispatch posted the exchange; FinishDispatch next
    bool open = false;       // FinishDispatch handed out the rows; StartCombine next
    bool returning = false;  // StartCombine posted the return; FinishCombine next
    int layer = -1;
    const float* x = nullptr;
    int64_t num_tokens = 0, hidden = 0, K = 0, T = 0, num_pairs = 0, num_in_rows = 0;
    absl::Status route, bad_pair;  // reported by FinishCombine, after every exchange
    double layout_s = 0, counts_s = 0, pack_s = 0, dispatch_s = 0, group_s = 0;
    double expert_s = 0, presum_s = 0, combine_s = 0, merge_s = 0;
  };
  // The state of one micro-batch (lane): scratch reused across calls, the exchange in flight.
  struct Lane {
    Call call;
    std::shared_ptr<const ExpertPlacement> placement;  // the call's (SetPlacement may follow)
    std::unique_ptr<PendingAllToAllV> pending;
    int64_t last_load = -1;  // pairs this lane computed in its previous call
    std::vector<int32_t> slots;
    std::vector<int32_t> seen_dest;               // [K] destinations of the current token
    std::vector<int32_t> token_dest, token_row;   // [T, K] (dest, row) per token, -1 padded
    std::vector<std::vector<int32_t>> tokens_to;  // [n][rows] token of each row sent to rank
    std::vector<std::vector<WirePair>> pairs_to;  // [n][pairs]
    std::vector<WireCounts> send_counts, recv_counts;
    std::vector<int64_t> s_cnt, s_off, r_cnt, r_off, dispatch_sent;
    std::vector<int64_t> row_cursor;              // counting-sort scratch
    std::vector<char> send_buf, recv_buf, ret_send, ret_recv;
    std::vector<WirePair> in_pairs;               // received pairs, source-major
    std::vector<int64_t> in_row;                  // global received row of each pair
    std::vector<int64_t> src_row_base;            // [n+1] first global received row per source
    std::vector<int32_t> row_src;                 // [received rows] source rank of each
    std::vector<int64_t> slot_offsets, cursor, pos_of_pair;
    std::vector<int64_t> row_pairs_begin, pairs_by_row;  // CSR: received row → its pairs
    std::vector<const void*> row_ptrs;  // grouped row → its address (x or receive buffer)
    std::vector<uint8_t> row_bf16;      // grouped row → 1 when it is in bf16 (wire)
    std::vector<float> results;
  };
  // out[t] for the lane's tokens (step 7):
  //   kAll:    one pass after the exchange (reads every input once, writes out once);
  //   kOwn:    (overlap_combine) while the partial sums are in flight, or this rank waits
  //            for a slower peer: the own share of every token served here (tokens with no
  //            destination at all get zeros; tokens served only remotely wait for kRemote);
  //   kRemote: after the exchange, the partial sums are added to what kOwn wrote. A token
  //            served here and remotely is read and written twice; the exchange hides kOwn.
  enum class Merge { kAll, kOwn, kRemote };
  void MergeInto(const Lane& L, Merge what, float* out) const;
  static void AddRowTerms(const Lane& L, int64_t g, std::vector<const float*>* ys,
                          std::vector<float>* ws);
  absl::Status CheckLane(int lane) const {
    if (lane < 0 || lane >= micro_batches())
      return absl::InvalidArgumentError(
          absl::StrCat("expert dispatch: micro-batch ", lane, " of ", micro_batches()));
    return absl::OkStatus();
  }

  Communicator* comm_;
  std::shared_ptr<const ExpertPlacement> placement_;
  EpDispatchOptions options_;
  Lane lanes_[2];
  // The caller's experts run between the last FinishDispatch and the next StartCombine (with
  // two lanes: lane 1's FinishDispatch and lane 0's StartCombine); the gaps after other calls
  // are the caller's other work (attention, router), not experts.
  std::chrono::steady_clock::time_point experts_from_;
  bool experts_open_ = false;

  mutable sy::Mutex stats_mu_;
  EpDispatchStats stats_ ABSL_GUARDED_BY(stats_mu_);
};

absl::Status EpDispatcher::StartDispatch(int lane, int layer, const float* x,
                                         int64_t num_tokens, int64_t hidden,
                                         const int32_t* topk_ids, const float* topk_weights,
                                         int64_t num_topk) {
  SY_RETURN_IF_ERROR(CheckLane(lane));
  experts_open_ = false;
  Lane& L = lanes_[lane];
  L.call = Call{};
  L.pending.reset();
  const int n = comm_->world_size();
  const int me = comm_->rank();
  L.placement = placement_;
  const ExpertPlacement& placement = *L.placement;
  const int spr = placement.slots_per_rank();
  const int64_t row_bytes = static_cast<int64_t>(ElemBytes()) * hidden;
  const int64_t K = num_topk;
  // Rows per parallel task: ~64 KiB of row data.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, hidden * 4));

  auto t0 = std::chrono::steady_clock::now();
  // 1. Route. A bad id is a bug upstream, but peers are already waiting for this rank's
  // collectives: join them with nothing to send and report the error afterwards.
  L.slots.resize(num_tokens * K);
  absl::Status route =
      ChooseSlots(placement, layer, me, topk_ids, num_tokens, K, L.slots.data());
  const int64_t T = route.ok() ? num_tokens : 0;

  // 2. Layout: one row per (token, destination rank); pairs of a row stay contiguous and in
  // row order (the receiver relies on neither, but it keeps its accesses sequential).
  L.tokens_to.resize(n);
  L.pairs_to.resize(n);
  for (int d = 0; d < n; ++d) {
    L.tokens_to[d].clear();
    L.pairs_to[d].clear();
  }
  L.seen_dest.resize(K);
  L.token_dest.assign(T * K, -1);
  L.token_row.assign(T * K, -1);
  for (int64_t t = 0; t < T; ++t) {
    const int32_t* ts = &L.slots[t * K];
    int num_seen = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int d = placement.rank_of_slot(ts[k]);
      int32_t row = -1;
      for (int j = 0; j < num_seen; ++j)  // k is small (≤ 8 or so): a scan beats a map
        if (L.token_dest[t * K + j] == d) row = L.token_row[t * K + j];
      if (row < 0) {
        row = static_cast<int32_t>(L.tokens_to[d].size());
        L.tokens_to[d].push_back(static_cast<int32_t>(t));
        L.token_dest[t * K + num_seen] = d;
        L.token_row[t * K + num_seen++] = row;
      }
      L.pairs_to[d].push_back({row, ts[k] % spr, topk_weights[t * K + k]});
    }
  }

  // 3. Counts, rows and pairs in one exchange: the message to rank d is its WireCounts, then
  // its rows, then its pairs. The rows for this rank's own experts never touch the wire: they
  // are read from x (f32, no bf16 rounding) in step 5 and their results summed in f32 in
  // step 7.
  L.send_counts.resize(n);
  L.recv_counts.resize(n);
  for (int d = 0; d < n; ++d)
    L.send_counts[d] = {static_cast<int64_t>(L.tokens_to[d].size()),
                       static_cast<int64_t>(L.pairs_to[d].size()), L.last_load,
                       placement.epoch()};
  const double layout_s = Lap(&t0);
  L.s_cnt.assign(n, 0);
  L.s_off.assign(n, 0);
  int64_t send_total = 0;
  for (int d = 0; d < n; ++d) {
    L.s_off[d] = send_total;
    if (d != me)
      L.s_cnt[d] = static_cast<int64_t>(sizeof(WireCounts)) + L.send_counts[d].rows * row_bytes +
                  L.send_counts[d].pairs * static_cast<int64_t>(sizeof(WirePair));
    send_total += L.s_cnt[d];
  }
  L.send_buf.resize(std::max<int64_t>(send_total, 1));
  for (int d = 0; d < n; ++d) {
    if (d == me) continue;
    char* seg = L.send_buf.data() + L.s_off[d];
    std::memcpy(seg, &L.send_counts[d], sizeof(WireCounts));
    seg += sizeof(WireCounts);
    const std::vector<int32_t>& toks = L.tokens_to[d];
    For(static_cast<int64_t>(toks.size()), grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        PutRow(x + static_cast<int64_t>(toks[i]) * hidden, hidden, seg + i * row_bytes);
    });
    if (!L.pairs_to[d].empty())
      std::memcpy(seg + toks.size() * row_bytes, L.pairs_to[d].data(),
                  L.pairs_to[d].size() * sizeof(WirePair));
  }
  const double pack_s = Lap(&t0);
  L.pending = comm_->StartAllToAllVDynamic(L.send_buf.data(), L.s_cnt, L.s_off, &L.recv_buf,
                                           &L.r_cnt, &L.r_off);
  L.dispatch_sent = L.s_cnt;
  L.call.started = true;
  L.call.layer = layer;
  L.call.x = x;
  L.call.num_tokens = num_tokens;
  L.call.hidden = hidden;
  L.call.K = K;
  L.call.T = T;
  L.call.route = route;
  L.call.layout_s = layout_s;
  L.call.pack_s = pack_s;
  L.call.dispatch_s = Lap(&t0);
  return absl::OkStatus();
}

absl::Status EpDispatcher::FinishDispatch(int lane, ExpertRows* expert_rows) {
  SY_RETURN_IF_ERROR(CheckLane(lane));
  Lane& L = lanes_[lane];
  if (!L.call.started)
    return absl::FailedPreconditionError("expert dispatch: finished without a start");
  L.call.started = false;
  const int n = comm_->world_size();
  const int me = comm_->rank();
  const ExpertPlacement& placement = *L.placement;
  const int spr = placement.slots_per_rank();
  const int layer = L.call.layer;
  const float* x = L.call.x;
  const int64_t hidden = L.call.hidden;
  const int64_t row_bytes = static_cast<int64_t>(ElemBytes()) * hidden;
  // While the exchange was in flight the caller worked: not this phase's time.
  auto t0 = std::chrono::steady_clock::now();
  absl::Status sent = L.pending->Wait();
  L.pending.reset();
  SY_RETURN_IF_ERROR(
      sy::Annotate(sent, absl::StrCat("expert dispatch layer ", layer, ": rows")));
  L.call.dispatch_s += Lap(&t0);
  // Each message's WireCounts; L.r_off[s] then points at rank s's rows.
  for (int s = 0; s < n; ++s) {
    if (s == me) {
      L.recv_counts[me] = L.send_counts[me];
      continue;
    }
    WireCounts c{};
    bool ok = L.r_cnt[s] >= static_cast<int64_t>(sizeof(WireCounts));
    if (ok) {
      std::memcpy(&c, L.recv_buf.data() + L.r_off[s], sizeof(WireCounts));
      ok = c.rows >= 0 && c.pairs >= 0 && c.rows <= L.r_cnt[s] && c.pairs <= L.r_cnt[s] &&
           L.r_cnt[s] == static_cast<int64_t>(sizeof(WireCounts)) + c.rows * row_bytes +
                            c.pairs * static_cast<int64_t>(sizeof(WirePair));
    }
    if (!ok)
      return absl::InternalError(absl::StrCat("expert dispatch layer ", layer, ": rank ", s,
                                              " sent a malformed message of ", L.r_cnt[s],
                                              " bytes"));
    L.recv_counts[s] = c;
    L.r_off[s] += static_cast<int64_t>(sizeof(WireCounts));
  }
  // Every rank sees every rank's epoch here, so all take the same decision: on a mismatch
  // (a placement switch applied on some ranks only) nobody computes rows for slots that mean
  // different experts on the two sides, and nothing returns; the group stays usable.
  for (int s = 0; s < n; ++s)
    if (L.recv_counts[s].placement_epoch != placement.epoch()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "expert dispatch layer ", layer, ": placement epoch ", placement.epoch(),
          " on rank ", me, " but ", L.recv_counts[s].placement_epoch, " on rank ", s));
    }

  // 5. Group received pairs by local slot (counting sort), widen rows to f32, compute.
  L.src_row_base.assign(n + 1, 0);
  int64_t num_pairs = 0;
  for (int s = 0; s < n; ++s) {
    L.src_row_base[s + 1] = L.src_row_base[s] + L.recv_counts[s].rows;
    num_pairs += L.recv_counts[s].pairs;
  }
  const int64_t num_in_rows = L.src_row_base[n];
  L.in_pairs.resize(num_pairs);
  L.in_row.resize(num_pairs);
  absl::Status bad_pair;
  {
    int64_t i = 0;
    for (int s = 0; s < n; ++s) {
      const char* p = s == me ? reinterpret_cast<const char*>(L.pairs_to[me].data())
                              : L.recv_buf.data() + L.r_off[s] + L.recv_counts[s].rows * row_bytes;
      if (L.recv_counts[s].pairs > 0)
        std::memcpy(&L.in_pairs[i], p, L.recv_counts[s].pairs * sizeof(WirePair));
      for (int64_t j = 0; j < L.recv_counts[s].pairs; ++j, ++i) {
        const WirePair& pr = L.in_pairs[i];
        if (pr.local_slot < 0 || pr.local_slot >= spr || pr.row < 0 ||
            pr.row >= L.recv_counts[s].rows) {
          bad_pair = absl::InternalError(absl::StrCat(
              "expert dispatch layer ", layer, ": rank ", s, " sent a malformed pair"));
          L.in_pairs[i] = {0, 0, 0.f};
          L.in_row[i] = -1;
          continue;
        }
        L.in_row[i] = L.src_row_base[s] + pr.row;
      }
    }
  }
  if (!bad_pair.ok()) num_pairs = 0;  // compute nothing; still take part in the return
  L.slot_offsets.assign(spr + 1, 0);
  L.row_pairs_begin.assign(num_in_rows + 1, 0);
  for (int64_t i = 0; i < num_pairs; ++i) {
    ++L.slot_offsets[L.in_pairs[i].local_slot + 1];
    ++L.row_pairs_begin[L.in_row[i] + 1];
  }
  for (int s = 0; s < spr; ++s) L.slot_offsets[s + 1] += L.slot_offsets[s];
  for (int64_t r = 0; r < num_in_rows; ++r) L.row_pairs_begin[r + 1] += L.row_pairs_begin[r];
  L.cursor.assign(L.slot_offsets.begin(), L.slot_offsets.end() - 1);
  L.pos_of_pair.resize(num_pairs);
  L.pairs_by_row.resize(num_pairs);
  {
    std::vector<int64_t>& row_cursor = L.row_cursor;
    row_cursor.assign(L.row_pairs_begin.begin(), L.row_pairs_begin.end() - 1);
    for (int64_t i = 0; i < num_pairs; ++i) {
      L.pos_of_pair[i] = L.cursor[L.in_pairs[i].local_slot]++;
      L.pairs_by_row[row_cursor[L.in_row[i]]++] = i;
    }
  }
  // Source rank of every received row, so the row loops need no search.
  L.row_src.resize(num_in_rows);
  for (int s = 0; s < n; ++s)
    std::fill(L.row_src.begin() + L.src_row_base[s], L.row_src.begin() + L.src_row_base[s + 1], s);
  // Address of received row g: this rank's own rows are read from x (f32), the others from
  // the receive buffer (wire dtype).
  auto in_row_ptr = [&](int64_t g) -> const char* {
    const int s = L.row_src[g];
    const int64_t row = g - L.src_row_base[s];
    if (s == me)
      return reinterpret_cast<const char*>(x + static_cast<int64_t>(L.tokens_to[me][row]) * hidden);
    return L.recv_buf.data() + L.r_off[s] + row * row_bytes;
  };
  // The grouped rows stay where they are (x, or the receive buffer in the wire dtype): the
  // experts' kernel reads them by address.
  L.row_ptrs.resize(num_pairs);
  L.row_bf16.resize(num_pairs);
  for (int64_t i = 0; i < num_pairs; ++i) {
    L.row_ptrs[L.pos_of_pair[i]] = in_row_ptr(L.in_row[i]);
    L.row_bf16[L.pos_of_pair[i]] = L.row_src[L.in_row[i]] != me && bf16() ? 1 : 0;
  }
  const double group_s = Lap(&t0);
  L.results.resize(num_pairs * hidden);
  expert_rows->row_ptrs = L.row_ptrs.data();
  expert_rows->row_bf16 = L.row_bf16.data();
  expert_rows->slot_offsets = L.slot_offsets.data();
  expert_rows->num_rows = num_pairs;
  expert_rows->out = L.results.data();
  L.call.open = true;
  L.call.num_pairs = num_pairs;
  L.call.num_in_rows = num_in_rows;
  L.call.bad_pair = bad_pair;
  L.call.group_s = group_s;
  experts_from_ = t0;
  experts_open_ = true;
  return absl::OkStatus();
}

absl::Status EpDispatcher::StartCombine(int lane, int layer, float* out) {
  SY_RETURN_IF_ERROR(CheckLane(lane));
  Lane& L = lanes_[lane];
  if (!L.call.open || L.call.layer != layer)
    return absl::FailedPreconditionError(
        absl::StrCat("expert combine layer ", layer, " without its dispatch"));
  L.call.open = false;
  const int n = comm_->world_size();
  const int me = comm_->rank();
  const int64_t hidden = L.call.hidden;
  const int64_t num_in_rows = L.call.num_in_rows;
  const int64_t row_bytes = static_cast<int64_t>(ElemBytes()) * hidden;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, hidden * 4));
  auto t0 = std::chrono::steady_clock::now();
  L.call.expert_s = experts_open_ ? std::chrono::duration<double>(t0 - experts_from_).count() : 0;
  experts_open_ = false;

  // 6. Pre-sum Σ weight · y per received row straight into the return buffer in the wire
  // dtype (one pass: read each result once, write each returned row once). Its layout is
  // that of the received rows: rank s gets L.recv_counts[s].rows rows back, in its order.
  // This rank's own rows are not pre-summed: step 7 reads their results directly.
  for (int d = 0; d < n; ++d) {
    L.s_cnt[d] = d == me ? 0 : L.recv_counts[d].rows * row_bytes;
    L.r_cnt[d] = d == me ? 0 : L.send_counts[d].rows * row_bytes;
  }
  int64_t ret_send_total = 0, ret_recv_total = 0;
  for (int d = 0; d < n; ++d) {
    L.s_off[d] = ret_send_total;
    ret_send_total += L.s_cnt[d];
    L.r_off[d] = ret_recv_total;
    ret_recv_total += L.r_cnt[d];
  }
  L.ret_send.resize(std::max<int64_t>(ret_send_total, 1));
  L.ret_recv.resize(std::max<int64_t>(ret_recv_total, 1));
  For(num_in_rows, grain, [&](int64_t b, int64_t e) {
    std::vector<const float*> ys;
    std::vector<float> ws;
    for (int64_t g = b; g < e; ++g) {
      const int s = L.row_src[g];
      if (s == me) continue;
      ys.clear();
      ws.clear();
      AddRowTerms(L, g, &ys, &ws);
      RowSum sum;
      sum.y = ys.data();
      sum.w = ws.data();
      sum.num_y = static_cast<int>(ys.size());
      char* dst = L.ret_send.data() + L.s_off[s] + (g - L.src_row_base[s]) * row_bytes;
      if (bf16()) {
        SumRows(sum, hidden, nullptr, reinterpret_cast<uint16_t*>(dst));
      } else {
        SumRows(sum, hidden, reinterpret_cast<float*>(dst), nullptr);
      }
    }
  });
  L.call.presum_s = Lap(&t0);
  // 7. Return (in flight until FinishCombine); with overlap_combine the own share of every
  // token is summed into out meanwhile.
  L.pending = comm_->StartAllToAllV(L.ret_send.data(), L.s_cnt, L.s_off, L.ret_recv.data(),
                                    L.r_cnt, L.r_off);
  L.call.combine_s = Lap(&t0);
  if (options_.overlap_combine) {
    MergeInto(L, Merge::kOwn, out);
    L.call.merge_s = Lap(&t0);
  }
  L.call.returning = true;
  return absl::OkStatus();
}

absl::Status EpDispatcher::FinishCombine(int lane, int layer, float* out) {
  SY_RETURN_IF_ERROR(CheckLane(lane));
  Lane& L = lanes_[lane];
  if (!L.call.returning || L.call.layer != layer)
    return absl::FailedPreconditionError(
        absl::StrCat("expert combine layer ", layer, " finished without its start"));
  L.call.returning = false;
  experts_open_ = false;
  const int n = comm_->world_size();
  const int me = comm_->rank();
  const int64_t T = L.call.T, num_pairs = L.call.num_pairs;
  auto t0 = std::chrono::steady_clock::now();
  absl::Status returned = L.pending->Wait();
  L.pending.reset();
  SY_RETURN_IF_ERROR(sy::Annotate(returned, absl::StrCat("expert combine layer ", layer)));
  const double combine_s = L.call.combine_s + Lap(&t0);
  MergeInto(L, options_.overlap_combine ? Merge::kRemote : Merge::kAll, out);
  const double merge_s = L.call.merge_s + Lap(&t0);
  const double expert_s = L.call.expert_s, presum_s = L.call.presum_s;

  // Counters.
  {
    sy::MutexLock lock(&stats_mu_);
    ++stats_.calls;
    stats_.tokens += T;
    stats_.pairs_computed += num_pairs;
    for (int d = 0; d < n; ++d) {
      if (d == me) continue;
      stats_.rows_sent += L.send_counts[d].rows;
      stats_.dispatch_bytes += L.dispatch_sent[d];
      stats_.combine_bytes += L.s_cnt[d];
    }
    stats_.counts_seconds += L.call.counts_s;
    stats_.dispatch_seconds += L.call.dispatch_s;
    stats_.combine_seconds += combine_s;
    stats_.layout_seconds += L.call.layout_s;
    stats_.pack_seconds += L.call.pack_s;
    stats_.group_seconds += L.call.group_s;
    stats_.expert_seconds += expert_s;
    stats_.presum_seconds += presum_s;
    stats_.merge_seconds += merge_s;
    bool known = true;
    for (int s = 0; s < n; ++s) known = known && L.recv_counts[s].sender_last_load >= 0;
    if (known) {
      for (int s = 0; s < n; ++s) {
        stats_.last_rank_load[s] = L.recv_counts[s].sender_last_load;
        stats_.total_rank_load[s] += L.recv_counts[s].sender_last_load;
      }
      const int64_t mx =
          *std::max_element(stats_.total_rank_load.begin(), stats_.total_rank_load.end());
      const double mean =
          std::accumulate(stats_.total_rank_load.begin(), stats_.total_rank_load.end(), 0.0) /
          n;
      stats_.balancedness = mx > 0 ? mean / static_cast<double>(mx) : 1.0;
    }
  }
  L.last_load = num_pairs;
  if (!L.call.route.ok())
    return sy::Annotate(L.call.route, absl::StrCat("expert dispatch layer ", layer));
  return L.call.bad_pair;
}

void EpDispatcher::MergeInto(const Lane& L, Merge what, float* out) const {
  const int me = comm_->rank();
  const int64_t num_tokens = L.call.num_tokens, hidden = L.call.hidden, K = L.call.K, T = L.call.T;
  const int64_t row_bytes = static_cast<int64_t>(ElemBytes()) * hidden;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, hidden * 4));
  // 7. Combine: out[t] = Σ over t's pairs computed here of weight · y (f32, straight from the
  // results) + Σ over t's other destination ranks of their partial sums.
  For(num_tokens, grain, [&](int64_t b, int64_t e) {
    std::vector<const float*> ys;
    std::vector<float> ws;
    std::vector<const void*> parts;
    const float one = 1.f;
    for (int64_t t = b; t < e; ++t) {
      ys.clear();
      ws.clear();
      parts.clear();
      bool own = false, remote = false;
      for (int64_t j = 0; t < T && j < K && L.token_dest[t * K + j] >= 0; ++j) {
        const int d = L.token_dest[t * K + j];
        const int64_t row = L.token_row[t * K + j];
        if (d == me) {
          own = true;
          if (what != Merge::kRemote) AddRowTerms(L, L.src_row_base[me] + row, &ys, &ws);
        } else {
          remote = true;
          if (what != Merge::kOwn) parts.push_back(L.ret_recv.data() + L.r_off[d] + row * row_bytes);
        }
      }
      float* o = out + t * hidden;
      const float* const prev = o;
      if (what == Merge::kOwn && !own && remote) continue;
      if (what == Merge::kRemote) {
        if (!remote) continue;
        if (own) {  // add to the own share kOwn wrote (in place)
          ys.push_back(prev);
          ws.push_back(one);
        }
      }
      RowSum sum;
      sum.y = ys.data();
      sum.w = ws.data();
      sum.num_y = static_cast<int>(ys.size());
      sum.parts = parts.data();
      sum.num_parts = static_cast<int>(parts.size());
      sum.parts_bf16 = bf16();
      SumRows(sum, hidden, o, nullptr);
    }
  });
}

// Gathers the weighted results of received row g into (ys, ws).
void EpDispatcher::AddRowTerms(const Lane& L, int64_t g, std::vector<const float*>* ys,
                               std::vector<float>* ws) {
  for (int64_t j = L.row_pairs_begin[g]; j < L.row_pairs_begin[g + 1]; ++j) {
    const int64_t i = L.pairs_by_row[j];
    ys->push_back(&L.results[L.pos_of_pair[i] * L.call.hidden]);
    ws->push_back(L.in_pairs[i].weight);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<ExpertParallelDispatcher>> MakeExpertParallelDispatcher(
    Communicator* comm, std::shared_ptr<const ExpertPlacement> placement,
    EpDispatchOptions options) {
  if (comm == nullptr || placement == nullptr)
    return absl::InvalidArgumentError("expert-parallel dispatcher: null communicator or placement");
  if (placement->world_size() != comm->world_size())
    return absl::InvalidArgumentError(
        absl::StrCat("expert-parallel dispatcher: placement for ", placement->world_size(),
                     " ranks, communicator has ", comm->world_size()));
  return std::unique_ptr<ExpertParallelDispatcher>(
      new EpDispatcher(comm, std::move(placement), options));
}

}  // namespace sy::parallel
