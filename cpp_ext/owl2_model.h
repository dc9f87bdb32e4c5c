// The decoder's own header (not the bindings'): the model's structs that its files share, and
// the functions one file calls in another, each under the file that defines it.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ggml-backend.h"
#include "ggml.h"
#include "owl2_decoder.h"
#include "owl2_gguf_file.h"
#include "owl2_names.h"

namespace owl2 {

// --- Names ---------------------------------------------------------------------------------------
// GGUF keys, tensor names, layer parts, devices and KV types come from owl2_names.h, generated at
// build time from owl2_edge/names.py and gguf_names.py (the one table of names). The table gives a
// layer part's short name; its tensor in layer i is named by llama.cpp's pattern (blk.%d.%s.weight):

namespace names {
inline std::string blk(int i, const char * part) {
    char name[GGML_MAX_NAME * 2];
    snprintf(name, sizeof name, LAYER_TENSOR_FORMAT, i, part);
    return name;
}
}  // namespace names

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

    // Weight matrices replaced for a while (override_weight): the field, what it held, and the
    // replacement's own metadata and buffer. clear_overrides() puts every original back.
    struct weight_override {
        ggml_tensor ** field;
        ggml_tensor * original;
        ggml_context * ctx;
        ggml_backend_buffer_t buf;
    };
    std::vector<weight_override> overrides;

    // Importance collection (start_importance): the weight matrices by tensor, and what their
    // inputs added up to so far.
    bool collecting = false;
    std::map<const ggml_tensor *, std::string> weight_names;
    std::map<std::string, importance_entry> importance;

    // Both in owl2_load.cpp, after pair_weights, which the model may still hold.
    model();
    ~model();
};

// --- the run a graph computes (owl2_graph.cpp builds it, eval() in owl2_decoder.cpp cuts it) ------

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
    // A pass from the middle (decoder::eval_runs): the pieces are the hidden states at this
    // layer's input and the layers before it are skipped; `capture`: the layers (n_layer: the
    // final norm) whose input hidden states the graph gives out, ascending.
    int first_layer = 0;
    std::vector<int> capture;
};

struct graph {
    ggml_context * ctx = nullptr;
    ggml_cgraph * gf = nullptr;
    std::vector<ggml_tensor *> inputs;  // per piece: its tokens (I32 [n]) or embeddings (F32 [n_embd, n])
    ggml_tensor * inp_pos = nullptr;
    ggml_tensor * inp_mask = nullptr;  // [n_kv, n] 0 where a query may look, -inf elsewhere
    ggml_tensor * inp_outputs = nullptr;  // I32 [outputs] when more than the last row is wanted
    ggml_tensor * logits = nullptr;
    std::vector<ggml_tensor *> captured;  // F32 [n_embd, n] per run.capture layer
    ~graph() {
        if (ctx) ggml_free(ctx);
    }
};

// --- owl2_load.cpp -------------------------------------------------------------------------------------

// Both files must say they are llama models before any key is read under llama's names (the
// vocabulary check reads the base file's too).
void check_architecture(const gguf_file & f);

// Loading is two calls: open() checks the pair and the options and creates the weights' metadata,
// place() does the slow part (repacks or uploads the weights, allocates the cache, starts the
// backends); place() does nothing when it has run.
void open(model & m, const std::string & base_path, const std::string & mam_path);
void place(model & m, const std::atomic<bool> & cancel);

// One weight matrix replaced by other data, of any type its rows take (the recipe chooser lowers a
// group this way instead of writing and loading a pair): `name` as the base names it, `visual`
// for the sidecar's copy; n_bytes must be the type's size for the matrix's shape. It is placed as
// load() would place it (the GPU, or a repacked CPU layout where ggml has one for the type).
void override_weight(model & m, const std::string & name, bool visual, ggml_type type, const uint8_t * data,
                     size_t n_bytes);
void clear_overrides(model & m);

// --- owl2_graph.cpp ------------------------------------------------------------------------------------

// Groups the run's pieces into its route spans and input spans.
void find_spans(run & r);
// The run's graph in g (metadata in m.graph_meta), and then its inputs once the scheduler has
// allocated it.
void build_graph(graph & g, model & m, const run & r);
void set_inputs(const graph & g, const model & m, const run & r);

// --- owl2_kv_cache.cpp ---------------------------------------------------------------------------------

int count_free(const model & m);
std::pair<int, int> find_free_cells(const model & m, int want);
int used_end(const model & m);
void check_seq(int seq);

// The decoder's cache calls on an open model (the caller holds the decoder's lock and has checked
// the sequence ids).
void rewind_seq(model & m, int n, int seq);
void clear_seq(model & m, int seq);
void copy_seq(model & m, int src, int dst);
std::unique_ptr<kv_state> save_seq(const model & m, int seq, int n_positions);
// Layers, K/V width, type and V layout: a state restores only into a cache of the same.
std::string cache_layout(const model & m);
void restore_seq(model & m, const kv_state & st, int seq);

// --- owl2_importance.cpp -------------------------------------------------------------------------------

// Starts (on) or stops importance collection: clears what was collected either way.
void set_collecting(model & m, bool on);

}  // namespace owl2
