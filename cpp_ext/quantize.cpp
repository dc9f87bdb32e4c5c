#include "quantize.h"

#include <algorithm>
#include <stdexcept>
#include <thread>

#include "ggml.h"
#include "ggml-cpu.h"
#include "owl2_decoder.h"  // max_n_threads

namespace owl2 {

static void check_type(int type) {
    if (type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size((ggml_type) type) == 0 ||
        ggml_type_size((ggml_type) type) == 0) {
        throw std::invalid_argument("not a usable ggml type id: " + std::to_string(type));
    }
}

int ggml_type_from_name(const std::string & name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * tn = ggml_type_name((ggml_type) t);
        if (tn && name == tn && ggml_blck_size((ggml_type) t) != 0) {
            return t;
        }
    }
    throw std::invalid_argument("unknown ggml type name: " + name);
}

std::string ggml_type_to_name(int type) {
    check_type(type);
    return ggml_type_name((ggml_type) type);
}

size_t row_bytes(int type, int64_t n_per_row) {
    check_type(type);
    const int64_t block = ggml_blck_size((ggml_type) type);
    if (n_per_row <= 0 || n_per_row % block != 0) {
        throw std::invalid_argument("rows of " + std::to_string(n_per_row) + " values do not fill whole " +
                                    ggml_type_name((ggml_type) type) + " blocks of " +
                                    std::to_string(block));
    }
    return ggml_row_size((ggml_type) type, n_per_row);
}

void quantize_rows(int type, const float * src, uint8_t * dst, int64_t nrows, int64_t n_per_row,
                   int n_threads, const float * importance) {
    row_bytes(type, n_per_row);  // validates the type and the row width
    if (importance == nullptr && ggml_quantize_requires_imatrix((ggml_type) type)) {
        throw std::invalid_argument(std::string("ggml type ") + ggml_type_name((ggml_type) type) +
                                    " needs an importance matrix (owl2 imatrix makes one)");
    }
    // One std::thread each: a mistyped count must not start thousands.
    if (n_threads > max_n_threads()) {
        throw std::invalid_argument("n_threads = " + std::to_string(n_threads) + " is more than this machine can use " +
                                    "(at most " + std::to_string(max_n_threads()) + ")");
    }
    // ggml_quantize_init builds lookup tables some types need; it is idempotent and thread-safe.
    ggml_quantize_init((ggml_type) type);
    n_threads = (int) std::max<int64_t>(1, std::min<int64_t>(n_threads, nrows));
    const int64_t per_thread = (nrows + n_threads - 1) / n_threads;
    auto work = [&](int64_t first, int64_t count) {
        // ggml_quantize_chunk's `start` is an element offset into src/dst of whole rows.
        ggml_quantize_chunk((ggml_type) type, src, dst, first * n_per_row, count, n_per_row, importance);
    };
    std::vector<std::thread> threads;
    for (int i = 1; i < n_threads; ++i) {
        const int64_t first = i * per_thread;
        if (first >= nrows) break;
        threads.emplace_back(work, first, std::min(per_thread, nrows - first));
    }
    work(0, std::min(per_thread, nrows));
    for (auto & t : threads) t.join();
}

void dequantize_rows(int type, const uint8_t * src, float * dst, int64_t nrows, int64_t n_per_row) {
    const size_t rb = row_bytes(type, n_per_row);
    if (type == GGML_TYPE_F32) {  // ggml has no to_float for its own float type
        std::copy_n(reinterpret_cast<const float *>(src), nrows * n_per_row, dst);
        return;
    }
    const auto * traits = ggml_get_type_traits((ggml_type) type);
    if (traits->to_float == nullptr) {
        throw std::invalid_argument(std::string("ggml type ") + ggml_type_name((ggml_type) type) +
                                    " cannot be converted to float");
    }
    for (int64_t r = 0; r < nrows; ++r) {
        traits->to_float(src + r * rb, dst + r * n_per_row, n_per_row);
    }
}

}  // namespace owl2
