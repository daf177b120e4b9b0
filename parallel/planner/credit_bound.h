// CreditBound: an upper bound on the co-activated pair weight a placement can credit (the
// traffic term of the ILP objective, planner.h), far tighter than "every credited pair
// co-located", which is what the ILP's LP relaxation gives.
//
// A rank's experts split into connected components of the credited-pair graph; a placement's
// credit is at most the summed pair weight inside the components of all its ranks. Every
// component has at most S experts, every expert sits in at least one slot, and there are R * S
// slots. The LP over all connected expert sets of size 2..S (columns; singletons fill the other
// slots; v_q credits pair q at most once, however many sets hold it)
//     max  sum_q w_q v_q
//     s.t. sum_{T owns e} z_T + s_e >= 1        every expert placed
//          sum_T |T| z_T + sum_e s_e <= R * S   slots
//          v_q <= sum_{T holds q} z_T,  0 <= v_q <= 1
// bounds the credit of every placement (replicas included). It is solved by column
// generation over the enumerated sets. With no spare slot (E = R S)
// every expert has one replica and every rank is full, so a component T can only sit on a
// rank whose load is at least load(T) plus the S - |T| lightest other experts; UpperBound(b)
// drops the components that exceed a straggler load b, which bounds the credit of every
// placement whose straggler load is at most b.
//
// Thread safety: an instance is used by one thread.
#pragma once

#include <chrono>
#include <memory>
#include <vector>

#include "CoinTypes.hpp"
#include "parallel/planner/placement_problem.h"

namespace sy::parallel::planner {

class CreditBound {
 public:
  // Null when the pair graph has more than `max_columns` connected sets of size 2..S (the LP
  // would not pay for itself) or no credited pairs.
  static std::unique_ptr<CreditBound> Build(const PlacementProblem& p, int num_pairs,
                                            int max_columns = 50000);
  ~CreditBound();

  // Upper bound on the credited pair weight of any placement whose straggler load under the
  // mean loads is at most `max_load` (the filter applies only without spare slots; pass a
  // large value for none). Negative when the LP did not solve within `max_seconds`.
  double UpperBound(double max_load, double max_seconds = 1e9);
  // A lower bound on the ILP objective M + constant - pair_coef * credit (+ migration >= 0)
  // of every placement, given one placement's `objective` and a lower bound lb_m on the
  // straggler term M. Every placement has objective >= M + constant - pair_coef * U(M), with U
  // nondecreasing. With `parametric` (M is the mean loads' straggler and this bound has a load
  // filter) the minimum over M in [lb_m, b_max] is taken on a grid of intervals [b_i, b_i+1],
  // each worth b_i + constant - pair_coef * U(b_i+1), refined where it is lowest; placements
  // with M > b_max = objective - constant + pair_coef * U(inf) cannot beat `objective`.
  // Otherwise lb_m + constant - pair_coef * U(inf). The LPs stop at `deadline` (the grid so
  // far still gives a valid bound); -1e300 when not even U(inf) solved.
  double ObjectiveLowerBound(double objective, double lb_m, double constant, double pair_coef,
                             bool parametric, std::chrono::steady_clock::time_point deadline);
  // Whether UpperBound depends on its limit (no spare slot).
  bool limits_load() const { return filter_; }
  int num_columns() const { return static_cast<int>(load_lb_.size()); }  // sets

 private:
  CreditBound() = default;
  struct Lp;
  std::vector<double> load_lb_;   // per column: the least straggler load a rank holding it has
  // The pool of columns (sets, then singletons, then the v_q), column-major: rows idx_, values
  // val_, column c in [starts_[c], starts_[c+1]).
  std::vector<int> idx_;
  std::vector<double> val_;
  std::vector<CoinBigIndex> starts_;
  std::vector<char> in_master_;   // per set: in the master LP
  std::vector<int> master_set_;   // the sets in the master, in its column order
  std::unique_ptr<Lp> lp_;
  bool filter_ = false;
};

}  // namespace sy::parallel::planner
