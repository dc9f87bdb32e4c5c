// One GGUF file, opened for the decoder: metadata through gguf.h, tensor data mapped read-only.
//
// Everything a later ggml call could assert on is checked here first (the key types, each
// tensor's type and byte range against the file size), so that a bad file becomes a
// decoder_error with the file's path in the message instead of an abort of the process.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ggml.h"

struct gguf_context;

namespace owl2 {

struct gguf_tensor_info {
    std::string name;
    ggml_type type;
    int64_t ne[GGML_MAX_DIMS];
    int n_dims;
    size_t file_offset;  // from the start of the file
    size_t nbytes;
};

class gguf_file {
public:
    // `role` names the file in messages ("decoder GGUF", "MAM GGUF").
    gguf_file(const std::string & path, const std::string & role);
    ~gguf_file();
    gguf_file(const gguf_file &) = delete;
    gguf_file & operator=(const gguf_file &) = delete;

    [[noreturn]] void fail(const std::string & what) const;

    bool has(const char * key) const;
    std::string get_str(const char * key) const;  // must be valid UTF-8
    uint64_t get_uint(const char * key) const;  // any integer type, must be >= 0
    uint64_t get_uint(const char * key, uint64_t fallback) const;
    double get_float(const char * key) const;   // f32 or f64
    double get_float(const char * key, double fallback) const;

    const std::vector<gguf_tensor_info> & tensors() const { return tensors_; }
    const gguf_tensor_info * find(const std::string & name) const;

    // The whole file, mapped read-only and page-aligned (the weights live here on CPU).
    void * map_base() const { return map_; }
    size_t map_size() const { return size_; }
    const uint8_t * data(const gguf_tensor_info & t) const { return (const uint8_t *) map_ + t.file_offset; }
    // Give back the memory of a tensor's mapped pages once its data were copied elsewhere (a GPU
    // buffer, a repacked CPU buffer): without this, peak RSS would count those weights twice.
    void release(const gguf_tensor_info & t) const;

private:
    std::string path_, role_;
    gguf_context * ctx_ = nullptr;
    void * map_ = nullptr;
    size_t size_ = 0;
    std::vector<gguf_tensor_info> tensors_;

    int64_t key_id(const char * key) const;
};

}  // namespace owl2
