#include "parallel/planner/credit_bound.h"

#include <algorithm>
#include <chrono>

#include "CoinPackedMatrix.hpp"
#include "OsiClpSolverInterface.hpp"

namespace sy::parallel::planner {

struct CreditBound::Lp {
  OsiClpSolverInterface solver;
  bool solved_once = false;
};

CreditBound::~CreditBound() = default;

std::unique_ptr<CreditBound> CreditBound::Build(const PlacementProblem& p, int num_pairs,
                                                int max_columns) {
  const int E = p.num_experts, S = p.slots_per_rank, R = p.world_size;
  if (num_pairs <= 0 || S < 2) return nullptr;
  // The graph of credited pairs; pair_id[e * E + f]: its index among the distinct pairs.
  std::vector<int> pair_id(static_cast<size_t>(E) * E, -1);
  std::vector<double> pair_weight;
  std::vector<std::vector<int>> adj(E);
  for (int q = 0; q < num_pairs; ++q) {
    const auto& pr = p.pairs[q];
    if (pr.e == pr.f || pr.weight <= 0) continue;
    if (pair_id[pr.e * E + pr.f] < 0) {
      adj[pr.e].push_back(pr.f);
      adj[pr.f].push_back(pr.e);
      pair_id[pr.e * E + pr.f] = pair_id[pr.f * E + pr.e] = static_cast<int>(pair_weight.size());
      pair_weight.push_back(0.0);
    }
    pair_weight[pair_id[pr.e * E + pr.f]] += pr.weight;
  }
  const int Q = static_cast<int>(pair_weight.size());
  // Every connected set of 2..S experts, each once (ESU, Wernicke 2006): grow a set from its
  // smallest member v by its extension: neighbours above v that are not neighbours of any
  // earlier member.
  std::vector<std::vector<int>> columns;
  std::vector<int> sub;
  std::vector<char> near_sub(E, 0);  // a member of the set or a neighbour of one
  bool too_many = false;
  auto extend = [&](auto&& self, std::vector<int> ext, int v) -> void {
    if (too_many) return;
    if (sub.size() >= 2) {
      columns.emplace_back(sub.begin(), sub.end());
      std::sort(columns.back().begin(), columns.back().end());
      if (static_cast<int>(columns.size()) > max_columns) {
        too_many = true;
        return;
      }
    }
    if (static_cast<int>(sub.size()) == S) return;
    while (!ext.empty()) {
      const int w = ext.back();
      ext.pop_back();
      std::vector<int> next = ext;
      std::vector<int> added;  // vertices newly near the set through w
      for (int u : adj[w]) {
        if (u > v && !near_sub[u]) next.push_back(u);
        if (!near_sub[u]) added.push_back(u);
      }
      sub.push_back(w);
      const bool w_was_near = near_sub[w];
      near_sub[w] = 1;
      for (int u : added) near_sub[u] = 1;
      self(self, std::move(next), v);
      for (int u : added) near_sub[u] = 0;
      near_sub[w] = w_was_near;
      sub.pop_back();
    }
  };
  for (int v = 0; v < E && !too_many; ++v) {
    if (adj[v].empty()) continue;
    sub = {v};
    near_sub[v] = 1;
    std::vector<int> ext;
    for (int u : adj[v]) {
      near_sub[u] = 1;
      if (u > v) ext.push_back(u);
    }
    extend(extend, ext, v);
    for (int u : adj[v]) near_sub[u] = 0;
    near_sub[v] = 0;
  }
  if (too_many) return nullptr;
  if (columns.empty()) return nullptr;

  std::unique_ptr<CreditBound> cb(new CreditBound());
  cb->filter_ = p.num_slots() == E;
  std::vector<int> by_load(E);
  for (int e = 0; e < E; ++e) by_load[e] = e;
  std::sort(by_load.begin(), by_load.end(),
            [&](int a, int b) { return p.loads[a] < p.loads[b]; });
  const int n = static_cast<int>(columns.size());
  cb->load_lb_.resize(n);
  // Rows: 0..E-1 experts placed, E slots, E+1.. one per pair (v_q <= sum of the sets that
  // hold it). Columns: the sets, the singletons, then v_q.
  // Built column by column into flat arrays (appendCol one at a time is quadratic).
  std::vector<int> idx;
  std::vector<double> val;
  std::vector<CoinBigIndex> starts = {0};
  auto end_col = [&]() { starts.push_back(static_cast<CoinBigIndex>(idx.size())); };
  for (int c = 0; c < n; ++c) {
    const auto& t = columns[c];
    double load = 0;
    idx.insert(idx.end(), t.begin(), t.end());
    val.insert(val.end(), t.size(), 1.0);
    idx.push_back(E);
    val.push_back(static_cast<double>(t.size()));
    for (size_t i = 0; i < t.size(); ++i) {
      load += p.loads[t[i]];
      for (size_t j = i + 1; j < t.size(); ++j) {
        const int q = pair_id[t[i] * E + t[j]];
        if (q < 0) continue;
        idx.push_back(E + 1 + q);
        val.push_back(-1.0);
      }
    }
    // The rest of a full rank: the S - |T| lightest experts outside T.
    int need = S - static_cast<int>(t.size());
    for (int i = 0; i < E && need > 0; ++i) {
      if (std::binary_search(t.begin(), t.end(), by_load[i])) continue;
      load += p.loads[by_load[i]];
      --need;
    }
    cb->load_lb_[c] = load;
    end_col();
  }
  for (int e = 0; e < E; ++e) {  // singletons
    idx.insert(idx.end(), {e, E});
    val.insert(val.end(), {1.0, 1.0});
    end_col();
  }
  for (int q = 0; q < Q; ++q) {  // v_q: pair q credited (at most once)
    idx.push_back(E + 1 + q);
    val.push_back(1.0);
    end_col();
  }
  cb->idx_ = std::move(idx);
  cb->val_ = std::move(val);
  cb->starts_ = std::move(starts);
  // The master LP: the singletons and the v_q (columns 0..E+Q-1), then the sets column
  // generation brings in (master_set_[k] = the pool index of master column E + Q + k).
  const int base = E + Q;
  std::vector<int> lengths(base);
  std::vector<CoinBigIndex> mstarts(base + 1, 0);
  std::vector<int> midx;
  std::vector<double> mval;
  for (int c = n; c < n + base; ++c) {
    for (CoinBigIndex k = cb->starts_[c]; k < cb->starts_[c + 1]; ++k) {
      midx.push_back(cb->idx_[k]);
      mval.push_back(cb->val_[k]);
    }
    mstarts[c - n + 1] = static_cast<CoinBigIndex>(midx.size());
    lengths[c - n] = static_cast<int>(mstarts[c - n + 1] - mstarts[c - n]);
  }
  CoinPackedMatrix matrix(true, E + 1 + Q, base, static_cast<CoinBigIndex>(midx.size()),
                          mval.data(), midx.data(), mstarts.data(), lengths.data());
  std::vector<double> col_lb(base, 0.0), col_ub(base, COIN_DBL_MAX), obj(base, 0.0);
  for (int q = 0; q < Q; ++q) {
    col_ub[E + q] = 1.0;
    obj[E + q] = -pair_weight[q];  // CLP minimises
  }
  std::vector<double> row_lb(E + 1 + Q, 1.0), row_ub(E + 1 + Q, COIN_DBL_MAX);
  row_lb[E] = -COIN_DBL_MAX;
  row_ub[E] = static_cast<double>(R) * S;
  for (int q = 0; q < Q; ++q) {
    row_lb[E + 1 + q] = -COIN_DBL_MAX;
    row_ub[E + 1 + q] = 0.0;
  }
  cb->lp_ = std::make_unique<Lp>();
  cb->lp_->solver.messageHandler()->setLogLevel(0);
  cb->lp_->solver.loadProblem(matrix, col_lb.data(), col_ub.data(), obj.data(), row_lb.data(),
                              row_ub.data());
  cb->in_master_.assign(n, 0);
  return cb;
}

// Column generation: the master holds few sets; each round prices every allowed set of the
// pool against the master's duals and brings in the most profitable (reduced cost < 0), until
// none is left, when the master's optimum is the LP's over every set. (CLP's own sprint does
// the same but prints to stdout; the full LP by dual simplex took 0.4 s on the largest ESFT
// layers, column generation at most 0.06 s, enumeration included.)
double CreditBound::UpperBound(double max_load, double max_seconds) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(max_seconds));
  OsiClpSolverInterface& s = lp_->solver;
  const int n = num_columns();
  const int base = s.getNumCols() - static_cast<int>(master_set_.size());
  auto allowed = [&](int c) { return !filter_ || load_lb_[c] <= max_load + 1e-12; };
  for (size_t k = 0; k < master_set_.size(); ++k) {
    s.setColUpper(base + static_cast<int>(k), allowed(master_set_[k]) ? COIN_DBL_MAX : 0.0);
  }
  constexpr int kPerRound = 400;
  for (;;) {
    if (lp_->solved_once) {
      s.resolve();
    } else {
      s.initialSolve();
      lp_->solved_once = true;
    }
    if (!s.isProvenOptimal()) return -1.0;
    if (std::chrono::steady_clock::now() >= deadline) return -1.0;
    const double* y = s.getRowPrice();
    std::vector<std::pair<double, int>> priced;
    for (int c = 0; c < n; ++c) {
      if (in_master_[c] || !allowed(c)) continue;
      double d = 0;  // the set's cost is 0: reduced cost = -y.A
      for (CoinBigIndex k = starts_[c]; k < starts_[c + 1]; ++k) d -= y[idx_[k]] * val_[k];
      if (d < -1e-9) priced.emplace_back(d, c);
    }
    if (priced.empty()) break;
    if (static_cast<int>(priced.size()) > kPerRound) {
      std::nth_element(priced.begin(), priced.begin() + kPerRound, priced.end());
      priced.resize(kPerRound);
    }
    for (const auto& [d, c] : priced) {
      const int len = static_cast<int>(starts_[c + 1] - starts_[c]);
      s.addCol(len, idx_.data() + starts_[c], val_.data() + starts_[c], 0.0, COIN_DBL_MAX, 0.0);
      in_master_[c] = 1;
      master_set_.push_back(c);
    }
  }
  // Round-off must not shave the bound: add a relative hair.
  return -s.getObjValue() * (1.0 + 1e-7) + 1e-12;
}

double CreditBound::ObjectiveLowerBound(double objective, double lb_m, double constant,
                                        double pair_coef, bool parametric,
                                        std::chrono::steady_clock::time_point deadline) {
  auto left = [&]() {
    return std::chrono::duration<double>(deadline - std::chrono::steady_clock::now()).count();
  };
  const double u_inf = UpperBound(1e300, left());
  if (u_inf < 0) return -1e300;
  const double simple = lb_m + constant - pair_coef * u_inf;
  const double b_max = objective - constant + pair_coef * u_inf;
  if (!parametric || b_max <= lb_m) return simple;
  // Breakpoints and U at each.
  std::vector<double> b = {lb_m, b_max};
  std::vector<double> u = {UpperBound(lb_m, left()), UpperBound(b_max, left())};
  if (u[0] < 0 || u[1] < 0) return simple;
  auto value = [&](size_t i) { return b[i] + constant - pair_coef * u[i + 1]; };
  for (int round = 0; round < 6 && left() > 0; ++round) {
    size_t worst = 0;
    for (size_t i = 0; i + 1 < b.size(); ++i) {
      if (value(i) < value(worst)) worst = i;
    }
    const double lo = b[worst], hi = b[worst + 1];
    std::vector<double> mids, ums;
    for (int j = 1; j <= 3; ++j) {  // split [lo, hi] in four
      mids.push_back(lo + (hi - lo) * j / 4.0);
      ums.push_back(UpperBound(mids.back(), left()));
      if (ums.back() < 0) break;
    }
    if (ums.back() < 0) break;  // out of time: keep the grid so far
    b.insert(b.begin() + worst + 1, mids.begin(), mids.end());
    u.insert(u.begin() + worst + 1, ums.begin(), ums.end());
  }
  double best = objective;
  for (size_t i = 0; i + 1 < b.size(); ++i) best = std::min(best, value(i));
  return std::max(simple, best);
}

}  // namespace sy::parallel::planner
