// FlagSet: every form a flag can take, config files under the command line, and the errors.
#include "server/flags.h"

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/model_fixtures.h"

namespace sy::server {
namespace {

// argv of writable copies (Parse may overwrite secret values in place).
class Argv {
 public:
  explicit Argv(std::vector<std::string> args) : args_(std::move(args)) {
    for (std::string& a : args_) ptrs_.push_back(a.data());
  }
  int argc() const { return static_cast<int>(ptrs_.size()); }
  char** argv() { return ptrs_.data(); }
  const std::string& operator[](size_t i) const { return args_[i]; }

 private:
  std::vector<std::string> args_;
  std::vector<char*> ptrs_;
};

struct Values {
  std::string host = "0.0.0.0";
  int64_t blocks = 16;
  int port = 50051;
  double timeout = 30;
  bool verbose = false, stream = true;
  std::string secret;
};

FlagSet Flags(Values* v) {
  FlagSet f("serve", "test");
  f.Add("host", &v->host, "");
  f.Add("blocks", &v->blocks, "");
  f.Add("port", &v->port, "");
  f.Add("timeout", &v->timeout, "");
  f.Add("verbose", &v->verbose, "");
  f.Add("stream", &v->stream, "");
  f.Add("secret", &v->secret, "");
  return f;
}

TEST(FlagsTest, EveryFormSetsItsValueAndPositionalsStayInOrder) {
  Values v;
  FlagSet f = Flags(&v);
  Argv a({"--host=127.0.0.1", "--blocks", "64", "one", "--port=0", "--timeout", "2.5",
          "--verbose", "--no-stream", "two", "--", "--not-a-flag"});
  ASSERT_TRUE(f.Parse(a.argc(), a.argv()).ok());
  EXPECT_EQ(v.host, "127.0.0.1");
  EXPECT_EQ(v.blocks, 64);
  EXPECT_EQ(v.port, 0);
  EXPECT_EQ(v.timeout, 2.5);
  EXPECT_TRUE(v.verbose);
  EXPECT_FALSE(v.stream);
  EXPECT_EQ(f.positional(), (std::vector<std::string>{"one", "two", "--not-a-flag"}));
  EXPECT_TRUE(f.WasSet("host"));
  EXPECT_FALSE(f.WasSet("secret"));
}

TEST(FlagsTest, BadInputIsAnErrorNamingTheFlag) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--nope"}, "unknown flag --nope"},
      {{"--blocks"}, "--blocks needs a value"},
      {{"--blocks=many"}, "--blocks"},
      {{"--port=99999999999"}, "--port"},
      {{"--timeout=fast"}, "--timeout"},
      {{"--verbose=maybe"}, "--verbose"},
  };
  for (const auto& [args, says] : cases) {
    Values v;
    FlagSet f = Flags(&v);
    Argv a(args);
    const absl::Status s = f.Parse(a.argc(), a.argv());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << args[0];
    EXPECT_NE(s.message().find(says), std::string::npos) << s;
  }
  Values v;
  FlagSet f = Flags(&v);
  Argv help({"--help"});
  const absl::Status s = f.Parse(help.argc(), help.argv());
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled);
  EXPECT_NE(s.message().find("--blocks VALUE"), std::string::npos) << s.message();
}

TEST(FlagsTest, AConfigFileIsReadFirstAndTheCommandLineWins) {
  const std::string dir = sy::testing::MakeTempDir("flags");
  std::ofstream(dir + "/serve.conf") << "# serve\nhost = 10.0.0.1\nblocks: 32  # inline comment\n"
                                     << "--port = 7\nsecret = \"quoted value\"\nverbose = true\n";
  Values v;
  FlagSet f = Flags(&v);
  Argv a({"--config", dir + "/serve.conf", "--blocks=8"});
  ASSERT_TRUE(f.Parse(a.argc(), a.argv()).ok());
  EXPECT_EQ(v.host, "10.0.0.1");
  EXPECT_EQ(v.blocks, 8);
  EXPECT_EQ(v.port, 7);
  EXPECT_EQ(v.secret, "quoted value");
  EXPECT_TRUE(v.verbose);

  std::ofstream(dir + "/bad.conf") << "host = a\n\nwhat is this\n";
  Values w;
  FlagSet g = Flags(&w);
  Argv b({"--config=" + dir + "/bad.conf"});
  const absl::Status s = g.Parse(b.argc(), b.argv());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("bad.conf:3"), std::string::npos) << s;
  Values x;
  FlagSet h = Flags(&x);
  Argv c({"--config", dir + "/missing.conf"});
  EXPECT_EQ(h.Parse(c.argc(), c.argv()).code(), absl::StatusCode::kNotFound);
}

TEST(FlagsTest, ASecretFlagsValueIsOverwrittenInArgvButKeptInTheFlag) {
  Values v;
  FlagSet f = Flags(&v);
  f.MarkSecret("secret", "secret-file");
  Argv a({"--secret", "hunter2-hunter2", "--host=h", "--secret=second-value"});
  ASSERT_TRUE(f.Parse(a.argc(), a.argv()).ok());
  EXPECT_EQ(v.secret, "second-value");
  EXPECT_STREQ(a.argv()[1], "xxxxxxxxxxxxxxx");
  EXPECT_STREQ(a.argv()[3], "--secret=xxxxxxxxxxxx");
  EXPECT_STREQ(a.argv()[2], "--host=h");
}

TEST(FlagsTest, DeviceAndBackendGiveOneBackendName) {
  EXPECT_EQ(*BackendForDevice("cpu", "auto"), "auto");
  EXPECT_EQ(*BackendForDevice("cpu", "reference"), "reference");
  EXPECT_EQ(*BackendForDevice("cuda", "auto"), "cuda");
  EXPECT_EQ(*BackendForDevice("cuda:1", "auto"), "cuda:1");
  EXPECT_EQ(*BackendForDevice("cuda:1", "cuda:1"), "cuda:1");
  EXPECT_EQ(BackendForDevice("cuda", "reference").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*BackendForDevice("cpu", "cuda:2"), "cuda:2");
  EXPECT_EQ(BackendForDevice("tpu", "auto").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sy::server
