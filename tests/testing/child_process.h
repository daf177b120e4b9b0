// ChildProcess: the built `switchyard` binary run as a child process by out-of-process tests
// (stdout and stderr to files in a test folder), with helpers to wait for a line it prints and
// for its exit. SIGKILLed and reaped when destroyed, so a failing test leaves no process.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace sy::testing {

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// argv and an environment (this process's, with `set` overriding) built BEFORE a fork: the
// child of a multi-threaded process may only call async-signal-safe functions (another
// thread may have held the allocator's lock at the fork), so it must not build them itself.
class ExecArgs {
 public:
  ExecArgs(std::vector<std::string> args, std::vector<std::pair<std::string, std::string>> set)
      : args_(std::move(args)) {
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string kv = *e;
      bool overridden = false;
      for (const auto& [k, v] : set) overridden = overridden || kv.rfind(k + "=", 0) == 0;
      if (!overridden) env_.push_back(kv);
    }
    for (const auto& [k, v] : set) env_.push_back(k + "=" + v);
    for (auto& a : args_) argv_.push_back(a.data());
    argv_.push_back(nullptr);
    for (auto& kv : env_) envp_.push_back(kv.data());
    envp_.push_back(nullptr);
  }
  // In the child: async-signal-safe.
  [[noreturn]] void Exec() {
    execve(argv_[0], argv_.data(), envp_.data());
    _exit(127);
  }

 private:
  std::vector<std::string> args_, env_;
  std::vector<char*> argv_, envp_;
};

// A child process running the built `switchyard` binary; stdout and stderr go to files.
// Killed (SIGKILL) and reaped when destroyed. Used by the process tests and bench/elastic_bench.
class ChildProcess {
 public:
  ChildProcess(const std::string& dir, const std::string& name, std::vector<std::string> args)
      : out_(dir + "/" + name + ".out"), err_(dir + "/" + name + ".err") {
    args.insert(args.begin(), SY_BINARY_DIR "/server/switchyard");
    // Files of an earlier child of the same name must not be read as this one's.
    unlink(out_.c_str());
    unlink(err_.c_str());
    ExecArgs exec(std::move(args), {{"SWITCHYARD_THREADS", "1"}});
    const char* out = out_.c_str();
    const char* err = err_.c_str();
    pid_ = fork();
    if (pid_ == 0) {
      const int o = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
      const int e = open(err, O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(o, 1);
      dup2(e, 2);
      exec.Exec();
    }
  }
  ~ChildProcess() {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  pid_t pid() const { return pid_; }
  std::string out() const { return ReadFile(out_); }
  std::string err() const { return ReadFile(err_); }

  // The text after `prefix` up to the end of its line, once the child prints it on stdout.
  std::string WaitForLine(const std::string& prefix, std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      const std::string text = out();
      const size_t at = text.find(prefix);
      if (at != std::string::npos) {
        const size_t end = text.find('\n', at);
        if (end != std::string::npos) return text.substr(at + prefix.size(), end - at - prefix.size());
      }
      if (Exited()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return "";
  }
  bool Exited() {
    if (reaped_) return true;
    int st = 0;
    if (waitpid(pid_, &st, WNOHANG) == pid_) {
      reaped_ = true;
      status_ = st;
    }
    return reaped_;
  }
  // Exit status once it exits within `timeout`; -1 otherwise.
  int WaitExit(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!Exited() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    if (!reaped_) return -1;
    return WIFEXITED(status_) ? WEXITSTATUS(status_) : 128 + WTERMSIG(status_);
  }
  void Kill() { kill(pid_, SIGKILL); }
  // The port at the end of the line after `prefix` ("... HOST:PORT"); 0 on time-out.
  int WaitForPort(const std::string& prefix, std::chrono::milliseconds timeout) {
    const std::string rest = WaitForLine(prefix, timeout);
    const size_t colon = rest.rfind(':');
    return colon == std::string::npos ? 0 : std::atoi(rest.c_str() + colon + 1);
  }

 private:
  std::string out_, err_;
  pid_t pid_ = -1;
  bool reaped_ = false;
  int status_ = 0;
};

}  // namespace sy::testing
