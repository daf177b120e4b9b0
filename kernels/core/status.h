// Status helpers shared by every target.
//
// Debian's abseil (20220623) has absl::Status / absl::StatusOr but no RETURN_IF_ERROR /
// ASSIGN_OR_RETURN macros, so they live here, once. Codes are gRPC's canonical codes and cross
// the wire unchanged (DESIGN.md §8). Thread-safe: these are plain macros over values.
#pragma once

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define SY_CONCAT_INNER_(a, b) a##b
#define SY_CONCAT_(a, b) SY_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define SY_RETURN_IF_ERROR(expr)                 \
  do {                                           \
    ::absl::Status sy_status_ = (expr);          \
    if (!sy_status_.ok()) return sy_status_;     \
  } while (0)

// `lhs` = value of `expr` (an absl::StatusOr<T>), or returns its error.
#define SY_ASSIGN_OR_RETURN(lhs, expr) \
  SY_ASSIGN_OR_RETURN_IMPL_(SY_CONCAT_(sy_statusor_, __LINE__), lhs, expr)
#define SY_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return std::move(tmp).status();  \
  lhs = std::move(tmp).value()

namespace sy {

// Prefixes `context` to the message of a non-OK status, keeping its code:
// "loading checkpoint: " + "layer 3 tensor ...".
inline absl::Status Annotate(const absl::Status& s, absl::string_view context) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat(context, ": ", s.message()));
}

}  // namespace sy
