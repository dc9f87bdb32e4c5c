// Loading a pair: check both files, choose the devices, create the weights' tensors, place their
// data, allocate the KV cache and start the backends (load() below says the steps in order).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <set>
#include <string_view>
#include <thread>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "owl2_model.h"
#include "quantize.h"

namespace owl2 {

// --- load() ------------------------------------------------------------------------------------------
// load() is a list of steps, defined below in the order it takes them: check the pair, choose the
// devices, create the weights' tensor metadata, place their data, allocate the KV cache, start the
// backends. Every file is checked before ggml sees any of its tensors, so that a bad file becomes a
// decoder_error naming the file instead of an abort inside ggml.

// --- check the pair

// Both files must say they are llama models before any key is read under llama's names.
void check_architecture(const gguf_file & f) {
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
        for (int p = 0; p < names::N_LAYER_PARTS; ++p) {
            const names::layer_part_info & part = names::LAYER_PARTS[p];
            const bool norm = part.ne1 == names::dim::none;  // a vector the graph multiplies by elementwise
            expect(base, names::blk(i, part.name), resolve(part.ne0, hp), resolve(part.ne1, hp),
                   seen_base, norm ? GGML_TYPE_F32 : GGML_TYPE_COUNT);
        }
        // The routed parts' visual copies in the sidecar: norms f32, K/V of any type. Each route's K/V
        // is its own mul_mat with a float32 result (owl2_graph.cpp, routed_mul_mat), so a recipe may
        // give the visual route other types than the text route (docs/quantize.md, per-tensor types).
        for (int p = 0; p < names::N_LAYER_PARTS; ++p) {
            const names::layer_part_info & part = names::LAYER_PARTS[p];
            if (!part.routed) continue;
            const bool norm = part.ne1 == names::dim::none;
            expect(mam, names::blk(i, part.name), resolve(part.ne0, hp), resolve(part.ne1, hp), seen_mam,
                   norm ? GGML_TYPE_F32 : GGML_TYPE_COUNT);
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

model::model() = default;

model::~model() {
    pending.reset();
    clear_overrides(*this);
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
static bool buft_takes_matmul(ggml_backend_dev_t dev, ggml_backend_buffer_type_t buft, ggml_type type, int n_dims,
                              const int64_t * ne) {
    ggml_init_params ip = {ggml_tensor_overhead() * 4, nullptr, true};
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * w = ggml_new_tensor(ctx, type, n_dims, ne);
    ggml_tensor * op = ggml_mul_mat(ctx, w, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne[0], 512));
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
            if (buft_takes_matmul(m.dev_cpu, r.repack_buft, info.type, info.n_dims, info.ne)) {
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
    m.n_threads = m.params.n_threads > 0 ? m.params.n_threads : default_n_threads();
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
void open(model & m, const std::string & base_path, const std::string & mam_path) {
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

void place(model & m, const std::atomic<bool> & cancel) {
    if (m.placed) return;
    ggml_log_scope quiet(ggml_log_scope::mode::quiet);
    place_weights(m, *m.pending, cancel);
    m.pending.reset();
    allocate_kv_cache(m);
    start_backends(m);
    m.placed = true;
}


// --- weights replaced for a while (override_weight)

// The model's field that holds one weight matrix of the pair: `name` as the base names it,
// `visual` for the sidecar's copy. nullptr for anything else (the norms are never retyped).
static ggml_tensor ** matrix_field(model & m, const std::string & name, bool visual) {
    if (!visual && name == names::OUTPUT) return &m.output;
    if (!visual && name == names::TOKEN_EMBD) return &m.token_embd;
    for (int i = 0; i < m.hp.n_layer; ++i) {
        for (int p = 0; p < names::N_LAYER_PARTS; ++p) {
            if (names::blk(i, names::LAYER_PARTS[p].name) != name) continue;
            const names::layer_part part = (names::layer_part) p;
            if (part == names::ATTN_NORM || part == names::FFN_NORM || (visual && !names::LAYER_PARTS[p].routed)) {
                return nullptr;
            }
            return &layer_weight(m.layers[i], part, visual ? names::VISUAL_ROUTE : names::TEXT_ROUTE);
        }
    }
    return nullptr;
}

void override_weight(model & m, const std::string & name, bool visual, ggml_type type, const uint8_t * data,
                     size_t n_bytes) {
    const std::string shown = name + (visual ? " (the sidecar's)" : "");
    ggml_tensor ** field = matrix_field(m, name, visual);
    if (field == nullptr) throw decoder_error("no weight matrix " + shown);
    for (const auto & o : m.overrides) {
        if (o.field == field) throw decoder_error(shown + " is replaced already");
    }
    ggml_tensor * original = *field;
    if (type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size(type) <= 0 || original->ne[0] % ggml_blck_size(type) != 0) {
        throw decoder_error(shown + ": its rows cannot take type " + std::to_string((int) type));
    }
    const size_t want = ggml_row_size(type, original->ne[0]) * (size_t) original->ne[1];
    if (n_bytes != want) {
        throw decoder_error(shown + ": " + std::to_string(n_bytes) + " bytes given; " + ggml_type_name(type) +
                            " takes " + std::to_string(want));
    }
    // Placed as load() places a matrix: where the original is (a GPU), or on the CPU in a
    // repacked layout when ggml has one that takes this type, so that the passes compute as
    // they would with the pair written and loaded.
    ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
    if (original->buffer != nullptr && !ggml_backend_buffer_is_host(original->buffer)) {
        buft = ggml_backend_buffer_get_type(original->buffer);
    } else if (m.params.repack && field != &m.token_embd) {
        for (ggml_backend_buffer_type_t r : cpu_repack_bufts(m.dev_cpu)) {
            if (buft_takes_matmul(m.dev_cpu, r, type, 2, original->ne)) {
                buft = r;
                break;
            }
        }
    }
    ggml_context * ctx = new_meta_context(1);
    ggml_tensor * t = ggml_new_tensor(ctx, type, 2, original->ne);
    ggml_set_name(t, original->name);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
    if (buf == nullptr) {
        ggml_free(ctx);
        throw decoder_error("out of memory for " + shown);
    }
    {
        ggml_log_scope quiet(ggml_log_scope::mode::quiet);  // ggml says each repack, as at load
        ggml_backend_tensor_set(t, data, 0, n_bytes);
    }
    m.overrides.push_back({field, original, ctx, buf});
    *field = t;
    if (auto it = m.weight_names.find(original); it != m.weight_names.end()) m.weight_names[t] = it->second;
}

void clear_overrides(model & m) {
    for (auto it = m.overrides.rbegin(); it != m.overrides.rend(); ++it) {
        m.weight_names.erase(*it->field);
        *it->field = it->original;
        ggml_backend_buffer_free(it->buf);
        ggml_free(it->ctx);
    }
    m.overrides.clear();
}

}  // namespace owl2
