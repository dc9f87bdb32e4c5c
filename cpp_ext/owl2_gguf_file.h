// One GGUF file, opened for the decoder: metadata through gguf.h, tensor data mapped read-only.
//
// Everything a later ggml call could assert on is checked here first (the key types, each
// tensor's type and byte range against the file size), so that a bad file becomes a
// decoder_error with the file's path in the message instead of an abort of the process.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "ggml.h"

struct gguf_context;

namespace owl2 {

// ggml's log, handled by this scope while it lives on this thread. ggml has one process-wide log
// callback and decoders may load on several threads at once, so the first live scope installs one
// dispatcher that hands each line to the innermost scope of the thread that logs it (a thread
// without one gets the callback that was replaced, e.g. llama_cpp's), and the last scope to go
// puts that callback back.
class ggml_log_scope {
public:
    enum class mode {
        quiet,    // drop debug and info lines (per-tensor chatter); pass warnings and errors on
        capture,  // print nothing, keep the first error line (a bad file is one decoder_error)
    };
    explicit ggml_log_scope(mode m);
    ~ggml_log_scope();
    ggml_log_scope(const ggml_log_scope &) = delete;
    ggml_log_scope & operator=(const ggml_log_scope &) = delete;

    // capture: ggml's first error line, without its "function: " prefix ("" if none yet).
    std::string first_error() const;

private:
    mode mode_;
    ggml_log_scope * outer_;  // the scope this one nests in on this thread, or null
    ggml_log_level last_ = GGML_LOG_LEVEL_NONE;  // the level a GGML_LOG_LEVEL_CONT line continues
    std::string error_;        // capture: the first error line as logged so far
    bool error_done_ = false;  // ... and whole

    void take(ggml_log_level level, const char * text);
    static void dispatch(ggml_log_level level, const char * text, void * user_data);
};

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
    uint32_t get_u32(const char * key) const;   // exactly a uint32 (what llama.cpp reads as one)
    double get_float(const char * key) const;   // f32 or f64
    double get_float(const char * key, double fallback) const;
    std::vector<std::string> keys() const;      // every key, in file order (raw bytes)

    // Arrays, whole. Each must hold elements of exactly that type: gguf.h aborts on an array
    // read as another type, so every accessor checks first. Strings are as gguf.h gives them (up
    // to a NUL, which is what llama.cpp reads), not checked for UTF-8: the caller names the bad
    // element. The views live as long as this gguf_file.
    std::vector<std::string_view> get_arr_str(const char * key) const;
    std::vector<float> get_arr_f32(const char * key) const;
    std::vector<int32_t> get_arr_i32(const char * key) const;

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
    int64_t arr_id(const char * key, int elem_type) const;  // a gguf_type, checked
};

}  // namespace owl2
