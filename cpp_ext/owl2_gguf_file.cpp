#include "owl2_gguf_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "gguf.h"
#include "owl2_decoder.h"

namespace owl2 {

// --- ggml's log ----------------------------------------------------------------------------------

namespace {

// The callback the first live scope replaced, and how many scopes live (on all threads).
struct replaced_log {
    std::mutex mutex;
    int scopes = 0;
    ggml_log_callback cb = nullptr;
    void * data = nullptr;
};

replaced_log & replaced() {
    static replaced_log r;
    return r;
}

thread_local ggml_log_scope * innermost_scope = nullptr;

// ggml's line without the "function_name: " it starts with and without trailing blanks.
std::string without_prefix(std::string line) {
    while (!line.empty() && std::isspace((unsigned char) line.back())) line.pop_back();
    size_t i = 0;
    while (i < line.size() && (std::isalnum((unsigned char) line[i]) || line[i] == '_')) ++i;
    if (i > 0 && line.compare(i, 2, ": ") == 0) line.erase(0, i + 2);
    return line;
}

}  // namespace

ggml_log_scope::ggml_log_scope(mode m) : mode_(m), outer_(innermost_scope) {
    innermost_scope = this;
    replaced_log & r = replaced();
    std::lock_guard<std::mutex> hold(r.mutex);
    if (r.scopes++ == 0) {
        ggml_log_get(&r.cb, &r.data);
        ggml_log_set(&ggml_log_scope::dispatch, nullptr);
    }
}

ggml_log_scope::~ggml_log_scope() {
    innermost_scope = outer_;
    replaced_log & r = replaced();
    std::lock_guard<std::mutex> hold(r.mutex);
    if (--r.scopes > 0) return;
    // Put the replaced callback back only if ours is still installed: code outside (llama_cpp's
    // log capture in Python) may have set its own meanwhile, and the callback we replaced may be
    // gone by then (a Python callback object freed after its capture).
    ggml_log_callback now_cb = nullptr;
    void * now_data = nullptr;
    ggml_log_get(&now_cb, &now_data);
    if (now_cb == &ggml_log_scope::dispatch) ggml_log_set(r.cb, r.data);
}

// What ggml would have done without any scope: the replaced callback, or ggml's default (stderr).
static void forward_to_replaced(ggml_log_level level, const char * text) {
    ggml_log_callback cb;
    void * data;
    {
        replaced_log & r = replaced();
        std::lock_guard<std::mutex> hold(r.mutex);
        cb = r.cb;
        data = r.data;
    }
    if (cb != nullptr) {
        cb(level, text, data);
    } else if (text != nullptr) {
        fputs(text, stderr);
    }
}

void ggml_log_scope::dispatch(ggml_log_level level, const char * text, void *) {
    if (innermost_scope != nullptr) {
        innermost_scope->take(level, text);
    } else {
        forward_to_replaced(level, text);
    }
}

void ggml_log_scope::take(ggml_log_level level, const char * text) {
    const bool continued = level == GGML_LOG_LEVEL_CONT;
    if (!continued) last_ = level;
    if (mode_ == mode::capture) {
        // Keep the first error line (its continuations too, up to its newline); print nothing.
        if (error_done_) return;
        if (!continued && !error_.empty()) {
            error_done_ = true;
        } else if (last_ == GGML_LOG_LEVEL_ERROR && text != nullptr) {
            error_ += text;
            error_done_ = error_.find('\n') != std::string::npos;
        }
        return;
    }
    if (last_ < GGML_LOG_LEVEL_WARN) return;
    if (outer_ != nullptr) {
        outer_->take(level, text);
    } else {
        forward_to_replaced(level, text);
    }
}

std::string ggml_log_scope::first_error() const {
    return without_prefix(error_.substr(0, error_.find('\n')));
}

// --- gguf_file -------------------------------------------------------------------------------------

gguf_file::gguf_file(const std::string & path, const std::string & role) : path_(path), role_(role) {
    // The C calls below would open the path only up to its first NUL: another file.
    if (path.find('\0') != std::string::npos) fail("the path has a NUL character");
    struct stat st;
    if (stat(path.c_str(), &st) != 0) {
        fail(std::string("cannot open: ") + std::strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        fail("not a regular file");
    }
    size_ = (size_t) st.st_size;

    // gguf.h reads the header itself and returns NULL (never aborts) on a bad magic, version,
    // key or tensor table; no_alloc: we only want the metadata, the data stay in the file.
    // Its log is captured: a bad file must print nothing, and its first error line says why.
    gguf_init_params gp = {/*no_alloc =*/true, /*ctx =*/nullptr};
    {
        ggml_log_scope log(ggml_log_scope::mode::capture);
        ctx_ = gguf_init_from_file(path.c_str(), gp);
        if (ctx_ == nullptr) {
            const std::string ggml_says = log.first_error();
            const std::string why = ggml_says.empty() ? "bad magic, version or header, or cut short" : printable(ggml_says);
            fail("not a readable GGUF file (" + why + ")");
        }
    }

    const size_t data_offset = gguf_get_data_offset(ctx_);
    const int64_t n = gguf_get_n_tensors(ctx_);
    tensors_.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
        gguf_tensor_info t;
        t.name = gguf_get_tensor_name(ctx_, i);
        t.type = gguf_get_tensor_type(ctx_, i);
        if ((int) t.type < 0 || t.type >= GGML_TYPE_COUNT || ggml_blck_size(t.type) == 0 ||
            ggml_type_size(t.type) == 0) {
            fail("tensor " + t.name + " has an unusable ggml type " + std::to_string((int) t.type));
        }
        const int64_t * ne = gguf_get_tensor_ne(ctx_, i);
        t.n_dims = 1;
        for (int d = 0; d < GGML_MAX_DIMS; ++d) {
            t.ne[d] = ne[d];
            if (ne[d] != 1) t.n_dims = d + 1;
        }
        t.file_offset = data_offset + gguf_get_tensor_offset(ctx_, i);
        t.nbytes = gguf_get_tensor_size(ctx_, i);
        if (t.file_offset > size_ || t.nbytes > size_ - t.file_offset) {
            fail("truncated: tensor " + t.name + " needs bytes up to " +
                 std::to_string(t.file_offset + t.nbytes) + " but the file has " + std::to_string(size_));
        }
        tensors_.push_back(std::move(t));
    }

    if (size_ > 0) {
        const int fd = open(path.c_str(), O_RDONLY);
        if (fd < 0) {
            fail(std::string("cannot open: ") + std::strerror(errno));
        }
        // Read-only and private: ggml reads the weights in place and never writes them.
        map_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        const int err = errno;
        close(fd);
        if (map_ == MAP_FAILED) {
            map_ = nullptr;
            fail(std::string("cannot map: ") + std::strerror(err));
        }
    }
}

gguf_file::~gguf_file() {
    if (map_ != nullptr) munmap(map_, size_);
    if (ctx_ != nullptr) gguf_free(ctx_);
}

void gguf_file::release(const gguf_tensor_info & t) const {
    // Only whole pages inside the tensor: a page it shares with a neighbour may still be in use.
    const uintptr_t page = (uintptr_t) sysconf(_SC_PAGESIZE);
    const uintptr_t begin = ((uintptr_t) map_ + t.file_offset + page - 1) / page * page;
    const uintptr_t end = ((uintptr_t) map_ + t.file_offset + t.nbytes) / page * page;
    if (end > begin) {
        // The mapping is private and never written: dropped pages would be read again from the
        // file if ever touched, so this only gives memory back.
        madvise((void *) begin, end - begin, MADV_DONTNEED);
    }
}

void gguf_file::fail(const std::string & what) const {
    throw decoder_error(role_ + " " + path_ + ": " + what);
}

int64_t gguf_file::key_id(const char * key) const {
    const int64_t id = gguf_find_key(ctx_, key);
    if (id < 0) fail(std::string("missing key ") + key);
    return id;
}

bool gguf_file::has(const char * key) const { return gguf_find_key(ctx_, key) >= 0; }

std::string gguf_file::get_str(const char * key) const {
    const int64_t id = key_id(key);
    if (gguf_get_kv_type(ctx_, id) != GGUF_TYPE_STRING) fail(std::string("key ") + key + " is not a string");
    // Python reads every string as UTF-8 (a message quoting it, a metadata value): refuse other bytes here.
    std::string s = gguf_get_val_str(ctx_, id);
    if (!is_utf8(s)) fail(std::string("key ") + key + " is not valid UTF-8 ('" + printable(s) + "')");
    return s;
}

uint32_t gguf_file::get_u32(const char * key) const {
    const int64_t id = key_id(key);
    const gguf_type type = gguf_get_kv_type(ctx_, id);
    if (type != GGUF_TYPE_UINT32) {
        fail(std::string("key ") + key + " is " + (type == GGUF_TYPE_ARRAY ? "an array" : gguf_type_name(type)) +
             ", expected u32");
    }
    return gguf_get_val_u32(ctx_, id);
}

std::vector<std::string> gguf_file::keys() const {
    std::vector<std::string> out;
    const int64_t n = gguf_get_n_kv(ctx_);
    out.reserve(n);
    for (int64_t i = 0; i < n; ++i) out.emplace_back(gguf_get_key(ctx_, i));
    return out;
}

int64_t gguf_file::arr_id(const char * key, int elem_type) const {
    const int64_t id = key_id(key);
    const gguf_type want = (gguf_type) elem_type;
    // gguf_get_arr_type asserts that the key is an array: ask the key's own type first.
    const gguf_type type = gguf_get_kv_type(ctx_, id);
    if (type != GGUF_TYPE_ARRAY) {
        fail(std::string("key ") + key + " is " + gguf_type_name(type) + ", expected an array of " + gguf_type_name(want));
    }
    const gguf_type elem = gguf_get_arr_type(ctx_, id);
    if (elem != want) {
        fail(std::string("key ") + key + " is an array of " + (elem == GGUF_TYPE_ARRAY ? "arrays" : gguf_type_name(elem)) +
             ", expected an array of " + gguf_type_name(want));
    }
    return id;
}

std::vector<std::string_view> gguf_file::get_arr_str(const char * key) const {
    const int64_t id = arr_id(key, GGUF_TYPE_STRING);
    const size_t n = gguf_get_arr_n(ctx_, id);
    std::vector<std::string_view> out;
    out.reserve(n);
    for (size_t i = 0; i < n; ++i) out.emplace_back(gguf_get_arr_str(ctx_, id, i));
    return out;
}

// gguf_get_arr_data gives the elements as the file stored them; copied out, so no alignment is assumed.
template <typename T>
static std::vector<T> arr_values(gguf_context * ctx, int64_t id) {
    const size_t n = gguf_get_arr_n(ctx, id);
    std::vector<T> out(n);
    if (n > 0) std::memcpy(out.data(), gguf_get_arr_data(ctx, id), n * sizeof(T));
    return out;
}

std::vector<float> gguf_file::get_arr_f32(const char * key) const {
    return arr_values<float>(ctx_, arr_id(key, GGUF_TYPE_FLOAT32));
}

std::vector<int32_t> gguf_file::get_arr_i32(const char * key) const {
    return arr_values<int32_t>(ctx_, arr_id(key, GGUF_TYPE_INT32));
}

uint64_t gguf_file::get_uint(const char * key) const {
    const int64_t id = key_id(key);
    int64_t v;
    switch (gguf_get_kv_type(ctx_, id)) {
        case GGUF_TYPE_UINT8: return gguf_get_val_u8(ctx_, id);
        case GGUF_TYPE_UINT16: return gguf_get_val_u16(ctx_, id);
        case GGUF_TYPE_UINT32: return gguf_get_val_u32(ctx_, id);
        case GGUF_TYPE_UINT64: return gguf_get_val_u64(ctx_, id);
        case GGUF_TYPE_INT8: v = gguf_get_val_i8(ctx_, id); break;
        case GGUF_TYPE_INT16: v = gguf_get_val_i16(ctx_, id); break;
        case GGUF_TYPE_INT32: v = gguf_get_val_i32(ctx_, id); break;
        case GGUF_TYPE_INT64: v = gguf_get_val_i64(ctx_, id); break;
        default: fail(std::string("key ") + key + " is not an integer");
    }
    if (v < 0) fail(std::string("key ") + key + " is negative");
    return (uint64_t) v;
}

uint64_t gguf_file::get_uint(const char * key, uint64_t fallback) const {
    return has(key) ? get_uint(key) : fallback;
}

double gguf_file::get_float(const char * key) const {
    const int64_t id = key_id(key);
    switch (gguf_get_kv_type(ctx_, id)) {
        case GGUF_TYPE_FLOAT32: return gguf_get_val_f32(ctx_, id);
        case GGUF_TYPE_FLOAT64: return gguf_get_val_f64(ctx_, id);
        default: fail(std::string("key ") + key + " is not a float");
    }
}

double gguf_file::get_float(const char * key, double fallback) const {
    return has(key) ? get_float(key) : fallback;
}

const gguf_tensor_info * gguf_file::find(const std::string & name) const {
    for (const auto & t : tensors_) {
        if (t.name == name) return &t;
    }
    return nullptr;
}

}  // namespace owl2
