// RendezvousStore: the key-value store ranks meet through when they build a communicator
// (DESIGN.md §3): Gloo publishes each rank's TCP addresses here, NCCL its unique id. In a
// served cluster the leader's Cluster service provides it; tests and single-host runs use
// FileRendezvousStore (a shared directory) or MemoryRendezvousStore (threads of one process).
//
// Keys are written once per membership epoch; callers put the epoch in a key prefix.
//
// Thread safety: implementations are thread-safe.
#pragma once

#include <chrono>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/core/mutex.h"

namespace sy::parallel {

class RendezvousStore {
 public:
  virtual ~RendezvousStore() = default;
  // Sets (or overwrites) key.
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  // The value of key, waiting up to `timeout` for it to be set; DEADLINE_EXCEEDED otherwise.
  virtual absl::StatusOr<std::string> Get(const std::string& key,
                                          std::chrono::milliseconds timeout) = 0;
};

// Keys are files in `dir` (created if missing), written atomically (write + rename), so any
// process on the host (or on a shared file system) can rendezvous.
class FileRendezvousStore final : public RendezvousStore {
 public:
  explicit FileRendezvousStore(std::string dir);
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key,
                                  std::chrono::milliseconds timeout) override;

 private:
  std::string PathOf(const std::string& key) const;
  std::string dir_;
};

// In-process store for ranks that are threads.
class MemoryRendezvousStore final : public RendezvousStore {
 public:
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::string> Get(const std::string& key,
                                  std::chrono::milliseconds timeout) override;

 private:
  sy::Mutex mu_;
  sy::CondVar cv_;
  std::map<std::string, std::string> values_ ABSL_GUARDED_BY(mu_);
};

}  // namespace sy::parallel
