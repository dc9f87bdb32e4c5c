// The MAM decoder: hparams, layer and model structs, then load(), build_graph(run), eval(), in the
// order a reader needs them (whisper.cpp keeps a ggml model the same way), then check_vocab() (the
// base file's vocabulary, for the tokenizer) and the public class.
#include "owl2_decoder.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <cstdio>
#include <set>
#include <string_view>
#include <thread>
#include <unordered_map>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"  // llama_token_type only: the vocabulary check accepts what llama.cpp's tokenizer reads
#include "owl2_gguf_file.h"
#include "owl2_names.h"
#include "quantize.h"

namespace owl2 {

// --- Names ---------------------------------------------------------------------------------------
// GGUF keys, tensor names, layer parts, devices and KV types come from owl2_names.h, generated at
// build time from owl2_edge/names.py and gguf_names.py (the one table of names). The table gives a
// layer part's short name; its tensor in layer i is named by llama.cpp's pattern (blk.%d.%s.weight):

namespace names {
static std::string blk(int i, const char * part) {
    char name[GGML_MAX_NAME * 2];
    snprintf(name, sizeof name, LAYER_TENSOR_FORMAT, i, part);
    return name;
}
}  // namespace names

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

// --- The model ---------------------------------------------------------------------------------------

struct hparams {
    int n_vocab = 0;
    int n_ctx_train = 0;
    int n_embd = 0;
    int n_layer = 0;
    int n_ff = 0;
    int n_head = 0;
    int n_head_kv = 0;
    int n_rot = 0;
    float rms_eps = 0;
    float rope_freq_base = 0;

    int head_dim() const { return n_embd / n_head; }
    int n_embd_kv() const { return head_dim() * n_head_kv; }
};

// One decoder layer. Index [route] picks the text (0) or the visual (1) copy of what MAM doubles;
// the rest is shared by both routes.
struct layer {
    ggml_tensor * attn_norm[2] = {};
    ggml_tensor * wq = nullptr;
    ggml_tensor * wk[2] = {};
    ggml_tensor * wv[2] = {};
    ggml_tensor * wo = nullptr;
    ggml_tensor * ffn_norm[2] = {};
    ggml_tensor * ffn_gate = nullptr;
    ggml_tensor * ffn_up = nullptr;
    ggml_tensor * ffn_down = nullptr;

    // KV cache, rows = positions: k [n_embd_kv, n_ctx]; v the same, or transposed
    // [n_ctx, n_embd_kv] when model::v_trans (so that attention multiplies by it directly).
    ggml_tensor * k_cache = nullptr;
    ggml_tensor * v_cache = nullptr;
    bool on_gpu = false;
};

struct pair_weights;

// One row of every layer's K and V cache. The cache is shared by up to MAX_SEQUENCES sequences
// (docs/design.md §14): a cell holds position `pos` of each sequence in `seqs` (several after
// copy_sequence, which shares cells instead of copying rows), or nothing when `seqs` is empty.
// A sequence's positions need not lie in consecutive cells: the attention mask, not the cell
// index, says which keys a query sees.
struct kv_cell {
    int pos = -1;
    uint64_t seqs = 0;
    bool has(int seq) const { return (seqs >> seq) & 1; }
    bool free() const { return seqs == 0; }
};

// The most spans (build_graph: positions of one route or one input kind) a graph may have; eval
// cuts a ubatch short at the next one. A graph's size grows with them (every routed weight is
// applied per route span), and room for its metadata is allocated once (start_backends).
static constexpr int MAX_SPANS = 16;

struct model {
    hparams hp;
    decoder_params params;
    ggml_type kv_type = GGML_TYPE_F16;
    bool v_trans = true;
    int n_ctx = 0;
    int n_threads = 1;

    std::unique_ptr<gguf_file> base, mam;

    ggml_tensor * token_embd = nullptr;
    ggml_tensor * output_norm = nullptr;
    ggml_tensor * output = nullptr;
    std::vector<layer> layers;
    bool output_on_gpu = false;  // output_norm and output: with every layer on the GPU

    ggml_backend_dev_t dev_cpu = nullptr, dev_gpu = nullptr;
    ggml_backend_t backend_cpu = nullptr, backend_gpu = nullptr;
    ggml_backend_sched_t sched = nullptr;
    std::vector<ggml_context *> contexts;           // tensor metadata (weights, KV)
    std::vector<ggml_backend_buffer_t> buffers;     // mapped files, GPU / repacked weights, KV
    std::vector<uint8_t> graph_meta;                // room for one graph's tensor metadata
    size_t graph_size = 0;

    std::vector<kv_cell> cells;           // [n_ctx]
    int seq_len[MAX_SEQUENCES] = {};      // positions each sequence holds (its n_past)

    // Between open() and place(): the weights' metadata, waiting for their data.
    std::unique_ptr<pair_weights> pending;
    bool placed = false;

    // Importance collection (start_importance): the weight matrices by tensor, and what their
    // inputs added up to so far.
    bool collecting = false;
    std::map<const ggml_tensor *, std::string> weight_names;
    std::map<std::string, importance_entry> importance;

    ~model();  // after pair_weights, which it may still hold
};

// --- load() ------------------------------------------------------------------------------------------
// load() is a list of steps, defined below in the order it takes them: check the pair, choose the
// devices, create the weights' tensor metadata, place their data, allocate the KV cache, start the
// backends. Every file is checked before ggml sees any of its tensors, so that a bad file becomes a
// decoder_error naming the file instead of an abort inside ggml.

// --- check the pair

// Both files must say they are llama models before any key is read under llama's names.
static void check_architecture(const gguf_file & f) {
    const std::string arch = f.get_str(names::KEY_ARCHITECTURE);
    if (arch != names::ARCHITECTURE) {
        f.fail(std::string(names::KEY_ARCHITECTURE) + " is '" + printable(arch) + "', expected '" +
               names::ARCHITECTURE + "'");
    }
}

// The base file's llama hparams, each bounded: a corrupt value fails here, not as a huge allocation.
static hparams read_hparams(const gguf_file & f) {
    check_architecture(f);
    auto get_int = [&](const char * key, int64_t lo, int64_t hi) {
        const uint64_t v = f.get_uint(key);
        if (v < (uint64_t) lo || v > (uint64_t) hi) {
            f.fail(std::string(key) + " = " + std::to_string(v) + " is out of range");
        }
        return (int) v;
    };
    hparams hp;
    hp.n_ctx_train = get_int(names::KEY_CONTEXT_LENGTH, 1, 1 << 24);
    hp.n_embd = get_int(names::KEY_EMBEDDING_LENGTH, 1, 1 << 20);
    hp.n_layer = get_int(names::KEY_BLOCK_COUNT, 1, 4096);
    hp.n_ff = get_int(names::KEY_FEED_FORWARD_LENGTH, 1, 1 << 22);
    hp.n_head = get_int(names::KEY_HEAD_COUNT, 1, 4096);
    hp.n_head_kv = f.has(names::KEY_HEAD_COUNT_KV) ? get_int(names::KEY_HEAD_COUNT_KV, 1, 4096) : hp.n_head;
    if (hp.n_embd % hp.n_head != 0) {
        f.fail(std::string(names::KEY_EMBEDDING_LENGTH) + " is not a multiple of " + names::KEY_HEAD_COUNT);
    }
    if (hp.n_head % hp.n_head_kv != 0) {
        f.fail(std::string(names::KEY_HEAD_COUNT) + " is not a multiple of " + names::KEY_HEAD_COUNT_KV);
    }
    hp.n_rot = f.has(names::KEY_ROPE_DIMENSION_COUNT) ? get_int(names::KEY_ROPE_DIMENSION_COUNT, 2, 1 << 16)
                                                      : hp.head_dim();
    if (hp.n_rot > hp.head_dim() || hp.n_rot % 2 != 0) {
        f.fail(std::string(names::KEY_ROPE_DIMENSION_COUNT) + " does not fit the head size");
    }
    // The floats go into every norm and every rotation: a NaN or inf (or an f64 beyond float) would
    // make every logit NaN, and an epsilon of 1 or more would swamp the activations it normalizes.
    auto get_real = [&](const char * key, double value, double lo, double hi, const char * range) {
        const float v = (float) value;
        if (!std::isfinite(v) || !(v > lo) || !(v < hi)) {
            char shown[32];
            snprintf(shown, sizeof shown, "%g", value);
            f.fail(std::string(key) + " = " + shown + " is not a finite number in " + range);
        }
        return v;
    };
    hp.rms_eps = get_real(names::KEY_RMS_EPS, f.get_float(names::KEY_RMS_EPS), 0.0, 1.0, "(0, 1)");
    hp.rope_freq_base = get_real(names::KEY_ROPE_FREQ_BASE, f.get_float(names::KEY_ROPE_FREQ_BASE, 10000.0), 0.0,
                                 HUGE_VAL, "(0, inf)");
    return hp;
}

// A sidecar from another conversion would load and silently give wrong image logits: it must be an
// owl2 MAM adapter written with this very base (the same pair id and dimensions).
static void check_sidecar(const gguf_file & base, const gguf_file & mam, const hparams & hp) {
    check_architecture(mam);
    auto str_or_empty = [&](const char * k) { return mam.has(k) ? mam.get_str(k) : std::string(); };
    if (str_or_empty(names::KEY_GENERAL_TYPE) != names::ADAPTER_GENERAL_TYPE ||
        str_or_empty(names::KEY_ADAPTER_TYPE) != names::MAM_ADAPTER_TYPE) {
        mam.fail(std::string("not an owl2 MAM sidecar (") + names::KEY_GENERAL_TYPE + " must be '" +
                 names::ADAPTER_GENERAL_TYPE + "' and " + names::KEY_ADAPTER_TYPE + " '" +
                 names::MAM_ADAPTER_TYPE + "')");
    }
    const std::string base_id = base.get_str(names::KEY_PAIR_ID);
    const std::string mam_id = mam.get_str(names::KEY_PAIR_ID);
    if (base_id != mam_id) {
        mam.fail("belongs to another decoder (pair id '" + printable(mam_id) + "', the decoder GGUF has '" +
                 printable(base_id) + "')");
    }
    auto same = [&](const char * k, int expected) {
        const uint64_t v = mam.get_uint(k);
        if (v != (uint64_t) expected) {
            mam.fail(std::string(k) + " = " + std::to_string(v) + " but the decoder GGUF has " + std::to_string(expected));
        }
    };
    same(names::KEY_MAM_BLOCK_COUNT, hp.n_layer);
    same(names::KEY_MAM_EMBEDDING_LENGTH, hp.n_embd);
    same(names::KEY_MAM_KV_WIDTH, hp.n_embd_kv());
}

// A dimension of the layer-part table in this model (-1: none, the part is a vector).
static int64_t resolve(names::dim d, const hparams & hp) {
    switch (d) {
        case names::dim::n_embd: return hp.n_embd;
        case names::dim::n_embd_kv: return hp.n_embd_kv();
        case names::dim::n_ff: return hp.n_ff;
        case names::dim::none: break;
    }
    return -1;
}

// Check a tensor's presence, shape and type against what the graph will do with it. A matrix
// [ne0 = in, ne1 = out] needs rows that fill whole blocks of its type; norms are float32.
static const gguf_tensor_info & expect(const gguf_file & f, const std::string & name, int64_t ne0, int64_t ne1,
                                       std::set<std::string> & seen, ggml_type required = GGML_TYPE_COUNT) {
    const gguf_tensor_info * t = f.find(name);
    if (t == nullptr) f.fail("missing tensor " + name);
    seen.insert(name);
    const int n_dims = ne1 > 0 ? 2 : 1;
    const bool shape_ok = t->n_dims <= n_dims && t->ne[0] == ne0 && (ne1 <= 0 || t->ne[1] == ne1);
    if (!shape_ok) {
        std::string got;
        for (int d = 0; d < t->n_dims; ++d) got += (d ? ", " : "") + std::to_string(t->ne[d]);
        f.fail("tensor " + name + " has shape [" + got + "], expected [" + std::to_string(ne0) +
               (ne1 > 0 ? ", " + std::to_string(ne1) : "") + "] (ggml order)");
    }
    if (required != GGML_TYPE_COUNT && t->type != required) {
        f.fail("tensor " + name + " is " + ggml_type_name(t->type) + ", expected " + ggml_type_name(required));
    }
    if (ne0 % ggml_blck_size(t->type) != 0) {
        f.fail("tensor " + name + " of type " + ggml_type_name(t->type) + " has rows of " + std::to_string(ne0) +
               " values, not whole blocks of " + std::to_string(ggml_blck_size(t->type)));
    }
    return *t;
}

// A tensor nothing reads means a file of another layout (or another model): refuse it rather than
// run without it.
static void refuse_unknown_tensors(const gguf_file & f, const std::set<std::string> & seen) {
    for (const auto & t : f.tensors()) {
        if (!seen.count(t.name)) f.fail("unexpected tensor " + t.name);
    }
}

// Every tensor of both files against the layer-part table: routed parts in both files, shared
// parts in the base only. Returns n_vocab, the one dimension only the embedding table knows.
static int check_tensors(const gguf_file & base, const gguf_file & mam, const hparams & hp) {
    std::set<std::string> seen_base, seen_mam;
    const gguf_tensor_info * embd = base.find(names::TOKEN_EMBD);
    if (embd == nullptr) base.fail(std::string("missing tensor ") + names::TOKEN_EMBD);
    if (embd->n_dims != 2 || embd->ne[1] < 1 || embd->ne[1] > INT32_MAX) {
        base.fail(std::string("tensor ") + names::TOKEN_EMBD + " must be [n_embd, n_vocab]");
    }
    const int n_vocab = (int) embd->ne[1];
    expect(base, names::TOKEN_EMBD, hp.n_embd, n_vocab, seen_base);
    expect(base, names::OUTPUT_NORM, hp.n_embd, -1, seen_base, GGML_TYPE_F32);
    expect(base, names::OUTPUT, hp.n_embd, n_vocab, seen_base);
    for (int i = 0; i < hp.n_layer; ++i) {
        // Every part in the base: shared parts and the text route's copies.
        const gguf_tensor_info * in_base[names::N_LAYER_PARTS] = {};
        for (int p = 0; p < names::N_LAYER_PARTS; ++p) {
            const names::layer_part_info & part = names::LAYER_PARTS[p];
            const bool norm = part.ne1 == names::dim::none;  // a vector the graph multiplies by elementwise
            in_base[p] = &expect(base, names::blk(i, part.name), resolve(part.ne0, hp), resolve(part.ne1, hp),
                                 seen_base, norm ? GGML_TYPE_F32 : GGML_TYPE_COUNT);
        }
        // The routed parts' visual copies in the sidecar, of the base copy's type (norms f32, K/V the
        // base's type per layer, docs/design.md §2): another type means the files were not written together.
        for (int p = 0; p < names::N_LAYER_PARTS; ++p) {
            const names::layer_part_info & part = names::LAYER_PARTS[p];
            if (!part.routed) continue;
            expect(mam, names::blk(i, part.name), resolve(part.ne0, hp), resolve(part.ne1, hp), seen_mam,
                   in_base[p]->type);
        }
    }
    refuse_unknown_tensors(base, seen_base);
    refuse_unknown_tensors(mam, seen_mam);
    return n_vocab;
}

// --- choose the devices

// Whether `s` is one of a generated list of names (names::DEVICES, names::KV_TYPES).
template <size_t N>
static constexpr bool listed(std::string_view s, const char * const (&list)[N]) {
    for (const char * x : list) {
        if (s == x) return true;
    }
    return false;
}

// The list as a message shows it: "a, b, c".
template <size_t N>
static std::string joined(const char * const (&list)[N]) {
    std::string out;
    for (const char * x : list) out += (out.empty() ? "" : ", ") + std::string(x);
    return out;
}

// The two device names with a meaning of their own here; any other listed name asks for a GPU.
// Checked against the generated list so that a rename in names.py fails the build, not a user.
static constexpr const char * DEVICE_AUTO = "auto";
static constexpr const char * DEVICE_CPU = "cpu";
static_assert(listed(DEVICE_AUTO, names::DEVICES) && listed(DEVICE_CPU, names::DEVICES));

// The compute device: a GPU from ggml's device registry (a CUDA build of llama-cpp-python
// registers one; nothing here depends on CUDA at compile time), or none.
static ggml_backend_dev_t pick_gpu(const std::string & device) {
    if (!listed(device, names::DEVICES)) {
        throw decoder_error("device must be one of " + joined(names::DEVICES) + ", not '" + device + "'");
    }
    if (device == DEVICE_CPU) return nullptr;
    ggml_backend_dev_t gpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
    if (gpu == nullptr && device != DEVICE_AUTO) {
        throw decoder_error("device '" + device + "' asked for, but ggml has no GPU device (the installed "
                            "llama-cpp-python was built without CUDA, or no GPU is visible)");
    }
    return gpu;
}

// Which device each layer runs on, decided once so that weights and cache land together: like
// llama.cpp's n_gpu_layers, the last layers go to the GPU, and the output head too once every
// layer is there. token_embd stays on the CPU (a row lookup; llama.cpp keeps it there as well).
static void choose_devices(model & m) {
    const hparams & hp = m.hp;
    const decoder_params & p = m.params;
    m.dev_cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (m.dev_cpu == nullptr) throw decoder_error("ggml has no CPU device");
    m.dev_gpu = pick_gpu(p.device);
    const int n_gpu = m.dev_gpu == nullptr ? 0 : (p.n_gpu_layers < 0 ? hp.n_layer : std::min(p.n_gpu_layers, hp.n_layer));
    if (m.dev_gpu != nullptr && n_gpu == 0) m.dev_gpu = nullptr;
    if (m.dev_gpu != nullptr) {
        // On the GPU attention always takes ggml's fused kernel, as llama.cpp's default does
        // there. Measured on an H100 (CUDA build of llama-cpp-python 0.3.36): the unfused path
        // (mul_mat over permuted cache views + soft_max) gave logits off by ~3 against the
        // reference with an f32 cache, while the fused kernel matched it.
        m.params.flash_attn = true;
    }
    m.layers.resize(hp.n_layer);
    for (int i = 0; i < hp.n_layer; ++i) m.layers[i].on_gpu = i >= hp.n_layer - n_gpu;
    m.output_on_gpu = m.dev_gpu != nullptr && n_gpu == hp.n_layer;
}

// --- create the weights' tensor metadata

// The two files of a pair: the base holds the shared weights and the text route's copies of the
// routed ones, the sidecar the visual route's copies.
enum class pair_file { base, mam };

static pair_file file_of_route(int route) { return route == names::VISUAL_ROUTE ? pair_file::mam : pair_file::base; }

// Where a weight's data live once loaded.
enum class weight_home {
    mapped_cpu,    // in place in the mapped file: no copy, the page cache holds it
    gpu,           // copied into a buffer on the GPU
    repacked_cpu,  // copied into one of ggml's CPU extra buffer types, in its interleaved layout
};

// The weights of one file that share one home (and, when repacked, one buffer type): metadata in a
// ggml context, data in one buffer once place_weights() has run.
struct weight_set {
    weight_home home = weight_home::mapped_cpu;
    ggml_backend_buffer_type_t repack_buft = nullptr;  // repacked_cpu: the extra buffer type
    ggml_context * ctx = nullptr;
    std::vector<std::pair<ggml_tensor *, const gguf_tensor_info *>> tensors;
};

// One file's weights by home.
struct file_weights {
    weight_set mapped_cpu, gpu;
    std::vector<weight_set> repacked_cpu;  // one per CPU extra buffer type, in ggml's order of preference
};

// Both files' weights by home.
struct pair_weights {
    file_weights base, mam;
    file_weights & of(pair_file f) { return f == pair_file::base ? base : mam; }
};

model::~model() {
    pending.reset();
    if (sched) ggml_backend_sched_free(sched);
    for (auto * b : buffers) ggml_backend_buffer_free(b);
    for (auto * c : contexts) ggml_free(c);
    if (backend_gpu) ggml_backend_free(backend_gpu);
    if (backend_cpu) ggml_backend_free(backend_cpu);
}

static const gguf_file & file_of(const model & m, pair_file f) { return f == pair_file::base ? *m.base : *m.mam; }

static ggml_context * new_meta_context(size_t n_tensors) {
    ggml_init_params ip = {ggml_tensor_overhead() * (n_tensors + 1), nullptr, /*no_alloc =*/true};
    ggml_context * ctx = ggml_init(ip);
    if (ctx == nullptr) throw decoder_error("out of memory (ggml context)");
    return ctx;
}

// ggml's CPU "extra" buffer types hold weights in repacked layouts (interleaved rows for the
// AVX2 / NEON kernels): faster matmuls, but the weights are copied out of the mapping (whose pages
// are given back). Used by default, as stock llama.cpp does; decoder_params::repack = false opts out.
static std::vector<ggml_backend_buffer_type_t> cpu_repack_bufts(ggml_backend_dev_t cpu) {
    std::vector<ggml_backend_buffer_type_t> out;
    auto get_extra = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
        ggml_backend_dev_backend_reg(cpu), "ggml_backend_dev_get_extra_bufts");
    if (get_extra) {
        for (ggml_backend_buffer_type_t * b = get_extra(cpu); b && *b; ++b) {
            // Not the AMX one (Xeons with AMX, when llama-cpp-python was built for them): its
            // matmul in this ggml crashes (SIGSEGV) on weights whose rows are not a multiple of
            // 2048 wide, which its supports_op accepts (found on the tiny test models; stock
            // llama.cpp crashes the same; later ggml refuses those widths). The interleaved
            // CPU_REPACK layouts serve those CPUs as they serve every other.
            if (std::string_view(ggml_backend_buft_name(*b)) == "AMX") continue;
            out.push_back(*b);
        }
    }
    return out;
}

// Whether a weight of this type and shape, held in `buft`, can be multiplied there (the extra
// buffer types take only some types and widths): ask the device about a stand-in mul_mat.
static bool buft_takes_matmul(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft, const gguf_tensor_info & info) {
    ggml_init_params ip = {ggml_tensor_overhead() * 4, nullptr, true};
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * w = ggml_new_tensor(ctx, info.type, info.n_dims, info.ne);
    ggml_tensor * op = ggml_mul_mat(ctx, w, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, info.ne[0], 512));
    ggml_backend_buffer_t probe = ggml_backend_buft_alloc_buffer(buft, 0);
    w->buffer = probe;
    const bool ok = probe != nullptr && ggml_backend_dev_supports_op(dev, op);
    w->buffer = nullptr;
    if (probe) ggml_backend_buffer_free(probe);
    ggml_free(ctx);
    return ok;
}

// One set (one ggml context, later one buffer) per file and home; each context has room for every
// tensor of the pair (metadata only, a few hundred bytes a tensor).
static pair_weights new_weight_sets(model & m) {
    const size_t n_tensors = m.base->tensors().size() + m.mam->tensors().size();
    const std::vector<ggml_backend_buffer_type_t> repack_bufts =
        m.params.repack ? cpu_repack_bufts(m.dev_cpu) : std::vector<ggml_backend_buffer_type_t>();
    auto new_set = [&](weight_home home, ggml_backend_buffer_type_t repack_buft) {
        weight_set s;
        s.home = home;
        s.repack_buft = repack_buft;
        s.ctx = new_meta_context(n_tensors);
        m.contexts.push_back(s.ctx);
        return s;
    };
    pair_weights w;
    for (file_weights * fw : {&w.base, &w.mam}) {
        fw->mapped_cpu = new_set(weight_home::mapped_cpu, nullptr);
        fw->gpu = new_set(weight_home::gpu, nullptr);
        for (ggml_backend_buffer_type_t buft : repack_bufts) fw->repacked_cpu.push_back(new_set(weight_home::repacked_cpu, buft));
    }
    return w;
}

// A weight's tensor metadata, created in the set whose buffer will hold its data: a GPU layer's
// weights on the GPU; on the CPU a matrix in the first repacked buffer type that can multiply it,
// anything else in place in the mapping. token_embd is only read by row (ggml_get_rows), never
// multiplied: it stays mapped. The sidecar's tensors have the base's names; their ggml names say
// they are the visual route's.
static ggml_tensor * new_weight(pair_weights & w, const model & m, pair_file file, const std::string & name, bool on_gpu) {
    const gguf_tensor_info & info = *file_of(m, file).find(name);  // present: check_tensors saw it
    file_weights & fw = w.of(file);
    weight_set * s = on_gpu ? &fw.gpu : &fw.mapped_cpu;
    if (!on_gpu && info.n_dims == 2 && name != names::TOKEN_EMBD) {
        for (weight_set & r : fw.repacked_cpu) {
            if (buft_takes_matmul(m.dev_cpu, r.repack_buft, info)) {
                s = &r;
                break;
            }
        }
    }
    ggml_tensor * t = ggml_new_tensor(s->ctx, info.type, info.n_dims, info.ne);
    ggml_set_name(t, file == pair_file::mam ? (name + names::VISUAL_WEIGHT_SUFFIX).c_str() : name.c_str());
    s->tensors.emplace_back(t, &info);
    return t;
}

// The field of `L` that holds one part of the layer-part table (for a routed part, the route's
// copy): build_graph reads the named fields, load() walks names::LAYER_PARTS.
static ggml_tensor *& layer_weight(layer & L, names::layer_part part, int route) {
    switch (part) {
        case names::ATTN_NORM: return L.attn_norm[route];
        case names::ATTN_Q: return L.wq;
        case names::ATTN_K: return L.wk[route];
        case names::ATTN_V: return L.wv[route];
        case names::ATTN_OUTPUT: return L.wo;
        case names::FFN_NORM: return L.ffn_norm[route];
        case names::FFN_GATE: return L.ffn_gate;
        case names::FFN_UP: return L.ffn_up;
        case names::FFN_DOWN: return L.ffn_down;
        case names::N_LAYER_PARTS: break;
    }
    throw decoder_error("no layer part " + std::to_string((int) part));
}

// struct layer doubles exactly the parts the table marks routed: a change to the table must
// change the struct (and the math) too, not load into the wrong field.
static_assert(names::N_LAYER_PARTS == 9, "struct layer and layer_weight() know nine layer parts");
static_assert(names::LAYER_PARTS[names::ATTN_NORM].routed && !names::LAYER_PARTS[names::ATTN_Q].routed &&
              names::LAYER_PARTS[names::ATTN_K].routed && names::LAYER_PARTS[names::ATTN_V].routed &&
              !names::LAYER_PARTS[names::ATTN_OUTPUT].routed && names::LAYER_PARTS[names::FFN_NORM].routed &&
              !names::LAYER_PARTS[names::FFN_GATE].routed && !names::LAYER_PARTS[names::FFN_UP].routed &&
              !names::LAYER_PARTS[names::FFN_DOWN].routed,
              "struct layer has two copies ([route]) of the routed parts and one of the shared parts");

// The metadata of every weight (ggml sees the tensors, no data yet), sorted into the sets of the
// buffers that will hold them and hooked into the model's named fields.
static pair_weights create_weights(model & m) {
    pair_weights w = new_weight_sets(m);
    m.token_embd = new_weight(w, m, pair_file::base, names::TOKEN_EMBD, false);
    m.output_norm = new_weight(w, m, pair_file::base, names::OUTPUT_NORM, m.output_on_gpu);
    m.output = new_weight(w, m, pair_file::base, names::OUTPUT, m.output_on_gpu);
    for (int i = 0; i < m.hp.n_layer; ++i) {
        layer & L = m.layers[i];
        for (int p = 0; p < names::N_LAYER_PARTS; ++p) {
            const names::layer_part part = (names::layer_part) p;
            const std::string name = names::blk(i, names::LAYER_PARTS[p].name);
            if (!names::LAYER_PARTS[p].routed) {
                layer_weight(L, part, names::TEXT_ROUTE) = new_weight(w, m, pair_file::base, name, L.on_gpu);
                continue;
            }
            for (int route : {names::TEXT_ROUTE, names::VISUAL_ROUTE}) {
                layer_weight(L, part, route) = new_weight(w, m, file_of_route(route), name, L.on_gpu);
            }
        }
    }
    return w;
}

// --- place the weights' data

// Gives the tensors of one set their data: the mapped set points into the mapping; the others get a
// buffer of their own and a copy (ggml repacks while the data are set), after which the copied
// pages of the mapping are given back.
static void place_set(model & m, const gguf_file & f, weight_set & set, const std::atomic<bool> & cancel) {
    if (set.tensors.empty()) return;
    ggml_backend_buffer_t buf;
    if (set.home == weight_home::mapped_cpu) {
        buf = ggml_backend_cpu_buffer_from_ptr(f.map_base(), f.map_size());
        if (buf == nullptr) f.fail("cannot wrap the mapped file in a ggml buffer");
        m.buffers.push_back(buf);
        for (auto & [t, info] : set.tensors) {
            if (ggml_backend_tensor_alloc(buf, t, (uint8_t *) f.map_base() + info->file_offset) != GGML_STATUS_SUCCESS) {
                f.fail("cannot place tensor " + info->name);
            }
        }
    } else {
        const bool gpu = set.home == weight_home::gpu;
        buf = ggml_backend_alloc_ctx_tensors_from_buft(set.ctx, gpu ? ggml_backend_dev_buffer_type(m.dev_gpu) : set.repack_buft);
        if (buf == nullptr) f.fail(gpu ? "out of GPU memory for its weights" : "out of memory for its repacked weights");
        m.buffers.push_back(buf);
        // Repacking is CPU work (reading the mapped file, interleaving rows): the tensors are
        // independent, so n_threads workers take them in turn. Uploads to a GPU stay on one thread.
        std::atomic<size_t> next{0};
        auto copy_some = [&] {
            ggml_log_scope quiet(ggml_log_scope::mode::quiet);  // log scopes are per thread
            for (size_t i; !cancel && (i = next.fetch_add(1)) < set.tensors.size();) {
                auto & [t, info] = set.tensors[i];
                ggml_backend_tensor_set(t, f.data(*info), 0, info->nbytes);
                f.release(*info);
            }
        };
        std::vector<std::thread> workers;
        const int n_workers = gpu ? 1 : std::min<int>(m.n_threads, (int) set.tensors.size());
        for (int k = 1; k < n_workers; ++k) workers.emplace_back(copy_some);
        copy_some();
        for (auto & w : workers) w.join();
        if (cancel) throw decoder_error("loading was cancelled");
    }
    // The scheduler runs an op where its weights are.
    ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
}

// Every set of both files, each into its buffer.
static void place_weights(model & m, pair_weights & w, const std::atomic<bool> & cancel) {
    for (pair_file file : {pair_file::base, pair_file::mam}) {
        file_weights & fw = w.of(file);
        place_set(m, file_of(m, file), fw.mapped_cpu, cancel);
        place_set(m, file_of(m, file), fw.gpu, cancel);
        for (weight_set & s : fw.repacked_cpu) place_set(m, file_of(m, file), s, cancel);
    }
}

// --- allocate the KV cache

// names::KV_TYPES are ggml's own spellings of the cache types, so ggml's name table maps them.
static ggml_type parse_kv_type(const std::string & s) {
    if (!listed(s, names::KV_TYPES)) {
        throw decoder_error("kv_type must be one of " + joined(names::KV_TYPES) + ", not '" + s + "'");
    }
    return (ggml_type) ggml_type_from_name(s);
}

// The run options that do not depend on memory, checked when the pair opens: the context, the
// cache's type and layout, the CPU threads.
static void check_run_options(model & m) {
    const hparams & hp = m.hp;
    m.n_ctx = m.params.n_ctx;
    if (m.n_ctx < 1 || m.n_ctx > (1 << 20)) throw decoder_error("n_ctx must be between 1 and 2^20");
    m.kv_type = parse_kv_type(m.params.kv_type);
    if (hp.head_dim() % ggml_blck_size(m.kv_type) != 0) {
        throw decoder_error(std::string("kv_type ") + ggml_type_name(m.kv_type) + " needs a head size that is a multiple of " +
                            std::to_string(ggml_blck_size(m.kv_type)) + "; this model has " + std::to_string(hp.head_dim()));
    }
    // A transposed V lets plain attention multiply by it without a copy; flash attention wants
    // rows, and a quantized V cannot be written column-wise (its blocks run along a row).
    m.v_trans = !m.params.flash_attn && !ggml_is_quantized(m.kv_type);
    m.n_threads = m.params.n_threads > 0 ? m.params.n_threads : std::min(physical_cores(), max_n_threads());
    if (m.n_threads > max_n_threads()) {
        throw decoder_error("n_threads = " + std::to_string(m.n_threads) +
                            " is more than this machine can use (at most " + std::to_string(max_n_threads()) + ")");
    }
}

// The KV cache of every layer, on the device of its layer, zeroed.
static void allocate_kv_cache(model & m) {
    const hparams & hp = m.hp;
    for (bool on_gpu : {false, true}) {
        ggml_context * ctx = new_meta_context(2 * hp.n_layer);
        m.contexts.push_back(ctx);
        bool any = false;
        for (int i = 0; i < hp.n_layer; ++i) {
            layer & L = m.layers[i];
            if (L.on_gpu != on_gpu) continue;
            any = true;
            L.k_cache = ggml_new_tensor_2d(ctx, m.kv_type, hp.n_embd_kv(), m.n_ctx);
            L.v_cache = m.v_trans ? ggml_new_tensor_2d(ctx, m.kv_type, m.n_ctx, hp.n_embd_kv())
                                  : ggml_new_tensor_2d(ctx, m.kv_type, hp.n_embd_kv(), m.n_ctx);
            ggml_format_name(L.k_cache, "cache_k.%d", i);
            ggml_format_name(L.v_cache, "cache_v.%d", i);
        }
        if (!any) continue;
        ggml_backend_buffer_t buf =
            ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_dev_buffer_type(on_gpu ? m.dev_gpu : m.dev_cpu));
        if (buf == nullptr) throw decoder_error("out of memory for the KV cache (n_ctx " + std::to_string(m.n_ctx) + ")");
        // Positions past n_past are masked, but a masked NaN still poisons the weighted sum of V.
        // On the GPU a run reads keys up to a padded length (eval's kv_pad), past what was ever
        // written: start from zeros there. On the CPU a run reads only positions it or an earlier
        // run wrote, so the cache is not cleared: writing 1 GiB of zeros (7B, n_ctx 2048) would
        // cost seconds of page faults at load for nothing.
        if (on_gpu) ggml_backend_buffer_clear(buf, 0);
        m.buffers.push_back(buf);
    }
    m.cells.assign(m.n_ctx, kv_cell{});
}

// --- start the backends

// The backends that compute and the scheduler that splits each graph between them (GPU first: the
// scheduler prefers low indices), with room for one graph's metadata.
static void start_backends(model & m) {
    m.backend_cpu = ggml_backend_dev_init(m.dev_cpu, nullptr);
    if (m.backend_cpu == nullptr) throw decoder_error("cannot start ggml's CPU backend");
    ggml_backend_reg_t cpu_reg = ggml_backend_dev_backend_reg(m.dev_cpu);
    using set_threads_fn = void (*)(ggml_backend_t, int);
    auto set_threads = (set_threads_fn) ggml_backend_reg_get_proc_address(cpu_reg, "ggml_backend_set_n_threads");
    if (set_threads) set_threads(m.backend_cpu, m.n_threads);
    std::vector<ggml_backend_t> backends;
    if (m.dev_gpu) {
        m.backend_gpu = ggml_backend_dev_init(m.dev_gpu, nullptr);
        if (m.backend_gpu == nullptr) throw decoder_error(std::string("cannot start the GPU backend ") + ggml_backend_dev_name(m.dev_gpu));
        backends.push_back(m.backend_gpu);
    }
    backends.push_back(m.backend_cpu);
    // Per layer about 40 nodes, and about 12 more per route span (a view, the routed op and a
    // concat for each of the two norms and K and V); the inputs add a few per span.
    m.graph_size = std::max<size_t>(2048, (size_t) m.hp.n_layer * (64 + 12 * MAX_SPANS) + 256 + 4 * MAX_SPANS);
    m.graph_meta.resize(ggml_tensor_overhead() * m.graph_size + ggml_graph_overhead_custom(m.graph_size, false));
    m.sched = ggml_backend_sched_new(backends.data(), nullptr, (int) backends.size(), m.graph_size, false,
                                     /*op_offload =*/true);
    if (m.sched == nullptr) throw decoder_error("cannot create the ggml scheduler");
}

// --- the steps in order

// ggml's log while the registry starts and a pair loads (ggml_log_scope, owl2_gguf_file.h): ggml
// reports each tensor it repacks or uploads at INFO level, one line per tensor on a user's
// terminal, so keep warnings and errors and drop the chatter. Opening a file (gguf_file) captures
// the log instead: a bad file prints nothing but our one-line error.
size_t init_backends_quietly() {
    ggml_log_scope quiet(ggml_log_scope::mode::quiet);
    return ggml_backend_dev_count();
}

// Loading is two calls. open() checks the pair and the options and creates the weights'
// metadata: fast (no tensor data is read), and every fact of the model is known after it. place()
// does the slow part (repacks or uploads the weights, allocates the cache, starts the backends),
// which a caller may run on another thread meanwhile (docs/design.md §12). A step that throws
// leaves a partly built model, which the decoder's unique_ptr frees (~model releases whatever was made).
static void open(model & m, const std::string & base_path, const std::string & mam_path) {
    ggml_log_scope quiet(ggml_log_scope::mode::quiet);
    m.base = std::make_unique<gguf_file>(base_path, "decoder GGUF");
    m.hp = read_hparams(*m.base);
    m.mam = std::make_unique<gguf_file>(mam_path, "MAM GGUF");
    check_sidecar(*m.base, *m.mam, m.hp);
    m.hp.n_vocab = check_tensors(*m.base, *m.mam, m.hp);
    check_run_options(m);
    choose_devices(m);
    m.pending = std::make_unique<pair_weights>(create_weights(m));
}

static void place(model & m, const std::atomic<bool> & cancel) {
    if (m.placed) return;
    ggml_log_scope quiet(ggml_log_scope::mode::quiet);
    place_weights(m, *m.pending, cancel);
    m.pending.reset();
    allocate_kv_cache(m);
    start_backends(m);
    m.placed = true;
}

// --- build_graph(run) --------------------------------------------------------------------------------

// The positions of one graph: consecutive pieces, each of one input kind, one route and one
// sequence (a text run, an image's embeddings, the text after it; in a decode step, one token of
// each sequence). Q, O and the MLP multiply all of them at once; the routed weights (the norms,
// K and V) multiply each piece with its route's copy, as the upstream model splits a sequence by
// modality (docs/architecture.md, MAM).
struct piece {
    const int32_t * tokens = nullptr;  // [n], or
    const float * embeds = nullptr;    // [n, n_embd]
    int n = 0;
    int route = names::TEXT_ROUTE;
    int seq = 0;
    int pos = 0;  // the position of its first row in its sequence
};

// Consecutive positions of a graph that take one route (for the routed weights) or come as one
// kind of input (one input tensor): a decode step that carries a token of each of many
// sequences is one of each, however many sequences there are.
struct span {
    int start = 0, n = 0;  // positions
    int route = names::TEXT_ROUTE;
    bool tokens = false;
    size_t first_piece = 0, n_pieces = 0;
};

struct run {
    std::vector<piece> pieces;
    std::vector<span> route_spans, input_spans;
    int n = 0;  // positions, all pieces together
    int head = 0;  // the cache cells [head, head + n) take this run's K/V rows
    int n_kv = 0;  // cells attention reads, [0, n_kv) (the ones of other sequences are masked)
    std::vector<int32_t> outputs;  // the rows (of n) whose logits are wanted, ascending
};

struct graph {
    ggml_context * ctx = nullptr;
    ggml_cgraph * gf = nullptr;
    std::vector<ggml_tensor *> inputs;  // per piece: its tokens (I32 [n]) or embeddings (F32 [n_embd, n])
    ggml_tensor * inp_pos = nullptr;
    ggml_tensor * inp_mask = nullptr;  // [n_kv, n] 0 where a query may look, -inf elsewhere
    ggml_tensor * inp_outputs = nullptr;  // I32 [outputs] when more than the last row is wanted
    ggml_tensor * logits = nullptr;
    ~graph() {
        if (ctx) ggml_free(ctx);
    }
};

static ggml_tensor * rms_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w, float eps) {
    return ggml_mul(ctx, ggml_rms_norm(ctx, x, eps), w);
}

// Rotary position embedding of x [head_dim, heads, n] at positions pos [n], as LLaMA-2 has it: the
// first n_rot dims of each head, base rope_freq_base, no context extension. llama.cpp's normal
// (adjacent-pair) rope, not NeoX's split halves: the converter permuted the Q/K rows for it.
static ggml_tensor * rope(ggml_context * ctx, ggml_tensor * x, ggml_tensor * pos, const hparams & hp) {
    return ggml_rope_ext(ctx, x, pos, /*freq_factors =*/nullptr, hp.n_rot, GGML_ROPE_TYPE_NORMAL,
                         /*n_ctx_orig =*/hp.n_ctx_train, hp.rope_freq_base,
                         /*freq_scale =*/1.0f,   // positions as they are (no linear scaling)
                         /*ext_factor =*/0.0f,   // no YaRN, so its ramp (beta_*) is unused
                         /*attn_factor =*/1.0f,  // rotated values unscaled
                         /*beta_fast =*/0.0f, /*beta_slow =*/0.0f);
}

// Attention of this run's queries over the cache cells [0, n_kv), after writing the run's K/V
// into cells [head, head + n); the mask leaves each query its own sequence's earlier positions.
// q [head_dim, n_head, n], k [head_dim, n_head_kv, n], v [n_embd_kv, n].
static ggml_tensor * attention(ggml_context * ctx, ggml_cgraph * gf, const model & m, const layer & L,
                               const run & r, ggml_tensor * mask, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v) {
    const hparams & hp = m.hp;
    const int hd = hp.head_dim(), kv = hp.n_embd_kv(), n = r.n;

    // Write this run's keys and values into the cache; expanding them first keeps them ahead of
    // the reads below in the graph's order.
    ggml_tensor * k_dst = ggml_view_2d(ctx, L.k_cache, kv, n, L.k_cache->nb[1], r.head * L.k_cache->nb[1]);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_2d(ctx, k, kv, n), k_dst));
    if (m.v_trans) {
        ggml_tensor * v_dst = ggml_view_2d(ctx, L.v_cache, n, kv, L.v_cache->nb[1], r.head * ggml_element_size(L.v_cache));
        ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_transpose(ctx, v), v_dst));
    } else {
        ggml_tensor * v_dst = ggml_view_2d(ctx, L.v_cache, kv, n, L.v_cache->nb[1], r.head * L.v_cache->nb[1]);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, v, v_dst));
    }

    // [head_dim, n_kv, n_head_kv] views of the cache; queries as [head_dim, n, n_head].
    const size_t k_head = ggml_row_size(L.k_cache->type, hd);
    ggml_tensor * K = ggml_permute(ctx, ggml_view_3d(ctx, L.k_cache, hd, hp.n_head_kv, r.n_kv, k_head, L.k_cache->nb[1], 0), 0, 2, 1, 3);
    ggml_tensor * Q = ggml_permute(ctx, q, 0, 2, 1, 3);
    const float scale = 1.0f / std::sqrt((float) hd);

    if (m.params.flash_attn) {
        const size_t v_head = ggml_row_size(L.v_cache->type, hd);
        ggml_tensor * Vr = ggml_permute(ctx, ggml_view_3d(ctx, L.v_cache, hd, hp.n_head_kv, r.n_kv, v_head, L.v_cache->nb[1], 0), 0, 2, 1, 3);
        ggml_tensor * Kf = K->type == GGML_TYPE_F32 ? ggml_cast(ctx, K, GGML_TYPE_F16) : K;
        ggml_tensor * Vf = Vr->type == GGML_TYPE_F32 ? ggml_cast(ctx, Vr, GGML_TYPE_F16) : Vr;
        ggml_tensor * out = ggml_flash_attn_ext(ctx, Q, Kf, Vf, mask, scale, 0.0f, 0.0f);
        ggml_prec_set_acc(out, GGML_PREC_F32);
        return ggml_reshape_2d(ctx, out, hp.n_embd, n);  // out is [head_dim, n_head, n]
    }

    ggml_tensor * kq = ggml_mul_mat(ctx, K, Q);  // [n_kv, n, n_head]; GQA broadcasts K's heads
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    kq = ggml_soft_max_ext(ctx, kq, mask, scale, 0.0f);
    ggml_tensor * Vt;  // [n_kv, head_dim, n_head_kv]
    if (m.v_trans) {
        Vt = ggml_view_3d(ctx, L.v_cache, r.n_kv, hd, hp.n_head_kv, L.v_cache->nb[1], L.v_cache->nb[1] * hd, 0);
    } else {  // a quantized V: dequantize the rows in use, then lay them out transposed
        ggml_tensor * rows = ggml_cast(ctx, ggml_view_2d(ctx, L.v_cache, kv, r.n_kv, L.v_cache->nb[1], 0), GGML_TYPE_F32);
        Vt = ggml_cont(ctx, ggml_permute(ctx, ggml_reshape_3d(ctx, rows, hd, hp.n_head_kv, r.n_kv), 1, 2, 0, 3));
    }
    ggml_tensor * kqv = ggml_mul_mat(ctx, Vt, kq);  // [head_dim, n, n_head]
    return ggml_cont_2d(ctx, ggml_permute(ctx, kqv, 0, 2, 1, 3), hp.n_embd, n);
}

// The columns (positions) [start, start + n) of a [width, positions] tensor.
static ggml_tensor * columns(ggml_context * ctx, ggml_tensor * t, int start, int n) {
    return ggml_view_2d(ctx, t, t->ne[0], n, t->nb[1], (size_t) start * t->nb[1]);
}

// Groups the run's pieces into spans: a new span wherever same(previous piece, piece) is false.
template <typename Same>
static std::vector<span> spans_of(const std::vector<piece> & pieces, Same same) {
    std::vector<span> out;
    int start = 0;
    for (size_t i = 0; i < pieces.size(); ++i) {
        const piece & p = pieces[i];
        if (i == 0 || !same(pieces[i - 1], p)) out.push_back(span{start, 0, p.route, p.tokens != nullptr, i, 0});
        out.back().n += p.n;
        ++out.back().n_pieces;
        start += p.n;
    }
    return out;
}

static void find_spans(run & r) {
    r.route_spans = spans_of(r.pieces, [](const piece & a, const piece & b) { return a.route == b.route; });
    r.input_spans = spans_of(r.pieces, [](const piece & a, const piece & b) { return !a.tokens == !b.tokens; });
}

// f(span's route, span's columns of x) for each route span, side by side again. One span: f(x).
template <typename F>
static ggml_tensor * per_route(ggml_context * ctx, const run & r, ggml_tensor * x, F f) {
    if (r.route_spans.size() == 1) return f(r.route_spans[0].route, x);
    ggml_tensor * out = nullptr;
    for (const span & s : r.route_spans) {
        ggml_tensor * part = f(s.route, columns(ctx, x, s.start, s.n));
        out = out ? ggml_concat(ctx, out, part, 1) : part;
    }
    return out;
}

// RMS_norm[route](x): the normalisation is the same for every route, the learned scale is routed.
static ggml_tensor * routed_rms_norm(ggml_context * ctx, const run & r, ggml_tensor * x,
                                     ggml_tensor * const (&w)[2], float eps) {
    if (r.route_spans.size() == 1) return rms_norm(ctx, x, w[r.route_spans[0].route], eps);
    ggml_tensor * normed = ggml_rms_norm(ctx, x, eps);
    return per_route(ctx, r, normed, [&](int route, ggml_tensor * part) { return ggml_mul(ctx, part, w[route]); });
}

// W[route] @ x, span by span.
static ggml_tensor * routed_mul_mat(ggml_context * ctx, const run & r, ggml_tensor * x, ggml_tensor * const (&w)[2]) {
    return per_route(ctx, r, x, [&](int route, ggml_tensor * part) { return ggml_mul_mat(ctx, w[route], part); });
}

static void build_graph(graph & g, model & m, const run & r) {
    const hparams & hp = m.hp;
    ggml_init_params ip = {m.graph_meta.size(), m.graph_meta.data(), /*no_alloc =*/true};
    g.ctx = ggml_init(ip);
    ggml_context * ctx = g.ctx;
    g.gf = ggml_new_graph_custom(ctx, m.graph_size, false);
    const int n = r.n, hd = hp.head_dim();

    // The input rows: each input span's token embeddings or given embeddings, side by side.
    ggml_tensor * x = nullptr;
    for (const span & s : r.input_spans) {
        ggml_tensor * in;
        ggml_tensor * rows;
        if (s.tokens) {
            in = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, s.n);
            rows = ggml_get_rows(ctx, m.token_embd, in);
        } else {
            in = rows = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, hp.n_embd, s.n);
        }
        ggml_set_input(in);
        g.inputs.push_back(in);
        x = x ? ggml_concat(ctx, x, rows, 1) : rows;
    }
    g.inp_pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_input(g.inp_pos);
    g.inp_mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, r.n_kv, n);
    ggml_set_input(g.inp_mask);

    // Flash attention takes its mask in f16; one cast serves every layer.
    ggml_tensor * kq_mask = m.params.flash_attn ? ggml_cast(ctx, g.inp_mask, GGML_TYPE_F16) : g.inp_mask;

    for (const layer & L : m.layers) {
        // h = x + o_proj(attention(RMS_in[route](x)))
        ggml_tensor * cur = routed_rms_norm(ctx, r, x, L.attn_norm, hp.rms_eps);
        ggml_tensor * q = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, L.wq, cur), hd, hp.n_head, n);
        ggml_tensor * k = ggml_reshape_3d(ctx, routed_mul_mat(ctx, r, cur, L.wk), hd, hp.n_head_kv, n);
        ggml_tensor * v = routed_mul_mat(ctx, r, cur, L.wv);
        q = rope(ctx, q, g.inp_pos, hp);
        k = rope(ctx, k, g.inp_pos, hp);
        cur = attention(ctx, g.gf, m, L, r, kq_mask, q, k, v);
        ggml_tensor * h = ggml_add(ctx, ggml_mul_mat(ctx, L.wo, cur), x);

        // out = h + down(silu(gate(g)) * up(g)), g = RMS_post[route](h)
        cur = routed_rms_norm(ctx, r, h, L.ffn_norm, hp.rms_eps);
        cur = ggml_swiglu_split(ctx, ggml_mul_mat(ctx, L.ffn_gate, cur), ggml_mul_mat(ctx, L.ffn_up, cur));
        x = ggml_add(ctx, ggml_mul_mat(ctx, L.ffn_down, cur), h);
    }

    // The head only for the rows whose logits are wanted: all, the last one, or a few (the last
    // position of each sequence in a decode step).
    const int n_out = (int) r.outputs.size();
    if (n_out == 1 && r.outputs[0] == n - 1) {
        if (n > 1) x = ggml_view_2d(ctx, x, hp.n_embd, 1, x->nb[1], (size_t) (n - 1) * x->nb[1]);
    } else if (n_out < n) {
        g.inp_outputs = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_out);
        ggml_set_input(g.inp_outputs);
        x = ggml_get_rows(ctx, x, g.inp_outputs);
    }
    x = rms_norm(ctx, x, m.output_norm, hp.rms_eps);
    g.logits = ggml_mul_mat(ctx, m.output, x);
    ggml_set_output(g.logits);
    ggml_build_forward_expand(g.gf, g.logits);
}

static void set_inputs(const graph & g, const model & m, const run & r) {
    for (size_t k = 0; k < r.input_spans.size(); ++k) {  // each piece at its place in its span's input
        const span & s = r.input_spans[k];
        const size_t row_bytes = s.tokens ? sizeof(int32_t) : sizeof(float) * m.hp.n_embd;
        size_t offset = 0;
        for (size_t i = s.first_piece; i < s.first_piece + s.n_pieces; ++i) {
            const piece & p = r.pieces[i];
            const size_t bytes = row_bytes * p.n;
            ggml_backend_tensor_set(g.inputs[k], p.tokens ? (const void *) p.tokens : (const void *) p.embeds, offset, bytes);
            offset += bytes;
        }
    }
    // Each row's position in its sequence, and the mask: causal within the row's own sequence,
    // image keys included; every other sequence's cells are hidden.
    std::vector<int32_t> pos(r.n);
    std::vector<float> mask((size_t) r.n_kv * r.n);
    int i = 0;
    for (const piece & p : r.pieces) {
        for (int k = 0; k < p.n; ++k, ++i) {
            pos[i] = p.pos + k;
            float * row = mask.data() + (size_t) i * r.n_kv;
            for (int j = 0; j < r.n_kv; ++j) {
                const kv_cell & c = m.cells[j];
                row[j] = c.has(p.seq) && c.pos <= pos[i] ? 0.0f : -INFINITY;
            }
        }
    }
    ggml_backend_tensor_set(g.inp_pos, pos.data(), 0, ggml_nbytes(g.inp_pos));
    ggml_backend_tensor_set(g.inp_mask, mask.data(), 0, ggml_nbytes(g.inp_mask));
    if (g.inp_outputs) ggml_backend_tensor_set(g.inp_outputs, r.outputs.data(), 0, ggml_nbytes(g.inp_outputs));
}

// --- the cache's cells ---------------------------------------------------------------------------------

static int count_free(const model & m) {
    int n = 0;
    for (const kv_cell & c : m.cells) n += c.free();
    return n;
}

// Where the next `want` rows go: the first run of free cells that holds them all, else the
// longest one (the rows are then split between graphs). Always the start of a free run, so the
// cells ever written stay a prefix of the cache and attention, which reads up to the last cell in
// use, never reads one that was not (the CPU cache is not cleared, allocate_kv_cache). Returns {first cell, how many}; {0, 0} when full.
static std::pair<int, int> find_free_cells(const model & m, int want) {
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
static int used_end(const model & m) {
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

static void check_seq(int seq) {
    if (seq < 0 || seq >= MAX_SEQUENCES) {
        throw decoder_error("sequence id " + std::to_string(seq) + " is outside [0, " + std::to_string(MAX_SEQUENCES) + ")");
    }
}

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

// Runs the pieces' positions through the model in ubatches (a piece may be split between two, and
// a ubatch is cut short where the free cells are) and returns the logits of every position
// [total, n_vocab] row-major, or only of each sequence's last position.
static std::vector<float> eval(model & m, std::vector<piece> pieces, bool all_logits) {
    const int total = prepare_pieces(m, pieces);

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
        } catch (...) {
            for (int i = 0; i < r.n; ++i) m.cells[head + i] = kv_cell{};
            throw;
        }
        for (const piece & p : r.pieces) m.seq_len[p.seq] = std::max(m.seq_len[p.seq], p.pos + p.n);
        start += r.n;
    }
    return out;
}

// --- check_vocab(): the base file's vocabulary, before llama.cpp's tokenizer sees it ------------------
// llama.cpp's vocabulary loader trusts the file. With llama-cpp-python 0.3.36 a duplicate token or
// tokenizer model "bert" aborts the process while loading, and an empty token list, tokenizer model
// "none" or a vocabulary without byte tokens (e.g. every token empty) aborts it at the first
// tokenize (tests/test_hostile_gguf.py reproduces each). Only what the converter writes
// (convert/gguf_vocab.py) and llama.cpp's SPM tokenizer handles safely passes.

// llama.cpp's tokenizer keys come from the generated header (gguf-py's Keys.Tokenizer).
namespace vocab_keys {
static constexpr const char * MODEL = names::KEY_TOKENIZER_MODEL;
static constexpr const char * TOKENS = names::KEY_TOKENIZER_TOKENS;
static constexpr const char * SCORES = names::KEY_TOKENIZER_SCORES;
static constexpr const char * TOKEN_TYPE = names::KEY_TOKENIZER_TOKEN_TYPE;
// Every special token id, whatever its role (bos, eos, unknown, seperator, padding...), is named
// tokenizer.ggml.<role>_token_id in gguf-py's Keys.Tokenizer.
static constexpr std::string_view SPECIAL_ID_PREFIX = "tokenizer.ggml.";
static constexpr std::string_view SPECIAL_ID_SUFFIX = "_token_id";
}  // namespace vocab_keys

using names::SPM_TOKENIZER_MODEL;

// The token llama.cpp's SPM tokenizer spells a byte with when no piece covers it (byte fallback),
// as its byte_to_token looks it up: "<0x0A>".
static std::string byte_token(unsigned byte) {
    char text[8];
    snprintf(text, sizeof text, "<0x%02X>", byte);
    return text;
}

// Whether a token of type BYTE is one: llama.cpp takes its value from characters 3 and 4.
static bool is_byte_token(std::string_view t) {
    if (t.size() != 6) return false;
    const unsigned long b = std::strtoul(std::string(t.substr(3, 2)).c_str(), nullptr, 16);
    return b < 256 && t == byte_token((unsigned) b);
}

static int check_vocabulary(const gguf_file & f) {
    using namespace vocab_keys;
    check_architecture(f);
    const std::string model = f.get_str(MODEL);
    if (model != SPM_TOKENIZER_MODEL) {
        f.fail(std::string(MODEL) + " is '" + printable(model) + "', expected '" + SPM_TOKENIZER_MODEL +
               "' (llama.cpp's sentencepiece tokenizer)");
    }

    // The tokens: llama.cpp maps text -> id and asserts the map is as long as the list; its
    // tokenizer needs at least one token (and BOS) to add; Python reads every piece as UTF-8.
    const std::vector<std::string_view> tokens = f.get_arr_str(TOKENS);
    if (tokens.empty()) f.fail(std::string(TOKENS) + " is empty");
    if (tokens.size() > (size_t) INT32_MAX) {
        f.fail(std::string(TOKENS) + " has " + std::to_string(tokens.size()) + " tokens, more than token ids can number");
    }
    const int n_vocab = (int) tokens.size();
    std::unordered_map<std::string_view, int> ids;
    ids.reserve(tokens.size());
    for (int i = 0; i < n_vocab; ++i) {
        const std::string_view t = tokens[i];
        const std::string at = " at " + std::to_string(i);
        if (t.empty()) f.fail(std::string(TOKENS) + " has an empty token" + at);
        if (!is_utf8(t)) {
            f.fail(std::string(TOKENS) + " has a token that is not valid UTF-8" + at + " ('" + printable(t) + "')");
        }
        const auto [first, fresh] = ids.emplace(t, i);
        if (!fresh) {
            f.fail(std::string(TOKENS) + " has a duplicate token" + at + " (same as " + std::to_string(first->second) + ")");
        }
    }

    auto check_length = [&](const char * key, size_t n) {
        if (n != tokens.size()) {
            f.fail(std::string(key) + " has " + std::to_string(n) + " entries for " + std::to_string(n_vocab) +
                   " tokens");
        }
    };
    if (f.has(SCORES)) {  // the merge priorities: a NaN breaks the tokenizer's ordering
        const std::vector<float> scores = f.get_arr_f32(SCORES);
        check_length(SCORES, scores.size());
        for (int i = 0; i < n_vocab; ++i) {
            if (!std::isfinite(scores[i])) {
                f.fail(std::string(SCORES) + " has a score that is not finite at " + std::to_string(i));
            }
        }
    }
    if (f.has(TOKEN_TYPE)) {
        const std::vector<int32_t> types = f.get_arr_i32(TOKEN_TYPE);
        check_length(TOKEN_TYPE, types.size());
        for (int i = 0; i < n_vocab; ++i) {
            if (types[i] < LLAMA_TOKEN_TYPE_NORMAL || types[i] > LLAMA_TOKEN_TYPE_BYTE) {
                f.fail(std::string(TOKEN_TYPE) + " has type " + std::to_string(types[i]) + " at " + std::to_string(i) +
                       ", not one of llama.cpp's token types " + std::to_string(LLAMA_TOKEN_TYPE_NORMAL) + ".." +
                       std::to_string(LLAMA_TOKEN_TYPE_BYTE));
            }
            if (types[i] == LLAMA_TOKEN_TYPE_BYTE && !is_byte_token(tokens[i])) {
                f.fail(std::string(TOKENS) + " has a byte token '" + printable(tokens[i]) + "' at " + std::to_string(i) +
                       " that is not <0xHH>");
            }
        }
    }

    // Byte fallback: a piece the vocabulary cannot spell is written byte by byte, and llama.cpp
    // looks each byte up as <0xHH> (or the one-byte token) and aborts when neither exists.
    for (unsigned b = 0; b < 256; ++b) {
        const bool single = b >= 0x01 && b < 0x80 && ids.count(std::string(1, (char) b));
        if (!ids.count(byte_token(b)) && !single) {
            f.fail(std::string(TOKENS) + " has no token for the byte " + byte_token(b) +
                   " (llama.cpp's sentencepiece tokenizer needs one for each byte)");
        }
    }

    // llama.cpp quietly replaces (or drops) a special id outside the vocabulary: refuse it instead,
    // the runtime would use a token the file does not have.
    for (const std::string & key : f.keys()) {
        const std::string_view k = key;
        const bool special_id = k.size() > SPECIAL_ID_PREFIX.size() + SPECIAL_ID_SUFFIX.size() &&
                                k.substr(0, SPECIAL_ID_PREFIX.size()) == SPECIAL_ID_PREFIX &&
                                k.substr(k.size() - SPECIAL_ID_SUFFIX.size()) == SPECIAL_ID_SUFFIX;
        if (!special_id) continue;
        const uint32_t id = f.get_u32(key.c_str());
        if (id >= (uint32_t) n_vocab) {
            f.fail(printable(key) + " = " + std::to_string(id) + " is outside the vocabulary [0, " +
                   std::to_string(n_vocab) + ")");
        }
    }

    // The decoder's embedding table has one row per token: the ids the tokenizer gives must fit it.
    if (const gguf_tensor_info * embd = f.find(names::TOKEN_EMBD)) {
        if (embd->n_dims != 2 || embd->ne[1] != n_vocab) {
            f.fail(std::string(TOKENS) + " has " + std::to_string(n_vocab) + " tokens but tensor " + names::TOKEN_EMBD +
                   " has " + std::to_string(embd->n_dims == 2 ? embd->ne[1] : 0) + " rows");
        }
    }
    return n_vocab;
}

int check_vocab(const std::string & path) {
    const gguf_file f(path, "decoder GGUF");
    return check_vocabulary(f);
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

size_t kv_state::nbytes() const {
    size_t s = 0;
    for (const auto & x : k) s += x.size();
    for (const auto & x : v) s += x.size();
    return s;
}

// --- importance collection -------------------------------------------------------------------------
// The scheduler asks about every node (ask = true) and then hands over the ones we said yes to,
// computed: a multiplication by a weight matrix, whose src[1] holds the inputs [n_per_row, n].

static bool observe_node(ggml_tensor * t, bool ask, void * user_data) {
    model & m = *static_cast<model *>(user_data);
    if (t->op != GGML_OP_MUL_MAT) return ask ? false : true;
    auto it = m.weight_names.find(t->src[0]);
    if (ask) return it != m.weight_names.end();
    const ggml_tensor * x = t->src[1];
    // A weight's input is float32 rows [n_per_row, n], each row contiguous (build_graph makes them
    // so); anything else is not summed rather than summed wrongly (a missing entry shows).
    if (x->type != GGML_TYPE_F32 || x->nb[0] != sizeof(float) || x->ne[2] != 1 || x->ne[3] != 1) return true;
    const int64_t n_per_row = x->ne[0], n = x->ne[1];
    std::vector<uint8_t> host;
    const uint8_t * data = static_cast<const uint8_t *>(x->data);
    if (!ggml_backend_buffer_is_host(x->buffer)) {  // on a GPU: copy it out first
        host.resize(ggml_nbytes(x));
        ggml_backend_tensor_get(x, host.data(), 0, host.size());
        data = host.data();
    }
    importance_entry & e = m.importance[it->second];
    if (e.sum_sq.empty()) e.sum_sq.assign(n_per_row, 0.0f);
    for (int64_t r = 0; r < n; ++r) {
        const float * row = reinterpret_cast<const float *>(data + r * x->nb[1]);
        for (int64_t j = 0; j < n_per_row; ++j) e.sum_sq[j] += row[j] * row[j];
    }
    e.count += n;
    return true;
}

static void set_collecting(model & m, bool on) {
    m.collecting = on;
    m.importance.clear();
    m.weight_names.clear();
    if (on) {
        auto add = [&](const ggml_tensor * w) { m.weight_names[w] = ggml_get_name(w); };
        for (const layer & L : m.layers) {
            for (const ggml_tensor * w : {L.wq, L.wk[0], L.wk[1], L.wv[0], L.wv[1], L.wo, L.ffn_gate,
                                          L.ffn_up, L.ffn_down}) {
                add(w);
            }
        }
        add(m.output);
    }
    ggml_backend_sched_set_eval_callback(m.sched, on ? observe_node : nullptr, on ? &m : nullptr);
}

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

std::vector<float> decoder::eval_runs(const std::vector<run_input> & runs, bool all_logits) {
    call_lock hold(mutex_);
    model & m = ready();
    std::vector<piece> pieces;
    for (const run_input & in : runs) {
        if (in.n > INT32_MAX) throw context_full_error("far too many positions");
        pieces.push_back(piece{in.tokens, in.embeds, (int) in.n, in.route, in.seq});
    }
    return eval(m, pieces, all_logits);
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
    model & m = ready();
    if (n < 0 || n > m.seq_len[seq]) {
        throw decoder_error("cannot rewind " + std::to_string(n) + " positions; n_past is " + std::to_string(m.seq_len[seq]));
    }
    // The rows stay in the cache until another run takes their cells.
    const int keep = m.seq_len[seq] - n;
    drop_cells(m, seq, [keep](const kv_cell & c) { return c.pos < keep; });
    m.seq_len[seq] = keep;
}

void decoder::clear_sequence(int seq) {
    check_seq(seq);
    call_lock hold(mutex_);
    model & m = ready();
    drop_cells(m, seq, [](const kv_cell &) { return false; });
    m.seq_len[seq] = 0;
}

void decoder::copy_sequence(int src, int dst) {
    check_seq(src);
    check_seq(dst);
    call_lock hold(mutex_);
    model & m = ready();
    if (src == dst) return;
    drop_cells(m, dst, [](const kv_cell &) { return false; });
    for (kv_cell & c : m.cells) {
        if (c.has(src)) c.seqs |= uint64_t(1) << dst;
    }
    m.seq_len[dst] = m.seq_len[src];
}

static std::string cache_layout(const model & m) {
    return std::to_string(m.hp.n_layer) + "x" + std::to_string(m.hp.n_embd_kv()) + ":" + ggml_type_name(m.kv_type) +
           (m.v_trans ? ":vT" : ":v");
}

// A sequence's cells as stretches of consecutive cells holding consecutive positions, each
// {first cell, first position, length}, so that its rows move between the cache and a state in
// a few copies (one when the sequence lies in one stretch, the usual case).
struct stretch {
    int cell, pos, n;
};

static std::vector<stretch> stretches_of(const model & m, int seq) {
    std::vector<int> cell_of(m.seq_len[seq], -1);
    for (int j = 0; j < (int) m.cells.size(); ++j) {
        const kv_cell & c = m.cells[j];
        if (c.has(seq) && c.pos < m.seq_len[seq]) cell_of[c.pos] = j;
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

std::unique_ptr<kv_state> decoder::save_state(int seq) const {
    check_seq(seq);
    call_lock hold(mutex_);
    const model & m = ready();
    auto st = std::make_unique<kv_state>();
    const int n = m.seq_len[seq];
    st->n_past = n;
    st->layout = cache_layout(m);
    const std::vector<stretch> parts = stretches_of(m, seq);
    for (const layer & L : m.layers) {
        std::vector<uint8_t> k(n * L.k_cache->nb[1]);
        std::vector<uint8_t> v(m.v_trans ? n * ggml_element_size(L.v_cache) * m.hp.n_embd_kv() : n * L.v_cache->nb[1]);
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

void decoder::restore_state(const kv_state & st, int seq) {
    check_seq(seq);
    call_lock hold(mutex_);
    model & m = ready();
    if (st.layout != cache_layout(m) || st.n_past > m.n_ctx || st.k.size() != m.layers.size()) {
        throw decoder_error("this state was saved from a decoder with another cache layout or a larger context");
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

int decoder::n_vocab() const { return read([](const model & m) { return m.hp.n_vocab; }); }
int decoder::n_embd() const { return read([](const model & m) { return m.hp.n_embd; }); }
int decoder::n_ctx() const { return read([](const model & m) { return m.n_ctx; }); }
int decoder::n_layer() const { return read([](const model & m) { return m.hp.n_layer; }); }
int decoder::n_threads() const { return read([](const model & m) { return m.n_threads; }); }
bool decoder::flash_attn() const { return read([](const model & m) { return m.params.flash_attn; }); }

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
