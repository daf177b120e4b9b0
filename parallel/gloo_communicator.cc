#include "parallel/gloo_communicator.h"

#include <atomic>
#include <csignal>
#include <cstring>
#include <exception>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "gloo/common/error.h"
#include "gloo/rendezvous/context.h"
#include "gloo/rendezvous/prefix_store.h"
#include "gloo/rendezvous/store.h"
#include "gloo/transport/tcp/device.h"
#include "gloo/transport/unbound_buffer.h"
#include "kernels/core/mutex.h"
#include "kernels/core/status.h"

namespace sy::parallel {
namespace {

// gloo::rendezvous::Store over our RendezvousStore. Gloo expects throws on failure.
class GlooStoreAdapter final : public gloo::rendezvous::Store {
 public:
  GlooStoreAdapter(RendezvousStore* store, std::chrono::milliseconds timeout)
      : store_(store), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    absl::Status s = store_->Set(key, std::string(data.begin(), data.end()));
    if (!s.ok()) throw gloo::IoException(std::string(s.message()));
  }
  std::vector<char> get(const std::string& key) override {
    absl::StatusOr<std::string> v = store_->Get(key, timeout_);
    if (!v.ok()) throw gloo::IoException(std::string(v.status().message()));
    return std::vector<char>(v->begin(), v->end());
  }
  void wait(const std::vector<std::string>& keys) override { wait(keys, timeout_); }
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (const auto& key : keys) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      absl::StatusOr<std::string> v =
          store_->Get(key, std::max(left, std::chrono::milliseconds(0)));
      if (!v.ok()) throw gloo::IoException(std::string(v.status().message()));
    }
  }

 private:
  RendezvousStore* store_;
  std::chrono::milliseconds timeout_;
};

std::chrono::milliseconds Left(std::chrono::steady_clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  // gloo treats a non-positive timeout as "use the default"; 1 ms makes an expired deadline
  // fail promptly instead.
  return std::max(left, std::chrono::milliseconds(1));
}

class GlooCommunicator final : public OverlappingCommunicator {
 public:
  GlooCommunicator(std::shared_ptr<gloo::transport::Device> device,
                   std::shared_ptr<gloo::rendezvous::Context> context,
                   std::chrono::milliseconds timeout)
      : device_(std::move(device)), context_(std::move(context)), timeout_(timeout) {}

  ~GlooCommunicator() override {
    // Orphaned buffers of a failed call must outlive the pairs that may still reference them.
    context_.reset();
    orphans_.clear();
  }

  int rank() const override { return context_->rank; }
  int world_size() const override { return context_->size; }
  std::chrono::milliseconds timeout() const override { return timeout_; }
  bool broken() const override { return broken_; }
  std::string name() const override { return "gloo"; }

  // Wakes the exchange in flight (gloo's abortWaitRecv/abortWaitSend, which make its waits
  // return false); the owning thread then breaks the communicator. Later calls fail at Start.
  void Abort() override {
    sy::MutexLock lock(&inflight_mu_);
    aborted_ = true;
    if (inflight_ != nullptr) {
      if (inflight_->rbuf) inflight_->rbuf->abortWaitRecv();
      if (inflight_->sbuf) inflight_->sbuf->abortWaitSend();
    }
  }

  // Posts every receive and send on Gloo's unbound buffers and returns: Gloo's device thread
  // moves the bytes while the caller works; Wait() waits for the completions.
  std::unique_ptr<PendingAllToAllV> StartAllToAllV(
      const void* send, absl::Span<const int64_t> send_counts,
      absl::Span<const int64_t> send_offsets, void* recv, absl::Span<const int64_t> recv_counts,
      absl::Span<const int64_t> recv_offsets) override {
    auto pending = std::make_unique<Pending>(this);
    if (aborted_.load() && !broken_) pending->status = Break(absl::UnavailableError("gloo communicator aborted"));
    if (broken_) {
      if (pending->status.ok()) pending->status = absl::UnavailableError("gloo communicator is broken");
      return pending;
    }
    const int n = world_size(), me = rank();
    absl::Status valid =
        ValidateAllToAllV(n, send_counts, send_offsets, recv_counts, recv_offsets);
    if (!valid.ok()) {
      pending->status = Break(valid);
      return pending;
    }
    // All ranks take the same slot: collectives are called in the same order everywhere.
    const uint64_t slot = static_cast<uint64_t>(context_->nextSlot());
    size_t send_extent = 0, recv_extent = 0;
    for (int p = 0; p < n; ++p) {
      if (p == me) continue;
      if (send_counts[p] > 0)
        send_extent = std::max<size_t>(send_extent, send_offsets[p] + send_counts[p]);
      if (recv_counts[p] > 0)
        recv_extent = std::max<size_t>(recv_extent, recv_offsets[p] + recv_counts[p]);
    }
    try {
      if (send_extent > 0)
        pending->sbuf = context_->createUnboundBuffer(const_cast<void*>(send), send_extent);
      if (recv_extent > 0) pending->rbuf = context_->createUnboundBuffer(recv, recv_extent);
      for (int p = 0; p < n; ++p) {
        if (p == me) continue;
        if (recv_counts[p] > 0) {
          pending->rbuf->recv(p, slot, recv_offsets[p], recv_counts[p]);
          ++pending->num_recvs;
        }
      }
      for (int i = 1; i < n; ++i) {  // staggered so that not every rank hits rank 0 first
        const int p = (me + i) % n;
        if (send_counts[p] > 0) {
          pending->sbuf->send(p, slot, send_offsets[p], send_counts[p]);
          ++pending->num_sends;
        }
      }
      if (send_counts[me] > 0) {
        if (recv_counts[me] != send_counts[me]) {
          pending->Orphan();
          pending->status = Break(absl::InvalidArgumentError(absl::StrCat(
              "all-to-all-v: rank ", me, " sends itself ", send_counts[me],
              " bytes but expects ", recv_counts[me])));
          return pending;
        }
        std::memmove(static_cast<char*>(recv) + recv_offsets[me],
                     static_cast<const char*>(send) + send_offsets[me], send_counts[me]);
      }
    } catch (const std::exception& e) {
      pending->Orphan();
      pending->status = Break(absl::UnavailableError(
          absl::StrCat("gloo all-to-all-v on rank ", me, ": ", e.what())));
    }
    if (pending->status.ok()) {
      sy::MutexLock lock(&inflight_mu_);
      inflight_ = pending.get();
      if (aborted_) {  // an Abort that came while the exchange was being posted
        if (pending->rbuf) pending->rbuf->abortWaitRecv();
        if (pending->sbuf) pending->sbuf->abortWaitSend();
      }
    }
    return pending;
  }

  absl::Status Barrier() override {
    const int n = world_size();
    std::vector<char> send(n, 1), recv(n, 0);
    return AllToAll(send.data(), recv.data(), 1);
  }

 private:
  class Pending final : public PendingAllToAllV {
   public:
    explicit Pending(GlooCommunicator* comm) : comm_(comm) {}
    ~Pending() override {
      if (!waited_) Wait().IgnoreError();
    }

    absl::Status Wait() override {
      waited_ = true;
      struct Done {
        Pending* p;
        ~Done() { p->comm_->Finished(p); }
      } done{this};
      if (!status.ok()) return status;
      const auto deadline = std::chrono::steady_clock::now() + comm_->timeout_;
      try {
        for (int i = 0; i < num_recvs; ++i)
          if (!rbuf->waitRecv(nullptr, Left(deadline)))
            throw gloo::IoException("receive aborted");
        for (int i = 0; i < num_sends; ++i)
          if (!sbuf->waitSend(nullptr, Left(deadline))) throw gloo::IoException("send aborted");
      } catch (const std::exception& e) {
        comm_->Finished(this);  // Abort must not touch the buffers Orphan moves
        Orphan();
        status = comm_->Break(absl::UnavailableError(
            absl::StrCat("gloo all-to-all-v on rank ", comm_->rank(), ": ", e.what())));
      }
      return status;
    }

    // A failed exchange's buffers may still be referenced by the pairs: the communicator
    // keeps them until it is destroyed.
    void Orphan() {
      if (sbuf) comm_->orphans_.push_back(std::move(sbuf));
      if (rbuf) comm_->orphans_.push_back(std::move(rbuf));
    }

    absl::Status status;
    std::unique_ptr<gloo::transport::UnboundBuffer> sbuf, rbuf;
    int num_sends = 0, num_recvs = 0;

   private:
    GlooCommunicator* comm_;
    bool waited_ = false;
  };

  void Finished(Pending* p) {
    sy::MutexLock lock(&inflight_mu_);
    if (inflight_ == p) inflight_ = nullptr;
  }

  absl::Status Break(absl::Status status) {
    if (!broken_) {
      broken_ = true;
      try {
        context_->closeConnections();
      } catch (const std::exception&) {
        // The pairs are already failing; nothing more to close.
      }
    }
    return status;
  }

  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::rendezvous::Context> context_;
  std::chrono::milliseconds timeout_;
  std::atomic<bool> broken_{false};
  std::vector<std::unique_ptr<gloo::transport::UnboundBuffer>> orphans_;
  sy::Mutex inflight_mu_;  // Abort (any thread) against the owning thread's exchange
  Pending* inflight_ ABSL_GUARDED_BY(inflight_mu_) = nullptr;
  std::atomic<bool> aborted_{false};
};

// Gloo's TCP pairs write with writev(), which raises SIGPIPE when the peer has gone; the
// default action would kill this process, where a dead peer must only break the group.
// A handler the process installed itself is left alone.
void IgnoreSigpipeUnlessHandled() {
  struct sigaction old {};
  if (sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL)
    std::signal(SIGPIPE, SIG_IGN);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicator(const GlooOptions& options) {
  if (options.store == nullptr) return absl::InvalidArgumentError("gloo: no rendezvous store");
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size)
    return absl::InvalidArgumentError(
        absl::StrCat("gloo: rank ", options.rank, " of world size ", options.world_size));
  IgnoreSigpipeUnlessHandled();
  try {
    gloo::transport::tcp::attr attr;
    if (!options.iface.empty()) {
      attr.iface = options.iface;
    } else {
      attr.hostname = options.hostname;
    }
    std::shared_ptr<gloo::transport::Device> device = gloo::transport::tcp::CreateDevice(attr);
    auto context =
        std::make_shared<gloo::rendezvous::Context>(options.rank, options.world_size);
    context->setTimeout(options.timeout);
    GlooStoreAdapter adapter(options.store, options.timeout);
    gloo::rendezvous::PrefixStore prefixed(options.prefix, adapter);
    context->connectFullMesh(prefixed, device);
    return std::unique_ptr<Communicator>(
        new GlooCommunicator(std::move(device), std::move(context), options.timeout));
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat("gloo: rank ", options.rank, " of ",
                                               options.world_size, " could not connect: ",
                                               e.what()));
  }
}

std::function<absl::StatusOr<std::unique_ptr<Communicator>>(const std::string&, int, int)>
GlooCommunicatorFactory(const GlooOptions& base) {
  return [base](const std::string& prefix, int rank, int world_size) {
    GlooOptions o = base;
    o.prefix = "gloo/" + prefix;
    o.rank = rank;
    o.world_size = world_size;
    return CreateGlooCommunicator(o);
  };
}

}  // namespace sy::parallel
