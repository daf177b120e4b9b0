#include "server/net_address.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"

namespace sy::server {
namespace {

std::string Ntop(const sockaddr_in& a) {
  char buf[INET_ADDRSTRLEN] = {};
  inet_ntop(AF_INET, &a.sin_addr, buf, sizeof(buf));
  return buf;
}

}  // namespace

std::string HostOf(const std::string& host_port) {
  const size_t colon = host_port.rfind(':');
  std::string host = colon == std::string::npos ? host_port : host_port.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  return host;
}

absl::StatusOr<std::string> LocalAddressTowards(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), "9", &hints, &res) != 0 || res == nullptr)
    return absl::NotFoundError(absl::StrCat("cannot resolve '", host, "'"));
  sockaddr_in peer = *reinterpret_cast<const sockaddr_in*>(res->ai_addr);
  freeaddrinfo(res);
  const int fd = socket(AF_INET, SOCK_DGRAM, 0);
  if (fd < 0) return absl::UnavailableError("socket: cannot open a UDP socket");
  sockaddr_in local{};
  socklen_t len = sizeof(local);
  const bool ok = connect(fd, reinterpret_cast<const sockaddr*>(&peer), sizeof(peer)) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0;
  close(fd);
  if (!ok) return absl::UnavailableError(absl::StrCat("no route to '", host, "'"));
  return Ntop(local);
}

std::string HostAddress() {
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) != 0) return "127.0.0.1";
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(name, nullptr, &hints, &res) != 0) return "127.0.0.1";
  std::string out = "127.0.0.1";
  for (addrinfo* p = res; p != nullptr; p = p->ai_next) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(p->ai_addr);
    if ((ntohl(a->sin_addr.s_addr) >> 24) == 127) continue;
    out = Ntop(*a);
    break;
  }
  freeaddrinfo(res);
  return out;
}

}  // namespace sy::server
