#include "parallel/transport.h"

#include "absl/strings/str_cat.h"
#include "parallel/gloo_communicator.h"
#include "parallel/tcp_communicator.h"

namespace sy::parallel {

absl::StatusOr<CommunicatorFactory> ProcessCommunicatorFactory(const std::string& transport,
                                                               RendezvousStore* store,
                                                               const std::string& hostname,
                                                               std::chrono::milliseconds timeout) {
  if (transport == "tcp") {
    TcpOptions o;
    o.store = store;
    o.hostname = hostname;
    o.timeout = timeout;
    return TcpCommunicatorFactory(o);
  }
  if (transport == "gloo") {
    GlooOptions o;
    o.store = store;
    o.hostname = hostname;
    o.timeout = timeout;
    return GlooCommunicatorFactory(o);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("transport '", transport, "': expected tcp or gloo"));
}

}  // namespace sy::parallel
