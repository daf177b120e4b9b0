#include "server/loadgen.h"
#include "kernels/core/status.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "switchyard/v1/inference.grpc.pb.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;
namespace {

using Clock = std::chrono::steady_clock;
double Sec(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

const char* CodeName(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    default: return "OTHER";
  }
}

struct Record {
  bool ok = false;
  grpc::StatusCode code = grpc::StatusCode::OK;
  int64_t prompt_tokens = 0, output_tokens = 0;
  Clock::time_point start, first, end;
  std::vector<double> gaps;  // between chunks
  std::vector<std::pair<Clock::time_point, int>> chunks;  // arrival, tokens
};

}  // namespace

LatencySummary Summarize(std::vector<double> v) {
  LatencySummary s;
  s.count = static_cast<int64_t>(v.size());
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  s.mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size();
  auto pct = [&](double q) {
    const double pos = q * (v.size() - 1);
    const size_t lo = static_cast<size_t>(std::floor(pos));
    const size_t hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (v[hi] - v[lo]) * (pos - lo);
  };
  s.p50 = pct(0.50);
  s.p90 = pct(0.90);
  s.p99 = pct(0.99);
  return s;
}

std::string LoadgenReport::Table() const {
  std::string t;
  absl::StrAppendFormat(&t, "%-34s %12d\n", "successful requests", requests_ok);
  absl::StrAppendFormat(&t, "%-34s %12d\n", "failed requests", requests_failed);
  for (const auto& [code, n] : errors) absl::StrAppendFormat(&t, "  %-32s %12d\n", code, n);
  absl::StrAppendFormat(&t, "%-34s %12.3f\n", "duration (s)", duration_s);
  absl::StrAppendFormat(&t, "%-34s %12d\n", "prompt tokens", prompt_tokens);
  absl::StrAppendFormat(&t, "%-34s %12d\n", "output tokens", output_tokens);
  absl::StrAppendFormat(&t, "%-34s %12.2f\n", "request throughput (req/s)", request_throughput);
  absl::StrAppendFormat(&t, "%-34s %12.2f\n", "output token throughput (tok/s)", output_throughput);
  absl::StrAppendFormat(&t, "%-34s %12.2f\n", "total token throughput (tok/s)", total_throughput);
  if (steady_window_s > 0) {
    absl::StrAppendFormat(&t, "%-34s %12.2f\n", "steady decode throughput (tok/s)",
                          steady_decode_throughput);
    absl::StrAppendFormat(&t, "%-34s %12.3f\n", "steady window (s)", steady_window_s);
  } else {  // the first wave never ran all at once (a --rate load, or failures)
    absl::StrAppendFormat(&t, "%-34s %12s\n", "steady decode throughput (tok/s)", "-");
  }
  absl::StrAppendFormat(&t, "%-10s %10s %10s %10s %10s\n", "(ms)", "mean", "p50", "p90", "p99");
  auto row = [&](const char* name, const LatencySummary& s) {
    absl::StrAppendFormat(&t, "%-10s %10.2f %10.2f %10.2f %10.2f\n", name, s.mean * 1e3,
                          s.p50 * 1e3, s.p90 * 1e3, s.p99 * 1e3);
  };
  row("TTFT", ttft);
  row("TPOT", tpot);
  row("ITL", itl);
  row("E2E", e2e);
  return t;
}

absl::StatusOr<LoadgenReport> RunLoadgen(const LoadgenOptions& o) {
  if (o.concurrency < 1 || o.requests < 1 || o.prompt_len < 1 || o.max_new_tokens < 1)
    return absl::InvalidArgumentError(
        "--concurrency, --requests, --prompt-len and --max-new-tokens must be >= 1");
  SY_ASSIGN_OR_RETURN(std::shared_ptr<grpc::Channel> channel, MakeChannel(o.addr, o.tls));
  // Wait for SERVING.
  auto health = grpc::health::v1::Health::NewStub(channel);
  const Clock::time_point ready_by =
      Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(o.wait_ready_s * 1000));
  for (;;) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    grpc::health::v1::HealthCheckRequest req;
    grpc::health::v1::HealthCheckResponse resp;
    grpc::Status s = health->Check(&ctx, req, &resp);
    if (s.ok() && resp.status() == grpc::health::v1::HealthCheckResponse::SERVING) break;
    if (Clock::now() > ready_by)
      return absl::UnavailableError(absl::StrCat(o.addr, " is not serving: ",
                                                 s.ok() ? "NOT_SERVING" : s.error_message()));
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  auto stub = v1::Inference::NewStub(channel);
  v1::ModelInfo info;
  {
    grpc::ClientContext ctx;
    if (!o.api_key.empty()) ctx.AddMetadata("authorization", "Bearer " + o.api_key);
    grpc::Status s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
    if (!s.ok()) return absl::UnavailableError(absl::StrCat("GetModelInfo: ", s.error_message()));
  }
  // Prompts: random ids above the usual special tokens.
  std::mt19937_64 rng(o.seed);
  const int64_t lo = std::min<int64_t>(3, info.vocab_size() - 1);
  std::uniform_int_distribution<int32_t> tok(static_cast<int32_t>(lo),
                                             static_cast<int32_t>(info.vocab_size() - 1));
  std::vector<v1::GenerateRequest> reqs(o.requests);
  for (auto& r : reqs) {
    for (int i = 0; i < o.prompt_len; ++i) r.mutable_token_ids()->add_ids(tok(rng));
    r.mutable_sampling()->set_max_new_tokens(o.max_new_tokens);
    r.mutable_sampling()->set_ignore_eos(true);
    r.set_stream(true);
  }
  // Arrival times (open loop): Poisson process.
  std::vector<double> arrival(o.requests, 0.0);
  if (o.rate > 0) {
    std::exponential_distribution<double> gap(o.rate);
    double t = 0;
    for (auto& a : arrival) { a = t; t += gap(rng); }
  }

  std::vector<Record> records(o.requests);
  std::atomic<int> next{0};
  const Clock::time_point t0 = Clock::now();
  auto worker = [&] {
    for (;;) {
      const int i = next.fetch_add(1);
      if (i >= o.requests) return;
      if (o.rate > 0)
        std::this_thread::sleep_until(
            t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(arrival[i])));
      Record& rec = records[i];
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() +
                       std::chrono::milliseconds(static_cast<int64_t>(o.timeout_s * 1000)));
      if (!o.api_key.empty()) ctx.AddMetadata("authorization", "Bearer " + o.api_key);
      rec.start = Clock::now();
      auto reader = stub->Generate(&ctx, reqs[i]);
      v1::GenerateResponse resp;
      Clock::time_point last{};
      while (reader->Read(&resp)) {
        const Clock::time_point now = Clock::now();
        if (resp.has_chunk() && resp.chunk().token_ids_size() > 0) {
          rec.chunks.push_back({now, resp.chunk().token_ids_size()});
          if (rec.first == Clock::time_point{}) rec.first = now;
          else rec.gaps.push_back(Sec(now - last));
          last = now;
        } else if (resp.has_completion()) {
          rec.output_tokens = resp.completion().completion_tokens();
          rec.prompt_tokens = resp.completion().prompt_tokens();
        }
      }
      grpc::Status s = reader->Finish();
      rec.end = Clock::now();
      rec.ok = s.ok();
      rec.code = s.error_code();
    }
  };
  std::vector<std::thread> threads;
  for (int c = 0; c < o.concurrency; ++c) threads.emplace_back(worker);
  for (auto& t : threads) t.join();

  LoadgenReport rep;
  std::vector<double> ttft, tpot, itl, e2e;
  Clock::time_point first_start = Clock::time_point::max(), last_end{};
  for (const Record& r : records) {
    first_start = std::min(first_start, r.start);
    last_end = std::max(last_end, r.end);
    if (!r.ok) {
      ++rep.requests_failed;
      ++rep.errors[CodeName(r.code)];
      continue;
    }
    ++rep.requests_ok;
    rep.prompt_tokens += r.prompt_tokens;
    rep.output_tokens += r.output_tokens;
    if (r.first != Clock::time_point{}) {
      ttft.push_back(Sec(r.first - r.start));
      if (r.output_tokens > 1) tpot.push_back(Sec(r.end - r.first) / (r.output_tokens - 1));
    }
    itl.insert(itl.end(), r.gaps.begin(), r.gaps.end());
    e2e.push_back(Sec(r.end - r.start));
  }
  rep.duration_s = Sec(last_end - first_start);
  if (rep.duration_s > 0) {
    rep.request_throughput = rep.requests_ok / rep.duration_s;
    rep.output_throughput = rep.output_tokens / rep.duration_s;
    rep.total_throughput = (rep.prompt_tokens + rep.output_tokens) / rep.duration_s;
  }
  // Steady state of the first wave (all of its streams decoding).
  const int wave = std::min(o.concurrency, o.requests);
  Clock::time_point all_started{}, first_done = Clock::time_point::max();
  bool wave_ok = true;
  for (int i = 0; i < wave; ++i) {
    const Record& r = records[i];
    if (!r.ok || r.chunks.empty()) { wave_ok = false; break; }
    all_started = std::max(all_started, r.chunks.front().first);
    first_done = std::min(first_done, r.chunks.back().first);
  }
  if (wave_ok && first_done > all_started) {
    int64_t tokens = 0;
    for (int i = 0; i < wave; ++i)
      for (const auto& [t, n] : records[i].chunks)
        if (t > all_started && t <= first_done) tokens += n;
    rep.steady_window_s = Sec(first_done - all_started);
    rep.steady_decode_throughput = tokens / rep.steady_window_s;
  }
  rep.ttft = Summarize(ttft);
  rep.tpot = Summarize(tpot);
  rep.itl = Summarize(itl);
  rep.e2e = Summarize(e2e);
  return rep;
}

}  // namespace sy::server
