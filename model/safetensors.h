// Safetensors checkpoints: header parsing (untrusted bytes), memory-mapped files, and the
// CheckpointReader that finds a tensor by name across `model.safetensors` or the shards named
// by `model.safetensors.index.json`.
//
// File format: 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data region; offsets are relative to the start of the data region.
//
// Thread safety: a CheckpointReader is immutable after Open and safe to share; the mapped
// memory lives as long as the reader.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/core/dtype.h"

namespace sy::model {

struct TensorInfo {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offsets into the data region
  uint64_t end = 0;
  int64_t numel() const;
};

// Parses and validates the header of a safetensors file of `file_size` bytes whose first
// bytes are `data` (at least min(file_size, 8 + header length) of them must be readable).
// InvalidArgument / DataLoss naming `path` (and the tensor) for: a file shorter than 8 bytes,
// a header length past the end of the file or over 100 MB, invalid JSON, missing fields, an
// unsupported dtype, a negative dimension, data_offsets that overlap the size the shape and
// dtype need, or point past the end of the file. Returns name -> info and the data start.
struct SafetensorsHeader {
  std::map<std::string, TensorInfo> tensors;
  uint64_t data_start = 0;  // 8 + header length
};
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* data, size_t file_size,
                                                         const std::string& path);

// A read-only memory mapping of a whole file.
class MappedFile {
 public:
  static absl::StatusOr<std::unique_ptr<MappedFile>> Open(const std::string& path);
  ~MappedFile();
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const uint8_t* data_;
  size_t size_;
};

// A tensor inside a mapped file.
struct TensorView {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  std::string file;  // for error messages
  int64_t numel() const;
};

class CheckpointReader {
 public:
  // Opens `dir`/model.safetensors, or the shards listed in model.safetensors.index.json.
  static absl::StatusOr<std::unique_ptr<CheckpointReader>> Open(const std::string& dir);

  bool Has(const std::string& name) const { return index_.count(name) > 0; }
  // NotFound naming the tensor and where it was looked for.
  absl::StatusOr<TensorView> Get(const std::string& name) const;
  // As Get, and InvalidArgument "file F tensor T: shape [a, b], expected [c, d]" on mismatch.
  absl::StatusOr<TensorView> Get(const std::string& name, const std::vector<int64_t>& shape) const;
  std::vector<std::string> Names() const;
  const std::string& dir() const { return dir_; }

 private:
  struct Entry {
    int file = 0;
    TensorInfo info;
  };
  std::string dir_;
  std::vector<std::unique_ptr<MappedFile>> files_;
  std::vector<uint64_t> data_start_;
  std::map<std::string, Entry> index_;
};

std::string ShapeString(const std::vector<int64_t>& shape);  // "[64, 128]"

// Writes a safetensors file: tensors in the given order, each {name, dtype, shape, bytes}.
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors);

// The same, each tensor's bytes produced while the file is written: one tensor is in memory at
// a time, so a checkpoint larger than memory can be written. fill(dst) writes the tensor's
// `bytes` bytes (normally elements × dtype size; the header says what is written).
struct TensorSource {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  int64_t bytes = 0;
  std::function<void(uint8_t* dst)> fill;
};
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorSource>& tensors);

}  // namespace sy::model
