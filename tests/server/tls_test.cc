// TLS on the daemon's ports (server/tls.h), with certificates made by the openssl command for
// each run: server TLS (a client that trusts the CA streams; a plaintext client and a client
// of another CA cannot connect), mutual TLS (no client certificate, or one of another CA:
// refused at the handshake), and the Cluster service with mutual TLS (a worker with a
// certificate of the CA joins and serves; one without cannot join). Bad files are
// INVALID_ARGUMENT naming the flag.
#include "server/tls.h"

#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server/daemon.h"
#include "switchyard/v1/inference.grpc.pb.h"
#include "tests/server/cluster_testing.h"
#include "tests/server/server_fixture.h"
#include "tests/testing/watchdog.h"

namespace sy::server {
namespace {

namespace v1 = ::switchyard::v1;

// A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, all signed by
// it; and another CA with a client certificate of its own.
struct Pki {
  std::string dir;
  bool ok = false;
  explicit Pki(const std::string& d) : dir(d) {
    const std::string q = " >/dev/null 2>&1";
    auto run = [&](const std::string& cmd) { return std::system((cmd + q).c_str()) == 0; };
    std::ofstream(dir + "/san.ext") << "subjectAltName=DNS:localhost,IP:127.0.0.1\n";
    ok = true;
    for (const std::string ca : {"ca", "other-ca"})
      ok = ok && run(absl::StrCat("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=", ca,
                                  " -keyout ", dir, "/", ca, ".key -out ", dir, "/", ca, ".pem"));
    auto issue = [&](const std::string& name, const std::string& ca, bool san) {
      return run(absl::StrCat("openssl req -newkey rsa:2048 -nodes -subj /CN=", name, " -keyout ",
                              dir, "/", name, ".key -out ", dir, "/", name, ".csr")) &&
             run(absl::StrCat("openssl x509 -req -days 1 -in ", dir, "/", name, ".csr -CA ", dir, "/",
                              ca, ".pem -CAkey ", dir, "/", ca, ".key -CAcreateserial -out ", dir,
                              "/", name, ".pem", san ? absl::StrCat(" -extfile ", dir, "/san.ext") : ""));
    };
    ok = ok && issue("server", "ca", true) && issue("client", "ca", false) &&
         issue("stranger", "other-ca", false);
  }
  std::string f(const std::string& name) const { return dir + "/" + name; }
};

// Greedy generation of 3 tokens through a channel made with `o`.
grpc::Status TryGenerate(int port, const TlsClientOptions& o) {
  // 127.0.0.1, not "localhost": no resolver thread (its allocations outlive the test).
  auto channel = MakeChannel(absl::StrCat("127.0.0.1:", port), o);
  if (!channel.ok()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "");
  auto stub = v1::Inference::NewStub(*channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::GenerateRequest req;
  for (int t : {1, 2, 3}) req.mutable_token_ids()->add_ids(t);
  req.mutable_sampling()->set_max_new_tokens(3);
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  while (reader->Read(&resp)) {
  }
  return reader->Finish();
}

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    pki_ = std::make_unique<Pki>(sy::testing::MakeTempDir("tls"));
    if (!pki_->ok) GTEST_SKIP() << "the openssl command could not make certificates";
  }
  std::unique_ptr<Daemon> Start(TlsServerOptions tls) {
    model_ = testing::WriteTinyModel(*dir_);
    ServeOptions o = testing::TestServeOptions(model_);
    o.tls = tls;
    auto d = Daemon::Start(o);
    EXPECT_TRUE(d.ok()) << d.status();
    if (!d.ok()) return nullptr;
    EXPECT_TRUE((*d)->Load().ok());
    return std::move(*d);
  }
  std::unique_ptr<Pki> pki_;
  std::unique_ptr<testing::TempDir> dir_ = std::make_unique<testing::TempDir>("tls-model");
  std::string model_;
};

TEST_F(TlsTest, OnlyClientsThatTrustTheServersCaConnect) {
  auto d = Start({pki_->f("server.pem"), pki_->f("server.key"), ""});
  ASSERT_NE(d, nullptr);
  TlsClientOptions trusting;
  trusting.ca = pki_->f("ca.pem");
  EXPECT_TRUE(TryGenerate(d->port(), trusting).ok());
  EXPECT_EQ(TryGenerate(d->port(), TlsClientOptions{}).error_code(), grpc::StatusCode::UNAVAILABLE);
  TlsClientOptions wrong;
  wrong.ca = pki_->f("other-ca.pem");
  EXPECT_EQ(TryGenerate(d->port(), wrong).error_code(), grpc::StatusCode::UNAVAILABLE);
  d->Drain();
}

TEST_F(TlsTest, MutualTlsRefusesClientsWithoutACertificateOfTheClientCa) {
  auto d = Start({pki_->f("server.pem"), pki_->f("server.key"), pki_->f("ca.pem")});
  ASSERT_NE(d, nullptr);
  TlsClientOptions o;
  o.ca = pki_->f("ca.pem");
  EXPECT_NE(TryGenerate(d->port(), o).error_code(), grpc::StatusCode::OK);  // no certificate
  o.cert = pki_->f("stranger.pem");
  o.key = pki_->f("stranger.key");
  EXPECT_NE(TryGenerate(d->port(), o).error_code(), grpc::StatusCode::OK);  // another CA's
  o.cert = pki_->f("client.pem");
  o.key = pki_->f("client.key");
  EXPECT_TRUE(TryGenerate(d->port(), o).ok());
  d->Drain();
}

TEST_F(TlsTest, BadFilesNameTheFlag) {
  auto s = MakeServerCredentials({pki_->f("server.pem"), "", ""});
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("--tls-key"), absl::string_view::npos) << s.status();
  auto t = MakeServerCredentials({pki_->f("server.pem"), pki_->f("nope.key"), ""});
  EXPECT_NE(t.status().message().find("--tls-key: cannot read"), absl::string_view::npos) << t.status();
  TlsClientOptions c;
  c.ca = pki_->f("san.ext");  // not PEM
  EXPECT_NE(MakeChannelCredentials(c).status().message().find("--tls-ca"), absl::string_view::npos);
}

TEST_F(TlsTest, TheClusterServiceTakesOnlyRanksWithACertificateOfItsCa) {
  sy::testing::Watchdog dog(std::chrono::seconds(120));
  const std::string tmp = sy::testing::MakeTempDir("cluster-tls");
  const std::string model = testing::TinyDir();
  sy::testing::ChildProcess leader(
      tmp, "leader",
      {"serve", "--model", model, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1",
       "--cluster-port", "0", "--secret", testing::kSecret, "--cluster-tls-cert",
       pki_->f("server.pem"), "--cluster-tls-key", pki_->f("server.key"), "--cluster-tls-ca",
       pki_->f("ca.pem"), "--kv-cache-bytes", absl::StrCat(testing::kKvBytes)});
  const int cport = testing::PortAfterColon(leader.WaitForLine("cluster service on ", std::chrono::seconds(30)));
  const int port = testing::PortAfterColon(leader.WaitForLine("listening on ", std::chrono::seconds(5)));
  ASSERT_GT(cport, 0) << leader.err();
  const std::string join = absl::StrCat("127.0.0.1:", cport);
  sy::testing::ChildProcess stranger(
      tmp, "stranger",
      {"worker", "--join", join, "--secret", testing::kSecret, "--model", model, "--tls-ca",
       pki_->f("ca.pem"), "--tls-cert", pki_->f("stranger.pem"), "--tls-key",
       pki_->f("stranger.key"), "--join-timeout", "2", "--kv-cache-bytes", absl::StrCat(testing::kKvBytes)});
  EXPECT_NE(stranger.WaitExit(std::chrono::seconds(30)), 0) << stranger.err();
  sy::testing::ChildProcess member(
      tmp, "member",
      {"worker", "--join", join, "--secret", testing::kSecret, "--model", model, "--tls-ca",
       pki_->f("ca.pem"), "--tls-cert", pki_->f("client.pem"), "--tls-key", pki_->f("client.key"),
       "--kv-cache-bytes", absl::StrCat(testing::kKvBytes)});
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (member.err().find("joined") == std::string::npos && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_NE(member.err().find("joined"), std::string::npos) << member.err() << leader.err();
  const testing::GenResult r =
      testing::Generate(absl::StrCat("127.0.0.1:", port), testing::Prompts()[0], 4);
  EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.tokens, testing::Reference(model, 4)[0]);
}

}  // namespace
}  // namespace sy::server
