// The daemon in process on 127.0.0.1 with OS-picked ports: Generate against a plain greedy
// reference, 32 concurrent streams, cancel / deadline / queue full / drain, bad input, health,
// reflection and the /metrics counts.
#include <atomic>
#include <cmath>
#include <fstream>
#include <future>
#include <limits>
#include <thread>

#include "grpcpp/generic/generic_stub.h"
#include "model/tokenizer.h"
#include "tests/server/server_fixture.h"

namespace sy::server::testing {
namespace {

class InferenceServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir("sy-inference-test");
    model_dir_ = new std::string(WriteTinyModel(*dir_));
    auto m = model::MoeModel::Load(*model_dir_);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = m->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete model_dir_;
    delete dir_;
  }

  void StartDaemon(ServeOptions o) {
    auto d = Daemon::Start(o);
    ASSERT_TRUE(d.ok()) << d.status();
    daemon_ = std::move(*d);
    channel_ = Connect(daemon_->port());
    EXPECT_EQ(CheckHealth(channel_), HealthStatus::NOT_SERVING);  // not loaded yet
    absl::Status s = daemon_->Load();
    ASSERT_TRUE(s.ok()) << s;
    stub_ = v1::Inference::NewStub(channel_);
  }
  void StartDaemon() { StartDaemon(TestServeOptions(*model_dir_)); }
  void TearDown() override { daemon_.reset(); }

  static std::vector<int32_t> Prompt(int i, int len) {
    std::vector<int32_t> p;
    for (int j = 0; j < len; ++j) p.push_back(3 + (i * 37 + j * 11) % 500);
    return p;
  }

  static TempDir* dir_;
  static std::string* model_dir_;
  static model::MoeModel* model_;
  std::unique_ptr<Daemon> daemon_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Inference::Stub> stub_;
};
TempDir* InferenceServiceTest::dir_ = nullptr;
std::string* InferenceServiceTest::model_dir_ = nullptr;
model::MoeModel* InferenceServiceTest::model_ = nullptr;

TEST_F(InferenceServiceTest, StreamingGenerateGivesTheGreedyReferenceTokens) {
  StartDaemon();
  const std::vector<int32_t> prompt = {1, 5, 9};
  StreamResult r = RunGenerate(*stub_, IdsRequest(prompt, 24));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  ASSERT_TRUE(r.has_completion);
  const std::vector<int32_t> ref = ReferenceGreedy(*model_, prompt, 24);
  EXPECT_EQ(std::vector<int32_t>(r.completion.token_ids().begin(), r.completion.token_ids().end()), ref);
  EXPECT_EQ(r.chunk_ids, ref);  // streamed chunks carry the same tokens
  EXPECT_GE(r.num_chunks, 1);
  EXPECT_EQ(r.completion.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.completion.prompt_tokens(), 3);
  EXPECT_EQ(r.completion.completion_tokens(), 24);
  EXPECT_EQ(r.chunk_text, r.completion.text());
}

TEST_F(InferenceServiceTest, NonStreamingSendsOnlyTheCompletion) {
  StartDaemon();
  v1::GenerateRequest req = IdsRequest({1, 5, 9}, 10);
  req.set_stream(false);
  StreamResult r = RunGenerate(*stub_, req);
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.num_chunks, 0);
  ASSERT_TRUE(r.has_completion);
  EXPECT_EQ(std::vector<int32_t>(r.completion.token_ids().begin(), r.completion.token_ids().end()),
            ReferenceGreedy(*model_, {1, 5, 9}, 10));
}

TEST_F(InferenceServiceTest, ThirtyTwoConcurrentStreamsAllFinishWithTheRightTokens) {
  // A KV cache too small for all 32 at once (48 blocks of 16 = 768 positions for up to 32 x 60)
  // so the scheduler also preempts and recomputes.
  ServeOptions o = TestServeOptions(*model_dir_);
  o.kv_cache_bytes = 48 * model::KvCache::BytesPerBlock(model_->config(), 16);
  o.max_num_batched_tokens = 64;
  StartDaemon(o);
  constexpr int kStreams = 32;
  std::vector<StreamResult> results(kStreams);
  std::vector<std::thread> threads;
  for (int i = 0; i < kStreams; ++i)
    threads.emplace_back([&, i] { results[i] = RunGenerate(*stub_, IdsRequest(Prompt(i, 8 + i % 24), 16 + i % 20)); });
  for (auto& t : threads) t.join();
  for (int i = 0; i < kStreams; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << i << ": " << results[i].status.error_message();
    const auto& c = results[i].completion;
    EXPECT_EQ(std::vector<int32_t>(c.token_ids().begin(), c.token_ids().end()),
              ReferenceGreedy(*model_, Prompt(i, 8 + i % 24), 16 + i % 20))
        << "stream " << i;
    EXPECT_EQ(results[i].chunk_ids.size(), static_cast<size_t>(16 + i % 20));
  }
  v1::ServerInfo info = WaitForAllBlocksFree(*stub_);
  EXPECT_EQ(info.kv_blocks_free(), info.kv_blocks_total());
  EXPECT_EQ(info.requests_total(), kStreams);
}

TEST_F(InferenceServiceTest, TextInputIsTokenizedAndDetokenizedIncrementally) {
  StartDaemon();
  auto tok = model::Tokenizer::FromFile(*model_dir_ + "/tokenizer.json");
  ASSERT_TRUE(tok.ok());
  v1::GenerateRequest req;
  req.set_text("The quick brown fox");
  req.mutable_sampling()->set_max_new_tokens(40);
  req.mutable_sampling()->set_ignore_eos(true);
  StreamResult r = RunGenerate(*stub_, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  const std::vector<int32_t> prompt = (*tok)->Encode("The quick brown fox", true);
  EXPECT_EQ(r.completion.prompt_tokens(), static_cast<int32_t>(prompt.size()));
  const std::vector<int32_t> out(r.completion.token_ids().begin(), r.completion.token_ids().end());
  EXPECT_EQ(out, ReferenceGreedy(*model_, prompt, 40));
  EXPECT_EQ(r.completion.text(), (*tok)->Decode(out));
  EXPECT_EQ(r.chunk_text, r.completion.text());
}

TEST_F(InferenceServiceTest, ATextThatCannotFitTheContextIsRefusedBeforeTokenizing) {
  StartDaemon();
  v1::GenerateRequest req;
  req.set_text(std::string(900 * 1000, 'a'));  // under the test daemon's 1 MB message limit
  req.mutable_sampling()->set_max_new_tokens(4);
  const auto t0 = std::chrono::steady_clock::now();
  StreamResult r = RunGenerate(*stub_, req);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(r.status.error_message().find("cannot fit the context"), std::string::npos)
      << r.status.error_message();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(1500));
  // A text that fits still works.
  req.set_text("The quick brown fox");
  EXPECT_TRUE(RunGenerate(*stub_, req).status.ok());
}

TEST_F(InferenceServiceTest, AStopStringCutsTheTextAndFinishesWithStop) {
  StartDaemon();
  // Find a stop string in the unconstrained output, then ask again with it.
  StreamResult free_run = RunGenerate(*stub_, IdsRequest({1, 20, 30, 40}, 60));
  ASSERT_TRUE(free_run.status.ok());
  const std::string text = free_run.completion.text();
  ASSERT_GE(text.size(), 12u);
  // A stop string of about 3 bytes in the middle, on UTF-8 character boundaries.
  auto is_cont = [&](size_t i) { return i < text.size() && (static_cast<unsigned char>(text[i]) & 0xC0) == 0x80; };
  size_t at = text.size() / 2, end = at + 3;
  while (at > 0 && is_cont(at)) --at;
  while (is_cont(end)) ++end;
  const std::string stop = text.substr(at, end - at);
  const size_t first = text.find(stop);
  v1::GenerateRequest req = IdsRequest({1, 20, 30, 40}, 60);
  req.mutable_sampling()->add_stop(stop);
  StreamResult r = RunGenerate(*stub_, req);
  ASSERT_TRUE(r.status.ok());
  EXPECT_EQ(r.completion.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(r.completion.text(), text.substr(0, first));
  EXPECT_EQ(r.chunk_text, r.completion.text());  // the held-back part never went out
}

TEST_F(InferenceServiceTest, StopTokenIdEndsTheStream) {
  StartDaemon();
  const std::vector<int32_t> ref = ReferenceGreedy(*model_, {1, 5, 9}, 20);
  v1::GenerateRequest req = IdsRequest({1, 5, 9}, 20);
  req.mutable_sampling()->add_stop_token_ids(ref[5]);
  StreamResult r = RunGenerate(*stub_, req);
  ASSERT_TRUE(r.status.ok());
  const size_t first = std::find(ref.begin(), ref.end(), ref[5]) - ref.begin();
  EXPECT_EQ(r.completion.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(r.completion.completion_tokens(), static_cast<int32_t>(first + 1));
}

TEST_F(InferenceServiceTest, ACancelledStreamFreesItsKvBlocks) {
  StartDaemon();
  v1::ServerInfo before = GetServerInfo(*stub_);
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, IdsRequest(Prompt(1, 100), 3900));
  v1::GenerateResponse resp;
  int chunks = 0;
  while (chunks < 3 && reader->Read(&resp)) chunks += resp.has_chunk();
  ASSERT_EQ(chunks, 3);
  EXPECT_LT(GetServerInfo(*stub_).kv_blocks_free(), before.kv_blocks_total());
  ctx.TryCancel();
  while (reader->Read(&resp)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  v1::ServerInfo after = WaitForAllBlocksFree(*stub_);
  EXPECT_EQ(after.kv_blocks_free(), after.kv_blocks_total());
  EXPECT_EQ(after.requests_running(), 0);
}

TEST_F(InferenceServiceTest, ADeadlineAbortsTheRequestAndFreesItsKvBlocks) {
  ServeOptions o = TestServeOptions(*model_dir_);
  o.metrics_port = 0;
  StartDaemon(o);
  // 3900 tokens take far longer than 150 ms even in a release build.
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(150));
  auto reader = stub_->Generate(&ctx, IdsRequest(Prompt(2, 100), 3900));
  v1::GenerateResponse resp;
  int chunks = 0;
  while (reader->Read(&resp)) chunks += resp.has_chunk();
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_GT(chunks, 0);
  v1::ServerInfo after = WaitForAllBlocksFree(*stub_);
  EXPECT_EQ(after.kv_blocks_free(), after.kv_blocks_total());
  // gRPC cancels the call at its deadline; the server still counts it as a deadline.
  const std::string text = HttpGet(daemon_->metrics_port(), "/metrics");
  EXPECT_EQ(MetricValue(text, "switchyard_requests_failed_total{code=\"DEADLINE_EXCEEDED\"}"), 1);
  EXPECT_NE(MetricValue(text, "switchyard_requests_failed_total{code=\"CANCELLED\"}"), 1);
}

TEST_F(InferenceServiceTest, AFullQueueGivesResourceExhausted) {
  ServeOptions o = TestServeOptions(*model_dir_);
  o.max_num_seqs = 1;
  o.max_queue = 1;
  StartDaemon(o);
  // The first runs (one sequence per step), the second waits, the third finds the queue full.
  grpc::ClientContext c1, c2;
  auto r1 = stub_->Generate(&c1, IdsRequest(Prompt(1, 10), 3000));
  v1::GenerateResponse resp;
  ASSERT_TRUE(r1->Read(&resp));  // running
  auto r2 = stub_->Generate(&c2, IdsRequest(Prompt(2, 10), 10));
  // Wait until the server counts the second as waiting.
  for (int i = 0; i < 500 && GetServerInfo(*stub_).requests_waiting() < 1; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  StreamResult r3 = RunGenerate(*stub_, IdsRequest(Prompt(3, 10), 10));
  EXPECT_EQ(r3.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(r3.status.error_message().find("queue"), std::string::npos);
  c1.TryCancel();
  while (r1->Read(&resp)) {
  }
  r1->Finish();
  // The waiting one then runs to completion.
  int n = 0;
  while (r2->Read(&resp)) n += resp.has_chunk() ? resp.chunk().token_ids_size() : 0;
  EXPECT_TRUE(r2->Finish().ok());
  EXPECT_EQ(n, 10);
}

TEST_F(InferenceServiceTest, HealthGoesNotServingDuringDrainWhileRunningRequestsFinish) {
  StartDaemon();
  EXPECT_EQ(CheckHealth(channel_), HealthStatus::SERVING);
  EXPECT_EQ(CheckHealth(channel_, "switchyard.v1.Inference"), HealthStatus::SERVING);
  // Watch sees SERVING, then NOT_SERVING.
  auto health = grpc::health::v1::Health::NewStub(channel_);
  grpc::ClientContext wctx;
  auto watch = health->Watch(&wctx, grpc::health::v1::HealthCheckRequest());
  HealthStatus w;
  ASSERT_TRUE(watch->Read(&w));
  EXPECT_EQ(w.status(), HealthStatus::SERVING);

  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, IdsRequest(Prompt(4, 50), 800));
  v1::GenerateResponse resp;
  ASSERT_TRUE(reader->Read(&resp));
  std::thread drainer([&] { daemon_->Drain(); });
  // While the long request still streams, health is NOT_SERVING and new calls are refused.
  HealthStatus::ServingStatus seen = HealthStatus::SERVING;
  for (int i = 0; i < 1000 && seen == HealthStatus::SERVING; ++i) {
    seen = CheckHealth(channel_);
    if (seen == HealthStatus::SERVING) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(seen, HealthStatus::NOT_SERVING);
  ASSERT_TRUE(watch->Read(&w));
  EXPECT_EQ(w.status(), HealthStatus::NOT_SERVING);
  StreamResult refused = RunGenerate(*stub_, IdsRequest({1, 2, 3}, 4));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  int tokens = resp.chunk().token_ids_size();
  v1::GenerateCompletion done;
  while (reader->Read(&resp)) {
    if (resp.has_chunk()) tokens += resp.chunk().token_ids_size();
    if (resp.has_completion()) done = resp.completion();
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 800);
  EXPECT_EQ(done.finish_reason(), v1::FINISH_REASON_LENGTH);
  drainer.join();
  wctx.TryCancel();
}

TEST_F(InferenceServiceTest, BadInputGetsInvalidArgumentNamingTheFieldAndServingGoesOn) {
  ServeOptions o = TestServeOptions(*model_dir_);
  o.max_message_bytes = 64 << 10;
  StartDaemon(o);
  const int64_t context = GetServerInfo(*stub_).kv_blocks_total() * 16;
  struct Case {
    std::string what;
    v1::GenerateRequest req;
    std::string field;
  };
  std::vector<Case> cases;
  auto base = [] { return IdsRequest({1, 2, 3}, 4); };
  cases.push_back({"no input", v1::GenerateRequest(), "input"});
  {
    v1::GenerateRequest r;
    r.set_text("");
    cases.push_back({"empty text", r, "text"});
  }
  {
    v1::GenerateRequest r;
    r.mutable_token_ids();
    cases.push_back({"empty ids", r, "token_ids"});
  }
  {
    auto r = IdsRequest({1, 512, 3}, 4);
    cases.push_back({"id outside vocab", r, "token_ids[1]"});
  }
  {
    auto r = IdsRequest({-4}, 4);
    cases.push_back({"negative id", r, "token_ids[0]"});
  }
  {
    std::vector<int32_t> longp(std::min<int64_t>(context, 4096), 5);
    cases.push_back({"prompt longer than context", IdsRequest(longp, 4), "prompt"});
  }
  {
    auto r = base();
    r.mutable_sampling()->set_max_new_tokens(0);
    cases.push_back({"max_new_tokens 0", r, "max_new_tokens"});
  }
  {
    auto r = base();
    r.mutable_sampling()->set_max_new_tokens(5000);
    cases.push_back({"max_new_tokens past context", r, "max_new_tokens"});
  }
  {
    auto r = base();
    r.mutable_sampling()->set_temperature(-1.f);
    cases.push_back({"negative temperature", r, "temperature"});
  }
  {
    auto r = base();
    r.mutable_sampling()->set_temperature(std::numeric_limits<float>::quiet_NaN());
    cases.push_back({"NaN temperature", r, "temperature"});
  }
  {
    auto r = base();
    r.mutable_sampling()->set_top_p(0.f);
    cases.push_back({"top_p 0", r, "top_p"});
  }
  {
    auto r = base();
    r.mutable_sampling()->set_top_p(1.01f);
    cases.push_back({"top_p > 1", r, "top_p"});
  }
  {
    auto r = base();
    r.mutable_sampling()->set_top_k(-2);
    cases.push_back({"negative top_k", r, "top_k"});
  }
  {
    auto r = base();
    r.mutable_sampling()->add_stop(std::string(context + 1, 'x'));
    cases.push_back({"stop string longer than context", r, "stop[0]"});
  }
  for (const Case& c : cases) {
    StreamResult r = RunGenerate(*stub_, c.req);
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.what;
    EXPECT_NE(r.status.error_message().find(c.field), std::string::npos)
        << c.what << ": " << r.status.error_message();
    // The daemon goes on serving everyone else.
    StreamResult ok = RunGenerate(*stub_, base());
    EXPECT_TRUE(ok.status.ok()) << "after " << c.what;
  }
  // A message over --max-message-bytes.
  std::vector<int32_t> huge(40000, 500);  // 2 bytes each as a varint: 80 KB > 64 KiB
  StreamResult big = RunGenerate(*stub_, IdsRequest(huge, 4));
  EXPECT_EQ(big.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << big.status.error_message();
  EXPECT_TRUE(RunGenerate(*stub_, base()).status.ok());
}

// Sends `bytes` as the request of `method` and returns the call's status (no response
// message is expected: every case here is refused).
grpc::Status RawCall(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                     const std::string& bytes) {
  grpc::GenericStub stub(channel);
  grpc::Slice slice(bytes);
  grpc::ByteBuffer request(&slice, 1), response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  std::promise<grpc::Status> done;
  stub.UnaryCall(&ctx, method, grpc::StubOptions(), &request, &response,
                 [&](grpc::Status s) { done.set_value(std::move(s)); });
  return done.get_future().get();
}

TEST_F(InferenceServiceTest, BytesThatAreNotTheRequestMessageAreInvalidArgument) {
  ServeOptions o = TestServeOptions(*model_dir_);
  o.metrics_port = 0;
  StartDaemon(o);
  // (generate_only: the info requests have no field 1, so there it is an unknown field.)
  struct Case {
    std::string what, bytes;
    bool generate_only = false;
  };
  const std::vector<Case> cases = {
      {"a varint that never ends", std::string(11, '\xff')},
      {"a length past the end", std::string("\x12\x7f\x08\x01", 4)},
      {"invalid UTF-8 in text", std::string("\x0a\x03\xff\xfe\x41", 5), true},
      {"a group that never closes", std::string("\x0b", 1)},
  };
  for (const auto& [what, bytes, generate_only] : cases) {
    for (const char* method :
         {"/switchyard.v1.Inference/Generate", "/switchyard.v1.Inference/GetModelInfo",
          "/switchyard.v1.Inference/GetServerInfo"}) {
      if (generate_only && std::string(method).find("Generate") == std::string::npos) continue;
      const grpc::Status s = RawCall(channel_, method, bytes);
      EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << what << " to " << method;
      EXPECT_NE(s.error_message().find("not a valid switchyard.v1."), std::string::npos)
          << s.error_message();
    }
    EXPECT_TRUE(RunGenerate(*stub_, IdsRequest({1, 2, 3}, 2)).status.ok()) << "after " << what;
  }
  const std::string text = HttpGet(daemon_->metrics_port(), "/metrics");
  EXPECT_EQ(MetricValue(text, "switchyard_requests_failed_total{code=\"INVALID_ARGUMENT\"}"),
            static_cast<double>(cases.size()));  // Generate's refusals are counted
}

TEST_F(InferenceServiceTest, WithApiKeysEveryCallNeedsOneAndGuessingIsSlowed) {
  const std::string keys = dir_->path() + "/api-keys";
  std::ofstream(keys) << "# two keys\nkey-one-0123456789abcdef\n\n  key-two-0123456789abcdef  \n";
  ServeOptions o = TestServeOptions(*model_dir_);
  o.metrics_port = 0;
  o.api_key_file = keys;
  StartDaemon(o);
  auto generate = [&](const std::string& authorization) {
    grpc::ClientContext ctx;
    if (!authorization.empty()) ctx.AddMetadata("authorization", authorization);
    auto reader = stub_->Generate(&ctx, IdsRequest({1, 2, 3}, 2));
    v1::GenerateResponse r;
    while (reader->Read(&r)) {
    }
    return reader->Finish();
  };
  EXPECT_TRUE(generate("Bearer key-one-0123456789abcdef").ok());
  EXPECT_TRUE(generate("Bearer key-two-0123456789abcdef").ok());
  int refused = 0;
  for (const std::string bad : {"", "key-one-0123456789abcdef", "Bearer key-one-0123456789abcde",
                                "Bearer key-one-0123456789abcdef0", "Bearer wrong",
                                "bearer key-one-0123456789abcdef"}) {
    const grpc::Status s = generate(bad);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << "'" << bad << "'";
    EXPECT_NE(s.error_message().find("authorization: Bearer"), std::string::npos);
    ++refused;
  }
  {  // the other methods too; health stays open for load balancers
    grpc::ClientContext ctx;
    v1::ModelInfo info;
    EXPECT_EQ(stub_->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
    ++refused;
    EXPECT_EQ(CheckHealth(channel_), HealthStatus::SERVING);
  }
  // Ten failures in a row from this address: even the right key waits (RESOURCE_EXHAUSTED).
  while (refused < 10) {
    EXPECT_EQ(generate("Bearer guess").error_code(), grpc::StatusCode::UNAUTHENTICATED);
    ++refused;
  }
  EXPECT_EQ(generate("Bearer key-one-0123456789abcdef").error_code(),
            grpc::StatusCode::RESOURCE_EXHAUSTED);
  const std::string text = HttpGet(daemon_->metrics_port(), "/metrics");
  EXPECT_EQ(MetricValue(text, "switchyard_auth_failures_total{service=\"inference\"}"), 10);
  EXPECT_EQ(MetricValue(text, "switchyard_auth_failures_total{service=\"admin\"}"), 0);
}

TEST_F(InferenceServiceTest, AnApiKeyFileThatCannotServeIsAnErrorAtStart) {
  const std::string empty = dir_->path() + "/no-keys", short_key = dir_->path() + "/short-key";
  std::ofstream(empty) << "# nothing\n\n";
  std::ofstream(short_key) << "abc\n";
  for (const auto& [file, says] : std::vector<std::pair<std::string, std::string>>{
           {empty, "holds no key"}, {short_key, "at least 16 bytes"}, {dir_->path() + "/none", "cannot read"}}) {
    ServeOptions o = TestServeOptions(*model_dir_);
    o.api_key_file = file;
    auto d = Daemon::Start(o);
    ASSERT_FALSE(d.ok()) << file;
    EXPECT_NE(d.status().message().find("--api-key-file"), std::string::npos) << d.status();
    EXPECT_NE(d.status().message().find(says), std::string::npos) << d.status();
  }
}

TEST_F(InferenceServiceTest, ModelAndServerInfoDescribeTheDaemon) {
  StartDaemon();
  grpc::ClientContext ctx;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.vocab_size(), 512);
  EXPECT_EQ(info.architecture(), "MixtralForCausalLM");
  EXPECT_TRUE(info.has_tokenizer());
  EXPECT_EQ(info.context_length(), std::min<int64_t>(4096, GetServerInfo(*stub_).kv_blocks_total() * 16));
  v1::ServerInfo s = GetServerInfo(*stub_);
  EXPECT_TRUE(s.serving());
  EXPECT_EQ(s.world_size(), 1);
  EXPECT_EQ(s.kv_blocks_free(), s.kv_blocks_total());
}

TEST_F(InferenceServiceTest, ReflectionListsTheServices) {
  StartDaemon();
  // ServerReflectionRequest{list_services: ""} encoded by hand (field 7, empty string): the
  // reflection protos live inside libgrpc++_reflection, not in our generated code.
  grpc::GenericStub generic(channel_);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto call = generic.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag;
  bool ok;
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  const char request[] = {0x3a, 0x00};
  grpc::Slice slice(request, sizeof(request));
  grpc::ByteBuffer out(&slice, 1);
  call->Write(out, reinterpret_cast<void*>(2));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::ByteBuffer in;
  call->Read(&in, reinterpret_cast<void*>(3));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(in.Dump(&slices).ok());
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_NE(bytes.find("switchyard.v1.Inference"), std::string::npos);
  EXPECT_NE(bytes.find("grpc.health.v1.Health"), std::string::npos);
  call->WritesDone(reinterpret_cast<void*>(4));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
}

TEST_F(InferenceServiceTest, MetricsCountsAddUpAfterAFewRequests) {
  ServeOptions o = TestServeOptions(*model_dir_);
  o.metrics_port = 0;
  StartDaemon(o);
  int64_t generated = 0, prompt_tokens = 0;
  for (int i = 0; i < 5; ++i) {
    StreamResult r = RunGenerate(*stub_, IdsRequest(Prompt(i, 4 + i), 6 + i));
    ASSERT_TRUE(r.status.ok());
    generated += r.completion.completion_tokens();
    prompt_tokens += r.completion.prompt_tokens();
  }
  for (int i = 0; i < 2; ++i) {
    auto bad = IdsRequest({1}, 4);
    bad.mutable_sampling()->set_top_k(-1);
    EXPECT_EQ(RunGenerate(*stub_, bad).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  const std::string text = HttpGet(daemon_->metrics_port(), "/metrics");
  ASSERT_FALSE(text.empty());
  EXPECT_EQ(MetricValue(text, "switchyard_request_success_total{finish_reason=\"length\"}"), 5);
  EXPECT_EQ(MetricValue(text, "switchyard_request_success_total{finish_reason=\"stop\"}"), 0);
  EXPECT_EQ(MetricValue(text, "switchyard_requests_failed_total{code=\"INVALID_ARGUMENT\"}"), 2);
  EXPECT_EQ(MetricValue(text, "switchyard_generation_tokens_total"), generated);
  EXPECT_EQ(MetricValue(text, "switchyard_prompt_tokens_total"), prompt_tokens);
  EXPECT_EQ(MetricValue(text, "switchyard_time_to_first_token_seconds_count"), 5);
  EXPECT_EQ(MetricValue(text, "switchyard_e2e_request_latency_seconds_count"), 5);
  EXPECT_EQ(MetricValue(text, "switchyard_request_queue_seconds_count"), 5);
  // One gap per token after the first.
  EXPECT_EQ(MetricValue(text, "switchyard_inter_token_latency_seconds_count"), generated - 5);
  EXPECT_EQ(MetricValue(text, "switchyard_requests_running"), 0);
  EXPECT_EQ(MetricValue(text, "switchyard_requests_waiting"), 0);
  EXPECT_EQ(MetricValue(text, "switchyard_kv_cache_usage_ratio"), 0);
  const double steps = MetricValue(text, "switchyard_step_seconds_count{phase=\"prefill\"}") +
                       MetricValue(text, "switchyard_step_seconds_count{phase=\"decode\"}") +
                       MetricValue(text, "switchyard_step_seconds_count{phase=\"mixed\"}");
  EXPECT_GE(steps, generated);  // sequential requests: one step per token
  EXPECT_NE(text.find("switchyard_step_seconds_bucket{phase=\"decode\",le=\"0.001\"}"), std::string::npos);
}

TEST_F(InferenceServiceTest, GenerateIsUnavailableWhileTheModelLoads) {
  auto d = Daemon::Start(TestServeOptions(*model_dir_));
  ASSERT_TRUE(d.ok());
  auto ch = Connect((*d)->port());
  auto stub = v1::Inference::NewStub(ch);
  EXPECT_EQ(CheckHealth(ch), HealthStatus::NOT_SERVING);
  EXPECT_EQ(RunGenerate(*stub, IdsRequest({1, 2}, 2)).status.error_code(), grpc::StatusCode::UNAVAILABLE);
  ASSERT_TRUE((*d)->Load().ok());
  EXPECT_EQ(CheckHealth(ch), HealthStatus::SERVING);
  EXPECT_TRUE(RunGenerate(*stub, IdsRequest({1, 2}, 2)).status.ok());
}

}  // namespace
}  // namespace sy::server::testing
