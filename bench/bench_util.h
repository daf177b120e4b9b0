// Small helpers shared by the benchmarks: wall-clock seconds, medians, the machine's streaming
// read bandwidth, and llama.cpp's published figures from shared/reference/llamacpp-bench.md.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/core/thread_pool.h"

namespace sy::bench {

inline double Seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// Streaming read bandwidth in GB/s of a 1 GiB buffer over the default pool's threads, as the
// median of 5 passes (first touch excluded). Eight independent integer accumulators keep the
// loop vectorised without fast-math.
inline double MeasureReadBandwidth() {
  const int64_t n = (1ll << 30) / 8;
  std::vector<uint64_t> buf(n, 1);
  std::vector<double> rates;
  volatile uint64_t sink = 0;
  auto& pool = ThreadPool::Default();
  for (int rep = 0; rep < 6; ++rep) {
    std::vector<uint64_t> part(pool.num_threads() * 8, 0);
    const double t0 = Seconds();
    pool.ParallelFor(pool.num_threads(), 1, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t lo = n * p / pool.num_threads(), hi = n * (p + 1) / pool.num_threads();
        uint64_t a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t i = lo; i + 8 <= hi; i += 8)
          for (int k = 0; k < 8; ++k) a[k] += buf[i + k];
        for (int k = 0; k < 8; ++k) part[p * 8 + k] = a[k];
      }
    });
    const double dt = Seconds() - t0;
    for (uint64_t v : part) sink = sink + v;
    if (rep > 0) rates.push_back(n * 8.0 / dt / 1e9);
  }
  return Median(rates);
}

// llama.cpp's figures for `dtype` ("bf16" | "f32"): keys "pp128", "pp512", "tg1" from the first
// table, "b1", "b4", "b16", "b32" from the batched table. Empty when the file is missing.
inline std::map<std::string, double> LlamaCppFigures(const std::string& path, const std::string& dtype) {
  std::map<std::string, double> out;
  std::ifstream in(path);
  std::string line;
  int table = 0;
  while (std::getline(in, line)) {
    if (line.rfind("| " + dtype + " |", 0) != 0) continue;
    std::vector<double> v;
    std::stringstream ss(line.substr(dtype.size() + 4));
    std::string cell;
    while (std::getline(ss, cell, '|')) {
      try {
        v.push_back(std::stod(cell));
      } catch (...) {
      }
    }
    if (table == 0 && v.size() >= 3) {
      out["pp128"] = v[0];
      out["pp512"] = v[1];
      out["tg1"] = v[2];
    } else if (table == 1 && v.size() >= 4) {
      out["b1"] = v[0];
      out["b4"] = v[1];
      out["b16"] = v[2];
      out["b32"] = v[3];
    }
    ++table;
  }
  return out;
}

}  // namespace sy::bench
