// The /metrics port against any client (server/metrics_http.h): the routing table of request
// lines; on a live server, every kind of stray request (other paths, methods, garbage, an
// oversized header, a client that never finishes) gets its status code and the scrape that
// follows still works at once; a silent client is dropped after the request time-out; the
// daemon's own port answers the same (it once crashed on `GET /`).
#include "server/metrics_http.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "prometheus/counter.h"
#include "prometheus/registry.h"
#include "server/daemon.h"
#include "tests/server/server_fixture.h"

namespace sy::server {
namespace {

using std::chrono::milliseconds;

TEST(MetricsHttpRouteTest, OnlyGetOrHeadOfMetricsIsServed) {
  struct Case {
    const char* request;
    int status;
    bool metrics;
  };
  const Case cases[] = {
      {"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 200, true},
      {"GET /metrics?name[]=x HTTP/1.0\r\n\r\n", 200, true},
      {"HEAD /metrics HTTP/1.1\r\n\r\n", 200, true},
      {"GET / HTTP/1.1\r\n\r\n", 404, false},
      {"GET /favicon.ico HTTP/1.1\r\n\r\n", 404, false},
      {"GET /metricsX HTTP/1.1\r\n\r\n", 404, false},
      {"GET /metrics/ HTTP/1.1\r\n\r\n", 404, false},
      {"HEAD /x HTTP/1.1\r\n\r\n", 404, false},
      {"POST /metrics HTTP/1.1\r\n\r\n", 405, false},
      {"DELETE /metrics HTTP/1.1\r\n\r\n", 405, false},
      {"GET /metrics\r\n\r\n", 400, false},
      {"GET  /metrics HTTP/1.1\r\n\r\n", 400, false},
      {"GET /metrics HTTP/1.1 extra\r\n\r\n", 400, false},
      {"GET /metrics FTP/1.0\r\n\r\n", 400, false},
      {"\r\n\r\n", 400, false},
      {"", 400, false},
  };
  for (const Case& c : cases) {
    const MetricsHttpRoute r = RouteMetricsRequest(c.request);
    EXPECT_EQ(r.status, c.status) << c.request;
    EXPECT_EQ(r.metrics, c.metrics) << c.request;
  }
  EXPECT_TRUE(RouteMetricsRequest("HEAD /metrics HTTP/1.1\r\n\r\n").head);
}

// Sends `raw` and returns the status code of the answer (0: none).
int Exchange(int port, const std::string& raw) {
  const int fd = testing::ConnectTcp(port);
  if (fd < 0) return 0;
  if (!raw.empty() && write(fd, raw.data(), raw.size()) < 0) {
    close(fd);
    return 0;
  }
  std::string resp;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) resp.append(buf, n);
  close(fd);
  if (resp.rfind("HTTP/1.1 ", 0) != 0) return 0;
  return std::atoi(resp.c_str() + 9);
}

class MetricsHttpServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    registry_ = std::make_shared<prometheus::Registry>();
    prometheus::BuildCounter().Name("test_requests_total").Help("x").Register(*registry_).Add({}).Increment(3);
    MetricsHttpOptions o;
    o.host = "127.0.0.1";
    o.port = 0;
    o.request_timeout = milliseconds(500);
    auto s = MetricsHttpServer::Start(o, {registry_});
    ASSERT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
  }
  bool Scrapes() {
    return testing::HttpGet(server_->port(), "/metrics").find("test_requests_total 3") != std::string::npos;
  }
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<MetricsHttpServer> server_;
};

TEST_F(MetricsHttpServerTest, StrayRequestsGetTheirCodeAndTheNextScrapeWorks) {
  const int port = server_->port();
  EXPECT_TRUE(Scrapes());
  EXPECT_EQ(Exchange(port, "GET / HTTP/1.1\r\n\r\n"), 404);
  EXPECT_EQ(Exchange(port, "GET /favicon.ico HTTP/1.0\r\n\r\n"), 404);
  EXPECT_EQ(Exchange(port, "HEAD /x HTTP/1.1\r\n\r\n"), 404);
  EXPECT_EQ(Exchange(port, "POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"), 405);
  EXPECT_EQ(Exchange(port, "HEAD /metrics HTTP/1.1\r\n\r\n"), 200);
  EXPECT_EQ(Exchange(port, std::string("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 11) + "\r\n\r\n"), 400);
  EXPECT_EQ(Exchange(port, "GET /metrics HTTP/1.1\r\nX: " + std::string(20000, 'a') + "\r\n\r\n"), 431);
  EXPECT_TRUE(Scrapes());
}

TEST_F(MetricsHttpServerTest, ClientsThatNeverFinishDoNotBlockAScrapeAndAreDropped) {
  const int port = server_->port();
  std::vector<int> stalled;
  for (int i = 0; i < 5; ++i) {
    const int fd = testing::ConnectTcp(port);
    ASSERT_GE(fd, 0);
    ASSERT_GT(write(fd, "GET /met", 8), 0);
    stalled.push_back(fd);
  }
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(Scrapes());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, milliseconds(400));  // before their time-out
  // Each stalled client gets 408 once its request time-out passes.
  char buf[256];
  for (int fd : stalled) {
    const ssize_t n = read(fd, buf, sizeof(buf) - 1);
    ASSERT_GT(n, 12);
    EXPECT_EQ(std::string(buf, 12), "HTTP/1.1 408");
    close(fd);
  }
}

TEST(MetricsHttpDaemonTest, TheDaemonsMetricsPortOutlivesStrayRequests) {
  testing::TempDir dir("metrics-http");
  const std::string model = testing::WriteTinyModel(dir);
  ServeOptions o = testing::TestServeOptions(model);
  o.metrics_port = 0;
  auto d = Daemon::Start(o);
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_TRUE((*d)->Load().ok());
  const int port = (*d)->metrics_port();
  for (const char* req : {"GET / HTTP/1.1\r\n\r\n", "GET /favicon.ico HTTP/1.1\r\n\r\n",
                          "HEAD /x HTTP/1.1\r\n\r\n", "POST /metrics HTTP/1.1\r\n\r\n",
                          "GET /metricsX HTTP/1.1\r\n\r\n"})
    EXPECT_NE(Exchange(port, req), 0) << req;
  EXPECT_NE(testing::HttpGet(port, "/metrics").find("switchyard_requests_running"), std::string::npos);
  (*d)->Drain();
}

}  // namespace
}  // namespace sy::server
