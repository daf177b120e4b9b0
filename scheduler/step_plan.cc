#include "scheduler/step_plan.h"

#include <bit>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/core/status.h"

namespace sy::scheduler {
namespace {
constexpr int32_t kMagic = 0x53595031;
}  // namespace

void EncodePlan(PlanKind kind, std::span<const PlannedSequence> seqs, std::vector<int32_t>* words) {
  words->clear();
  words->push_back(kMagic);
  words->push_back(static_cast<int32_t>(kind));
  words->push_back(static_cast<int32_t>(seqs.size()));
  for (const PlannedSequence& s : seqs) {
    words->push_back(s.home_rank);
    words->push_back(static_cast<int32_t>(s.input.start_pos));
    words->push_back(s.input.compute_logits ? 1 : 0);
    words->push_back(static_cast<int32_t>(s.input.tokens.size()));
    words->insert(words->end(), s.input.tokens.begin(), s.input.tokens.end());
    words->push_back(static_cast<int32_t>(s.input.block_table.size()));
    words->insert(words->end(), s.input.block_table.begin(), s.input.block_table.end());
    if (s.input.compute_logits) {
      const model::SamplingParams& p = s.sample.params;
      words->push_back(std::bit_cast<int32_t>(p.temperature));
      words->push_back(std::bit_cast<int32_t>(p.top_p));
      words->push_back(p.top_k);
      words->push_back(static_cast<int32_t>(p.seed & 0xFFFFFFFFu));
      words->push_back(static_cast<int32_t>(p.seed >> 32));
      words->push_back(static_cast<int32_t>(s.sample.draw & 0xFFFFFFFFu));
      words->push_back(static_cast<int32_t>(s.sample.draw >> 32));
    }
  }
}

void EncodeControlPlan(PlanKind kind, std::span<const int32_t> payload, std::vector<int32_t>* words) {
  EncodePlan(kind, {}, words);
  words->insert(words->end(), payload.begin(), payload.end());
}

absl::StatusOr<DecodedPlan> DecodePlan(std::span<const int32_t> words) {
  size_t at = 0;
  auto take = [&](const char* what) -> absl::StatusOr<int32_t> {
    if (at >= words.size())
      return absl::InvalidArgumentError(absl::StrCat("step plan: truncated at ", what));
    return words[at++];
  };
  auto take_span = [&](int32_t n, const char* what) -> absl::StatusOr<std::span<const int32_t>> {
    if (n < 0 || static_cast<size_t>(n) > words.size() - at)
      return absl::InvalidArgumentError(absl::StrCat("step plan: bad length ", n, " of ", what));
    std::span<const int32_t> s = words.subspan(at, n);
    at += n;
    return s;
  };
  DecodedPlan plan;
  auto magic = take("magic");
  if (!magic.ok()) return magic.status();
  if (*magic != kMagic) return absl::InvalidArgumentError("step plan: bad magic");
  auto kind = take("kind");
  if (!kind.ok()) return kind.status();
  if (*kind < 1 || *kind > 8)
    return absl::InvalidArgumentError(absl::StrCat("step plan: unknown kind ", *kind));
  plan.kind = static_cast<PlanKind>(*kind);
  auto n = take("num_seqs");
  if (!n.ok()) return n.status();
  if (*n < 0) return absl::InvalidArgumentError("step plan: negative num_seqs");
  if (IsControlPlan(plan.kind)) {
    if (*n != 0) return absl::InvalidArgumentError("step plan: a control plan with sequences");
    plan.payload = words.subspan(at);
    return plan;
  }
  // Every sequence takes at least five words: a count past that is a bad plan, not an
  // allocation.
  if (static_cast<size_t>(*n) > (words.size() - at) / 5)
    return absl::InvalidArgumentError(
        absl::StrCat("step plan: ", *n, " sequences cannot fit ", words.size() - at, " words"));
  plan.seqs.resize(*n);
  for (PlannedSequence& s : plan.seqs) {
    auto home = take("home_rank");
    auto start = take("start_pos");
    auto logits = take("compute_logits");
    if (!home.ok() || !start.ok() || !logits.ok())
      return absl::InvalidArgumentError("step plan: truncated sequence header");
    s.home_rank = *home;
    s.input.start_pos = *start;
    s.input.compute_logits = *logits != 0;
    auto nt = take("num_tokens");
    if (!nt.ok()) return nt.status();
    auto tokens = take_span(*nt, "tokens");
    if (!tokens.ok()) return tokens.status();
    s.input.tokens = *tokens;
    auto nb = take("num_blocks");
    if (!nb.ok()) return nb.status();
    auto blocks = take_span(*nb, "block table");
    if (!blocks.ok()) return blocks.status();
    s.input.block_table = *blocks;
    if (s.input.compute_logits) {
      auto sample = take_span(7, "sampling parameters");
      if (!sample.ok()) return sample.status();
      const std::span<const int32_t> w = *sample;
      auto u32 = [](int32_t v) { return static_cast<uint64_t>(static_cast<uint32_t>(v)); };
      model::SamplingParams& p = s.sample.params;
      p.temperature = std::bit_cast<float>(w[0]);
      p.top_p = std::bit_cast<float>(w[1]);
      p.top_k = w[2];
      p.seed = u32(w[3]) | (u32(w[4]) << 32);
      s.sample.draw = u32(w[5]) | (u32(w[6]) << 32);
      if (!std::isfinite(p.temperature) || p.temperature < 0 || !(p.top_p > 0 && p.top_p <= 1) ||
          p.top_k < 0)
        return absl::InvalidArgumentError("step plan: bad sampling parameters");
    }
  }
  if (at != words.size()) return absl::InvalidArgumentError("step plan: trailing words");
  return plan;
}

std::vector<int64_t> TokensPerRank(std::span<const PlannedSequence> seqs, int world_size) {
  std::vector<int64_t> rows(world_size, 0);
  for (const PlannedSequence& s : seqs)
    if (WantsToken(s.input) && s.home_rank >= 0 && s.home_rank < world_size)
      ++rows[s.home_rank];
  return rows;
}

namespace {
// Largest plan accepted by a rank (words); guards against a desynchronised sender.
constexpr int64_t kMaxPlanWords = int64_t{1} << 28;
}  // namespace

absl::Status SendPlan(parallel::Communicator* comm, std::span<const int32_t> words) {
  const int world = comm->world_size();
  const int64_t bytes = static_cast<int64_t>(words.size() * sizeof(int32_t));
  std::vector<int64_t> counts(world, bytes), offsets(world, 0), rcounts, roffsets;
  counts[comm->rank()] = 0;
  std::vector<char> none;
  return comm->AllToAllVDynamic(words.data(), counts, offsets, &none, &rcounts, &roffsets);
}

absl::Status ReceivePlan(parallel::Communicator* comm, std::vector<char>* bytes,
                         std::vector<int32_t>* words) {
  const int world = comm->world_size();
  std::vector<int64_t> zeros(world, 0), counts, offsets;
  const int32_t dummy = 0;
  SY_RETURN_IF_ERROR(comm->AllToAllVDynamic(&dummy, zeros, zeros, bytes, &counts, &offsets));
  const int64_t n = counts[0] / static_cast<int64_t>(sizeof(int32_t));
  if (counts[0] % static_cast<int64_t>(sizeof(int32_t)) != 0 || n < 3 || n > kMaxPlanWords)
    return absl::InternalError(absl::StrCat("a step plan of ", counts[0], " bytes"));
  for (int p = 1; p < world; ++p)
    if (counts[p] != 0)
      return absl::InternalError(absl::StrCat("rank ", p, " sent ", counts[p], " bytes of a step plan"));
  words->resize(n);
  std::memcpy(words->data(), bytes->data() + offsets[0], counts[0]);
  return absl::OkStatus();
}

absl::Status GatherRowsToLeader(parallel::Communicator* comm, const void* own, int64_t row_bytes,
                                std::span<const int64_t> rows_per_rank, void* recv) {
  const int world = comm->world_size(), rank = comm->rank();
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
  int64_t dummy = 0;
  return comm->AllToAllV(own != nullptr ? own : &dummy, send_counts, zeros,
                         recv != nullptr ? recv : &dummy, recv_counts, recv_offsets);
}

}  // namespace sy::scheduler
