#include "server/metrics_http.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/core/logging.h"
#include "prometheus/text_serializer.h"

namespace sy::server {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kMaxRequestBytes = 8192;
constexpr size_t kMaxConnections = 256;

int RemainingMs(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return static_cast<int>(std::max<int64_t>(0, left.count()));
}

const char* Reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 431: return "Request Header Fields Too Large";
  }
  return "Error";
}

}  // namespace

MetricsHttpRoute RouteMetricsRequest(std::string_view request) {
  MetricsHttpRoute r;
  const size_t eol = request.find("\r\n");
  const std::string_view line = request.substr(0, eol == std::string_view::npos ? request.size() : eol);
  // METHOD SP TARGET SP HTTP/x.y
  const size_t sp1 = line.find(' ');
  const size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp1 == std::string_view::npos || sp2 == std::string_view::npos || sp1 == 0 ||
      sp2 == sp1 + 1 || line.substr(sp2 + 1).rfind("HTTP/", 0) != 0 ||
      line.find(' ', sp2 + 1) != std::string_view::npos) {
    r.status = 400;
    return r;
  }
  const std::string_view method = line.substr(0, sp1);
  std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  const size_t q = target.find('?');
  if (q != std::string_view::npos) target = target.substr(0, q);
  if (target != "/metrics") {
    r.status = 404;
    return r;
  }
  if (method != "GET" && method != "HEAD") {
    r.status = 405;
    return r;
  }
  r.status = 200;
  r.metrics = true;
  r.head = method == "HEAD";
  return r;
}

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const MetricsHttpOptions& options,
    std::vector<std::weak_ptr<prometheus::Collectable>> collectables) {
  std::unique_ptr<MetricsHttpServer> s(new MetricsHttpServer());
  s->options_ = options;
  s->collectables_ = std::move(collectables);
  auto fail = [&](const std::string& why) {
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot listen on ", options.host, ":", options.port, ": ", why));
  };
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const std::string port = absl::StrCat(options.port);
  if (getaddrinfo(options.host.empty() ? nullptr : options.host.c_str(), port.c_str(), &hints, &res) != 0)
    return fail("the address does not resolve");
  const int fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol);
  const int one = 1;
  if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  const bool ok = fd >= 0 && bind(fd, res->ai_addr, res->ai_addrlen) == 0 && listen(fd, 128) == 0;
  freeaddrinfo(res);
  if (!ok) {
    const std::string why = std::strerror(errno);
    if (fd >= 0) close(fd);
    return fail(why);
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &len);
  s->port_ = ntohs(bound.ss_family == AF_INET6
                       ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                       : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  s->listen_fd_ = fd;
  s->loop_ = std::thread([p = s.get()] { p->Loop(); });
  return s;
}

struct MetricsHttpServer::Connection {
  int fd = -1;
  Clock::time_point deadline;
  std::string in;        // the request so far
  std::string out;       // the response while it is sent
  size_t sent = 0;
  bool writing = false;
};

MetricsHttpServer::~MetricsHttpServer() {
  stop_ = true;
  if (loop_.joinable()) loop_.join();
  if (listen_fd_ >= 0) close(listen_fd_);
}

void MetricsHttpServer::Answer(Connection* c, int status) {
  MetricsHttpRoute route;
  if (status == 0) {
    route = RouteMetricsRequest(c->in);
  } else {
    route.status = status;
  }
  std::string body;
  const char* type = "text/plain; charset=utf-8";
  if (route.metrics) {
    body = Render();
    type = "text/plain; version=0.0.4; charset=utf-8";
  } else {
    body = absl::StrCat(route.status, " ", Reason(route.status),
                        route.status == 404 ? ": the only path here is /metrics" : "", "\n");
  }
  c->out = absl::StrCat("HTTP/1.1 ", route.status, " ", Reason(route.status),
                        "\r\nContent-Type: ", type, "\r\nContent-Length: ", body.size(),
                        "\r\nConnection: close\r\n", route.status == 405 ? "Allow: GET, HEAD\r\n" : "",
                        "\r\n");
  if (!route.head) c->out += body;
  c->in.clear();
  c->writing = true;
}

void MetricsHttpServer::Loop() {
  std::vector<std::unique_ptr<Connection>> conns;
  std::vector<pollfd> fds;
  char buf[4096];
  while (!stop_.load()) {
    const auto now = Clock::now();
    int wait_ms = 100;
    fds.clear();
    fds.push_back({listen_fd_, POLLIN, 0});
    for (const auto& c : conns) {
      fds.push_back({c->fd, static_cast<short>(c->writing ? POLLOUT : POLLIN), 0});
      wait_ms = std::min(wait_ms, RemainingMs(c->deadline) + 1);
    }
    if (poll(fds.data(), fds.size(), std::max(0, wait_ms)) < 0 && errno != EINTR) break;
    std::vector<bool> done(conns.size(), false);
    for (size_t i = 0; i < conns.size(); ++i) {
      Connection* c = conns[i].get();
      const short ev = fds[i + 1].revents;
      if (!c->writing && (ev & (POLLIN | POLLHUP | POLLERR))) {
        const ssize_t n = recv(c->fd, buf, sizeof(buf), 0);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
          done[i] = true;  // the client went away
          continue;
        }
        if (n > 0) c->in.append(buf, static_cast<size_t>(n));
        if (c->in.find("\r\n\r\n") != std::string::npos) {
          Answer(c, 0);
        } else if (c->in.size() > kMaxRequestBytes) {
          Answer(c, 431);
        }
      }
      if (c->writing && (ev & (POLLOUT | POLLERR | POLLHUP) || c->sent == 0)) {
        const ssize_t n = send(c->fd, c->out.data() + c->sent, c->out.size() - c->sent,
                               MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
          done[i] = true;
          continue;
        }
        if (n > 0) c->sent += static_cast<size_t>(n);
        if (c->sent == c->out.size()) done[i] = true;
      }
      if (!done[i] && Clock::now() >= c->deadline) {
        if (!c->writing) {  // tell the slow client why, if it listens, and drop it
          Answer(c, 408);
          send(c->fd, c->out.data(), c->out.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        done[i] = true;
      }
    }
    for (size_t i = conns.size(); i-- > 0;)
      if (done[i]) {
        shutdown(conns[i]->fd, SHUT_RDWR);
        close(conns[i]->fd);
        conns.erase(conns.begin() + static_cast<std::ptrdiff_t>(i));
      }
    if (fds[0].revents & POLLIN) {
      for (int k = 0; k < 16; ++k) {  // a few at a time; the rest at the next turn
        const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) break;
        if (conns.size() >= kMaxConnections) {
          close(fd);
          continue;
        }
        auto c = std::make_unique<Connection>();
        c->fd = fd;
        c->deadline = now + options_.request_timeout;
        conns.push_back(std::move(c));
      }
    }
  }
  for (const auto& c : conns) close(c->fd);
}

std::string MetricsHttpServer::Render() const {
  std::vector<prometheus::MetricFamily> families;
  for (const auto& weak : collectables_) {
    if (auto c = weak.lock()) {
      std::vector<prometheus::MetricFamily> f = c->Collect();
      families.insert(families.end(), std::make_move_iterator(f.begin()),
                      std::make_move_iterator(f.end()));
    }
  }
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace sy::server
