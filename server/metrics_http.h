// MetricsHttpServer: Prometheus text exposition at http://HOST:PORT/metrics, written for any
// client that may connect (a browser, a port scanner, a load balancer's health check). It
// replaces prometheus-cpp's Exposer, whose embedded civetweb crashed the daemon on any request
// but GET /metrics and let one client that never finished its headers block every scrape.
//   * GET or HEAD /metrics (a query string is ignored): 200, text format 0.0.4;
//     another path: 404; another method: 405; a malformed request line: 400; headers over
//     8 KiB: 431. Nothing the client sends reaches anything but this parser.
//   * A request must arrive whole within `request_timeout` (default 3 s; then 408), and its
//     response be taken within it too; then the connection is dropped.
//   * One thread serves every connection from a poll loop (non-blocking sockets), so a client
//     that sends slowly or never takes its answer delays nobody; at most 256 connections are
//     open at once (a new one beyond that is closed at once). Every response closes its
//     connection.
// Used by ServerMetrics (the leader) and WorkerMetrics (a worker).
// Thread safety: Start and the destructor from one thread; collectables are read from the
// serving thread (prometheus-cpp collectables are thread-safe).
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "prometheus/collectable.h"

namespace sy::server {

struct MetricsHttpOptions {
  std::string host = "0.0.0.0";
  int port = 9400;  // 0: the OS picks
  std::chrono::milliseconds request_timeout{3000};
};

// The response to one request (the part a fuzzer can reach without sockets): status code and
// whether the body is the exposition.
struct MetricsHttpRoute {
  int status = 400;
  bool metrics = false;  // 200 with the exposition as the body (HEAD: headers only)
  bool head = false;
};
// `request`: the bytes up to and including the blank line that ends the headers.
MetricsHttpRoute RouteMetricsRequest(std::string_view request);

class MetricsHttpServer {
 public:
  // Listens at once; UNAVAILABLE when host:port cannot be bound.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const MetricsHttpOptions& options,
      std::vector<std::weak_ptr<prometheus::Collectable>> collectables);
  ~MetricsHttpServer();  // stops and joins every thread
  int port() const { return port_; }
  // The exposition text of every collectable (what a scrape returns).
  std::string Render() const;

 private:
  struct Connection;
  MetricsHttpServer() = default;
  void Loop();
  // The answer to what `c` sent (or to its time-out, status 408).
  void Answer(Connection* c, int status);

  MetricsHttpOptions options_;
  std::vector<std::weak_ptr<prometheus::Collectable>> collectables_;
  int listen_fd_ = -1;
  int port_ = -1;
  std::atomic<bool> stop_{false};
  std::thread loop_;
};

}  // namespace sy::server
