#include "server/worker_metrics.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "kernels/core/mutex.h"
#include "prometheus/collectable.h"
#include "prometheus/metric_family.h"
#include "kernels/core/status.h"

namespace sy::server {
namespace {

prometheus::ClientMetric Sample(double v, bool counter,
                                std::vector<prometheus::ClientMetric::Label> labels) {
  prometheus::ClientMetric m;
  m.label = std::move(labels);
  if (counter) {
    m.counter.value = v;
  } else {
    m.gauge.value = v;
  }
  return m;
}

prometheus::MetricFamily Family(const std::string& name, const std::string& help, bool counter) {
  prometheus::MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = counter ? prometheus::MetricType::Counter : prometheus::MetricType::Gauge;
  return f;
}

}  // namespace

class WorkerMetrics::Collector : public prometheus::Collectable {
 public:
  void Set(const scheduler::RankRunner* runner, int32_t id) {
    sy::MutexLock lock(&mu_);
    runner_ = runner;
    if (runner != nullptr) id_ = id;
  }

  std::vector<prometheus::MetricFamily> Collect() const override {
    scheduler::RankStats s;
    int32_t id = -1;
    bool running = false;
    {
      sy::MutexLock lock(&mu_);
      if (runner_ != nullptr) {
        s = runner_->stats();
        running = true;
      }
      id = id_;
    }
    std::vector<prometheus::MetricFamily> out;
    if (id < 0) return out;  // not joined yet: nothing to say
    const prometheus::ClientMetric::Label rank{"rank", absl::StrCat(id)};
    auto one = [&](const std::string& name, const std::string& help, bool counter, double v) {
      prometheus::MetricFamily f = Family(name, help, counter);
      f.metric.push_back(Sample(v, counter, {rank}));
      out.push_back(std::move(f));
    };
    one("switchyard_rank_tokens_total", "Tokens of the sequences homed on this rank.", true,
        static_cast<double>(s.tokens));
    one("switchyard_rank_steps_total", "Step plans this rank ran.", true, static_cast<double>(s.steps));
    one("switchyard_rank_kv_blocks", "KV cache blocks of this rank's pool.", false,
        static_cast<double>(s.kv_blocks));
    one("switchyard_rank_kv_blocks_used",
        "KV cache blocks held by this rank's sequences of its latest step.", false,
        static_cast<double>(s.kv_blocks_used));
    one("switchyard_ep_membership_epoch", "Membership epoch this rank serves in.", false,
        static_cast<double>(s.epoch));
    one("switchyard_ep_world_size", "Ranks in this rank's epoch.", false,
        static_cast<double>(s.world_size));
    {
      prometheus::MetricFamily f = Family("switchyard_ep_alltoall_seconds_total",
                                          "Seconds this rank spent in all-to-alls, by phase.", true);
      f.metric.push_back(Sample(s.dispatch.counts_seconds, true, {rank, {"phase", "counts"}}));
      f.metric.push_back(Sample(s.dispatch.dispatch_seconds, true, {rank, {"phase", "dispatch"}}));
      f.metric.push_back(Sample(s.dispatch.combine_seconds, true, {rank, {"phase", "combine"}}));
      out.push_back(std::move(f));
    }
    {
      prometheus::MetricFamily f = Family(
          "switchyard_rank_step_seconds_total",
          "Seconds of this rank's steps by part: attention, experts, all_to_all (every "
          "collective of the step, waits included), other.",
          true);
      f.metric.push_back(Sample(s.split.attention, true, {rank, {"phase", "attention"}}));
      f.metric.push_back(Sample(s.split.experts, true, {rank, {"phase", "experts"}}));
      f.metric.push_back(Sample(s.split.all_to_all, true, {rank, {"phase", "all_to_all"}}));
      f.metric.push_back(Sample(s.split.other, true, {rank, {"phase", "other"}}));
      out.push_back(std::move(f));
    }
    {
      prometheus::MetricFamily f = Family("switchyard_ep_dispatch_bytes_total",
                                          "Bytes this rank sent to other ranks, by phase.", true);
      f.metric.push_back(Sample(static_cast<double>(s.dispatch.dispatch_bytes), true, {rank, {"phase", "dispatch"}}));
      f.metric.push_back(Sample(static_cast<double>(s.dispatch.combine_bytes), true, {rank, {"phase", "combine"}}));
      out.push_back(std::move(f));
    }
    {
      const char* state = !running ? "gone"
                          : s.exit != scheduler::RankExit::kRunning ? "gone"
                          : s.leaving ? "draining"
                          : s.epoch > 0 ? "serving"
                                        : "joining";
      prometheus::MetricFamily f =
          Family("switchyard_rank_state", "1 for the state this rank is in.", false);
      for (const char* st : {"joining", "serving", "draining", "gone"})
        f.metric.push_back(Sample(std::string(st) == state ? 1 : 0, false, {rank, {"state", st}}));
      out.push_back(std::move(f));
    }
    return out;
  }

 private:
  mutable sy::Mutex mu_;
  const scheduler::RankRunner* runner_ ABSL_GUARDED_BY(mu_) = nullptr;
  int32_t id_ ABSL_GUARDED_BY(mu_) = -1;
};

absl::StatusOr<std::unique_ptr<WorkerMetrics>> WorkerMetrics::Start(const std::string& host, int port) {
  std::unique_ptr<WorkerMetrics> m(new WorkerMetrics());
  m->collector_ = std::make_shared<Collector>();
  MetricsHttpOptions o;
  o.host = host;
  o.port = port;
  auto server = MetricsHttpServer::Start(o, {m->collector_});
  if (!server.ok()) return sy::Annotate(server.status(), "--metrics-port");
  m->exposer_ = std::move(*server);
  m->port_ = m->exposer_->port();
  return m;
}

WorkerMetrics::~WorkerMetrics() { collector_->Set(nullptr, -1); }

void WorkerMetrics::SetRunner(const scheduler::RankRunner* runner, int32_t id) {
  collector_->Set(runner, id);
}

}  // namespace sy::server
