#include "parallel/rendezvous_store.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "kernels/core/mutex.h"

namespace sy::parallel {

FileRendezvousStore::FileRendezvousStore(std::string dir) : dir_(std::move(dir)) {}

std::string FileRendezvousStore::PathOf(const std::string& key) const {
  // Keys may hold '/' (prefixes); keep one flat directory.
  std::string name;
  for (char c : key) name += (c == '/' ? '%' : c);
  return absl::StrCat(dir_, "/", name);
}

absl::Status FileRendezvousStore::Set(const std::string& key, const std::string& value) {
  std::error_code ec;
  std::filesystem::create_directories(dir_, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("rendezvous dir ", dir_, ": ", ec.message()));
  const std::string path = PathOf(key);
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid(), ".",
                                       std::hash<std::thread::id>()(std::this_thread::get_id()));
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(value.data(), static_cast<std::streamsize>(value.size()));
    if (!out) return absl::UnavailableError(absl::StrCat("rendezvous: cannot write ", tmp));
  }
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("rendezvous: rename ", tmp, ": ", ec.message()));
  return absl::OkStatus();
}

absl::StatusOr<std::string> FileRendezvousStore::Get(const std::string& key,
                                                     std::chrono::milliseconds timeout) {
  const std::string path = PathOf(key);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto pause = std::chrono::milliseconds(1);
  while (true) {
    std::ifstream in(path, std::ios::binary);
    if (in) {
      std::ostringstream ss;
      ss << in.rdbuf();
      return ss.str();
    }
    if (std::chrono::steady_clock::now() >= deadline)
      return absl::DeadlineExceededError(
          absl::StrCat("rendezvous: key ", key, " not set within ", timeout.count(), " ms"));
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(50));
  }
}

absl::Status MemoryRendezvousStore::Set(const std::string& key, const std::string& value) {
  sy::MutexLock lock(&mu_);
  values_[key] = value;
  cv_.SignalAll();
  return absl::OkStatus();
}

absl::StatusOr<std::string> MemoryRendezvousStore::Get(const std::string& key,
                                                       std::chrono::milliseconds timeout) {
  sy::MutexLock lock(&mu_);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (values_.count(key) == 0 && !cv_.WaitUntil(&mu_, deadline)) {
  }
  if (values_.count(key) == 0)
    return absl::DeadlineExceededError(
        absl::StrCat("rendezvous: key ", key, " not set within ", timeout.count(), " ms"));
  return values_[key];
}

}  // namespace sy::parallel
