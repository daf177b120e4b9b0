#include "scheduler/request.h"

#include <cmath>
#include <limits>

#include "gtest/gtest.h"

namespace sy::scheduler {
namespace {

const ModelLimits kLimits{/*vocab_size=*/100, /*context_length=*/64};

Request Valid() {
  Request r;
  r.prompt = {1, 2, 3};
  r.params.max_new_tokens = 8;
  return r;
}

// The error is InvalidArgument and its message names `field`.
void ExpectRejected(const Request& r, const std::string& field) {
  absl::Status s = ValidateRequest(r, kLimits);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find(field), std::string::npos) << s;
}

TEST(ValidateRequestTest, AcceptsAPlainRequest) { EXPECT_TRUE(ValidateRequest(Valid(), kLimits).ok()); }

TEST(ValidateRequestTest, RejectsEachBadFieldByName) {
  Request r = Valid();
  r.prompt.clear();
  ExpectRejected(r, "prompt");
  r = Valid();
  r.prompt[1] = 100;
  ExpectRejected(r, "token_ids[1]");
  r = Valid();
  r.prompt[0] = -1;
  ExpectRejected(r, "token_ids[0]");
  r = Valid();
  r.prompt.assign(64, 1);
  ExpectRejected(r, "prompt");
  r = Valid();
  r.params.max_new_tokens = 0;
  ExpectRejected(r, "max_new_tokens");
  r = Valid();
  r.params.max_new_tokens = 62;  // 3 + 62 > 64
  ExpectRejected(r, "max_new_tokens");
  r = Valid();
  r.params.sampling.temperature = -0.5f;
  ExpectRejected(r, "temperature");
  r = Valid();
  r.params.sampling.temperature = std::nanf("");
  ExpectRejected(r, "temperature");
  r = Valid();
  r.params.sampling.top_p = 0.f;
  ExpectRejected(r, "top_p");
  r = Valid();
  r.params.sampling.top_p = 1.5f;
  ExpectRejected(r, "top_p");
  r = Valid();
  r.params.sampling.top_k = -1;
  ExpectRejected(r, "top_k");
  r = Valid();
  r.params.stop_strings = {std::string(65, 'x')};
  ExpectRejected(r, "stop[0]");
  r = Valid();
  r.params.stop_token_ids = {100};
  ExpectRejected(r, "stop_token_ids[0]");
}

TEST(ValidateRequestTest, AcceptsTheEdgesOfEachRange) {
  Request r = Valid();
  r.params.max_new_tokens = 61;  // exactly fills the context
  r.params.sampling.top_p = 1.f;
  r.params.sampling.temperature = 0.f;
  r.params.sampling.top_k = 0;
  r.params.stop_strings = {std::string(64, 'x')};
  EXPECT_TRUE(ValidateRequest(r, kLimits).ok());
}

}  // namespace
}  // namespace sy::scheduler
