// The KV cache's cells (which sequence holds which position where) and a sequence's rows as a
// state in host memory (save and restore, prefix reuse).
#include <array>

#include "ggml-backend.h"
#include "ggml.h"
#include "owl2_model.h"

namespace owl2 {

// --- the cache's cells ---------------------------------------------------------------------------------

int count_free(const model & m) {
    int n = 0;
    for (const kv_cell & c : m.cells) n += c.free();
    return n;
}

// Where the next `want` rows go: the first run of free cells that holds them all, else the
// longest one (the rows are then split between graphs). Always the start of a free run, so the
// cells ever written stay a prefix of the cache and attention, which reads up to the last cell in
// use, never reads one that was not (the CPU cache is not cleared, allocate_kv_cache). Returns {first cell, how many}; {0, 0} when full.
std::pair<int, int> find_free_cells(const model & m, int want) {
    int best_start = 0, best_len = 0;
    const int n = (int) m.cells.size();
    for (int i = 0; i < n;) {
        if (!m.cells[i].free()) {
            ++i;
            continue;
        }
        int j = i;
        while (j < n && m.cells[j].free()) ++j;
        if (j - i >= want) return {i, want};
        if (j - i > best_len) best_start = i, best_len = j - i;
        i = j;
    }
    return {best_start, best_len};
}

// One past the last cell some sequence holds: what attention needs to read.
int used_end(const model & m) {
    for (int j = (int) m.cells.size(); j > 0; --j) {
        if (!m.cells[j - 1].free()) return j;
    }
    return 0;
}

// Drops `seq` from the cells where keep(cell) is false; a cell no sequence holds is free.
template <typename Keep>
static void drop_cells(model & m, int seq, Keep keep) {
    for (kv_cell & c : m.cells) {
        if (!c.has(seq) || keep(c)) continue;
        c.seqs &= ~(uint64_t(1) << seq);
        if (c.free()) c.pos = -1;
    }
}

void check_seq(int seq) {
    if (seq < 0 || seq >= MAX_SEQUENCES) {
        throw decoder_error("sequence id " + std::to_string(seq) + " is outside [0, " + std::to_string(MAX_SEQUENCES) + ")");
    }
}

// --- a sequence's cells ------------------------------------------------------------------------------------

void rewind_seq(model & m, int n, int seq) {
    if (n < 0 || n > m.seq_len[seq]) {
        throw decoder_error("cannot rewind " + std::to_string(n) + " positions; n_past is " + std::to_string(m.seq_len[seq]));
    }
    // The rows stay in the cache until another run takes their cells.
    const int keep = m.seq_len[seq] - n;
    drop_cells(m, seq, [keep](const kv_cell & c) { return c.pos < keep; });
    m.seq_len[seq] = keep;
}

void clear_seq(model & m, int seq) {
    drop_cells(m, seq, [](const kv_cell &) { return false; });
    m.seq_len[seq] = 0;
}

void copy_seq(model & m, int src, int dst) {
    if (src == dst) return;
    drop_cells(m, dst, [](const kv_cell &) { return false; });
    for (kv_cell & c : m.cells) {
        if (c.has(src)) c.seqs |= uint64_t(1) << dst;
    }
    m.seq_len[dst] = m.seq_len[src];
}

// --- snapshots: a sequence's rows in host memory ---------------------------------------------------------

size_t kv_state::nbytes() const {
    size_t s = 0;
    for (const auto & x : k) s += x.size();
    for (const auto & x : v) s += x.size();
    return s;
}

std::string cache_layout(const model & m) {
    return std::to_string(m.hp.n_layer) + "x" + std::to_string(m.hp.n_embd_kv()) + ":" + ggml_type_name(m.kv_type) +
           (m.v_trans ? ":vT" : ":v");
}

// A sequence's cells as stretches of consecutive cells holding consecutive positions, each
// {first cell, first position, length}, so that its rows move between the cache and a state in
// a few copies (one when the sequence lies in one stretch, the usual case).
struct stretch {
    int cell, pos, n;
};

static std::vector<stretch> stretches_of(const model & m, int seq, int n_pos) {
    std::vector<int> cell_of(n_pos, -1);
    for (int j = 0; j < (int) m.cells.size(); ++j) {
        const kv_cell & c = m.cells[j];
        if (c.has(seq) && c.pos < n_pos) cell_of[c.pos] = j;
    }
    std::vector<stretch> out;
    for (int p = 0; p < (int) cell_of.size(); ++p) {
        if (cell_of[p] < 0) throw decoder_error("the cache lost position " + std::to_string(p) + " of a sequence");
        if (!out.empty() && out.back().cell + out.back().n == cell_of[p]) {
            ++out.back().n;
        } else {
            out.push_back(stretch{cell_of[p], p, 1});
        }
    }
    return out;
}

// The two block copies that move layer L's rows of one stretch between the cache and a state's
// buffers (k, v: positions [0, n_pos) of the sequence; a transposed V is stored as n_embd_kv rows
// of n_pos): K's rows, then V's rows or, transposed, a column block of each of its rows.
struct block_copy {
    ggml_tensor * tensor;
    bool is_v;
    size_t host_offset, tensor_offset, size, n_rows, tensor_stride, host_stride;
};

static std::array<block_copy, 2> stretch_copies(const model & m, const layer & L, const stretch & s, int n_pos) {
    const size_t k_row = L.k_cache->nb[1], v_row = L.v_cache->nb[1], e = ggml_element_size(L.v_cache);
    const block_copy k{L.k_cache, false, s.pos * k_row, s.cell * k_row, s.n * k_row, 1, k_row, k_row};
    const block_copy v = m.v_trans
        ? block_copy{L.v_cache, true, s.pos * e, s.cell * e, s.n * e, (size_t) m.hp.n_embd_kv(), v_row, n_pos * e}
        : block_copy{L.v_cache, true, s.pos * v_row, s.cell * v_row, s.n * v_row, 1, v_row, v_row};
    return {k, v};
}

// The bytes a state of n positions holds for one layer's K and for its V.
static std::pair<size_t, size_t> layer_bytes(const model & m, const layer & L, int n) {
    const size_t v = m.v_trans ? n * ggml_element_size(L.v_cache) * m.hp.n_embd_kv() : n * L.v_cache->nb[1];
    return {n * L.k_cache->nb[1], v};
}

std::unique_ptr<kv_state> save_seq(const model & m, int seq, int n_positions) {
    const int n = n_positions < 0 ? m.seq_len[seq] : n_positions;
    if (n > m.seq_len[seq]) {
        throw decoder_error("cannot save " + std::to_string(n) + " positions of a sequence that holds " +
                            std::to_string(m.seq_len[seq]));
    }
    auto st = std::make_unique<kv_state>();
    st->n_past = n;
    st->layout = cache_layout(m);
    const std::vector<stretch> parts = stretches_of(m, seq, n);
    for (const layer & L : m.layers) {
        const auto [k_bytes, v_bytes] = layer_bytes(m, L, n);
        std::vector<uint8_t> k(k_bytes), v(v_bytes);
        for (const stretch & s : parts) {
            for (const block_copy & c : stretch_copies(m, L, s, n)) {
                ggml_backend_tensor_get_2d(c.tensor, (c.is_v ? v : k).data() + c.host_offset, c.tensor_offset, c.size,
                                           c.n_rows, c.tensor_stride, c.host_stride);
            }
        }
        st->k.push_back(std::move(k));
        st->v.push_back(std::move(v));
    }
    return st;
}

void restore_seq(model & m, const kv_state & st, int seq) {
    if (st.layout != cache_layout(m) || st.n_past < 0 || st.n_past > m.n_ctx || st.k.size() != m.layers.size() ||
        st.v.size() != m.layers.size()) {
        throw decoder_error("this state was saved from a decoder with another cache layout or a larger context");
    }
    // A state rebuilt from bytes (kv_state::from_parts) may have parts of any size: never copy past one.
    for (size_t i = 0; i < m.layers.size(); ++i) {
        const auto [k_bytes, v_bytes] = layer_bytes(m, m.layers[i], st.n_past);
        if (st.k[i].size() != k_bytes || st.v[i].size() != v_bytes) {
            throw decoder_error("this state's layer " + std::to_string(i) + " does not hold " +
                                std::to_string(st.n_past) + " positions of this cache layout");
        }
    }
    drop_cells(m, seq, [](const kv_cell &) { return false; });
    m.seq_len[seq] = 0;
    if (st.n_past > count_free(m)) {
        throw context_full_error("the state holds " + std::to_string(st.n_past) + " positions but only " +
                                 std::to_string(count_free(m)) + " cells are free");
    }
    // Into free cells, in as few stretches as they allow.
    std::vector<stretch> parts;
    for (int pos = 0; pos < st.n_past;) {
        const auto [cell, n] = find_free_cells(m, st.n_past - pos);
        for (int i = 0; i < n; ++i) m.cells[cell + i] = kv_cell{pos + i, uint64_t(1) << seq};
        parts.push_back(stretch{cell, pos, n});
        pos += n;
    }
    for (size_t i = 0; i < m.layers.size(); ++i) {
        for (const stretch & s : parts) {
            for (const block_copy & c : stretch_copies(m, m.layers[i], s, st.n_past)) {
                ggml_backend_tensor_set_2d(c.tensor, (c.is_v ? st.v[i] : st.k[i]).data() + c.host_offset, c.tensor_offset,
                                           c.size, c.n_rows, c.tensor_stride, c.host_stride);
            }
        }
    }
    m.seq_len[seq] = st.n_past;
}

}  // namespace owl2
