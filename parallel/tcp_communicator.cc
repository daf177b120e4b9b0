#include "parallel/tcp_communicator.h"

#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kernels/core/status.h"

namespace sy::parallel {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr char kMagic[4] = {'S', 'Y', 'T', 'C'};
constexpr uint32_t kVersion = 1;
constexpr size_t kTokenBytes = 32;
// magic, version, world size, rank, the listener's token
constexpr size_t kHelloBytes = 4 + 4 + 4 + 4 + kTokenBytes;
constexpr size_t kHeaderBytes = 16;  // uint64 sequence number, uint64 bytes
// Largest message of a dynamic exchange: a header claiming more is a broken peer.
constexpr uint64_t kMaxDynamicBytes = uint64_t{1} << 36;

int LeftMs(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::clamp<int64_t>(left, 0, 1 << 30));
}

absl::Status Errno(const std::string& what) {
  return absl::UnavailableError(absl::StrCat(what, ": ", std::strerror(errno)));
}

void SetNoDelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// Blocking-with-deadline I/O on a non-blocking socket (set-up only).
absl::Status WriteAll(int fd, const char* p, size_t n, Clock::time_point deadline) {
  while (n > 0) {
    const ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w > 0) {
      p += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return Errno("send");
    pollfd pfd{fd, POLLOUT, 0};
    if (poll(&pfd, 1, LeftMs(deadline)) == 0) return absl::UnavailableError("send timed out");
  }
  return absl::OkStatus();
}

absl::Status ReadAll(int fd, char* p, size_t n, Clock::time_point deadline) {
  while (n > 0) {
    const ssize_t r = recv(fd, p, n, 0);
    if (r > 0) {
      p += r;
      n -= static_cast<size_t>(r);
      continue;
    }
    if (r == 0) return absl::UnavailableError("connection closed");
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return Errno("recv");
    pollfd pfd{fd, POLLIN, 0};
    if (poll(&pfd, 1, LeftMs(deadline)) == 0) return absl::UnavailableError("recv timed out");
  }
  return absl::OkStatus();
}

void PutU32(char* p, uint32_t v) { std::memcpy(p, &v, 4); }
uint32_t GetU32(const char* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

std::string RandomToken() {
  static const char kHex[] = "0123456789abcdef";
  std::random_device rd;
  std::string t(kTokenBytes, '0');
  for (char& c : t) c = kHex[rd() & 15];
  return t;
}

// An open file descriptor, closed when dropped.
struct OwnedFd {
  int fd = -1;
  OwnedFd() = default;
  explicit OwnedFd(int f) : fd(f) {}
  OwnedFd(OwnedFd&& o) noexcept : fd(o.fd) { o.fd = -1; }
  OwnedFd& operator=(OwnedFd&& o) noexcept {
    std::swap(fd, o.fd);
    return *this;
  }
  ~OwnedFd() {
    if (fd >= 0) close(fd);
  }
  int release() {
    const int f = fd;
    fd = -1;
    return f;
  }
};

absl::StatusOr<addrinfo*> Resolve(const std::string& host, const std::string& port, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &res);
  if (rc != 0 || res == nullptr)
    return absl::UnavailableError(absl::StrCat("resolving '", host, "': ", gai_strerror(rc)));
  return res;
}

// A listening socket on host (any port) and the "address port" it can be reached at.
absl::StatusOr<std::pair<OwnedFd, std::string>> Listen(const std::string& host, int backlog) {
  SY_ASSIGN_OR_RETURN(addrinfo * res, Resolve(host, "0", true));
  OwnedFd fd(socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (fd.fd < 0) {
    freeaddrinfo(res);
    return Errno("socket");
  }
  int one = 1;
  setsockopt(fd.fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd.fd, res->ai_addr, res->ai_addrlen) != 0) {
    const absl::Status s = Errno(absl::StrCat("bind ", host));
    freeaddrinfo(res);
    return s;
  }
  freeaddrinfo(res);
  if (listen(fd.fd, backlog) != 0) return Errno("listen");
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  if (getsockname(fd.fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return Errno("getsockname");
  char name[NI_MAXHOST], port[NI_MAXSERV];
  if (getnameinfo(reinterpret_cast<sockaddr*>(&addr), len, name, sizeof(name), port, sizeof(port),
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return absl::UnavailableError("getnameinfo failed");
  return std::make_pair(std::move(fd), absl::StrCat(name, " ", port));
}

absl::StatusOr<OwnedFd> Connect(const std::string& host, const std::string& port,
                                Clock::time_point deadline) {
  absl::Status last = absl::UnavailableError("no address");
  while (Clock::now() < deadline) {
    SY_ASSIGN_OR_RETURN(addrinfo * res, Resolve(host, port, false));
    OwnedFd fd(socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (fd.fd < 0) {
      freeaddrinfo(res);
      return Errno("socket");
    }
    int rc = connect(fd.fd, res->ai_addr, res->ai_addrlen);
    freeaddrinfo(res);
    if (rc != 0 && errno == EINPROGRESS) {
      pollfd pfd{fd.fd, POLLOUT, 0};
      if (poll(&pfd, 1, LeftMs(deadline)) == 1) {
        int err = 0;
        socklen_t len = sizeof(err);
        getsockopt(fd.fd, SOL_SOCKET, SO_ERROR, &err, &len);
        errno = err;
        rc = err == 0 ? 0 : -1;
      } else {
        errno = ETIMEDOUT;
      }
    }
    if (rc == 0) return fd;
    last = Errno(absl::StrCat("connect ", host, ":", port));
    std::this_thread::sleep_for(milliseconds(20));
  }
  return last;
}

class TcpCommunicator final : public OverlappingCommunicator {
 public:
  TcpCommunicator(int rank, int world, std::vector<int> fds, milliseconds timeout)
      : rank_(rank), world_(world), fds_(std::move(fds)), timeout_(timeout) {}

  ~TcpCommunicator() override {
    for (int fd : fds_)
      if (fd >= 0) close(fd);
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  milliseconds timeout() const override { return timeout_; }
  bool broken() const override { return broken_.load(); }
  std::string name() const override { return "tcp"; }

  // Shuts every connection down: the collective in flight wakes (its sockets hang up), the
  // peers' collectives fail at once, later calls fail at Start.
  void Abort() override {
    if (aborted_.exchange(true)) return;
    Shutdown();
  }

  std::unique_ptr<PendingAllToAllV> StartAllToAllV(
      const void* send, absl::Span<const int64_t> send_counts,
      absl::Span<const int64_t> send_offsets, void* recv, absl::Span<const int64_t> recv_counts,
      absl::Span<const int64_t> recv_offsets) override {
    auto p = std::make_unique<Pending>(this);
    const uint64_t seq = ++seq_;
    if (broken_.load()) {
      p->status = BrokenStatus();
      return p;
    }
    absl::Status valid = ValidateAllToAllV(world_, send_counts, send_offsets, recv_counts, recv_offsets);
    if (valid.ok() && recv_counts[rank_] != send_counts[rank_])
      valid = absl::InvalidArgumentError(absl::StrCat("all-to-all-v: rank ", rank_, " sends itself ",
                                                      send_counts[rank_], " bytes but expects ",
                                                      recv_counts[rank_]));
    if (!valid.ok()) {
      p->status = Break(valid);
      return p;
    }
    if (send_counts[rank_] > 0)
      std::memmove(static_cast<char*>(recv) + recv_offsets[rank_],
                   static_cast<const char*>(send) + send_offsets[rank_], send_counts[rank_]);
    p->peers.resize(world_);
    for (int q = 0; q < world_; ++q) {
      if (q == rank_) continue;
      Peer& e = p->peers[q];
      if (send_counts[q] > 0) {
        e.SetOut(seq, static_cast<const char*>(send) + send_offsets[q],
                 static_cast<uint64_t>(send_counts[q]));
      }
      if (recv_counts[q] > 0) {
        e.in = static_cast<char*>(recv) + recv_offsets[q];
        e.in_bytes = static_cast<uint64_t>(recv_counts[q]);
        e.in_left = kHeaderBytes + e.in_bytes;
      }
    }
    p->seq = seq;
    // Eager: whatever fits in the socket buffers goes now.
    for (int q = 0; q < world_ && p->status.ok(); ++q)
      if (q != rank_ && p->peers[q].out_left > 0) p->status = SendSome(q, &p->peers[q]);
    if (!p->status.ok()) p->status = Break(p->status);
    return p;
  }

  // One exchange: each message's header says its size, so no counts go first.
  absl::Status AllToAllVDynamic(const void* send, absl::Span<const int64_t> send_counts,
                                absl::Span<const int64_t> send_offsets, std::vector<char>* recv,
                                std::vector<int64_t>* recv_counts,
                                std::vector<int64_t>* recv_offsets) override {
    return StartAllToAllVDynamic(send, send_counts, send_offsets, recv, recv_counts, recv_offsets)
        ->Wait();
  }

  // Posts the one exchange: whatever fits in the socket buffers goes now, the rest (and every
  // receive) moves in Wait().
  std::unique_ptr<PendingAllToAllV> StartAllToAllVDynamic(
      const void* send, absl::Span<const int64_t> send_counts,
      absl::Span<const int64_t> send_offsets, std::vector<char>* recv,
      std::vector<int64_t>* recv_counts, std::vector<int64_t>* recv_offsets) override {
    auto p = std::make_unique<Pending>(this);
    const uint64_t seq = ++seq_;
    if (broken_.load()) {
      p->status = BrokenStatus();
      return p;
    }
    absl::Status valid;
    if (static_cast<int>(send_counts.size()) != world_ ||
        static_cast<int>(send_offsets.size()) != world_)
      valid = absl::InvalidArgumentError("all-to-all-v dynamic: spans of world size expected");
    for (int q = 0; valid.ok() && q < world_; ++q)
      if (send_counts[q] < 0 || send_offsets[q] < 0)
        valid = absl::InvalidArgumentError("all-to-all-v dynamic: negative count or offset");
    if (!valid.ok()) {
      p->status = Break(valid);
      return p;
    }
    recv_counts->assign(world_, 0);
    recv_offsets->assign(world_, 0);
    p->dyn_recv = recv;
    p->dyn_counts = recv_counts;
    p->dyn_offsets = recv_offsets;
    p->own = static_cast<const char*>(send) + send_offsets[rank_];
    p->own_bytes = send_counts[rank_];
    p->seq = seq;
    p->peers.resize(world_);
    for (int q = 0; q < world_; ++q) {
      if (q == rank_) continue;
      Peer& e = p->peers[q];
      e.SetOut(seq, static_cast<const char*>(send) + send_offsets[q],
               static_cast<uint64_t>(send_counts[q]));
      e.awaiting_size = true;
      e.in_left = kHeaderBytes;
    }
    for (int q = 0; q < world_ && p->status.ok(); ++q)
      if (q != rank_) p->status = SendSome(q, &p->peers[q]);
    if (!p->status.ok()) p->status = Break(p->status);
    return p;
  }

  absl::Status Barrier() override {
    std::vector<char> send(world_, 1), recv(world_, 0);
    return AllToAll(send.data(), recv.data(), 1);
  }

 private:
  // One peer's share of an exchange: what is left to send and to receive.
  struct Peer {
    const char* out = nullptr;
    uint64_t out_bytes = 0;
    char out_header[kHeaderBytes] = {};
    uint64_t out_left = 0;  // header + bytes not yet sent
    char* in = nullptr;     // null in a dynamic exchange until every header is in
    uint64_t in_bytes = 0;  // a dynamic exchange: learnt from the header
    char in_header[kHeaderBytes] = {};
    uint64_t in_left = 0;  // header + bytes not yet received
    // The message to this peer: the header of collective `seq`, then `bytes` at `data`.
    void SetOut(uint64_t seq, const char* data, uint64_t bytes) {
      out = data;
      out_bytes = bytes;
      std::memcpy(out_header, &seq, 8);
      std::memcpy(out_header + 8, &out_bytes, 8);
      out_left = kHeaderBytes + out_bytes;
    }
    bool awaiting_size = false;  // dynamic: the header has not given the size yet
  };

  class Pending final : public PendingAllToAllV {
   public:
    explicit Pending(TcpCommunicator* c) : c_(c) {}
    ~Pending() override {
      if (!waited_) Wait().IgnoreError();
    }
    absl::Status Wait() override {
      if (waited_) return status;
      waited_ = true;
      if (status.ok()) status = c_->Finish(this);
      return status;
    }
    absl::Status status;
    std::vector<Peer> peers;
    uint64_t seq = 0;
    // A dynamic exchange: where the received bytes go once every size is known.
    std::vector<char>* dyn_recv = nullptr;
    std::vector<int64_t>* dyn_counts = nullptr;
    std::vector<int64_t>* dyn_offsets = nullptr;
    const char* own = nullptr;  // this rank's block to itself
    int64_t own_bytes = 0;
    bool placed = false;

   private:
    TcpCommunicator* c_;
    bool waited_ = false;
  };

  absl::Status SendSome(int q, Peer* e) {
    const uint64_t total = kHeaderBytes + e->out_bytes;
    while (e->out_left > 0) {
      const uint64_t done = total - e->out_left;
      iovec iov[2];
      int n = 0;
      if (done < kHeaderBytes) iov[n++] = {e->out_header + done, kHeaderBytes - done};
      const uint64_t body_done = done < kHeaderBytes ? 0 : done - kHeaderBytes;
      if (e->out_bytes > body_done)
        iov[n++] = {const_cast<char*>(e->out) + body_done, e->out_bytes - body_done};
      msghdr msg{};
      msg.msg_iov = iov;
      msg.msg_iovlen = n;
      const ssize_t w = sendmsg(fds_[q], &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (w > 0) {
        e->out_left -= static_cast<uint64_t>(w);
        continue;
      }
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return absl::OkStatus();
      return Lost(q, "send", w < 0 ? errno : 0);
    }
    return absl::OkStatus();
  }

  absl::Status RecvSome(int q, Peer* e, uint64_t seq) {
    while (e->in_left > 0) {
      const uint64_t total = kHeaderBytes + (e->awaiting_size ? 0 : e->in_bytes);
      const uint64_t done = total - e->in_left;
      if (done >= kHeaderBytes && e->in == nullptr) return absl::OkStatus();  // no place yet
      char* dst;
      uint64_t want;
      if (done < kHeaderBytes) {
        dst = e->in_header + done;
        want = kHeaderBytes - done;  // the header alone: the next message must stay queued
      } else {
        dst = e->in + (done - kHeaderBytes);
        want = e->in_left;
      }
      const ssize_t r = recv(fds_[q], dst, want, MSG_DONTWAIT);
      if (r > 0) {
        e->in_left -= static_cast<uint64_t>(r);
        if (done < kHeaderBytes && done + static_cast<uint64_t>(r) == kHeaderBytes) {
          uint64_t got_seq, got_bytes;
          std::memcpy(&got_seq, e->in_header, 8);
          std::memcpy(&got_bytes, e->in_header + 8, 8);
          if (e->awaiting_size && got_seq == seq && got_bytes <= kMaxDynamicBytes) {
            e->awaiting_size = false;
            e->in_bytes = got_bytes;
            e->in_left = got_bytes;
            continue;
          }
          if (got_seq != seq || got_bytes != e->in_bytes)
            return absl::InternalError(absl::StrCat(
                "tcp all-to-all-v on rank ", rank_, ": rank ", q, " sent ", got_bytes,
                " bytes of collective ", got_seq, ", expected ", e->in_bytes, " bytes of ", seq,
                " (the ranks did not call the same collectives)"));
        }
        continue;
      }
      if (r == 0) return Lost(q, "recv", 0);
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return absl::OkStatus();
      return Lost(q, "recv", errno);
    }
    return absl::OkStatus();
  }

  // err: the errno of the failed call; 0: the peer closed the connection.
  absl::Status Lost(int q, const char* what, int err) {
    if (aborted_.load()) return absl::UnavailableError("tcp communicator aborted");
    return absl::UnavailableError(absl::StrCat("tcp all-to-all-v on rank ", rank_, ": ", what,
                                               " rank ", q, ": ",
                                               err == 0 ? "connection closed" : std::strerror(err)));
  }

  absl::Status Finish(Pending* p) {
    const auto deadline = Clock::now() + timeout_;
    std::vector<pollfd>& pfds = pfds_;  // scratch kept across collectives (one thread)
    std::vector<int>& who = who_;
    for (;;) {
      pfds.clear();
      who.clear();
      for (int q = 0; q < world_; ++q) {
        if (q == rank_) continue;
        Peer& e = p->peers[q];
        if (e.in_left > 0) {
          absl::Status s = RecvSome(q, &e, p->seq);
          if (!s.ok()) return Break(s);
        }
        if (e.out_left > 0) {
          absl::Status s = SendSome(q, &e);
          if (!s.ok()) return Break(s);
        }
        // A dynamic receive whose header is in waits for its place, not for the socket.
        const bool can_read = e.in_left > 0 && (e.awaiting_size || e.in != nullptr ||
                                                 e.in_left > e.in_bytes);
        const short events = (can_read ? POLLIN : 0) | (e.out_left > 0 ? POLLOUT : 0);
        if (events != 0) {
          pfds.push_back({fds_[q], events, 0});
          who.push_back(q);
        }
      }
      if (p->dyn_recv != nullptr && !p->placed) {
        bool all_sizes = true;
        for (int q = 0; q < world_; ++q)
          if (q != rank_ && p->peers[q].awaiting_size) all_sizes = false;
        if (all_sizes) {
          Place(p);
          continue;  // read what already arrived
        }
      }
      if (pfds.empty()) return absl::OkStatus();
      if (aborted_.load()) return Break(absl::UnavailableError("tcp communicator aborted"));
      const int ms = LeftMs(deadline);
      const int rc = poll(pfds.data(), pfds.size(), ms);
      if (rc < 0 && errno != EINTR) return Break(Errno("poll"));
      if (rc == 0 && Clock::now() >= deadline) {
        std::string waiting;
        for (int q : who) absl::StrAppend(&waiting, waiting.empty() ? "" : ",", q);
        return Break(absl::UnavailableError(absl::StrCat(
            "tcp all-to-all-v on rank ", rank_, ": timed out after ", timeout_.count(),
            " ms waiting for rank(s) ", waiting)));
      }
    }
  }

  absl::Status BrokenStatus() const {
    return absl::UnavailableError(aborted_.load() ? "tcp communicator aborted"
                                                  : "tcp communicator is broken");
  }

  // Every size of a dynamic exchange is known: lay the receive buffer out in rank order.
  void Place(Pending* p) {
    p->placed = true;
    std::vector<int64_t>& counts = *p->dyn_counts;
    std::vector<int64_t>& offsets = *p->dyn_offsets;
    int64_t total = 0;
    for (int q = 0; q < world_; ++q) {
      counts[q] = q == rank_ ? p->own_bytes : static_cast<int64_t>(p->peers[q].in_bytes);
      offsets[q] = total;
      total += counts[q];
    }
    p->dyn_recv->resize(std::max<int64_t>(total, 1));
    char* base = p->dyn_recv->data();
    if (p->own_bytes > 0) std::memmove(base + offsets[rank_], p->own, p->own_bytes);
    for (int q = 0; q < world_; ++q)
      if (q != rank_) p->peers[q].in = base + offsets[q];
  }

  absl::Status Break(absl::Status status) {
    if (!broken_.exchange(true)) Shutdown();
    return status;
  }

  void Shutdown() {
    broken_ = true;
    for (int fd : fds_)
      if (fd >= 0) shutdown(fd, SHUT_RDWR);
  }

  const int rank_, world_;
  const std::vector<int> fds_;  // by peer rank; -1 for this rank
  const milliseconds timeout_;
  uint64_t seq_ = 0;  // collectives called (the same count on every rank)
  std::vector<pollfd> pfds_;  // Finish's poll set
  std::vector<int> who_;      // the peer of each entry of pfds_
  std::atomic<bool> broken_{false};
  std::atomic<bool> aborted_{false};
};

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateTcpCommunicator(const TcpOptions& o) {
  if (o.store == nullptr) return absl::InvalidArgumentError("tcp: no rendezvous store");
  if (o.world_size < 1 || o.rank < 0 || o.rank >= o.world_size)
    return absl::InvalidArgumentError(
        absl::StrCat("tcp: rank ", o.rank, " of world size ", o.world_size));
  const std::string where = absl::StrCat("tcp: rank ", o.rank, " of ", o.world_size);
  const auto deadline = Clock::now() + o.timeout;
  const std::string token = RandomToken();
  auto listening = Listen(o.hostname, o.world_size);
  if (!listening.ok()) return sy::Annotate(listening.status(), where);
  OwnedFd listener = std::move(listening->first);
  SY_RETURN_IF_ERROR(sy::Annotate(
      o.store->Set(absl::StrCat(o.prefix, "/addr/", o.rank), absl::StrCat(listening->second, " ", token)),
      where));

  std::vector<OwnedFd> peers(o.world_size);
  // Lower ranks: connect and present their token.
  for (int q = 0; q < o.rank; ++q) {
    absl::StatusOr<std::string> v =
        o.store->Get(absl::StrCat(o.prefix, "/addr/", q), milliseconds(LeftMs(deadline)));
    if (!v.ok())
      return absl::UnavailableError(absl::StrCat(where, ": no address of rank ", q, ": ",
                                                 v.status().message()));
    std::vector<std::string> f = absl::StrSplit(*v, ' ');
    if (f.size() != 3 || f[2].size() != kTokenBytes)
      return absl::UnavailableError(absl::StrCat(where, ": bad address of rank ", q, ": '", *v, "'"));
    absl::StatusOr<OwnedFd> fd = Connect(f[0], f[1], deadline);
    if (!fd.ok())
      return absl::UnavailableError(
          absl::StrCat(where, ": connecting to rank ", q, ": ", fd.status().message()));
    char hello[kHelloBytes];
    std::memcpy(hello, kMagic, 4);
    PutU32(hello + 4, kVersion);
    PutU32(hello + 8, static_cast<uint32_t>(o.world_size));
    PutU32(hello + 12, static_cast<uint32_t>(o.rank));
    std::memcpy(hello + 16, f[2].data(), kTokenBytes);
    absl::Status s = WriteAll(fd->fd, hello, sizeof(hello), deadline);
    if (!s.ok()) return absl::UnavailableError(absl::StrCat(where, ": hello to rank ", q, ": ", s.message()));
    SetNoDelay(fd->fd);
    peers[q] = std::move(*fd);
  }
  // Higher ranks: accept, and keep only connections that present this rank's token.
  for (int missing = o.world_size - 1 - o.rank; missing > 0;) {
    pollfd pfd{listener.fd, POLLIN, 0};
    if (poll(&pfd, 1, LeftMs(deadline)) <= 0) {
      std::string ranks;
      for (int q = o.rank + 1; q < o.world_size; ++q)
        if (peers[q].fd < 0) absl::StrAppend(&ranks, ranks.empty() ? "" : ",", q);
      return absl::UnavailableError(
          absl::StrCat(where, ": timed out waiting for rank(s) ", ranks, " to connect"));
    }
    OwnedFd fd(accept4(listener.fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (fd.fd < 0) continue;
    char hello[kHelloBytes];
    const auto hello_deadline = std::min(deadline, Clock::now() + std::chrono::seconds(5));
    if (!ReadAll(fd.fd, hello, sizeof(hello), hello_deadline).ok()) continue;
    const uint32_t world = GetU32(hello + 8), rank = GetU32(hello + 12);
    if (std::memcmp(hello, kMagic, 4) != 0 || GetU32(hello + 4) != kVersion ||
        world != static_cast<uint32_t>(o.world_size) || rank <= static_cast<uint32_t>(o.rank) ||
        rank >= world || peers[rank].fd >= 0 ||
        std::memcmp(hello + 16, token.data(), kTokenBytes) != 0)
      continue;  // not a rank of this group: dropped
    SetNoDelay(fd.fd);
    peers[rank] = std::move(fd);
    --missing;
  }
  std::vector<int> fds(o.world_size, -1);
  for (int q = 0; q < o.world_size; ++q) fds[q] = peers[q].release();
  return std::unique_ptr<Communicator>(
      new TcpCommunicator(o.rank, o.world_size, std::move(fds), o.timeout));
}

std::function<absl::StatusOr<std::unique_ptr<Communicator>>(const std::string&, int, int)>
TcpCommunicatorFactory(const TcpOptions& base) {
  return [base](const std::string& prefix, int rank, int world_size) {
    TcpOptions o = base;
    o.prefix = "tcp/" + prefix;
    o.rank = rank;
    o.world_size = world_size;
    return CreateTcpCommunicator(o);
  };
}

}  // namespace sy::parallel
