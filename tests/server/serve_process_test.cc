// The built `switchyard` binary as separate processes on 127.0.0.1 with OS-picked ports:
// `serve` against `run` and `generate`, SIGTERM drain, `loadgen`, and the Python example
// client (Debian's python3-grpcio).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "kernels/core/logging.h"
#include "tests/server/server_fixture.h"
#include "tests/testing/child_process.h"

namespace sy::server::testing {
namespace {

const std::string kBinary = SY_BINARY_DIR "/server/switchyard";

// A child process whose stdout we read line by line.
class ServeProcess {
 public:
  explicit ServeProcess(std::vector<std::string> args,
                        std::vector<std::pair<std::string, std::string>> env = {}) {
    int out[2];
    SY_CHECK(pipe(out) == 0);
    args.insert(args.begin(), kBinary);
    sy::testing::ExecArgs exec(std::move(args), std::move(env));
    pid_ = fork();
    SY_CHECK(pid_ >= 0);
    if (pid_ == 0) {
      dup2(out[1], 1);
      close(out[0]);
      close(out[1]);
      exec.Exec();
    }
    close(out[1]);
    fd_ = out[0];
  }
  ~ServeProcess() {
    if (pid_ > 0 && !exited_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (fd_ >= 0) close(fd_);
  }
  // Next stdout line, or "" after `timeout_s`.
  std::string ReadLine(double timeout_s = 60) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
    for (;;) {
      const size_t nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return line;
      }
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - std::chrono::steady_clock::now()).count();
      if (left <= 0) return "";
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, static_cast<int>(left)) <= 0) return "";
      char tmp[512];
      const ssize_t n = read(fd_, tmp, sizeof(tmp));
      if (n <= 0) return "";
      buf_.append(tmp, n);
    }
  }
  // Waits for a line starting with `prefix`; returns the port after the last ':' (0 if none).
  int WaitForPort(const std::string& prefix) {
    for (std::string line = ReadLine(); !line.empty(); line = ReadLine()) {
      if (line.rfind(prefix, 0) == 0) {
        int port = 0;
        std::string tail = line.substr(line.rfind(':') + 1);
        if (const size_t slash = tail.find('/'); slash != std::string::npos) tail.resize(slash);
        return absl::SimpleAtoi(tail, &port) ? port : 0;
      }
    }
    return 0;
  }
  void Signal(int sig) { kill(pid_, sig); }
  // Exit status (or -1 on a signal / timeout).
  int Wait(double timeout_s = 60) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
    int status = 0;
    while (std::chrono::steady_clock::now() < until) {
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exited_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return -1;
  }

 private:
  pid_t pid_ = -1;
  int fd_ = -1;
  std::string buf_;
  bool exited_ = false;
};

// stdout of a shell command, and its exit status.
std::string RunCommand(const std::string& cmd, int* status) {
  std::string out;
  FILE* f = popen(cmd.c_str(), "r");
  if (f == nullptr) {
    *status = -1;
    return out;
  }
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
  const int st = pclose(f);
  *status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

std::vector<int32_t> ParseIds(const std::string& s) {
  std::vector<int32_t> ids;
  for (absl::string_view part : absl::StrSplit(s, absl::ByAnyChar(" \n,"), absl::SkipWhitespace())) {
    int32_t v;
    if (absl::SimpleAtoi(part, &v)) ids.push_back(v);
  }
  return ids;
}

class ServeProcessTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir("sy-serve-process-test");
    model_dir_ = new std::string(WriteTinyModel(*dir_, 11));
  }
  static void TearDownTestSuite() {
    delete model_dir_;
    delete dir_;
  }
  void Start(std::vector<std::string> extra = {}, bool with_model = true,
             std::vector<std::pair<std::string, std::string>> env = {}) {
    std::vector<std::string> args = {"serve", "--host", "127.0.0.1", "--port", "0",
                                     "--metrics-port", "-1", "--kv-cache-bytes", "4000000"};
    if (with_model) args.insert(args.end(), {"--model", *model_dir_});
    args.insert(args.end(), extra.begin(), extra.end());
    proc_ = std::make_unique<ServeProcess>(args, env);
    port_ = proc_->WaitForPort("listening on ");
    ASSERT_GT(port_, 0);
    ASSERT_GT(proc_->WaitForPort("serving on "), 0);
    channel_ = Connect(port_);
    stub_ = v1::Inference::NewStub(channel_);
  }
  std::string Addr() const { return "127.0.0.1:" + std::to_string(port_); }

  static TempDir* dir_;
  static std::string* model_dir_;
  std::unique_ptr<ServeProcess> proc_;
  int port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Inference::Stub> stub_;
};
TempDir* ServeProcessTest::dir_ = nullptr;
std::string* ServeProcessTest::model_dir_ = nullptr;

TEST_F(ServeProcessTest, StreamingGenerateAndTheGenerateCommandMatchSwitchyardRun) {
  Start();
  int status = 0;
  const std::string run = RunCommand(kBinary + " run --model " + *model_dir_ +
                                         " --prompt-ids 1,5,9 --max-new-tokens 20 --ids-only --ignore-eos",
                                     &status);
  ASSERT_EQ(status, 0);
  const std::vector<int32_t> expected = ParseIds(run);
  ASSERT_EQ(expected.size(), 20u);

  StreamResult r = RunGenerate(*stub_, IdsRequest({1, 5, 9}, 20));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.chunk_ids, expected);
  EXPECT_EQ(std::vector<int32_t>(r.completion.token_ids().begin(), r.completion.token_ids().end()), expected);

  const std::string gen = RunCommand(kBinary + " generate --addr " + Addr() +
                                         " --prompt-ids 1,5,9 --max-new-tokens 20 --ids-only --ignore-eos 2>/dev/null",
                                     &status);
  EXPECT_EQ(status, 0);
  EXPECT_EQ(ParseIds(gen), expected);
}

TEST_F(ServeProcessTest, SigtermDrainsRunningRequestsWithHealthNotServing) {
  Start();
  EXPECT_EQ(CheckHealth(channel_), HealthStatus::SERVING);
  grpc::ClientContext ctx;
  auto reader = stub_->Generate(&ctx, IdsRequest({1, 2, 3, 4}, 600));
  v1::GenerateResponse resp;
  ASSERT_TRUE(reader->Read(&resp));
  int tokens = resp.chunk().token_ids_size();
  proc_->Signal(SIGTERM);
  HealthStatus::ServingStatus seen = HealthStatus::SERVING;
  for (int i = 0; i < 2000 && seen == HealthStatus::SERVING; ++i) {
    seen = CheckHealth(channel_);
    if (seen == HealthStatus::SERVING) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(seen, HealthStatus::NOT_SERVING);
  v1::GenerateCompletion done;
  while (reader->Read(&resp)) {
    if (resp.has_chunk()) tokens += resp.chunk().token_ids_size();
    if (resp.has_completion()) done = resp.completion();
  }
  EXPECT_TRUE(reader->Finish().ok());
  EXPECT_EQ(tokens, 600);
  EXPECT_EQ(done.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(proc_->Wait(), 0);
}

TEST_F(ServeProcessTest, LoadgenReportsEveryRequest) {
  Start();
  int status = 0;
  const std::string out = RunCommand(kBinary + " loadgen --addr " + Addr() +
                                         " --concurrency 4 --requests 12 --prompt-len 8 --max-new-tokens 6",
                                     &status);
  EXPECT_EQ(status, 0) << out;
  EXPECT_NE(out.find("successful requests"), std::string::npos) << out;
  // 12 requests x 6 tokens.
  std::istringstream lines(out);
  std::string line;
  int64_t ok = -1, output = -1;
  while (std::getline(lines, line)) {
    auto value = [&](const std::string& key, int64_t* v) {
      if (line.rfind(key, 0) == 0 &&
          !absl::SimpleAtoi(absl::StripAsciiWhitespace(line.substr(key.size())), v))
        *v = -1;
    };
    value("successful requests", &ok);
    value("output tokens", &output);
  }
  EXPECT_EQ(ok, 12);
  EXPECT_EQ(output, 72);
  EXPECT_NE(out.find("TTFT"), std::string::npos);
  EXPECT_NE(out.find("ITL"), std::string::npos);
}

TEST_F(ServeProcessTest, ThePythonExampleClientStreamsTheSameTokens) {
  int status = 0;
  RunCommand("/usr/bin/python3 -c 'import grpc, google.protobuf' 2>/dev/null && command -v protoc >/dev/null", &status);
  if (status != 0) GTEST_SKIP() << "python3-grpcio, python3-protobuf or protoc missing";
  Start();
  const std::vector<int32_t> expected = ParseIds(RunCommand(
      kBinary + " run --model " + *model_dir_ + " --prompt-ids 1,5,9 --max-new-tokens 12 --ids-only --ignore-eos", &status));
  ASSERT_EQ(status, 0);
  const std::string out = RunCommand("/usr/bin/python3 " SY_SOURCE_DIR "/server/examples/python_client.py --addr " +
                                         Addr() + " --prompt-ids 1,5,9 --max-new-tokens 12 --ignore-eos --json",
                                     &status);
  ASSERT_EQ(status, 0) << out;
  std::string ids = "[";
  for (size_t i = 0; i < expected.size(); ++i) ids += (i ? ", " : "") + std::to_string(expected[i]);
  ids += "]";
  EXPECT_NE(out.find("\"token_ids\": " + ids), std::string::npos) << out;
  EXPECT_NE(out.find("\"streamed_ids\": " + ids), std::string::npos) << out;
  EXPECT_NE(out.find("\"health\": \"SERVING\""), std::string::npos) << out;
  EXPECT_NE(out.find("FINISH_REASON_LENGTH"), std::string::npos) << out;
}

TEST_F(ServeProcessTest, FlagsCanComeFromAConfigFile) {
  const std::string path = dir_->path() + "/serve.conf";
  {
    std::ofstream f(path);
    f << "# serve flags\nmax-queue = 7\nmax-num-seqs: 5\n";
  }
  Start({"--config", path});
  v1::ServerInfo info = GetServerInfo(*stub_);
  EXPECT_EQ(info.max_queue(), 7);
  EXPECT_EQ(info.max_num_seqs(), 5);
}

TEST_F(ServeProcessTest, WithoutModelItServesTheBuiltInDemoModel) {
  TempDir cache("sy-demo-cache");
  Start({}, /*with_model=*/false, {{"SWITCHYARD_CACHE", cache.path()}});
  grpc::ClientContext ctx;
  v1::ModelInfo info;
  ASSERT_TRUE(stub_->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.model_type(), "mixtral");
  EXPECT_EQ(info.vocab_size(), 4096);  // the demo preset
  EXPECT_TRUE(info.has_tokenizer());
  EXPECT_EQ(info.model_dir().rfind(cache.path(), 0), 0u) << info.model_dir();
  v1::GenerateRequest req;
  req.set_text("Hello");
  req.mutable_sampling()->set_max_new_tokens(5);
  req.mutable_sampling()->set_ignore_eos(true);
  StreamResult r = RunGenerate(*stub_, req);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.completion.completion_tokens(), 5);
}

TEST_F(ServeProcessTest, HelpDocumentsEveryServeFlag) {
  int status = 0;
  const std::string out = RunCommand(kBinary + " serve --help", &status);
  EXPECT_EQ(status, 0);
  for (const char* flag : {"--model", "--port", "--metrics-port", "--kv-cache-bytes", "--max-num-seqs",
                           "--max-num-batched-tokens", "--max-queue", "--block-size", "--config"})
    EXPECT_NE(out.find(flag), std::string::npos) << flag;
}

}  // namespace
}  // namespace sy::server::testing
