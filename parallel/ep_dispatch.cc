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

  absl::Status Dispatch(int layer, const float* x, int64_t num_tokens, int64_t hidden,
                        const int32_t* topk_ids, const float* topk_weights, int64_t num_topk,
                        ExpertRows* rows) override;
  absl::Status Combine(int layer, float* out) override;

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

  Communicator* comm_;
  std::shared_ptr<const ExpertPlacement> placement_;
  EpDispatchOptions options_;
  int64_t last_load_ = -1;

  // Scratch reused across calls (one engine thread).
  std::vector<int32_t> slots_;
  std::vector<int32_t> seen_dest_;                // [K] destinations of the current token
  std::vector<int32_t> token_dest_, token_row_;   // [T, K] (dest, row) per token, -1 padded
  std::vector<std::vector<int32_t>> tokens_to_;   // [n][rows] token of each row sent to rank
  std::vector<std::vector<WirePair>> pairs_to_;   // [n][pairs]
  std::vector<WireCounts> send_counts_, recv_counts_;
  std::vector<int64_t> s_cnt_, s_off_, r_cnt_, r_off_, dispatch_sent_;
  std::vector<int64_t> row_cursor_;               // counting-sort scratch
  std::vector<char> send_buf_, recv_buf_, ret_send_, ret_recv_;
  std::vector<WirePair> in_pairs_;                // received pairs, source-major
  std::vector<int64_t> in_row_;                   // global received row of each pair
  std::vector<int64_t> src_row_base_;             // [n+1] first global received row per source
  std::vector<int32_t> row_src_;                  // [received rows] source rank of each
  std::vector<int64_t> slot_offsets_, cursor_, pos_of_pair_;
  std::vector<int64_t> row_pairs_begin_, pairs_by_row_;  // CSR: received row → its pairs
  std::vector<const void*> row_ptrs_;  // grouped row → its address (x or receive buffer)
  std::vector<uint8_t> row_bf16_;      // grouped row → 1 when it is in bf16 (wire)
  std::vector<float> results_;

  // The layer between Dispatch and Combine.
  struct Call {
    bool open = false;
    int layer = -1;
    int64_t num_tokens = 0, hidden = 0, K = 0, T = 0, num_pairs = 0, num_in_rows = 0;
    absl::Status route, bad_pair;  // reported by Combine, after every exchange
    double layout_s = 0, counts_s = 0, pack_s = 0, dispatch_s = 0, group_s = 0;
    std::chrono::steady_clock::time_point dispatched;
  };
  Call call_;

  mutable sy::Mutex stats_mu_;
  EpDispatchStats stats_ ABSL_GUARDED_BY(stats_mu_);
};

absl::Status EpDispatcher::Dispatch(int layer, const float* x, int64_t num_tokens,
                                    int64_t hidden, const int32_t* topk_ids,
                                    const float* topk_weights, int64_t num_topk,
                                    ExpertRows* expert_rows) {
  call_.open = false;
  const int n = comm_->world_size();
  const int me = comm_->rank();
  const ExpertPlacement& placement = *placement_;
  const int spr = placement.slots_per_rank();
  const int64_t row_bytes = static_cast<int64_t>(ElemBytes()) * hidden;
  const int64_t K = num_topk;
  // Rows per parallel task: ~64 KiB of row data.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, hidden * 4));

  auto t0 = std::chrono::steady_clock::now();
  // 1. Route. A bad id is a bug upstream, but peers are already waiting for this rank's
  // collectives: join them with nothing to send and report the error afterwards.
  slots_.resize(num_tokens * K);
  absl::Status route =
      ChooseSlots(placement, layer, me, topk_ids, num_tokens, K, slots_.data());
  const int64_t T = route.ok() ? num_tokens : 0;

  // 2. Layout: one row per (token, destination rank); pairs of a row stay contiguous and in
  // row order (the receiver relies on neither, but it keeps its accesses sequential).
  tokens_to_.resize(n);
  pairs_to_.resize(n);
  for (int d = 0; d < n; ++d) {
    tokens_to_[d].clear();
    pairs_to_[d].clear();
  }
  seen_dest_.resize(K);
  token_dest_.assign(T * K, -1);
  token_row_.assign(T * K, -1);
  for (int64_t t = 0; t < T; ++t) {
    const int32_t* ts = &slots_[t * K];
    int num_seen = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int d = placement.rank_of_slot(ts[k]);
      int32_t row = -1;
      for (int j = 0; j < num_seen; ++j)  // k is small (≤ 8 or so): a scan beats a map
        if (token_dest_[t * K + j] == d) row = token_row_[t * K + j];
      if (row < 0) {
        row = static_cast<int32_t>(tokens_to_[d].size());
        tokens_to_[d].push_back(static_cast<int32_t>(t));
        token_dest_[t * K + num_seen] = d;
        token_row_[t * K + num_seen++] = row;
      }
      pairs_to_[d].push_back({row, ts[k] % spr, topk_weights[t * K + k]});
    }
  }

  // 3. Counts, rows and pairs in one exchange: the message to rank d is its WireCounts, then
  // its rows, then its pairs. The rows for this rank's own experts never touch the wire: they
  // are read from x (f32, no bf16 rounding) in step 5 and their results summed in f32 in
  // step 7.
  send_counts_.resize(n);
  recv_counts_.resize(n);
  for (int d = 0; d < n; ++d)
    send_counts_[d] = {static_cast<int64_t>(tokens_to_[d].size()),
                       static_cast<int64_t>(pairs_to_[d].size()), last_load_,
                       placement.epoch()};
  const double layout_s = Lap(&t0);
  s_cnt_.assign(n, 0);
  s_off_.assign(n, 0);
  int64_t send_total = 0;
  for (int d = 0; d < n; ++d) {
    s_off_[d] = send_total;
    if (d != me)
      s_cnt_[d] = static_cast<int64_t>(sizeof(WireCounts)) + send_counts_[d].rows * row_bytes +
                  send_counts_[d].pairs * static_cast<int64_t>(sizeof(WirePair));
    send_total += s_cnt_[d];
  }
  send_buf_.resize(std::max<int64_t>(send_total, 1));
  for (int d = 0; d < n; ++d) {
    if (d == me) continue;
    char* seg = send_buf_.data() + s_off_[d];
    std::memcpy(seg, &send_counts_[d], sizeof(WireCounts));
    seg += sizeof(WireCounts);
    const std::vector<int32_t>& toks = tokens_to_[d];
    For(static_cast<int64_t>(toks.size()), grain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        PutRow(x + static_cast<int64_t>(toks[i]) * hidden, hidden, seg + i * row_bytes);
    });
    if (!pairs_to_[d].empty())
      std::memcpy(seg + toks.size() * row_bytes, pairs_to_[d].data(),
                  pairs_to_[d].size() * sizeof(WirePair));
  }
  const double pack_s = Lap(&t0);
  SY_RETURN_IF_ERROR(sy::Annotate(
      comm_->AllToAllVDynamic(send_buf_.data(), s_cnt_, s_off_, &recv_buf_, &r_cnt_, &r_off_),
      absl::StrCat("expert dispatch layer ", layer, ": rows")));
  const double dispatch_s = Lap(&t0);
  const double counts_s = 0;  // the counts travel with the rows
  dispatch_sent_ = s_cnt_;
  // Each message's WireCounts; r_off_[s] then points at rank s's rows.
  for (int s = 0; s < n; ++s) {
    if (s == me) {
      recv_counts_[me] = send_counts_[me];
      continue;
    }
    WireCounts c{};
    bool ok = r_cnt_[s] >= static_cast<int64_t>(sizeof(WireCounts));
    if (ok) {
      std::memcpy(&c, recv_buf_.data() + r_off_[s], sizeof(WireCounts));
      ok = c.rows >= 0 && c.pairs >= 0 && c.rows <= r_cnt_[s] && c.pairs <= r_cnt_[s] &&
           r_cnt_[s] == static_cast<int64_t>(sizeof(WireCounts)) + c.rows * row_bytes +
                            c.pairs * static_cast<int64_t>(sizeof(WirePair));
    }
    if (!ok)
      return absl::InternalError(absl::StrCat("expert dispatch layer ", layer, ": rank ", s,
                                              " sent a malformed message of ", r_cnt_[s],
                                              " bytes"));
    recv_counts_[s] = c;
    r_off_[s] += static_cast<int64_t>(sizeof(WireCounts));
  }
  // Every rank sees every rank's epoch here, so all take the same decision: on a mismatch
  // (a placement switch applied on some ranks only) nobody computes rows for slots that mean
  // different experts on the two sides, and nothing returns; the group stays usable.
  for (int s = 0; s < n; ++s)
    if (recv_counts_[s].placement_epoch != placement.epoch()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "expert dispatch layer ", layer, ": placement epoch ", placement.epoch(),
          " on rank ", me, " but ", recv_counts_[s].placement_epoch, " on rank ", s));
    }

  // 5. Group received pairs by local slot (counting sort), widen rows to f32, compute.
  src_row_base_.assign(n + 1, 0);
  int64_t num_pairs = 0;
  for (int s = 0; s < n; ++s) {
    src_row_base_[s + 1] = src_row_base_[s] + recv_counts_[s].rows;
    num_pairs += recv_counts_[s].pairs;
  }
  const int64_t num_in_rows = src_row_base_[n];
  in_pairs_.resize(num_pairs);
  in_row_.resize(num_pairs);
  absl::Status bad_pair;
  {
    int64_t i = 0;
    for (int s = 0; s < n; ++s) {
      const char* p = s == me ? reinterpret_cast<const char*>(pairs_to_[me].data())
                              : recv_buf_.data() + r_off_[s] + recv_counts_[s].rows * row_bytes;
      if (recv_counts_[s].pairs > 0)
        std::memcpy(&in_pairs_[i], p, recv_counts_[s].pairs * sizeof(WirePair));
      for (int64_t j = 0; j < recv_counts_[s].pairs; ++j, ++i) {
        const WirePair& pr = in_pairs_[i];
        if (pr.local_slot < 0 || pr.local_slot >= spr || pr.row < 0 ||
            pr.row >= recv_counts_[s].rows) {
          bad_pair = absl::InternalError(absl::StrCat(
              "expert dispatch layer ", layer, ": rank ", s, " sent a malformed pair"));
          in_pairs_[i] = {0, 0, 0.f};
          in_row_[i] = -1;
          continue;
        }
        in_row_[i] = src_row_base_[s] + pr.row;
      }
    }
  }
  if (!bad_pair.ok()) num_pairs = 0;  // compute nothing; still take part in the return
  slot_offsets_.assign(spr + 1, 0);
  row_pairs_begin_.assign(num_in_rows + 1, 0);
  for (int64_t i = 0; i < num_pairs; ++i) {
    ++slot_offsets_[in_pairs_[i].local_slot + 1];
    ++row_pairs_begin_[in_row_[i] + 1];
  }
  for (int s = 0; s < spr; ++s) slot_offsets_[s + 1] += slot_offsets_[s];
  for (int64_t r = 0; r < num_in_rows; ++r) row_pairs_begin_[r + 1] += row_pairs_begin_[r];
  cursor_.assign(slot_offsets_.begin(), slot_offsets_.end() - 1);
  pos_of_pair_.resize(num_pairs);
  pairs_by_row_.resize(num_pairs);
  {
    std::vector<int64_t>& row_cursor = row_cursor_;
    row_cursor.assign(row_pairs_begin_.begin(), row_pairs_begin_.end() - 1);
    for (int64_t i = 0; i < num_pairs; ++i) {
      pos_of_pair_[i] = cursor_[in_pairs_[i].local_slot]++;
      pairs_by_row_[row_cursor[in_row_[i]]++] = i;
    }
  }
  // Source rank of every received row, so the row loops need no search.
  row_src_.resize(num_in_rows);
  for (int s = 0; s < n; ++s)
    std::fill(row_src_.begin() + src_row_base_[s], row_src_.begin() + src_row_base_[s + 1], s);
  // Address of received row g: this rank's own rows are read from x (f32), the others from
  // the receive buffer (wire dtype).
  auto in_row_ptr = [&](int64_t g) -> const char* {
    const int s = row_src_[g];
    const int64_t row = g - src_row_base_[s];
    if (s == me)
      return reinterpret_cast<const char*>(x + static_cast<int64_t>(tokens_to_[me][row]) * hidden);
    return recv_buf_.data() + r_off_[s] + row * row_bytes;
  };
  // The grouped rows stay where they are (x, or the receive buffer in the wire dtype): the
  // experts' kernel reads them by address.
  row_ptrs_.resize(num_pairs);
  row_bf16_.resize(num_pairs);
  for (int64_t i = 0; i < num_pairs; ++i) {
    row_ptrs_[pos_of_pair_[i]] = in_row_ptr(in_row_[i]);
    row_bf16_[pos_of_pair_[i]] = row_src_[in_row_[i]] != me && bf16() ? 1 : 0;
  }
  const double group_s = Lap(&t0);
  results_.resize(num_pairs * hidden);
  expert_rows->row_ptrs = row_ptrs_.data();
  expert_rows->row_bf16 = row_bf16_.data();
  expert_rows->slot_offsets = slot_offsets_.data();
  expert_rows->num_rows = num_pairs;
  expert_rows->out = results_.data();
  call_ = Call{true,     layer,    num_tokens, hidden,  K,       T,       num_pairs, num_in_rows,
               route,    bad_pair, layout_s,   counts_s, pack_s, dispatch_s, group_s, t0};
  return absl::OkStatus();
}

absl::Status EpDispatcher::Combine(int layer, float* out) {
  if (!call_.open || call_.layer != layer)
    return absl::FailedPreconditionError(
        absl::StrCat("expert combine layer ", layer, " without its dispatch"));
  call_.open = false;
  const int n = comm_->world_size();
  const int me = comm_->rank();
  const int64_t num_tokens = call_.num_tokens, hidden = call_.hidden, K = call_.K, T = call_.T;
  const int64_t num_pairs = call_.num_pairs, num_in_rows = call_.num_in_rows;
  const int64_t row_bytes = static_cast<int64_t>(ElemBytes()) * hidden;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, hidden * 4));
  auto t0 = call_.dispatched;
  const double expert_s = Lap(&t0);  // the caller's experts ran between the two phases

  // 6. Pre-sum Σ weight · y per received row straight into the return buffer in the wire
  // dtype (one pass: read each result once, write each returned row once). Its layout is
  // that of the received rows: rank s gets recv_counts_[s].rows rows back, in its order.
  // This rank's own rows are not pre-summed: step 7 reads their results directly.
  for (int d = 0; d < n; ++d) {
    s_cnt_[d] = d == me ? 0 : recv_counts_[d].rows * row_bytes;
    r_cnt_[d] = d == me ? 0 : send_counts_[d].rows * row_bytes;
  }
  int64_t ret_send_total = 0, ret_recv_total = 0;
  for (int d = 0; d < n; ++d) {
    s_off_[d] = ret_send_total;
    ret_send_total += s_cnt_[d];
    r_off_[d] = ret_recv_total;
    ret_recv_total += r_cnt_[d];
  }
  ret_send_.resize(std::max<int64_t>(ret_send_total, 1));
  ret_recv_.resize(std::max<int64_t>(ret_recv_total, 1));
  // Gathers the weighted results of received row g into (ys, ws).
  auto add_row_terms = [&](int64_t g, std::vector<const float*>* ys, std::vector<float>* ws) {
    for (int64_t j = row_pairs_begin_[g]; j < row_pairs_begin_[g + 1]; ++j) {
      const int64_t i = pairs_by_row_[j];
      ys->push_back(&results_[pos_of_pair_[i] * hidden]);
      ws->push_back(in_pairs_[i].weight);
    }
  };
  For(num_in_rows, grain, [&](int64_t b, int64_t e) {
    std::vector<const float*> ys;
    std::vector<float> ws;
    for (int64_t g = b; g < e; ++g) {
      const int s = row_src_[g];
      if (s == me) continue;
      ys.clear();
      ws.clear();
      add_row_terms(g, &ys, &ws);
      RowSum sum;
      sum.y = ys.data();
      sum.w = ws.data();
      sum.num_y = static_cast<int>(ys.size());
      char* dst = ret_send_.data() + s_off_[s] + (g - src_row_base_[s]) * row_bytes;
      if (bf16()) {
        SumRows(sum, hidden, nullptr, reinterpret_cast<uint16_t*>(dst));
      } else {
        SumRows(sum, hidden, reinterpret_cast<float*>(dst), nullptr);
      }
    }
  });
  const double presum_s = Lap(&t0);
  // 7. Return and combine: out[t] = Σ over t's pairs computed here of weight · y (f32,
  // straight from the results) + Σ over t's other destination ranks of their partial sums.
  //   kAll:    one pass after the exchange (reads every input once, writes out once);
  //   kOwn:    (overlap_combine) while the partial sums are in flight, or this rank waits
  //            for a slower peer: the own share of every token served here (tokens with no
  //            destination at all get zeros; tokens served only remotely wait for kRemote);
  //   kRemote: after the exchange, the partial sums are added to what kOwn wrote. A token
  //            served here and remotely is read and written twice; the exchange hides kOwn.
  enum class Merge { kAll, kOwn, kRemote };
  auto merge = [&](Merge what) {
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
        for (int64_t j = 0; t < T && j < K && token_dest_[t * K + j] >= 0; ++j) {
          const int d = token_dest_[t * K + j];
          const int64_t row = token_row_[t * K + j];
          if (d == me) {
            own = true;
            if (what != Merge::kRemote) add_row_terms(src_row_base_[me] + row, &ys, &ws);
          } else {
            remote = true;
            if (what != Merge::kOwn) parts.push_back(ret_recv_.data() + r_off_[d] + row * row_bytes);
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
  };
  double merge_own_s = 0;
  if (options_.overlap_combine) {
    std::unique_ptr<PendingAllToAllV> ret = comm_->StartAllToAllV(
        ret_send_.data(), s_cnt_, s_off_, ret_recv_.data(), r_cnt_, r_off_);
    merge(Merge::kOwn);
    merge_own_s = Lap(&t0);
    SY_RETURN_IF_ERROR(
        sy::Annotate(ret->Wait(), absl::StrCat("expert combine layer ", layer)));
  } else {
    SY_RETURN_IF_ERROR(sy::Annotate(comm_->AllToAllV(ret_send_.data(), s_cnt_, s_off_,
                                                     ret_recv_.data(), r_cnt_, r_off_),
                                    absl::StrCat("expert combine layer ", layer)));
  }
  const double combine_s = Lap(&t0);
  merge(options_.overlap_combine ? Merge::kRemote : Merge::kAll);
  const double merge_s = merge_own_s + Lap(&t0);

  // Counters.
  {
    sy::MutexLock lock(&stats_mu_);
    ++stats_.calls;
    stats_.tokens += T;
    stats_.pairs_computed += num_pairs;
    for (int d = 0; d < n; ++d) {
      if (d == me) continue;
      stats_.rows_sent += send_counts_[d].rows;
      stats_.dispatch_bytes += dispatch_sent_[d];
      stats_.combine_bytes += s_cnt_[d];
    }
    stats_.counts_seconds += call_.counts_s;
    stats_.dispatch_seconds += call_.dispatch_s;
    stats_.combine_seconds += combine_s;
    stats_.layout_seconds += call_.layout_s;
    stats_.pack_seconds += call_.pack_s;
    stats_.group_seconds += call_.group_s;
    stats_.expert_seconds += expert_s;
    stats_.presum_seconds += presum_s;
    stats_.merge_seconds += merge_s;
    bool known = true;
    for (int s = 0; s < n; ++s) known = known && recv_counts_[s].sender_last_load >= 0;
    if (known) {
      for (int s = 0; s < n; ++s) {
        stats_.last_rank_load[s] = recv_counts_[s].sender_last_load;
        stats_.total_rank_load[s] += recv_counts_[s].sender_last_load;
      }
      const int64_t mx =
          *std::max_element(stats_.total_rank_load.begin(), stats_.total_rank_load.end());
      const double mean =
          std::accumulate(stats_.total_rank_load.begin(), stats_.total_rank_load.end(), 0.0) /
          n;
      stats_.balancedness = mx > 0 ? mean / static_cast<double>(mx) : 1.0;
    }
  }
  last_load_ = num_pairs;
  if (!call_.route.ok())
    return sy::Annotate(call_.route, absl::StrCat("expert dispatch layer ", layer));
  return call_.bad_pair;
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
