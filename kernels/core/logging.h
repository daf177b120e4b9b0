// Minimal logging and CHECK for programmer errors (DESIGN.md §8: CHECK only for bugs; every
// failure with an outside cause is an absl::Status). Debian's abseil has no absl/log.
//
//   SY_LOG(INFO) << "loaded " << n << " tensors";
//   SY_CHECK(ptr != nullptr) << "why";
//   SY_CHECK_EQ(a, b);
//
// Thread-safe: each message is formatted in its own buffer and written with one call.
// The level threshold comes from SWITCHYARD_LOG_LEVEL (DEBUG, INFO, WARNING, ERROR; INFO
// by default).
#pragma once

#include <sstream>

namespace sy::logging {

enum class Level { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kFatal = 4 };

bool Enabled(Level level);

class Message {
 public:
  Message(Level level, const char* file, int line);
  ~Message();  // writes the line; aborts for kFatal
  std::ostream& stream() { return stream_; }

 private:
  Level level_;
  std::ostringstream stream_;
};

// Swallows the stream expression when a log level is off.
struct Voidify {
  void operator&(std::ostream&) {}
};

}  // namespace sy::logging

#define SY_LOG_LEVEL_DEBUG ::sy::logging::Level::kDebug
#define SY_LOG_LEVEL_INFO ::sy::logging::Level::kInfo
#define SY_LOG_LEVEL_WARNING ::sy::logging::Level::kWarning
#define SY_LOG_LEVEL_ERROR ::sy::logging::Level::kError
#define SY_LOG_LEVEL_FATAL ::sy::logging::Level::kFatal

#define SY_LOG(level)                                   \
  !::sy::logging::Enabled(SY_LOG_LEVEL_##level)         \
      ? (void)0                                         \
      : ::sy::logging::Voidify() &                      \
            ::sy::logging::Message(SY_LOG_LEVEL_##level, __FILE__, __LINE__).stream()

#define SY_CHECK(cond)                                                                \
  (cond) ? (void)0                                                                    \
         : ::sy::logging::Voidify() &                                                 \
               ::sy::logging::Message(::sy::logging::Level::kFatal, __FILE__, __LINE__) \
                       .stream()                                                      \
                   << "Check failed: " #cond " "

#define SY_CHECK_EQ(a, b) SY_CHECK((a) == (b)) << "(" << (a) << " vs " << (b) << ") "
#define SY_CHECK_LT(a, b) SY_CHECK((a) < (b)) << "(" << (a) << " vs " << (b) << ") "
#define SY_CHECK_LE(a, b) SY_CHECK((a) <= (b)) << "(" << (a) << " vs " << (b) << ") "
#define SY_CHECK_GE(a, b) SY_CHECK((a) >= (b)) << "(" << (a) << " vs " << (b) << ") "
#define SY_CHECK_OK(expr)                                   \
  do {                                                      \
    ::absl::Status sy_check_status_ = (expr);               \
    SY_CHECK(sy_check_status_.ok()) << sy_check_status_;    \
  } while (0)
