// The decoder's public face: the decoder class's methods and eval() (a call's runs through the
// graph, ubatch by ubatch), with the messages and the thread counts. The other jobs have files of
// their own: owl2_model.h (the structs they share), owl2_load.cpp (load()), owl2_graph.cpp
// (build_graph(run)), owl2_kv_cache.cpp (the cache's cells and snapshots), owl2_vocab.cpp
// (check_vocab()) and owl2_importance.cpp (importance collection).
#include "owl2_decoder.h"

#include <algorithm>
#include <fstream>
#include <mutex>
#include <set>
#include <string_view>
#include <thread>

#include "ggml-backend.h"
#include "ggml.h"
#include "owl2_model.h"

namespace owl2 {

// --- Messages ------------------------------------------------------------------------------------

// Length of the UTF-8 character at s[i], or 0 when the bytes there are not one (RFC 3629).
static size_t utf8_char_len(std::string_view s, size_t i) {
    const unsigned char c = (unsigned char) s[i];
    if (c < 0x80) return 1;
    size_t n;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
        n = 2, cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
        n = 3, cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
        n = 4, cp = c & 0x07;
    } else {
        return 0;
    }
    if (n > s.size() - i) return 0;
    for (size_t k = 1; k < n; ++k) {
        const unsigned char cc = (unsigned char) s[i + k];
        if ((cc & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (cc & 0x3F);
    }
    static constexpr uint32_t shortest[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < shortest[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return n;
}

bool is_utf8(std::string_view s) {
    for (size_t i = 0, n; i < s.size(); i += n) {
        n = utf8_char_len(s, i);
        if (n == 0) return false;
    }
    return true;
}

std::string printable(std::string_view text, size_t max_bytes) {
    std::string out;
    for (size_t i = 0, n; i < text.size(); i += n) {
        n = utf8_char_len(text, i);
        const unsigned char c = (unsigned char) text[i];
        std::string piece;
        if (n == 0 || (n == 1 && (c < 0x20 || c == 0x7F))) {
            char esc[5];
            snprintf(esc, sizeof esc, "\\x%02X", c);
            piece = esc;
            n = 1;
        } else {
            piece = text.substr(i, n);
        }
        if (out.size() + piece.size() > max_bytes) return out + "...";
        out += piece;
    }
    return out;
}

// Long enough for any message of ours with a long path; only a runaway quote is cut.
static constexpr size_t MAX_MESSAGE_BYTES = 8192;

decoder_error::decoder_error(const std::string & what) : std::runtime_error(printable(what, MAX_MESSAGE_BYTES)) {}

// --- eval() ------------------------------------------------------------------------------------------

// Checks the pieces and gives each its position in its sequence; returns how many positions in all.
static int prepare_pieces(const model & m, std::vector<piece> & pieces) {
    int64_t total = 0;
    int next_pos[MAX_SEQUENCES];
    std::copy(std::begin(m.seq_len), std::end(m.seq_len), next_pos);
    uint64_t seen = 0;
    for (size_t k = 0; k < pieces.size(); ++k) {
        piece & p = pieces[k];
        if (p.route != names::TEXT_ROUTE && p.route != names::VISUAL_ROUTE) {
            throw decoder_error("route must be 0 (text) or 1 (visual), not " + std::to_string(p.route));
        }
        check_seq(p.seq);
        if (p.n < 1) throw decoder_error("nothing to evaluate (an empty run)");
        if ((p.tokens == nullptr) == (p.embeds == nullptr)) {
            throw decoder_error("each run is token ids or embeddings, one of the two");
        }
        if (p.tokens) {
            for (int i = 0; i < p.n; ++i) {
                if (p.tokens[i] < 0 || p.tokens[i] >= m.hp.n_vocab) {
                    throw decoder_error("token id " + std::to_string(p.tokens[i]) + " at index " + std::to_string(i) +
                                        " is outside the vocabulary [0, " + std::to_string(m.hp.n_vocab) + ")");
                }
            }
        }
        const bool continues = k > 0 && pieces[k - 1].seq == p.seq;
        if (!continues && ((seen >> p.seq) & 1)) {
            throw decoder_error("the runs of sequence " + std::to_string(p.seq) + " must come one after another");
        }
        seen |= uint64_t(1) << p.seq;
        p.pos = next_pos[p.seq];
        next_pos[p.seq] += p.n;
        total += p.n;
    }
    if (total < 1) throw decoder_error("nothing to evaluate (no runs)");
    const int n_free = count_free(m);
    if (total > n_free) {
        const int seq = pieces[0].seq;
        throw context_full_error("the input needs " + std::to_string(total) + " positions but only " +
                                 std::to_string(n_free) + " of the context's " + std::to_string(m.n_ctx) +
                                 " are free (n_past " + std::to_string(m.seq_len[seq]) +
                                 (seq ? " in sequence " + std::to_string(seq) : std::string()) + ")");
    }
    return (int) total;
}

// A pass from the middle takes hidden states only (token ids enter at layer 0), and gives out
// only the layers it runs through.
static void check_range(const model & m, const std::vector<piece> & pieces, const pass_range & range) {
    const int L = m.hp.n_layer;
    if (range.first_layer < 0 || range.first_layer > L) {
        throw decoder_error("first_layer " + std::to_string(range.first_layer) + " is outside [0, " + std::to_string(L) + "]");
    }
    for (size_t k = 0; k < range.capture.size(); ++k) {
        const int il = range.capture[k];
        if (il < range.first_layer || il > L || (k > 0 && il <= range.capture[k - 1])) {
            throw decoder_error("the layers to capture must ascend within [first_layer, n_layer] = [" +
                                std::to_string(range.first_layer) + ", " + std::to_string(L) + "]");
        }
    }
    if (range.first_layer > 0) {
        for (const piece & p : pieces) {
            if (p.tokens) throw decoder_error("a pass from layer " + std::to_string(range.first_layer) + " takes hidden states, not token ids");
        }
    }
}

// Runs the pieces' positions through the model in ubatches (a piece may be split between two, and
// a ubatch is cut short where the free cells are) and returns the logits of every position
// [total, n_vocab] row-major, or only of each sequence's last position.
static std::vector<float> eval(model & m, std::vector<piece> pieces, bool all_logits, const pass_range & range = {},
                               std::vector<std::vector<float>> * captured = nullptr) {
    check_range(m, pieces, range);
    const int total = prepare_pieces(m, pieces);
    if (captured) captured->assign(range.capture.size(), {});

    // The rows (of all `total`) whose logits are returned.
    std::vector<char> wanted(total, all_logits);
    {
        int end = 0;
        for (size_t k = 0; k < pieces.size(); ++k) {
            end += pieces[k].n;
            if (k + 1 == pieces.size() || pieces[k + 1].seq != pieces[k].seq) wanted[end - 1] = 1;
        }
    }

    const int64_t V = m.hp.n_vocab;
    std::vector<float> out;
    out.reserve((all_logits ? total : (int) std::count(wanted.begin(), wanted.end(), 1)) * V);
    const int ubatch = std::max(1, m.params.n_ubatch);
    // GPU flash attention kernels work on blocks of keys: pad what they read (the pad is masked,
    // as llama.cpp pads its cache). On the CPU the pad would only cost time, and without it no run
    // reads a cell that was never written (allocate_kv_cache relies on that).
    const int kv_pad = m.params.flash_attn && m.dev_gpu ? 256 : 1;
    size_t next_piece = 0;
    int piece_done = 0;  // positions of pieces[next_piece] already evaluated
    for (int start = 0; start < total;) {
        run r;
        const auto [head, room_here] = find_free_cells(m, std::min(ubatch, total - start));
        r.head = head;
        int n_spans = 0;
        for (int room = room_here; room > 0;) {  // this ubatch's share of the pieces, in order
            const piece & p = pieces[next_piece];
            const bool new_span = r.pieces.empty() || r.pieces.back().route != p.route || !r.pieces.back().tokens != !p.tokens;
            if (new_span && n_spans == MAX_SPANS) break;  // the rest goes to the next graph
            n_spans += new_span;
            piece part = p;
            part.n = std::min(room, p.n - piece_done);
            part.pos = p.pos + piece_done;
            part.tokens = p.tokens ? p.tokens + piece_done : nullptr;
            part.embeds = p.embeds ? p.embeds + (size_t) piece_done * m.hp.n_embd : nullptr;
            r.pieces.push_back(part);
            r.n += part.n;
            room -= part.n;
            piece_done += part.n;
            if (piece_done == p.n) {
                ++next_piece;
                piece_done = 0;
            }
        }
        find_spans(r);
        r.first_layer = range.first_layer;
        r.capture = range.capture;
        for (int i = 0; i < r.n; ++i) {
            if (wanted[start + i]) r.outputs.push_back(i);
        }
        const bool keep = !r.outputs.empty();
        if (!keep) r.outputs.push_back(r.n - 1);  // a graph needs an output; this one is dropped

        // The run's cells are taken before the mask is made (each row sees its own key) and given
        // back if the graph fails.
        int row = 0;
        for (const piece & p : r.pieces) {
            for (int k = 0; k < p.n; ++k, ++row) m.cells[head + row] = kv_cell{p.pos + k, uint64_t(1) << p.seq};
        }
        r.n_kv = std::min(m.n_ctx, GGML_PAD(used_end(m), kv_pad));
        try {
            graph g;
            ggml_backend_sched_reset(m.sched);
            build_graph(g, m, r);
            if (!ggml_backend_sched_alloc_graph(m.sched, g.gf)) {
                throw decoder_error("cannot allocate the compute graph (out of memory?)");
            }
            set_inputs(g, m, r);
            if (ggml_backend_sched_graph_compute(m.sched, g.gf) != GGML_STATUS_SUCCESS) {
                throw decoder_error("ggml failed to compute the graph");
            }
            if (keep) {
                const size_t old = out.size();
                out.resize(old + ggml_nelements(g.logits));
                ggml_backend_tensor_get(g.logits, out.data() + old, 0, ggml_nbytes(g.logits));
            }
            for (size_t k = 0; captured && k < g.captured.size(); ++k) {  // this ubatch's rows, appended
                std::vector<float> & to = (*captured)[k];
                const size_t old = to.size();
                to.resize(old + ggml_nelements(g.captured[k]));
                ggml_backend_tensor_get(g.captured[k], to.data() + old, 0, ggml_nbytes(g.captured[k]));
            }
        } catch (...) {
            for (int i = 0; i < r.n; ++i) m.cells[head + i] = kv_cell{};
            throw;
        }
        for (const piece & p : r.pieces) m.seq_len[p.seq] = std::max(m.seq_len[p.seq], p.pos + p.n);
        start += r.n;
    }
    return out;
}

// --- decoder: the public face ------------------------------------------------------------------------

int physical_cores() {
    // Linux: each physical core lists its hardware threads in thread_siblings_list.
    std::set<std::string> cores;
    for (unsigned cpu = 0;; ++cpu) {
        std::ifstream f("/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/thread_siblings_list");
        if (!f) break;
        std::string line;
        std::getline(f, line);
        cores.insert(line);
    }
    if (!cores.empty()) return (int) cores.size();
    const unsigned hw = std::thread::hardware_concurrency();
    return std::max(1, (int) hw / 2);
}

int max_n_threads() {
    const unsigned hw = std::thread::hardware_concurrency();  // 0 when unknown
    const int by_machine = hw == 0 ? GGML_MAX_N_THREADS : (int) std::min<unsigned>(4 * hw, GGML_MAX_N_THREADS);
    return std::max(1, std::min(by_machine, GGML_MAX_N_THREADS));
}

int default_n_threads() { return std::min(physical_cores(), max_n_threads()); }

// Each public method below takes mutex_ and only then asks live(): a close() on another thread
// lands wholly before the call (which then raises "closed") or wholly after it.
using call_lock = std::lock_guard<std::mutex>;

decoder::decoder(const std::string & base_path, const std::string & mam_path, const decoder_params & params)
    : m_(std::make_unique<model>()) {
    m_->params = params;
    open(*m_, base_path, mam_path);
    if (!params.defer_placing) place(*m_, cancel_loading_);
}

// Waits for a running call (a finish_loading() on another thread, say) before freeing the model.
decoder::~decoder() {
    cancel_loading_ = true;
    call_lock hold(mutex_);
    m_.reset();
}



model & decoder::live() const {
    if (!m_) throw decoder_error("the decoder is closed");
    return *m_;
}

model & decoder::ready() const {
    model & m = live();
    if (!m.placed) throw decoder_error("the decoder's weights are not loaded yet (finish_loading)");
    return m;
}


void decoder::finish_loading() {
    call_lock hold(mutex_);
    place(live(), cancel_loading_);
}

void decoder::cancel_loading() { cancel_loading_ = true; }

template <typename Fact> auto decoder::read(Fact fact) const {
    call_lock hold(mutex_);
    return fact(live());
}

std::vector<float> decoder::eval_runs(const std::vector<run_input> & runs, bool all_logits, const pass_range & range,
                                      std::vector<std::vector<float>> * captured) {
    call_lock hold(mutex_);
    model & m = ready();
    std::vector<piece> pieces;
    for (const run_input & in : runs) {
        if (in.n > INT32_MAX) throw context_full_error("far too many positions");
        pieces.push_back(piece{in.tokens, in.embeds, (int) in.n, in.route, in.seq});
    }
    return eval(m, pieces, all_logits, range, captured);
}

int decoder::n_past(int seq) const {
    check_seq(seq);
    return read([seq](const model & m) { return m.seq_len[seq]; });
}

int decoder::n_free() const {
    call_lock hold(mutex_);
    return count_free(ready());
}

void decoder::rewind(int n, int seq) {
    check_seq(seq);
    call_lock hold(mutex_);
    rewind_seq(ready(), n, seq);
}

void decoder::clear_sequence(int seq) {
    check_seq(seq);
    call_lock hold(mutex_);
    clear_seq(ready(), seq);
}

void decoder::copy_sequence(int src, int dst) {
    check_seq(src);
    check_seq(dst);
    call_lock hold(mutex_);
    copy_seq(ready(), src, dst);
}

std::unique_ptr<kv_state> decoder::save_state(int seq, int n_positions) const {
    check_seq(seq);
    call_lock hold(mutex_);
    return save_seq(ready(), seq, n_positions);
}

void decoder::restore_state(const kv_state & st, int seq) {
    check_seq(seq);
    call_lock hold(mutex_);
    restore_seq(ready(), st, seq);
}

void decoder::start_importance() {
    call_lock hold(mutex_);
    set_collecting(ready(), true);
}

std::map<std::string, importance_entry> decoder::take_importance() {
    call_lock hold(mutex_);
    model & m = ready();
    std::map<std::string, importance_entry> out = std::move(m.importance);
    set_collecting(m, false);
    return out;
}

void decoder::override_weight(const std::string & name, bool visual, int type, const uint8_t * data, size_t n_bytes) {
    call_lock hold(mutex_);
    owl2::override_weight(ready(), name, visual, (ggml_type) type, data, n_bytes);
}

void decoder::clear_overrides() {
    call_lock hold(mutex_);
    owl2::clear_overrides(ready());
}

int decoder::n_overrides() const { return read([](const model & m) { return (int) m.overrides.size(); }); }

int decoder::n_vocab() const { return read([](const model & m) { return m.hp.n_vocab; }); }
int decoder::n_embd() const { return read([](const model & m) { return m.hp.n_embd; }); }
int decoder::n_ctx() const { return read([](const model & m) { return m.n_ctx; }); }
int decoder::n_layer() const { return read([](const model & m) { return m.hp.n_layer; }); }
int decoder::n_threads() const { return read([](const model & m) { return m.n_threads; }); }
bool decoder::flash_attn() const { return read([](const model & m) { return m.params.flash_attn; }); }

std::string decoder::cache_layout() const {
    return read([](const model & m) { return owl2::cache_layout(m); });
}

std::string decoder::kv_type() const {
    return read([](const model & m) { return std::string(ggml_type_name(m.kv_type)); });
}

std::string decoder::device_name() const {
    return read([](const model & m) { return std::string(ggml_backend_dev_name(m.dev_gpu ? m.dev_gpu : m.dev_cpu)); });
}

void decoder::close() {
    cancel_loading_ = true;  // a finish_loading() still running stops at its next tensor
    call_lock hold(mutex_);  // waits for a running call; the model is freed before anyone else gets in
    m_.reset();
}

bool decoder::closed() const {
    call_lock hold(mutex_);
    return !m_;
}

}  // namespace owl2
