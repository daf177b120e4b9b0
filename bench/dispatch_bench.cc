// dispatch_bench: expert-parallel dispatch + combine (parallel/ep_dispatch.h) against a bare
// all-to-all-v of the same bytes on the same communicator, in the style of nccl-tests: per
// configuration the bytes each rank sends, the time, algbw = bytes / time, busbw = algbw ·
// (n − 1) / n, our overhead over the bare exchange, and a check of the combined output
// against a plain reference in the same run.
//
// Engines: local (ranks as threads), gloo (ranks as forked processes over 127.0.0.1), nccl
// (one rank per GPU as threads; only in a CUDA build with a device).
//
// "ours" is the wall time of DispatchCombine minus the time inside the expert callback (a
// per-expert scale, y = (1 + e/64) · x, timed and reported separately as "expert"). The
// callback runs between the two exchanges with nothing in flight, so subtracting it removes
// exactly the expert math and nothing else; everything else the dispatcher does — routing,
// the counts exchange, packing and bf16 conversion, grouping, the weighted pre-sum, the
// combine, waiting for peers — stays in "ours" (with --overlap_combine the own share of the
// combine runs while the return exchange is in flight; it is still wall time in "ours").
// "bare" is AllToAllV(dispatch bytes) + AllToAllV(return bytes) with the per-peer counts of
// our layout, own block included as nccl-tests does (our dispatcher keeps its own rows off
// the wire), on pre-filled buffers right after a barrier. overhead = ours / bare − 1.
// "in-comm" is the part of "ours" spent inside the communicator (counts + rows + return
// exchanges, waits for peers included).
//
//   dispatch_bench [--engines=local,gloo,nccl] [--tokens=256,1024,4096] [--hidden=1024]
//                  [--experts=8] [--topk=2] [--wire=bf16,f32] [--iters=10] [--local_ranks=2,4]
//                  [--gloo_ranks=2] [--threads_per_rank=1] [--stat=median|min]
//                  [--overlap_combine]
//
// Each row is followed by "# phases": the dispatcher's own per-phase wall times
// (EpDispatchStats): layout, counts (exchange), pack, rows (exchange), group, presum, return
// (exchange), merge. The exchanges include waiting for the slowest peer.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "parallel/ep_dispatch.h"
#include "parallel/gloo_communicator.h"
#include "parallel/tcp_communicator.h"
#include "parallel/local_communicator.h"
#include "parallel/nccl_communicator.h"
#include "server/flags.h"

#ifdef SY_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace sy::bench {
namespace {

using parallel::Communicator;
using parallel::WireDType;

struct Config {
  std::string engine;
  int ranks = 2;
  int64_t tokens = 4096, hidden = 1024, experts = 8, topk = 2;
  WireDType wire = WireDType::kBF16;
  int iters = 10, warmup = 2;
  int threads_per_rank = 1;  // > 1: the dispatcher's row loops run on a pool of this size
  bool use_min = false;      // report the fastest iteration instead of the median
  bool overlap_combine = false;  // EpDispatchOptions::overlap_combine
};

constexpr const char* kPhaseNames[] = {"layout", "counts", "pack", "rows", "group",
                                       "presum", "return", "merge"};

// The phase times of one call: the difference of two cumulative stats snapshots.
std::vector<double> PhaseSeconds(const parallel::EpDispatchStats& a,
                                 const parallel::EpDispatchStats& b) {
  return {b.layout_seconds - a.layout_seconds,   b.counts_seconds - a.counts_seconds,
          b.pack_seconds - a.pack_seconds,       b.dispatch_seconds - a.dispatch_seconds,
          b.group_seconds - a.group_seconds,     b.presum_seconds - a.presum_seconds,
          b.combine_seconds - a.combine_seconds, b.merge_seconds - a.merge_seconds};
}

// Per rank, reduced over ranks by the caller.
constexpr int kNumPhases = 8;

struct RankResult {
  double ours_s = 0, bare_s = 0, expert_s = 0;
  double comm_s = 0;   // of ours_s: time inside the communicator (counts + rows + return)
  double bytes = 0;    // bytes this rank sent (dispatch + return, own block included)
  double max_err = 0;  // max |out − reference|
  double ok = 1;
  // Medians of the dispatcher's phases (EpDispatchStats), seconds: layout, counts, pack,
  // rows, group, presum, return, merge.
  double phase_s[kNumPhases] = {};
};

float ExpertScale(int32_t e) { return 1.f + static_cast<float>(e) / 64.f; }

RankResult BenchRank(Communicator* comm, const Config& cfg) {
  const int n = comm->world_size(), me = comm->rank();
  const int64_t T = cfg.tokens, H = cfg.hidden, K = cfg.topk, E = cfg.experts;
  std::mt19937 rng(1234 + me);
  std::uniform_real_distribution<float> u(-1.f, 1.f), uw(0.1f, 1.f);
  std::vector<float> x(T * H), w(T * K), out(T * H);
  std::vector<int32_t> ids(T * K);
  for (auto& v : x) v = u(rng);
  std::vector<int32_t> pool(E);
  for (int64_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) pool[e] = e;
    float sum = 0;
    for (int64_t k = 0; k < K; ++k) {  // K distinct experts (partial Fisher–Yates)
      std::swap(pool[k], pool[k + rng() % (E - k)]);
      ids[t * K + k] = pool[k];
      sum += w[t * K + k] = uw(rng);
    }
    for (int64_t k = 0; k < K; ++k) w[t * K + k] /= sum;
  }
  auto placement = std::make_shared<const parallel::ExpertPlacement>(
      parallel::ExpertPlacement::Contiguous(1, static_cast<int>(E), n));
  // Created here, after any fork, so a rank process owns its pool's threads.
  std::unique_ptr<ThreadPool> row_pool;
  if (cfg.threads_per_rank > 1) row_pool = std::make_unique<ThreadPool>(cfg.threads_per_rank);
  auto made = parallel::MakeExpertParallelDispatcher(
      comm, placement,
      {.wire_dtype = cfg.wire, .pool = row_pool.get(), .overlap_combine = cfg.overlap_combine});
  RankResult res;
  if (!made.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", me, made.status().ToString().c_str());
    res.ok = 0;
    return res;
  }
  parallel::ExpertParallelDispatcher* disp = made->get();
  double expert_s = 0;
  auto compute = [&](int l, const float* rows, const int64_t* off, float* y) {
    const double t0 = Seconds();
    for (int64_t s = 0; s < disp->num_local_slots(l); ++s) {
      const float a = ExpertScale(disp->local_slot_expert(l, s));
      for (int64_t i = off[s] * H; i < off[s + 1] * H; ++i) y[i] = a * rows[i];
    }
    expert_s += Seconds() - t0;
  };

  // The same per-peer byte counts the dispatcher sends (same routing rule, same layout).
  const int64_t elt = cfg.wire == WireDType::kBF16 ? 2 : 4;
  std::vector<int32_t> slots(T * K);
  if (!parallel::ChooseSlots(*placement, 0, me, ids.data(), T, K, slots.data()).ok()) res.ok = 0;
  std::vector<int64_t> rows_to(n, 0), pairs_to(n, 0);
  for (int64_t t = 0; t < T; ++t) {
    std::set<int> dests;
    for (int64_t k = 0; k < K; ++k) dests.insert(placement->rank_of_slot(slots[t * K + k]));
    for (int d : dests) ++rows_to[d];
    for (int64_t k = 0; k < K; ++k) ++pairs_to[placement->rank_of_slot(slots[t * K + k])];
  }
  std::vector<int64_t> rows_from(n), pairs_from(n);
  if (!comm->AllToAll(rows_to.data(), rows_from.data(), 8).ok() ||
      !comm->AllToAll(pairs_to.data(), pairs_from.data(), 8).ok())
    res.ok = 0;
  std::vector<int64_t> ds(n), dso(n), dr(n), dro(n), cs(n), cso(n), cr(n), cro(n);
  int64_t a = 0, b = 0, c = 0, d = 0;
  for (int p = 0; p < n; ++p) {
    ds[p] = rows_to[p] * H * elt + pairs_to[p] * 12;
    dr[p] = rows_from[p] * H * elt + pairs_from[p] * 12;
    cs[p] = rows_from[p] * H * elt;
    cr[p] = rows_to[p] * H * elt;
    dso[p] = a, a += ds[p];
    dro[p] = b, b += dr[p];
    cso[p] = c, c += cs[p];
    cro[p] = d, d += cr[p];
  }
  res.bytes = static_cast<double>(a + c);
  std::vector<char> dsend(a + 1, 1), drecv(b + 1), csend(c + 1, 2), crecv(d + 1);

  std::vector<double> ours, bare, expert, in_comm;
  std::vector<std::vector<double>> phases(kNumPhases);
  for (int it = 0; it < cfg.warmup + cfg.iters; ++it) {
    if (!comm->Barrier().ok()) res.ok = 0;
    expert_s = 0;
    const parallel::EpDispatchStats before = disp->stats();
    double t0 = Seconds();
    absl::Status s = disp->DispatchCombine(0, x.data(), T, H, ids.data(), w.data(), K, compute,
                                           out.data());
    const double t_ours = Seconds() - t0;
    const parallel::EpDispatchStats after = disp->stats();
    const double t_comm = (after.counts_seconds + after.dispatch_seconds +
                           after.combine_seconds) -
                          (before.counts_seconds + before.dispatch_seconds +
                           before.combine_seconds);
    if (!s.ok()) {
      std::fprintf(stderr, "rank %d: %s\n", me, s.ToString().c_str());
      res.ok = 0;
      break;
    }
    if (!comm->Barrier().ok()) res.ok = 0;
    t0 = Seconds();
    if (!comm->AllToAllV(dsend.data(), ds, dso, drecv.data(), dr, dro).ok() ||
        !comm->AllToAllV(csend.data(), cs, cso, crecv.data(), cr, cro).ok())
      res.ok = 0;
    const double t_bare = Seconds() - t0;
    if (it >= cfg.warmup) {
      ours.push_back(t_ours - expert_s);
      bare.push_back(t_bare);
      expert.push_back(expert_s);
      in_comm.push_back(t_comm);
      const std::vector<double> ph = PhaseSeconds(before, after);
      for (int p = 0; p < kNumPhases; ++p) phases[p].push_back(ph[p]);
    }
  }
  auto stat = [&](const std::vector<double>& v) {
    return cfg.use_min ? (v.empty() ? 0 : *std::min_element(v.begin(), v.end())) : Median(v);
  };
  res.ours_s = stat(ours);
  res.bare_s = stat(bare);
  res.expert_s = stat(expert);
  res.comm_s = stat(in_comm);
  for (int p = 0; p < kNumPhases; ++p) res.phase_s[p] = stat(phases[p]);
  // Check: out[t] = Σ_k w_k (1 + e_k/64) x[t]. bf16 rounds x on the way out and the
  // pre-summed rows on the way back: 2 · 2^-8 relative of values ≤ ~1.3.
  for (int64_t t = 0; t < T; ++t) {
    float scale = 0;
    for (int64_t k = 0; k < K; ++k) scale += w[t * K + k] * ExpertScale(ids[t * K + k]);
    for (int64_t i = 0; i < H; ++i)
      res.max_err = std::max<double>(res.max_err, std::abs(out[t * H + i] - scale * x[t * H + i]));
  }
  const double tol = cfg.wire == WireDType::kBF16 ? 1.5e-2 : 1e-5;
  if (res.max_err > tol) res.ok = 0;
  return res;
}

// Reduces every rank's result over the communicator (max times and error, mean bytes, all ok).
RankResult Reduce(Communicator* comm, const RankResult& r) {
  const int n = comm->world_size();
  std::vector<RankResult> all(n);
  RankResult out;
  if (!comm->AllGather(&r, sizeof(r), all.data()).ok()) {
    out.ok = 0;
    return out;
  }
  out.bytes = 0;
  for (const auto& a : all) {
    out.ours_s = std::max(out.ours_s, a.ours_s);
    out.bare_s = std::max(out.bare_s, a.bare_s);
    out.expert_s = std::max(out.expert_s, a.expert_s);
    out.comm_s = std::max(out.comm_s, a.comm_s);
    out.max_err = std::max(out.max_err, a.max_err);
    out.bytes += a.bytes / n;
    out.ok = std::min(out.ok, a.ok);
    for (int p = 0; p < kNumPhases; ++p) out.phase_s[p] = std::max(out.phase_s[p], a.phase_s[p]);
  }
  return out;
}

void PrintHeader() {
  std::printf(
      "#%-6s %5s %6s %6s %4s %3s %5s %10s | %10s %10s %7s %7s | %10s %7s %7s | %8s %10s %9s "
      "%5s\n",
      "engine", "ranks", "tokens", "hidden", "E", "k", "wire", "size(B)", "ours(us)",
      "in-comm(us)", "algbw", "busbw", "bare(us)", "algbw", "busbw", "overhead", "expert(us)",
      "max_err", "check");
  std::printf(
      "#%-6s %5s %6s %6s %4s %3s %5s %10s | %10s %10s %7s %7s | %10s %7s %7s | %8s %10s %9s "
      "%5s\n",
      "", "", "", "", "", "", "", "per rank", "", "", "GB/s", "GB/s", "", "GB/s", "GB/s", "",
      "(excluded)", "", "");
  std::fflush(stdout);
}

void PrintRow(const Config& cfg, const RankResult& r) {
  const int n = cfg.ranks;
  const double alg = r.bytes / r.ours_s / 1e9, bare_alg = r.bytes / r.bare_s / 1e9;
  const double f = n > 1 ? (n - 1.0) / n : 1.0;
  std::printf(
      " %-6s %5d %6ld %6ld %4ld %3ld %5s %10.0f | %10.1f %10.1f %7.2f %7.2f | %10.1f %7.2f %7.2f "
      "| %7.1f%% %10.1f %9.2e %5s\n",
      cfg.engine.c_str(), n, static_cast<long>(cfg.tokens), static_cast<long>(cfg.hidden),
      static_cast<long>(cfg.experts), static_cast<long>(cfg.topk),
      cfg.wire == WireDType::kBF16 ? "bf16" : "f32", r.bytes, r.ours_s * 1e6, r.comm_s * 1e6,
      alg, alg * f,
      r.bare_s * 1e6, bare_alg, bare_alg * f, (r.ours_s / r.bare_s - 1) * 100, r.expert_s * 1e6,
      r.max_err, r.ok > 0 ? "OK" : "FAIL");
  std::printf("#   phases (us, %s per rank, max over ranks):", cfg.use_min ? "min" : "median");
  for (int p = 0; p < kNumPhases; ++p) std::printf(" %s %.0f", kPhaseNames[p], r.phase_s[p] * 1e6);
  std::printf("\n");
  std::fflush(stdout);
}

bool RunLocal(const Config& cfg) {
  parallel::LocalCommunicatorGroup group(cfg.ranks, std::chrono::milliseconds(120000));
  RankResult row;
  std::vector<std::thread> threads;
  for (int r = 0; r < cfg.ranks; ++r)
    threads.emplace_back([&, r] {
      RankResult red = Reduce(group.comm(r), BenchRank(group.comm(r), cfg));
      if (r == 0) row = red;
    });
  for (auto& t : threads) t.join();
  PrintRow(cfg, row);
  return row.ok > 0;
}

// Ranks as forked processes over 127.0.0.1 on the gloo or the tcp engine.
bool RunProcesses(const Config& cfg, bool tcp) {
  char tmpl[] = "/tmp/sy-dispatch-bench-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  std::fflush(stdout);
  std::vector<pid_t> pids;
  for (int r = 0; r < cfg.ranks; ++r) {
    pid_t pid = fork();
    if (pid == 0) {
      parallel::FileRendezvousStore store(dir);
      const std::chrono::milliseconds timeout(120000);
      auto comm = tcp ? parallel::CreateTcpCommunicator({.rank = r,
                                                         .world_size = cfg.ranks,
                                                         .store = &store,
                                                         .prefix = "bench",
                                                         .timeout = timeout})
                      : parallel::CreateGlooCommunicator({.rank = r,
                                                          .world_size = cfg.ranks,
                                                          .store = &store,
                                                          .prefix = "bench",
                                                          .timeout = timeout});
      if (!comm.ok()) {
        std::fprintf(stderr, "rank %d: %s\n", r, comm.status().ToString().c_str());
        _exit(2);
      }
      RankResult red = Reduce(comm->get(), BenchRank(comm->get(), cfg));
      if (r == 0) PrintRow(cfg, red);
      std::fflush(stdout);
      _exit(red.ok > 0 ? 0 : 1);
    }
    pids.push_back(pid);
  }
  bool ok = true;
  for (pid_t pid : pids) {
    int ws = 0;
    waitpid(pid, &ws, 0);
    ok = ok && WIFEXITED(ws) && WEXITSTATUS(ws) == 0;
  }
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return ok;
}

// SY_REQUIRE_GPU=1 (the GPU host's check): a skipped nccl row is a failure.
bool GpuRequired() {
  const char* v = std::getenv("SY_REQUIRE_GPU");
  return v != nullptr && std::string(v) == "1";
}

bool RunNccl(Config cfg) {
#ifdef SY_HAVE_CUDA
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("# nccl: no CUDA device, %s\n", GpuRequired() ? "FAILED (SY_REQUIRE_GPU=1)" : "skipped");
    return !GpuRequired();
  }
  cfg.ranks = devices;
  parallel::MemoryRendezvousStore store;
  RankResult row;
  bool ok = true;
  std::vector<std::thread> threads;
  for (int r = 0; r < devices; ++r)
    threads.emplace_back([&, r] {
      auto comm = parallel::CreateNcclCommunicator({.rank = r,
                                                    .world_size = devices,
                                                    .store = &store,
                                                    .device = r,
                                                    .timeout = std::chrono::milliseconds(120000)});
      if (!comm.ok()) {
        std::fprintf(stderr, "rank %d: %s\n", r, comm.status().ToString().c_str());
        ok = false;
        return;
      }
      RankResult red = Reduce(comm->get(), BenchRank(comm->get(), cfg));
      if (r == 0) row = red;
    });
  for (auto& t : threads) t.join();
  if (!ok) return false;
  PrintRow(cfg, row);
  return row.ok > 0;
#else
  std::printf("# nccl: built without CUDA, %s\n",
              GpuRequired() ? "FAILED (SY_REQUIRE_GPU=1)" : "skipped");
  return !GpuRequired();
#endif
}

std::vector<int64_t> ParseList(const std::string& s) {
  std::vector<int64_t> out;
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int64_t v = 0;
    if (absl::SimpleAtoi(part, &v)) out.push_back(v);
  }
  return out;
}

}  // namespace
}  // namespace sy::bench

int main(int argc, char** argv) {
  using namespace sy::bench;
  std::string engines = "local,gloo,nccl", tokens = "256,1024,4096", wires = "bf16,f32",
              local_ranks = "2,4", gloo_ranks = "2";
  int64_t hidden = 1024, experts = 8, topk = 2;
  int iters = 10, threads_per_rank = 1;
  std::string stat = "median";
  bool overlap_combine = false;
  sy::server::FlagSet flags("dispatch_bench", "expert dispatch+combine vs bare all-to-all-v");
  flags.Add("engines", &engines, "comma list of local, gloo, tcp, nccl");
  flags.Add("tokens", &tokens, "comma list of tokens per rank");
  flags.Add("hidden", &hidden, "hidden size");
  flags.Add("experts", &experts, "logical experts (contiguous placement)");
  flags.Add("topk", &topk, "experts per token");
  flags.Add("wire", &wires, "comma list of bf16, f32");
  flags.Add("iters", &iters, "timed iterations (median reported), after 2 warm-up ones");
  flags.Add("threads_per_rank", &threads_per_rank,
            "threads of each rank's dispatcher pool (1: inline on the rank's thread)");
  flags.Add("stat", &stat,
            "median (default) or min: the fastest iteration of each quantity, the least "
            "disturbed one on a shared machine");
  flags.Add("overlap_combine", &overlap_combine,
            "combine the own share while the return exchange is in flight");
  flags.Add("local_ranks", &local_ranks, "comma list of thread counts for the local engine");
  flags.Add("gloo_ranks", &gloo_ranks, "comma list of process counts for the gloo and tcp engines");
  absl::Status s = flags.Parse(argc, argv);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
    return s.code() == absl::StatusCode::kCancelled ? 0 : 2;
  }
  if (topk < 1 || topk > experts) {
    std::fprintf(stderr, "--topk must be in [1, --experts]\n");
    return 2;
  }
  PrintHeader();
  bool ok = true;
  for (absl::string_view engine : absl::StrSplit(engines, ',', absl::SkipEmpty())) {
    for (absl::string_view wire : absl::StrSplit(wires, ',', absl::SkipEmpty())) {
      for (int64_t t : ParseList(tokens)) {
        Config cfg;
        cfg.engine = std::string(engine);
        cfg.tokens = t;
        cfg.hidden = hidden;
        cfg.experts = experts;
        cfg.topk = topk;
        cfg.iters = iters;
        cfg.threads_per_rank = threads_per_rank;
        cfg.use_min = stat == "min";
        cfg.overlap_combine = overlap_combine;
        cfg.wire = wire == "f32" ? sy::parallel::WireDType::kF32 : sy::parallel::WireDType::kBF16;
        if (engine == "local") {
          for (int64_t r : ParseList(local_ranks)) {
            cfg.ranks = static_cast<int>(r);
            ok = RunLocal(cfg) && ok;
          }
        } else if (engine == "gloo" || engine == "tcp") {
          for (int64_t r : ParseList(gloo_ranks)) {
            cfg.ranks = static_cast<int>(r);
            ok = RunProcesses(cfg, engine == "tcp") && ok;
          }
        } else if (engine == "nccl") {
          ok = RunNccl(cfg) && ok;
        } else {
          std::fprintf(stderr, "unknown engine %s\n", std::string(engine).c_str());
          return 2;
        }
      }
    }
  }
  std::printf("# %s\n", ok ? "all results checked OK" : "SOME RESULTS FAILED");
  return ok ? 0 : 1;
}
