#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/core/status.h"
#include "nlohmann/json.hpp"

namespace sy::model {
namespace {

using nlohmann::json;
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* data, size_t file_size,
                                                         const std::string& path) {
  if (file_size < 8)
    return absl::DataLossError(absl::StrCat(path, ": truncated safetensors file (", file_size,
                                            " bytes, need at least 8)"));
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
  if (header_len > kMaxHeaderBytes)
    return absl::DataLossError(absl::StrCat(path, ": corrupt safetensors header length ",
                                            header_len, " (over 100 MB)"));
  if (header_len > file_size - 8)
    return absl::DataLossError(absl::StrCat(path, ": safetensors header length ", header_len,
                                            " runs past the end of the file (", file_size,
                                            " bytes)"));
  const char* begin = reinterpret_cast<const char*>(data + 8);
  json j = json::parse(begin, begin + header_len, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object())
    return absl::DataLossError(absl::StrCat(path, ": corrupt safetensors header (not a JSON object)"));
  SafetensorsHeader h;
  h.data_start = 8 + header_len;
  const uint64_t data_size = file_size - h.data_start;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") continue;
    const json& t = it.value();
    auto where = [&](const std::string& what) {
      return absl::StrCat(path, ": tensor ", name, ": ", what);
    };
    if (!t.is_object() || !t.contains("dtype") || !t.contains("shape") || !t.contains("data_offsets"))
      return absl::DataLossError(where("needs dtype, shape and data_offsets"));
    if (!t["dtype"].is_string()) return absl::DataLossError(where("dtype is not a string"));
    TensorInfo info;
    auto dt = ParseDType(t["dtype"].get<std::string>());
    if (!dt.ok()) return absl::InvalidArgumentError(where(std::string(dt.status().message())));
    info.dtype = *dt;
    if (!t["shape"].is_array()) return absl::DataLossError(where("shape is not a list"));
    uint64_t numel = 1;
    for (const auto& d : t["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        return absl::DataLossError(where("shape holds a non-integer or negative dimension"));
      int64_t v = d.get<int64_t>();
      info.shape.push_back(v);
      if (MulOverflows(numel, static_cast<uint64_t>(v), &numel))
        return absl::DataLossError(where("shape overflows"));
    }
    const json& off = t["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      return absl::DataLossError(where("data_offsets must be two non-negative integers"));
    info.begin = off[0].get<uint64_t>();
    info.end = off[1].get<uint64_t>();
    uint64_t bytes;
    if (MulOverflows(numel, static_cast<uint64_t>(DTypeSize(info.dtype)), &bytes))
      return absl::DataLossError(where("size overflows"));
    if (info.end < info.begin || info.end - info.begin != bytes)
      return absl::DataLossError(where(absl::StrCat("data_offsets [", info.begin, ", ", info.end,
                                                    ") do not hold ", bytes, " bytes of ",
                                                    DTypeName(info.dtype), " ",
                                                    ShapeString(info.shape))));
    if (info.end > data_size)
      return absl::DataLossError(where(absl::StrCat("data_offsets end ", info.end,
                                                    " is past the end of the file (data region is ",
                                                    data_size, " bytes)")));
    h.tensors.emplace(name, std::move(info));
  }
  // Two tensors may not share bytes: writing one would change the other, and a crafted file
  // could alias a small tensor's view into a large one's.
  std::vector<std::pair<uint64_t, const std::string*>> starts;
  for (const auto& [name, info] : h.tensors)
    if (info.end > info.begin) starts.emplace_back(info.begin, &name);
  std::sort(starts.begin(), starts.end());
  for (size_t i = 1; i < starts.size(); ++i) {
    const TensorInfo& prev = h.tensors.at(*starts[i - 1].second);
    if (starts[i].first < prev.end)
      return absl::DataLossError(absl::StrCat(path, ": tensors ", *starts[i - 1].second, " and ",
                                              *starts[i].second, " overlap (data_offsets [",
                                              prev.begin, ", ", prev.end, ") and [",
                                              starts[i].first, ", ...))"));
  }
  return h;
}

absl::StatusOr<std::unique_ptr<MappedFile>> MappedFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat("cannot stat ", path));
  }
  size_t size = static_cast<size_t>(st.st_size);
  const uint8_t* data = nullptr;
  if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      return absl::InternalError(absl::StrCat("cannot mmap ", path, ": ", std::strerror(errno)));
    }
    data = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
  return std::unique_ptr<MappedFile>(new MappedFile(path, data, size));
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

absl::StatusOr<std::unique_ptr<CheckpointReader>> CheckpointReader::Open(const std::string& dir) {
  auto reader = std::unique_ptr<CheckpointReader>(new CheckpointReader());
  reader->dir_ = dir;
  std::vector<std::string> files;
  const std::string single = dir + "/model.safetensors";
  const std::string index_path = dir + "/model.safetensors.index.json";
  std::map<std::string, std::string> weight_map;
  if (std::ifstream(index_path).good()) {
    std::ifstream in(index_path);
    std::stringstream ss;
    ss << in.rdbuf();
    json j = json::parse(ss.str(), nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": invalid index (needs a weight_map object)"));
    std::set<std::string> shard_set;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string())
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map['", it.key(), "'] is not a file name"));
      std::string f = it.value().get<std::string>();
      if (f.find('/') != std::string::npos || f == "..")
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": shard name '", f, "' must be a plain file name"));
      weight_map[it.key()] = f;
      shard_set.insert(f);
    }
    files.assign(shard_set.begin(), shard_set.end());
  } else if (std::ifstream(single).good()) {
    files.push_back("model.safetensors");
  } else {
    return absl::NotFoundError(absl::StrCat(dir, ": no model.safetensors or model.safetensors.index.json"));
  }
  for (size_t i = 0; i < files.size(); ++i) {
    const std::string path = dir + "/" + files[i];
    SY_ASSIGN_OR_RETURN(auto mf, MappedFile::Open(path));
    SY_ASSIGN_OR_RETURN(auto header, ParseSafetensorsHeader(mf->data(), mf->size(), path));
    for (auto& [name, info] : header.tensors) {
      if (!weight_map.empty()) {
        auto w = weight_map.find(name);
        if (w == weight_map.end() || w->second != files[i]) continue;  // index decides
      }
      if (reader->index_.count(name))
        return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " appears in two files"));
      reader->index_[name] = Entry{static_cast<int>(i), info};
    }
    reader->data_start_.push_back(header.data_start);
    reader->files_.push_back(std::move(mf));
  }
  for (const auto& [name, file] : weight_map) {
    if (!reader->index_.count(name))
      return absl::InvalidArgumentError(absl::StrCat(dir, "/", file, ": tensor ", name,
                                                     " is listed in the index but missing from the file"));
  }
  return reader;
}

absl::StatusOr<TensorView> CheckpointReader::Get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end())
    return absl::NotFoundError(absl::StrCat(dir_, ": missing tensor ", name));
  const Entry& e = it->second;
  const MappedFile& f = *files_[e.file];
  TensorView v;
  v.dtype = e.info.dtype;
  v.shape = e.info.shape;
  v.data = f.data() + data_start_[e.file] + e.info.begin;
  v.file = f.path();
  return v;
}

absl::StatusOr<TensorView> CheckpointReader::Get(const std::string& name,
                                                 const std::vector<int64_t>& shape) const {
  SY_ASSIGN_OR_RETURN(TensorView v, Get(name));
  if (v.shape != shape)
    return absl::InvalidArgumentError(absl::StrCat(v.file, ": tensor ", name, ": shape ",
                                                   ShapeString(v.shape), ", expected ",
                                                   ShapeString(shape)));
  return v;
}

std::vector<std::string> CheckpointReader::Names() const {
  std::vector<std::string> out;
  for (const auto& [n, e] : index_) out.push_back(n);
  return out;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorSource>& tensors) {
  json header = json::object();
  uint64_t offset = 0;
  int64_t largest = 0;
  for (const auto& t : tensors) {
    const uint64_t n = static_cast<uint64_t>(t.bytes);
    header[t.name] = {{"dtype", std::string(DTypeName(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + n}}};
    offset += n;
    largest = std::max(largest, t.bytes);
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string h = header.dump();
  while ((8 + h.size()) % 8 != 0) h.push_back(' ');  // align the data region
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  uint64_t n = h.size();
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(h.data(), static_cast<std::streamsize>(h.size()));
  std::vector<uint8_t> buf(static_cast<size_t>(largest));
  for (const auto& t : tensors) {
    t.fill(buf.data());
    out.write(reinterpret_cast<const char*>(buf.data()), static_cast<std::streamsize>(t.bytes));
    if (!out) break;
  }
  if (!out) return absl::DataLossError(absl::StrCat("short write to ", path, " (disk full?)"));
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors) {
  std::vector<TensorSource> sources;
  sources.reserve(tensors.size());
  for (const auto& t : tensors) {
    const TensorToWrite* p = &t;
    sources.push_back({t.name, t.dtype, t.shape, static_cast<int64_t>(t.bytes.size()),
                       [p](uint8_t* dst) { std::copy(p->bytes.begin(), p->bytes.end(), dst); }});
  }
  return WriteSafetensors(path, sources);
}

}  // namespace sy::model
