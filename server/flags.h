// FlagSet: the command-line parser of every `switchyard` subcommand.
//
// Accepts `--name=value`, `--name value`, bare `--flag` for booleans (and `--no-flag`), and
// `--config FILE`, whose lines are `name = value` (or `name: value`; `#` starts a comment) and
// are applied before the command line, so the command line wins. Positional arguments are
// collected in order. `--help` makes Parse return a kCancelled status whose message is the
// usage text. Not thread-safe; used once per process at start-up.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sy::server {

class FlagSet {
 public:
  FlagSet(std::string command, std::string summary);

  void Add(const std::string& name, std::string* value, const std::string& help);
  void Add(const std::string& name, int64_t* value, const std::string& help);
  void Add(const std::string& name, int* value, const std::string& help);
  void Add(const std::string& name, double* value, const std::string& help);
  void Add(const std::string& name, bool* value, const std::string& help);

  // A flag whose value is a secret: when it is given on the command line, Parse overwrites
  // its bytes in argv (so /proc/PID/cmdline and ps show x's from then on) and warns on stderr
  // that a file flag keeps it out of ps altogether.
  void MarkSecret(const std::string& name, const std::string& file_flag);

  // InvalidArgument naming the flag on an unknown flag or bad value.
  absl::Status Parse(int argc, char** argv);
  // Parse for a subcommand: on --help prints the usage to stdout and returns 0; on a bad flag
  // prints "<command>: <message>" to stderr and returns 2; otherwise returns -1 (carry on).
  int ParseOrExitCode(int argc, char** argv);
  const std::vector<std::string>& positional() const { return positional_; }
  // True if the flag was given (on the command line or in a config file).
  bool WasSet(const std::string& name) const;
  std::string Usage() const;

 private:
  struct Flag {
    std::string name, help, default_text;
    bool is_bool = false;
    bool* bool_ptr = nullptr;
    std::function<absl::Status(const std::string&)> set;
    bool was_set = false;
    std::string secret_file_flag;  // set: a secret (MarkSecret)
  };
  Flag* Find(const std::string& name);
  absl::Status Apply(Flag* f, const std::string& value);
  absl::Status LoadConfig(const std::string& path);

  std::string command_, summary_;
  std::vector<Flag> flags_;
  std::vector<std::string> positional_;
};

// The kernels::MakeBackend name for `--device` and `--backend` (serve, worker, run):
// --device cpu keeps --backend (auto, cpu, reference, or cuda[:K], the older spelling of the
// device); --device cuda or cuda:K runs the model's weight products on GPU K
// (kernels/cuda/cuda_backend.h), with --backend left at auto or naming the same device.
// INVALID_ARGUMENT for anything else.
absl::StatusOr<std::string> BackendForDevice(const std::string& device, const std::string& backend);

}  // namespace sy::server
