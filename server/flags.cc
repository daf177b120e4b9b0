#include "server/flags.h"

#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace sy::server {

FlagSet::FlagSet(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

void FlagSet::Add(const std::string& name, std::string* v, const std::string& help) {
  flags_.push_back({name, help, *v, false, nullptr, [v](const std::string& s) {
                      *v = s;
                      return absl::OkStatus();
                    }});
}

void FlagSet::Add(const std::string& name, int64_t* v, const std::string& help) {
  flags_.push_back({name, help, std::to_string(*v), false, nullptr,
                    [v, name](const std::string& s) {
                      if (!absl::SimpleAtoi(s, v))
                        return absl::InvalidArgumentError(
                            absl::StrCat("--", name, ": '", s, "' is not an integer"));
                      return absl::OkStatus();
                    }});
}

void FlagSet::Add(const std::string& name, int* v, const std::string& help) {
  flags_.push_back({name, help, std::to_string(*v), false, nullptr,
                    [v, name](const std::string& s) {
                      if (!absl::SimpleAtoi(s, v))
                        return absl::InvalidArgumentError(
                            absl::StrCat("--", name, ": '", s, "' is not an integer"));
                      return absl::OkStatus();
                    }});
}

void FlagSet::Add(const std::string& name, double* v, const std::string& help) {
  std::ostringstream d;
  d << *v;
  flags_.push_back({name, help, d.str(), false, nullptr, [v, name](const std::string& s) {
                      if (!absl::SimpleAtod(s, v))
                        return absl::InvalidArgumentError(
                            absl::StrCat("--", name, ": '", s, "' is not a number"));
                      return absl::OkStatus();
                    }});
}

void FlagSet::Add(const std::string& name, bool* v, const std::string& help) {
  flags_.push_back({name, help, *v ? "true" : "false", true, v,
                    [v, name](const std::string& s) {
                      if (s == "true" || s == "1" || s == "yes") {
                        *v = true;
                      } else if (s == "false" || s == "0" || s == "no") {
                        *v = false;
                      } else {
                        return absl::InvalidArgumentError(
                            absl::StrCat("--", name, ": '", s, "' is not a boolean"));
                      }
                      return absl::OkStatus();
                    }});
}

FlagSet::Flag* FlagSet::Find(const std::string& name) {
  for (auto& f : flags_)
    if (f.name == name) return &f;
  return nullptr;
}

bool FlagSet::WasSet(const std::string& name) const {
  for (const auto& f : flags_)
    if (f.name == name) return f.was_set;
  return false;
}

absl::Status FlagSet::Apply(Flag* f, const std::string& value) {
  f->was_set = true;
  return f->set(value);
}

absl::Status FlagSet::LoadConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("--config: cannot open '", path, "'"));
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    auto hash = line.find('#');
    if (hash != std::string::npos) line.resize(hash);
    absl::string_view sv = absl::StripAsciiWhitespace(line);
    if (sv.empty()) continue;
    auto sep = sv.find_first_of("=:");
    if (sep == absl::string_view::npos)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", lineno, ": expected 'name = value'"));
    std::string name(absl::StripAsciiWhitespace(sv.substr(0, sep)));
    std::string value(absl::StripAsciiWhitespace(sv.substr(sep + 1)));
    if (absl::StartsWith(name, "--")) name = name.substr(2);
    Flag* f = Find(name);
    if (f == nullptr)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", lineno, ": unknown flag '", name, "'"));
    if (value.size() >= 2 && value.front() == '"' && value.back() == '"')
      value = value.substr(1, value.size() - 2);
    absl::Status s = Apply(f, value);
    if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ":", lineno, ": ", s.message()));
  }
  return absl::OkStatus();
}

absl::Status FlagSet::Parse(int argc, char** argv) {
  // Config files first, so the command line overrides them.
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    std::string path;
    if (a == "--config" && i + 1 < argc) {
      path = argv[++i];
    } else if (absl::StartsWith(a, "--config=")) {
      path = a.substr(9);
    } else {
      continue;
    }
    absl::Status s = LoadConfig(path);
    if (!s.ok()) return s;
  }
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--help" || a == "-h") return absl::CancelledError(Usage());
    if (a == "--") {
      for (++i; i < argc; ++i) positional_.push_back(argv[i]);
      break;
    }
    if (!absl::StartsWith(a, "--") || a.size() == 2) {
      positional_.push_back(a);
      continue;
    }
    std::string name = a.substr(2), value;
    bool has_value = false;
    auto eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
      has_value = true;
    }
    if (name == "config") {
      if (!has_value) ++i;
      continue;
    }
    Flag* f = Find(name);
    if (f == nullptr && absl::StartsWith(name, "no-") && !has_value) {
      Flag* nf = Find(name.substr(3));
      if (nf != nullptr && nf->is_bool) {
        nf->was_set = true;
        *nf->bool_ptr = false;
        continue;
      }
    }
    if (f == nullptr)
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag --", name, " for '", command_, "' (see --help)"));
    char* value_bytes = nullptr;  // where the value sits in argv
    if (!has_value) {
      if (f->is_bool) {
        value = "true";
      } else if (i + 1 < argc) {
        value = argv[++i];
        value_bytes = argv[i];
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      }
    } else {
      value_bytes = argv[i] + 2 + eq + 1;
    }
    absl::Status s = Apply(f, value);
    if (!s.ok()) return s;
    if (!f->secret_file_flag.empty() && value_bytes != nullptr && !value.empty()) {
      std::memset(value_bytes, 'x', std::strlen(value_bytes));
      std::fprintf(stderr,
                   "%s: warning: --%s on the command line shows in ps until now; --%s keeps it "
                   "out\n",
                   command_.c_str(), name.c_str(), f->secret_file_flag.c_str());
    }
  }
  return absl::OkStatus();
}

void FlagSet::MarkSecret(const std::string& name, const std::string& file_flag) {
  if (Flag* f = Find(name)) f->secret_file_flag = file_flag;
}

int FlagSet::ParseOrExitCode(int argc, char** argv) {
  absl::Status s = Parse(argc, argv);
  if (absl::IsCancelled(s)) {
    std::fputs(std::string(s.message()).c_str(), stdout);
    return 0;
  }
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", command_.c_str(), std::string(s.message()).c_str());
    return 2;
  }
  return -1;
}

std::string FlagSet::Usage() const {
  std::string out = absl::StrCat("usage: switchyard ", command_, " [flags]\n\n", summary_, "\n\nflags:\n");
  for (const auto& f : flags_) {
    absl::StrAppend(&out, "  --", f.name, f.is_bool ? "" : " VALUE", "\n      ", f.help,
                    " (default: ", f.default_text.empty() ? "\"\"" : f.default_text, ")\n");
  }
  absl::StrAppend(&out, "  --config FILE\n      read 'name = value' lines from FILE first; the command line wins\n");
  return out;
}

absl::StatusOr<std::string> BackendForDevice(const std::string& device,
                                             const std::string& backend) {
  if (device.empty() || device == "cpu") return backend;  // --backend cuda[:K] says it too
  if (device.rfind("cuda", 0) != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("--device ", device, ": expected cpu, cuda or cuda:K"));
  if (backend != "auto" && backend != device)
    return absl::InvalidArgumentError(absl::StrCat(
        "--device ", device, " with --backend ", backend,
        ": --backend picks a CPU backend; leave it at auto with a GPU device"));
  return device;
}

}  // namespace sy::server
