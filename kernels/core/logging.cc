#include "kernels/core/logging.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

namespace sy::logging {
namespace {

Level ThresholdFromEnv() {
  const char* env = std::getenv("SWITCHYARD_LOG_LEVEL");
  if (env == nullptr) return Level::kInfo;
  std::string v(env);
  if (v == "DEBUG" || v == "debug") return Level::kDebug;
  if (v == "WARNING" || v == "warning") return Level::kWarning;
  if (v == "ERROR" || v == "error") return Level::kError;
  return Level::kInfo;
}

const char* LevelChar(Level l) {
  switch (l) {
    case Level::kDebug: return "D";
    case Level::kInfo: return "I";
    case Level::kWarning: return "W";
    case Level::kError: return "E";
    case Level::kFatal: return "F";
  }
  return "?";
}

}  // namespace

bool Enabled(Level level) {
  static const Level threshold = ThresholdFromEnv();
  return level >= threshold;
}

Message::Message(Level level, const char* file, int line) : level_(level) {
  const char* base = std::strrchr(file, '/');
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char ts[32];
  std::strftime(ts, sizeof(ts), "%H:%M:%S", &tm);
  stream_ << LevelChar(level) << ts << " " << (base ? base + 1 : file) << ":" << line << "] ";
}

Message::~Message() {
  stream_ << '\n';
  std::string s = stream_.str();
  std::fwrite(s.data(), 1, s.size(), stderr);
  if (level_ == Level::kFatal) {
    std::fflush(stderr);
    std::abort();
  }
}

}  // namespace sy::logging
