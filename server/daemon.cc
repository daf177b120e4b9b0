#include "server/daemon.h"

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/server_builder.h"
#include "kernels/core/logging.h"
#include "kernels/core/mutex.h"
#include "kernels/core/status.h"
#include "kernels/core/thread_pool.h"
#include "model/synthetic.h"
#include "scheduler/step_executor.h"
#include "server/net_address.h"
#include "server/secrets.h"

namespace sy::server {
namespace v1 = ::switchyard::v1;

absl::StatusOr<std::string> ResolveModelDir(
    const std::string& model, const std::function<void(const std::string&)>& progress) {
  if (!model.empty() && model != "demo") {
    if (!std::filesystem::is_directory(model))
      return absl::NotFoundError(absl::StrCat("--model: no such folder: ", model));
    return model;
  }
  const std::string dir = model::DefaultDemoDir();
  if (progress && !std::filesystem::exists(std::filesystem::path(dir) / "config.json"))
    progress(absl::StrCat("writing the built-in demo model to ", dir, " (first run only)"));
  SY_RETURN_IF_ERROR(sy::Annotate(model::EnsureDemoModel(dir), "making the demo model"));
  return dir;
}

Daemon::Daemon(const ServeOptions& options) : options_(options) {}

Daemon::~Daemon() { Drain(); }

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Start(const ServeOptions& options) {
  std::unique_ptr<Daemon> d(new Daemon(options));
  d->metrics_ = std::make_unique<ServerMetrics>();
  if (options.metrics_port >= 0)
    SY_RETURN_IF_ERROR(d->metrics_->StartExposer(
        options.metrics_host.empty() ? options.host : options.metrics_host, options.metrics_port));
  SY_ASSIGN_OR_RETURN(d->options_.cluster.secret,
                      ReadSecret(options.cluster.secret, options.cluster.secret_file, "secret-file",
                                 "SWITCHYARD_CLUSTER_SECRET"));
  SY_ASSIGN_OR_RETURN(const std::string admin_token,
                      ReadSecret(options.admin.admin_token, options.admin.admin_token_file,
                                 "admin-token-file", "SWITCHYARD_ADMIN_TOKEN"));
  if (d->options_.cluster.cluster_host.empty()) d->options_.cluster.cluster_host = options.host;
  d->options_.cluster.drain_timeout_s = options.drain_timeout_s;
  if (d->options_.cluster.rank_host.empty())  // peers elsewhere must be able to reach rank 0
    d->options_.cluster.rank_host =
        options.host != "0.0.0.0" && options.host != "::" && !options.host.empty() ? options.host
                                                                                   : HostAddress();
  InferenceServiceOptions so;
  so.default_max_new_tokens = options.default_max_new_tokens;
  if (!options.api_key_file.empty()) {
    SY_ASSIGN_OR_RETURN(so.api_keys, ReadKeys(options.api_key_file, "api-key-file"));
  }
  d->service_ = std::make_unique<InferenceService>(so, d->metrics_.get());
  d->service_->set_on_auth_failure(d->metrics_->AuthFailureCounter("inference"));

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  SY_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> creds,
                      MakeServerCredentials(options.tls));
  builder.AddListeningPort(absl::StrCat(options.host, ":", options.port), creds, &d->port_);
  builder.RegisterService(d->service_.get());
  d->admin_ = std::make_unique<AdminService>(admin_token);
  d->admin_->set_on_auth_failure(d->metrics_->AuthFailureCounter("admin"));
  d->admin_->SetDrainWaitLimit(std::chrono::milliseconds(
      static_cast<int64_t>((options.drain_timeout_s + 60) * 1000)));
  builder.RegisterService(d->admin_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(options.max_message_bytes));
  d->server_ = builder.BuildAndStart();
  if (d->server_ == nullptr || d->port_ == 0)
    return absl::UnavailableError(
        absl::StrCat("--port: cannot listen on ", options.host, ":", options.port));
  d->SetHealth(false);
  return d;
}

void Daemon::SetHealth(bool serving) {
  grpc::HealthCheckServiceInterface* h = server_->GetHealthCheckService();
  if (h == nullptr) return;
  h->SetServingStatus(serving);  // "" (the whole server) and every service
  h->SetServingStatus(v1::Inference::service_full_name(), serving);
}

absl::Status Daemon::Load(const std::function<void(const std::string&)>& progress) {
  sy::MutexLock lock(&drain_mu_);
  if (drained_) return absl::CancelledError("the daemon was drained before the model loaded");
  if (options_.threads > 0) ThreadPool::SetDefaultThreads(options_.threads);
  SY_ASSIGN_OR_RETURN(model_dir_, ResolveModelDir(options_.model, progress));
  if (progress) progress(absl::StrCat("loading model ", model_dir_));
  const auto t0 = std::chrono::steady_clock::now();
  model::LoadOptions lo;
  lo.backend = options_.backend;
  if (options_.cluster.multi_rank()) {  // a rank group: the leader loads its experts
    SY_ASSIGN_OR_RETURN(cluster_, ClusterLeader::Start(options_.cluster, model_dir_, options_.backend,
                                                       options_.kv_cache_bytes, options_.block_size,
                                                       progress));
    lo.experts_per_layer = cluster_->leader_experts();
  }
  SY_ASSIGN_OR_RETURN(model_, model::MoeModel::Load(model_dir_, lo));
  const std::string tok_path = (std::filesystem::path(model_dir_) / "tokenizer.json").string();
  if (std::filesystem::exists(tok_path)) {
    SY_ASSIGN_OR_RETURN(tokenizer_, model::Tokenizer::FromFile(tok_path));
  }
  const model::ModelConfig& c = model_->config();

  if (options_.block_size < 1) return absl::InvalidArgumentError("--block-size: must be >= 1");
  scheduler::EngineOptions eo;
  eo.block_size = options_.block_size;
  eo.num_blocks = scheduler::NumBlocksForBytes(c, options_.kv_cache_bytes, options_.block_size);
  eo.scheduler.max_num_seqs = options_.max_num_seqs;
  eo.scheduler.max_num_batched_tokens = options_.max_num_batched_tokens;
  eo.max_queue = options_.max_queue;
  if (options_.block_size < 1 || options_.max_num_seqs < 1 || options_.max_num_batched_tokens < 1 ||
      options_.max_queue < 1)
    return absl::InvalidArgumentError(
        "--block-size, --max-num-seqs, --max-num-batched-tokens and --max-queue must be >= 1");
  if (eo.num_blocks < 1)
    return absl::InvalidArgumentError(absl::StrCat(
        "--kv-cache-bytes: ", options_.kv_cache_bytes, " bytes hold no KV block of ",
        model::KvCache::BytesPerBlock(c, options_.block_size), " bytes"));
  std::unique_ptr<scheduler::StepExecutor> executor;
  if (cluster_ != nullptr) {  // waits for --min-ranks ranks; a failed group turns health off
    cluster_->RegisterMetrics(metrics_->registry());
    if (ClusterService* service = cluster_->service())  // none with --local-ranks alone
      service->set_on_auth_failure(metrics_->AuthFailureCounter("cluster"));
    SY_ASSIGN_OR_RETURN(executor, cluster_->MakeExecutor(
                                      model_.get(), [this](const absl::Status&) { SetHealth(false); },
                                      &cancel_load_));
  } else {
    executor = std::make_unique<scheduler::LocalStepExecutor>(model_.get(), eo.num_blocks,
                                                              eo.block_size);
  }
  live_ = std::make_unique<LivePlacement>(  // installs the load recorder before any step
      model_.get(), dynamic_cast<scheduler::DistributedStepExecutor*>(executor.get()),
      &metrics_->registry(), options_.admin);
  if (cluster_ != nullptr) {
    LivePlacement* live = live_.get();
    cluster_->SetLoadSource([live] { return live->RecentLoads(); });
  }
  service_->SetGroupInfo([live = live_.get()] {
    GroupInfo g;
    g.world_size = live->world_size();
    if (auto p = live->placement()) g.placement_epoch = p->epoch();
    return g;
  });
  admin_->SetCluster(cluster_ != nullptr ? cluster_->membership() : nullptr);
  engine_ = std::make_unique<scheduler::Engine>(std::move(executor), tokenizer_.get(), eo,
                                                metrics_.get());
  engine_->Start();
  live_->Start();
  admin_->SetReady(live_.get());

  v1::ModelInfo info;
  info.set_model_dir(model_dir_);
  info.set_architecture(c.architecture);
  info.set_model_type(c.model_type);
  info.set_vocab_size(c.vocab_size);
  info.set_context_length(engine_->limits().context_length);
  info.set_num_layers(c.num_layers);
  info.set_hidden_size(c.hidden_size);
  info.set_num_experts(c.num_experts);
  info.set_num_experts_per_tok(c.num_experts_per_tok);
  info.set_num_parameters(model_->NumParameters());
  info.set_dtype(c.torch_dtype);
  info.set_bos_token_id(c.bos_token_id);
  for (int32_t e : c.eos_token_ids) info.add_eos_token_ids(e);
  info.set_has_tokenizer(tokenizer_ != nullptr);
  metrics_->SetEngine(engine_.get());
  service_->SetReady(engine_.get(), tokenizer_.get(), info);
  SetHealth(true);
  if (progress)
    progress(absl::StrCat(
        "loaded ", c.architecture, " (", model_->NumParameters() / 1e6, " M parameters, ",
        c.torch_dtype, ") in ",
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
        " s; KV cache ", eo.num_blocks, " blocks of ", eo.block_size, " positions, context ",
        engine_->limits().context_length));
  return absl::OkStatus();
}

void Daemon::Drain() {
  cancel_load_ = true;  // a Load waiting for --min-ranks ranks gives up (it holds drain_mu_)
  sy::MutexLock lock(&drain_mu_);
  if (drained_) return;
  drained_ = true;
  if (server_ == nullptr) return;
  SetHealth(false);
  service_->SetDraining();
  admin_->SetReady(nullptr);
  admin_->SetCluster(nullptr);
  if (live_ != nullptr) live_->Stop();  // before the engine (and its executor) stop
  if (engine_ != nullptr) {
    engine_->StopAccepting();
    const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(options_.drain_timeout_s * 1000));
    if (!engine_->WaitIdle(timeout))
      SY_LOG(WARNING) << "drain: requests still running after " << options_.drain_timeout_s
                      << " s; aborting them";
    engine_->Stop();  // aborts whatever is left; every call gets its Finish
  }
  // Every call the engine finished has its last messages queued; let them reach the clients
  // (bounded), then stop at once (long-lived calls such as health Watch are cancelled).
  const auto flush_until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (service_->active_streams() > 0 && std::chrono::steady_clock::now() < flush_until)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  server_->Shutdown(std::chrono::system_clock::now());
  server_->Wait();
  metrics_->SetEngine(nullptr);
}

}  // namespace sy::server
