// The `ilp` planner: one mixed-integer program per layer (DESIGN.md §4), solved by CBC over
// CLP, warm-started from greedy (DeepSeek EPLB), bounded by a wall-clock limit.
//
// Variables, per layer (R ranks, S slots per rank, E experts, P credited pairs, W load
// scenarios: w = 0 the mean loads, 1..W-1 the windows of PlacementProblem::scenario_loads):
//   x[e,r] in {0,1}   rank r holds a replica of expert e
//   z[e,r] in [0,1]   the share of expert e's tokens served on r
//   M_w               the straggler rank's load in scenario w
//   y[p,r] in [0,1]   pair p = (e,f) is co-located on r (credited)
// Constraints:
//   sum_e x[e,r] <= S                 slots
//   sum_r x[e,r] >= 1                 every expert placed
//   z[e,r] <= x[e,r]                  tokens only where a replica is
//   sum_r z[e,r] = 1                  all tokens served
//   sum_e load_w[e] z[e,r] <= M_w     M_w is scenario w's straggler load (one set of shares
//                                     serves every window)
//   y[p,r] <= x[e,r], y[p,r] <= x[f,r], sum_r y[p,r] <= 1
//   sum_{p owns e} y[p,r] <= (S-1) x[e,r]   e has at most S-1 neighbours on r; this keeps
//                                     the LP bound honest (with y <= x alone the relaxation
//                                     credits every pair)
//   M_w >= max_e load_w[e] / c[e]     c = the replica counts that minimise the largest load
//                                     per replica (highest-load-per-replica greedy is exact for
//                                     that, each expert at most R replicas): a valid cut that
//                                     lifts the LP bound when one hot expert sets the pace;
//                                     with no spare slot (E = R S) the hottest expert's rank
//                                     also holds the S-1 lightest others
//   M_w <= (1 + balance_slack) * M_w(greedy)   (optional) in no scenario balance worse than
//                                     greedy (EPLB on the mean loads, the baseline)
//   sum_e load[e] z[e,r] >= sum_e load[e] z[e,r+1]   without a current placement: ranks in
//                                     descending order of mean load (symmetry breaking)
// With M = (1/W) sum_w M_w (the expected straggler load; M_0 alone without scenarios or with
// PlannerOptions::average_scenarios off):
// Objective: M + lambda * (sum_e load[e] - sum_{e,r} load[e] x[e,r] / R
//                         - (1-1/R) (2/k) sum_p w[p] sum_r y[p,r])
//              + mu * sum_{(e,r) not held now} bytes[e]/mean_bytes * x[e,r]
// (the traffic term of planner.h, linearised: its pair saving never exceeds the y credit, so
// this objective never exceeds EvaluateObjective's and its bounds stay valid)
// (migration m[e,r] >= x[e,r] - x_old[e,r] needs no variable: where x_old = 1 it is 0,
// elsewhere m = x.)
// The reported bound is the planner's own (CBC's is not used; see the end of PlanLayer): the
// best of the root LP, the analytic one, and the pair-credit bound (credit_bound.h: an LP over
// connected expert sets that bounds the co-located pair weight of any placement, far below
// "every credited pair", and, with no spare slot and M the mean loads' straggler, taken
// jointly with M).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>

#include "CbcHeuristic.hpp"
#include "CbcHeuristicLocal.hpp"
#include "CbcHeuristicRINS.hpp"
#include "CbcModel.hpp"
#include "CglClique.hpp"
#include "CglFlowCover.hpp"
#include "CglGomory.hpp"
#include "CglKnapsackCover.hpp"
#include "CglMixedIntegerRounding2.hpp"
#include "CglProbing.hpp"
#include "CoinPackedMatrix.hpp"
#include "OsiClpSolverInterface.hpp"
#include "absl/strings/str_cat.h"
#include "parallel/planner/credit_bound.h"
#include "parallel/planner/eplb.h"
#include "parallel/planner/planner.h"

namespace sy::parallel::planner {
namespace {

double ThreadCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// The weight of each scenario's straggler load in the objective's M (PlannerOptions::
// average_scenarios): 1/W each, or all on the mean loads (scenario 0).
std::vector<double> ScenarioWeights(const PlacementProblem& p, const PlannerOptions& o) {
  const int W = p.num_scenarios();
  std::vector<double> sw(W, o.average_scenarios ? 1.0 / W : 0.0);
  if (!o.average_scenarios) sw[0] = 1.0;
  return sw;
}

// Lower bound on M from replica counts alone (see the header comment), for one scenario's
// loads.
double ReplicaLowerBound(const PlacementProblem& p, const std::vector<double>& loads) {
  const int E = p.num_experts, R = p.world_size;
  std::vector<int> c(E, 1);
  int spare = p.num_slots() - E;
  double total = 0;
  for (double l : loads) total += l;
  auto worst = [&]() {
    int best = 0;
    for (int e = 1; e < E; ++e) {
      if (loads[e] / c[e] > loads[best] / c[best]) best = e;
    }
    return best;
  };
  while (spare > 0) {
    const int e = worst();
    if (c[e] >= R) break;  // the worst expert is on every rank already
    ++c[e];
    --spare;
  }
  const int e = worst();
  double bound = std::max(loads[e] / c[e], total / R);
  if (p.num_slots() == E && p.slots_per_rank > 1) {
    // No spare slot: every expert has one replica and every rank exactly S of them, so the
    // rank of the hottest expert also carries at least the S-1 lightest others.
    std::vector<double> sorted = loads;
    std::sort(sorted.begin(), sorted.end());
    const int S = p.slots_per_rank;
    double lightest = 0;
    for (int i = 0; i < S - 1; ++i) lightest += sorted[i];
    bound = std::max(bound, sorted.back() + lightest);
    // The m hottest together: either two of them share a rank (which then carries at least
    // the two smaller of them and the S-2 lightest others), or they sit on m ranks that also
    // hold m(S-1) others, so the busiest of those carries at least their average.
    double hot = sorted[E - 1], fill = lightest;
    for (int m = 2; m <= R && m * S <= E; ++m) {
      hot += sorted[E - m];
      for (int i = (m - 1) * (S - 1); i < m * (S - 1); ++i) fill += sorted[i];
      const double shared = sorted[E - m] + sorted[E - m + 1] + (lightest - sorted[S - 2]);
      bound = std::max(bound, std::min(shared, (hot + fill) / m));
    }
  }
  return bound;
}

// Swap local search on the ILP objective with even shares: exchange the contents of two slots
// on different ranks (an empty slot included) when that lowers
// M + lambda * traffic + mu * migration (M averaged over the load scenarios) and keeps every
// scenario's straggler load under its cap (or, from a start above a cap, gets closer). Replica counts stay those of the start, so this only
// re-packs; it finds the co-location the LP relaxation is too weak to reach in a few seconds.
// First improvement, sweeps until none or the deadline.
std::vector<int32_t> SwapLocalSearch(const PlacementProblem& p, std::vector<int32_t> p2l,
                                     const PlannerOptions& o, const std::vector<double>& cap,
                                     int num_pairs,
                                     std::chrono::steady_clock::time_point deadline) {
  const int E = p.num_experts, R = p.world_size, S = p.slots_per_rank, W = p.num_scenarios();
  const std::vector<double> sw = ScenarioWeights(p, o);
  std::vector<int> count(E, 0);
  for (int32_t e : p2l) {
    if (e >= 0) ++count[e];
  }
  std::vector<int> held(static_cast<size_t>(E) * R, 0);  // replicas of e on r
  std::vector<double> rank_load(static_cast<size_t>(W) * R, 0.0);  // [W][R]
  for (int s = 0; s < R * S; ++s) {
    if (p2l[s] < 0) continue;
    held[p2l[s] * R + s / S] += 1;
    for (int w = 0; w < W; ++w) rank_load[w * R + s / S] += p.scenario(w)[p2l[s]] / count[p2l[s]];
  }
  double mean_bytes = 0;
  for (double b : p.expert_bytes) mean_bytes += b;
  mean_bytes /= E;
  auto mig = [&](int e, int r) {
    if (!p.has_current() || p.CurrentlyOn(e, r)) return 0.0;
    return mean_bytes > 0 ? p.expert_bytes[e] / mean_bytes : 1.0;
  };
  // Credited pairs by expert, and per pair the copies its co-location saves (PairSaving with
  // even shares; kept up to date). Swaps keep each expert's replica count and its ranks
  // distinct, so the objective's per-expert traffic term does not change.
  std::vector<std::vector<int>> pairs_of(E);
  std::vector<double> saving(num_pairs, 0.0);
  auto pair_saving = [&](int q) {
    const auto& pr = p.pairs[q];
    int either = 0;
    double both = 0;
    for (int r = 0; r < R; ++r) {
      const int he = held[pr.e * R + r], hf = held[pr.f * R + r];
      either += (he > 0 || hf > 0);
      both += static_cast<double>(he) / count[pr.e] * hf / count[pr.f];
    }
    return pr.weight * (R - either) / R * both;
  };
  double credit = 0;
  for (int q = 0; q < num_pairs; ++q) {
    const auto& pr = p.pairs[q];
    pairs_of[pr.e].push_back(q);
    pairs_of[pr.f].push_back(q);
    saving[q] = pair_saving(q);
    credit += saving[q];
  }
  // One replica of e moves from rank `from` to rank `to`.
  auto move = [&](int e, int from, int to) {
    if (e < 0) return;
    for (int w = 0; w < W; ++w) {
      const double l = p.scenario(w)[e] / count[e];
      rank_load[w * R + from] -= l;
      rank_load[w * R + to] += l;
    }
    --held[e * R + from];
    ++held[e * R + to];
    for (int q : pairs_of[e]) {
      credit -= saving[q];
      saving[q] = pair_saving(q);
      credit += saving[q];
    }
  };
  // The objective's M (the straggler load averaged over scenarios) and how far the scenarios'
  // straggler loads exceed their caps.
  auto max_load = [&](double* violation) {
    double m = 0;
    *violation = 0;
    for (int w = 0; w < W; ++w) {
      const double mw = *std::max_element(rank_load.begin() + w * R, rank_load.begin() + (w + 1) * R);
      m += sw[w] * mw;
      *violation += std::max(0.0, mw - cap[w]);
    }
    return m;
  };
  const double pair_coef = o.lambda * (2.0 / p.top_k);
  bool improved = true;
  while (improved && std::chrono::steady_clock::now() < deadline) {
    improved = false;
    for (int s1 = 0; s1 < R * S; ++s1) {
      if (std::chrono::steady_clock::now() >= deadline) break;
      for (int s2 = (s1 / S + 1) * S; s2 < R * S; ++s2) {
        const int r1 = s1 / S, r2 = s2 / S;
        const int e1 = p2l[s1], e2 = p2l[s2];
        if (e1 == e2 || (e1 >= 0 && held[e1 * R + r2] > 0) ||
            (e2 >= 0 && held[e2 * R + r1] > 0)) {
          continue;
        }
        double v_before = 0, v_after = 0;
        const double m_before = max_load(&v_before), c_before = credit;
        double mig_delta = 0;
        if (e1 >= 0) mig_delta += mig(e1, r2) - mig(e1, r1);
        if (e2 >= 0) mig_delta += mig(e2, r1) - mig(e2, r2);
        move(e1, r1, r2);
        move(e2, r2, r1);
        const double m_after = max_load(&v_after);
        const double delta =
            (m_after - m_before) - pair_coef * (credit - c_before) + o.mu * mig_delta;
        if (v_after < v_before - 1e-12 || (v_after <= 1e-12 && delta < -1e-12)) {
          std::swap(p2l[s1], p2l[s2]);
          improved = true;
        } else {
          move(e2, r1, r2);  // undo, in reverse order
          move(e1, r2, r1);
        }
      }
    }
  }
  return p2l;
}

// The shares that minimise the straggler load averaged over scenarios for a fixed placement: a
// small LP over the occupied slots (min mean_w M_w; an expert's slot shares sum to 1; in
// scenario w a rank's tokens <= M_w <= cap_w). Fitting to several windows at once keeps the
// shares from chasing the noise of one. Empty when no expert has two replicas (nothing to
// choose) or the LP is infeasible.
std::vector<float> OptimalShares(const PlacementProblem& p, const std::vector<int32_t>& p2l,
                                 const std::vector<double>& cap, const PlannerOptions& o) {
  const std::vector<double> sw = ScenarioWeights(p, o);
  const int E = p.num_experts, R = p.world_size, S = p.slots_per_rank, n = R * S,
            W = p.num_scenarios();
  std::vector<std::vector<int>> slots_of(E);
  for (int s = 0; s < n; ++s) {
    if (p2l[s] >= 0) slots_of[p2l[s]].push_back(s);
  }
  bool any = false;
  for (const auto& v : slots_of) any = any || v.size() > 1;
  if (!any) return {};
  const int m0 = n;  // M_w, one per scenario
  CoinPackedMatrix matrix(false, 0, 0);
  matrix.setDimensions(0, n + W);
  std::vector<double> row_lb, row_ub;
  for (int e = 0; e < E; ++e) {
    std::vector<double> ones(slots_of[e].size(), 1.0);
    matrix.appendRow(static_cast<int>(slots_of[e].size()), slots_of[e].data(), ones.data());
    row_lb.push_back(1.0);
    row_ub.push_back(1.0);
  }
  for (int w = 0; w < p.num_scenarios(); ++w) {
    const std::vector<double>& loads = p.scenario(w);
    for (int r = 0; r < R; ++r) {
      std::vector<int> idx;
      std::vector<double> val;
      for (int s = r * S; s < (r + 1) * S; ++s) {
        if (p2l[s] < 0) continue;
        idx.push_back(s);
        val.push_back(loads[p2l[s]]);
      }
      idx.push_back(m0 + w);
      val.push_back(-1.0);
      matrix.appendRow(static_cast<int>(idx.size()), idx.data(), val.data());
      row_lb.push_back(-COIN_DBL_MAX);
      row_ub.push_back(0.0);
    }
  }
  std::vector<double> col_lb(n + W, 0.0), col_ub(n + W, 1.0), obj(n + W, 0.0);
  for (int s = 0; s < n; ++s) {
    if (p2l[s] < 0) col_ub[s] = 0.0;
  }
  for (int w = 0; w < W; ++w) {
    col_ub[m0 + w] = cap[w];
    // The windows also break ties when they are not in the objective: of the shares that
    // balance the mean loads best, those that hold up across the windows.
    obj[m0 + w] = sw[w] + (o.average_scenarios ? 0.0 : 1e-3 / W);
  }
  OsiClpSolverInterface lp;
  lp.messageHandler()->setLogLevel(0);
  lp.loadProblem(matrix, col_lb.data(), col_ub.data(), obj.data(), row_lb.data(), row_ub.data());
  lp.initialSolve();
  if (!lp.isProvenOptimal()) return {};
  const double* z = lp.getColSolution();
  std::vector<float> share(n, 0.0f);
  for (int e = 0; e < E; ++e) {
    double sum = 0;
    for (int s : slots_of[e]) sum += std::max(0.0, z[s]);
    for (int s : slots_of[e]) {
      share[s] = sum > 0 ? static_cast<float>(std::max(0.0, z[s]) / sum)
                         : 1.0f / static_cast<float>(slots_of[e].size());
    }
  }
  return share;
}

// Share of the time limit CBC may use; the rest is left for the share LPs and the choice
// among candidates after it, so a layer ends within its limit on an idle core.
constexpr double kSolveFraction = 0.85;

class IlpPlanner : public Planner {
 public:
  explicit IlpPlanner(const PlannerOptions& o) : options_(o) {}
  std::string name() const override { return "ilp"; }
  absl::StatusOr<LayerPlan> PlanLayer(const PlacementProblem& p) const override;

 private:
  PlannerOptions options_;
};

absl::StatusOr<LayerPlan> IlpPlanner::PlanLayer(const PlacementProblem& p) const {
  const auto start = std::chrono::steady_clock::now();
  const double cpu_start = ThreadCpuSeconds();
  auto st = p.Validate();
  if (!st.ok()) return st;
  const int E = p.num_experts, R = p.world_size, S = p.slots_per_rank;
  const double k = p.top_k;

  const int W = p.num_scenarios();
  // Warm start: greedy (DeepSeek EPLB on the mean loads: the baseline), and EPLB on each
  // expert's worst window load (replicas go to the experts whose load peaks, not only to the
  // hottest on average).
  PlannerOptions greedy_options = options_;
  greedy_options.distinct_ranks = true;
  auto greedy = MakeGreedyPlanner(greedy_options)->PlanLayer(p);
  if (!greedy.ok()) return greedy.status();
  const ObjectiveTerms greedy_terms =
      EvaluateObjective(p, greedy->physical_to_logical, {}, options_);
  std::vector<int32_t> peak_greedy;
  if (W > 1) {
    PlacementProblem peak = p;
    for (int w = 1; w < W; ++w) {
      for (int e = 0; e < E; ++e) peak.loads[e] = std::max(peak.loads[e], p.scenario(w)[e]);
    }
    peak.scenario_loads.clear();
    auto g = MakeGreedyPlanner(greedy_options)->PlanLayer(peak);
    if (!g.ok()) return g.status();
    peak_greedy = std::move(g->physical_to_logical);
  }

  const int P = CreditedPairs(p, options_);
  // Column layout. z[e,r] is the share of e's tokens served on r (the a[e,r] of DESIGN.md
  // divided by load[e]), so one share serves every scenario.
  const int x0 = 0, z0 = E * R, m0 = 2 * E * R, y0 = 2 * E * R + W;
  const int num_cols = y0 + P * R;
  auto X = [&](int e, int r) { return x0 + e * R + r; };
  auto Z = [&](int e, int r) { return z0 + e * R + r; };
  auto Y = [&](int q, int r) { return y0 + q * R + r; };

  double mean_bytes = 0;
  for (double b : p.expert_bytes) mean_bytes += b;
  mean_bytes /= E;
  // Per scenario: M_w's lower bound and its cap (greedy's straggler load in that scenario).
  const std::vector<double> sw = ScenarioWeights(p, options_);
  std::vector<double> lb(W), cap(W, COIN_DBL_MAX);
  double lb_m = 0;
  for (int w = 0; w < W; ++w) {
    lb[w] = ReplicaLowerBound(p, p.scenario(w));
    lb_m += sw[w] * lb[w];
    if (options_.balance_slack >= 0) {
      cap[w] = std::max(lb[w], greedy_terms.scenario_max_load[w] * (1.0 + options_.balance_slack));
    }
  }
  auto within_caps = [&](const ObjectiveTerms& t) {
    for (int w = 0; w < W; ++w) {
      if (t.scenario_max_load[w] > cap[w] + 1e-9) return false;
    }
    return true;
  };

  std::vector<double> col_lb(num_cols, 0.0), col_ub(num_cols, 1.0), obj(num_cols, 0.0);
  double total_load = 0;
  for (double l : p.loads) total_load += l;
  for (int e = 0; e < E; ++e) {
    for (int r = 0; r < R; ++r) {
      // A replica on r serves the tokens whose home is r without a copy.
      obj[X(e, r)] = -options_.lambda * p.loads[e] / R;
      if (p.has_current() && !p.CurrentlyOn(e, r)) {
        obj[X(e, r)] += options_.mu * (mean_bytes > 0 ? p.expert_bytes[e] / mean_bytes : 1.0);
      }
    }
  }
  for (int w = 0; w < W; ++w) {
    col_lb[m0 + w] = lb[w];
    col_ub[m0 + w] = cap[w];
    obj[m0 + w] = sw[w];
  }
  const double pair_coef = options_.lambda * (1.0 - 1.0 / R) * (2.0 / k);
  for (int q = 0; q < P; ++q) {
    for (int r = 0; r < R; ++r) obj[Y(q, r)] = -pair_coef * p.pairs[q].weight;
  }
  const double constant = options_.lambda * total_load;
  // The least the per-expert traffic term can be: spare slots as replicas of the hottest
  // experts (at most one per rank each).
  double most_replicated = 0;
  {
    std::vector<double> sorted = p.loads;
    std::sort(sorted.begin(), sorted.end(), std::greater<double>());
    int spare = p.num_slots() - E;
    for (double l : sorted) {
      const int extra = std::min(spare, R - 1);
      spare -= extra;
      most_replicated += l * (1 + extra);
    }
  }
  const double traffic_floor = constant - options_.lambda * most_replicated / R;

  CoinPackedMatrix matrix(false, 0, 0);
  matrix.setDimensions(0, num_cols);
  std::vector<double> row_lb, row_ub;
  auto add_row = [&](const std::vector<int>& idx, const std::vector<double>& val, double lo,
                     double hi) {
    matrix.appendRow(static_cast<int>(idx.size()), idx.data(), val.data());
    row_lb.push_back(lo);
    row_ub.push_back(hi);
  };
  for (int r = 0; r < R; ++r) {  // slots
    std::vector<int> idx;
    for (int e = 0; e < E; ++e) idx.push_back(X(e, r));
    add_row(idx, std::vector<double>(E, 1.0), -COIN_DBL_MAX, S);
  }
  for (int e = 0; e < E; ++e) {  // placed; all tokens served
    std::vector<int> xi, zi;
    for (int r = 0; r < R; ++r) {
      xi.push_back(X(e, r));
      zi.push_back(Z(e, r));
    }
    add_row(xi, std::vector<double>(R, 1.0), 1.0, COIN_DBL_MAX);
    add_row(zi, std::vector<double>(R, 1.0), 1.0, 1.0);
    for (int r = 0; r < R; ++r) add_row({Z(e, r), X(e, r)}, {1.0, -1.0}, -COIN_DBL_MAX, 0);
  }
  for (int w = 0; w < W; ++w) {  // straggler, in every scenario
    const std::vector<double>& loads = p.scenario(w);
    for (int r = 0; r < R; ++r) {
      std::vector<int> idx;
      std::vector<double> val;
      for (int e = 0; e < E; ++e) {
        if (loads[e] <= 0) continue;
        idx.push_back(Z(e, r));
        val.push_back(loads[e]);
      }
      idx.push_back(m0 + w);
      val.push_back(-1.0);
      add_row(idx, val, -COIN_DBL_MAX, 0.0);
    }
  }
  std::vector<std::vector<int>> pairs_of(E);
  for (int q = 0; q < P; ++q) {
    const auto& pr = p.pairs[q];
    pairs_of[pr.e].push_back(q);
    pairs_of[pr.f].push_back(q);
    std::vector<int> once;
    for (int r = 0; r < R; ++r) {
      add_row({Y(q, r), X(pr.e, r)}, {1.0, -1.0}, -COIN_DBL_MAX, 0.0);
      add_row({Y(q, r), X(pr.f, r)}, {1.0, -1.0}, -COIN_DBL_MAX, 0.0);
      once.push_back(Y(q, r));
    }
    add_row(once, std::vector<double>(R, 1.0), -COIN_DBL_MAX, 1.0);
  }
  for (int e = 0; e < E; ++e) {  // neighbours on a rank
    if (pairs_of[e].empty()) continue;
    for (int r = 0; r < R; ++r) {
      std::vector<int> idx;
      std::vector<double> val;
      for (int q : pairs_of[e]) {
        idx.push_back(Y(q, r));
        val.push_back(1.0);
      }
      idx.push_back(X(e, r));
      val.push_back(-(S - 1.0));
      add_row(idx, val, -COIN_DBL_MAX, 0.0);
    }
  }

  // Symmetry: without a current placement the ranks are interchangeable, so every placement
  // has a copy with ranks in descending order of their load under the mean loads; keeping
  // only those spares CBC from exploring R! copies of each. (With a current placement the
  // migration term tells ranks apart.)
  const bool rank_symmetry = !p.has_current();
  if (rank_symmetry) {
    for (int r = 0; r + 1 < R; ++r) {
      std::vector<int> idx;
      std::vector<double> val;
      for (int e = 0; e < E; ++e) {
        if (p.loads[e] <= 0) continue;
        idx.push_back(Z(e, r));
        val.push_back(p.loads[e]);
        idx.push_back(Z(e, r + 1));
        val.push_back(-p.loads[e]);
      }
      if (!idx.empty()) add_row(idx, val, 0.0, COIN_DBL_MAX);
    }
  }

  // Warm start: the better of greedy and peak-load greedy, each re-packed by the swap local
  // search (even shares), a quarter of the time limit each.
  auto deadline_at = [&](double fraction) {
    return start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                       std::chrono::duration<double>(fraction * options_.time_limit_seconds));
  };
  const std::vector<int32_t> greedy_swapped = SwapLocalSearch(
      p, greedy->physical_to_logical, options_, cap, P, deadline_at(peak_greedy.empty() ? 0.5 : 0.25));
  std::vector<int32_t> start_p2l = greedy_swapped;
  ObjectiveTerms start_terms = EvaluateObjective(p, start_p2l, {}, options_);
  std::vector<int32_t> peak_swapped;
  if (!peak_greedy.empty()) {
    peak_swapped = SwapLocalSearch(p, peak_greedy, options_, cap, P, deadline_at(0.5));
    const ObjectiveTerms t = EvaluateObjective(p, peak_swapped, {}, options_);
    if (within_caps(t) && (!within_caps(start_terms) || t.total < start_terms.total)) {
      start_p2l = peak_swapped;
      start_terms = t;
    }
  }
  std::vector<double> warm(num_cols, 0.0);
  std::vector<int> replicas(E, 0);
  for (int32_t e : start_p2l) {
    if (e >= 0) ++replicas[e];
  }
  // The warm start with its ranks in the order the symmetry rows ask for.
  std::vector<int32_t> warm_p2l = start_p2l;
  if (rank_symmetry) {
    std::vector<double> mean_load(R, 0.0);
    for (int s = 0; s < R * S; ++s) {
      if (start_p2l[s] >= 0) mean_load[s / S] += p.loads[start_p2l[s]] / replicas[start_p2l[s]];
    }
    std::vector<int> order(R);
    for (int r = 0; r < R; ++r) order[r] = r;
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return mean_load[a] > mean_load[b]; });
    for (int r = 0; r < R; ++r) {
      std::copy(start_p2l.begin() + order[r] * S, start_p2l.begin() + (order[r] + 1) * S,
                warm_p2l.begin() + r * S);
    }
  }
  for (int s = 0; s < R * S; ++s) {
    const int32_t e = warm_p2l[s];
    if (e < 0) continue;
    warm[X(e, s / S)] = 1.0;
    warm[Z(e, s / S)] += 1.0 / replicas[e];
  }
  for (int w = 0; w < W; ++w) warm[m0 + w] = std::max(start_terms.scenario_max_load[w], lb[w]);
  for (int q = 0; q < P; ++q) {
    for (int r = 0; r < R; ++r) {
      if (warm[X(p.pairs[q].e, r)] > 0.5 && warm[X(p.pairs[q].f, r)] > 0.5) {
        warm[Y(q, r)] = 1.0;
        break;
      }
    }
  }
  double warm_obj = 0;
  for (int c = 0; c < num_cols; ++c) warm_obj += obj[c] * warm[c];

  // The pair-credit bound (credit_bound.h): its LP without a load limit is solved now, before
  // CBC takes what is left of the budget (re-solving it later is free); the limited ones, for
  // placements without spare slots, are cheap and run after the search.
  std::unique_ptr<CreditBound> credit_bound = CreditBound::Build(p, P);
  if (credit_bound != nullptr &&
      credit_bound->UpperBound(1e300, 0.25 * options_.time_limit_seconds) < 0) {
    credit_bound.reset();  // too slow to pay for itself
  }

  OsiClpSolverInterface solver;
  solver.messageHandler()->setLogLevel(0);
  solver.loadProblem(matrix, col_lb.data(), col_ub.data(), obj.data(), row_lb.data(),
                     row_ub.data());
  for (int e = 0; e < E; ++e) {
    for (int r = 0; r < R; ++r) solver.setInteger(X(e, r));
  }
  // The root LP is degenerate (every rank ties at M); primal simplex solves it several times
  // faster than dual here. CLP's limit keeps the root LP (and, as it stays with the solver, CBC's LPs after it) inside
  // the layer's budget. It is a deadline on the process's CPU clock, which runs up to twice as
  // fast as the wall clock while two layers solve at once; see the bound below for what that
  // does to CBC's claims.
  solver.setHintParam(OsiDoDualInInitial, false, OsiHintDo);
  solver.getModelPtr()->setMaximumSeconds(
      std::max(0.05, kSolveFraction * options_.time_limit_seconds - Seconds(start)));
  solver.initialSolve();
  // The root LP's optimum is a valid bound only when the LP finished.
  const bool root_solved = solver.isProvenOptimal();
  const double root_bound = solver.getObjValue() + constant;
  CbcModel model(solver);
  model.setLogLevel(0);
  model.messageHandler()->setLogLevel(0);
  model.solver()->messageHandler()->setLogLevel(0);
  model.setUseElapsedTime(true);
  const double budget =
      std::max(0.05, kSolveFraction * options_.time_limit_seconds - Seconds(start));
  model.setMaximumSeconds(budget);
  model.setAllowableGap(options_.target_gap * std::fabs(warm_obj + constant));
  CglProbing probing;
  probing.setUsingObjective(1);
  probing.setMaxPass(1);
  probing.setMaxProbe(10);
  probing.setMaxLook(10);
  CglGomory gomory;
  gomory.setLimit(100);
  CglKnapsackCover knapsack;
  CglClique clique;
  clique.setStarCliqueReport(false);  // it prints to stdout otherwise
  clique.setRowCliqueReport(false);
  CglMixedIntegerRounding2 mir;
  CglFlowCover flow;
  // Cuts at the root only: resolving this LP is the expensive part.
  model.addCutGenerator(&probing, -99, "Probing");
  model.addCutGenerator(&gomory, -99, "Gomory");
  model.addCutGenerator(&knapsack, -99, "Knapsack");
  model.addCutGenerator(&clique, -99, "Clique");
  model.addCutGenerator(&mir, -99, "MIR2");
  model.addCutGenerator(&flow, -99, "FlowCover");
  model.setMaximumCutPassesAtRoot(5);
  CbcRounding rounding(model);
  model.addHeuristic(&rounding);
  CbcHeuristicLocal local(model);
  model.addHeuristic(&local);
  CbcHeuristicRINS rins(model);
  model.addHeuristic(&rins);
  model.setBestSolution(warm.data(), num_cols, warm_obj, /*check=*/true);
  model.branchAndBound();

  // The plan: the best on the objective of greedy, the swap search, CBC's incumbent, and the
  // last two with LP-optimal shares. Never worse than greedy: greedy is a candidate.
  LayerPlan plan;
  plan.physical_to_logical = greedy->physical_to_logical;
  plan.objective = greedy_terms.total;
  plan.note = "greedy";
  auto consider = [&](const std::vector<int32_t>& p2l, const std::vector<float>& share,
                      const char* note) {
    const ObjectiveTerms terms = EvaluateObjective(p, p2l, share, options_);
    const double t = terms.total;
    if (t < plan.objective - 1e-12 && within_caps(terms)) {
      plan.physical_to_logical = p2l;
      plan.slot_share = share;
      plan.objective = t;
      plan.note = note;
    }
  };
  auto consider_with_shares = [&](const std::vector<int32_t>& p2l, const char* note) {
    if (!options_.fit_shares) return;
    std::vector<float> share = OptimalShares(p, p2l, cap, options_);
    if (!share.empty()) consider(p2l, share, note);
  };
  consider(greedy_swapped, {}, "swap search");
  consider_with_shares(greedy_swapped, "swap search + LP shares");
  if (!peak_greedy.empty()) {
    consider(peak_greedy, {}, "peak greedy");
    consider(peak_swapped, {}, "peak greedy + swap search");
    consider_with_shares(peak_swapped, "peak greedy + swap search + LP shares");
  }
  const double* best = model.bestSolution();
  if (best != nullptr) {
    std::vector<int32_t> p2l(R * S, -1);
    std::vector<float> share(R * S, 0.0f);
    bool ok = true;
    std::vector<int> count(E, 0);
    for (int r = 0; r < R && ok; ++r) {
      int slot = r * S;
      for (int e = 0; e < E; ++e) {
        if (best[X(e, r)] < 0.5) continue;
        if (slot >= (r + 1) * S) {
          ok = false;
          break;
        }
        p2l[slot++] = e;
        ++count[e];
      }
    }
    for (int e = 0; e < E && ok; ++e) ok = count[e] > 0;
    if (ok) {
      // Shares from z[e,r].
      for (int s = 0; s < R * S; ++s) {
        const int32_t e = p2l[s];
        if (e < 0) continue;
        share[s] = static_cast<float>(std::max(0.0, best[Z(e, s / S)]));
      }
      for (int e = 0; e < E; ++e) {  // renormalise away solver round-off
        double sum = 0;
        for (int s = 0; s < R * S; ++s) {
          if (p2l[s] == e) sum += share[s];
        }
        for (int s = 0; s < R * S; ++s) {
          if (p2l[s] == e) share[s] = sum > 0 ? static_cast<float>(share[s] / sum) : 1.0f / count[e];
        }
      }
      consider(p2l, options_.fit_shares ? share : std::vector<float>{}, "cbc");
      consider_with_shares(p2l, "cbc + LP shares");
    }
  }
  // CBC's own bound is not used. Its LPs run under CLP's deadline (above), and an LP stopped
  // by it reads as "infeasible": nodes are pruned, or the warm start is rejected, and the
  // search ends "completed, infeasible" or "optimal" as if it had proved the warm start. On
  // ESFT 8 x 8 CBC so "proved" the warm start within 0.1 % after 0-2 nodes of a 4.5 % root
  // gap, which 800 nodes without the warm start (and no limit) could not move; OLMoE gaps of
  // 0.0-0.1 % reported before 2026-11-23 were partly such claims. Without the deadline CBC
  // overruns a 2 s layer budget by 1-10 s (strong branching and root cut passes do not check
  // the clock). So CBC only searches for better placements, and every bound here is one this
  // code computed itself.
  double all_pairs = 0;
  for (int q = 0; q < P; ++q) all_pairs += p.pairs[q].weight;
  double bound = lb_m + traffic_floor - pair_coef * all_pairs;
  if (root_solved) bound = std::max(bound, root_bound);
  if (credit_bound != nullptr) {
    // Parametric in M only when M is the mean loads' straggler, the load the bound filters on.
    const bool parametric = !options_.average_scenarios && credit_bound->limits_load();
    bound = std::max(bound, credit_bound->ObjectiveLowerBound(plan.objective, lb_m, traffic_floor,
                                                              pair_coef, parametric,
                                                              deadline_at(1.0)));
  }
  plan.best_bound = std::min(bound, plan.objective);
  plan.proven_optimal = bound >= plan.objective - 1e-9;
  plan.gap = (plan.objective - plan.best_bound) / std::max(std::fabs(plan.objective), 1e-9);
  plan.solve_seconds = Seconds(start);
  plan.cpu_seconds = ThreadCpuSeconds() - cpu_start;
  return plan;
}

}  // namespace

std::unique_ptr<Planner> MakeIlpPlanner(const PlannerOptions& o) {
  return std::make_unique<IlpPlanner>(o);
}

}  // namespace sy::parallel::planner
