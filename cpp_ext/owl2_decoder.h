// The mPLUG-Owl2 decoder (LLaMA-2 with the Modality-Adaptive Module) on ggml.
//
// Two GGUF files make one model: a stock llama.cpp LLaMA file (shared weights + the text route)
// and the MAM sidecar (the visual route: per layer attn_norm, attn_k, attn_v, ffn_norm). A call
// to eval() is one run of one modality; its graph takes that route's norms and K/V weights, and
// Q, O, the MLP and the output head are shared (docs/architecture.md §4).
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace owl2 {

// A file or an argument the decoder refuses (bad GGUF, mismatched pair, bad ids...). Python
// decodes the message as UTF-8 and shows it as one line, and a message may quote a hostile file:
// the constructor makes it one line of valid UTF-8 (see printable()).
struct decoder_error : std::runtime_error {
    explicit decoder_error(const std::string & what);
};

// The input would not fit in the context window; nothing was written to the cache.
struct context_full_error : decoder_error {
    using decoder_error::decoder_error;
};

// Whether `s` is valid UTF-8 as Python's strict decoder takes it (RFC 3629: no overlong forms,
// surrogates or code points above U+10FFFF).
bool is_utf8(std::string_view s);

// Text as a message may quote it: valid UTF-8 on one line (invalid bytes and control characters
// written as \xNN) and at most about max_bytes long (cut at a character, "..." added).
std::string printable(std::string_view text, size_t max_bytes = 200);

// Builds ggml's backend registry (the first call does; a CUDA build then reports its devices at
// INFO level) with that chatter silenced, and returns the number of devices. Call it before
// anything else touches the registry so a terminal never sees those lines.
size_t init_backends_quietly();

struct decoder_params {
    int n_ctx = 0;               // positions the KV cache holds, set by the caller (no default here): 0 is refused
    int n_threads = 0;           // <= 0: default_n_threads()
    std::string device = "auto"; // one of names::DEVICES: "auto" (a GPU when ggml has one), "cpu", "cuda"
    int n_gpu_layers = -1;       // < 0: all; layers >= n_layer - n_gpu_layers go to the GPU
    std::string kv_type = "f16"; // one of names::KV_TYPES: "f16", "f32", "q8_0"
    bool flash_attn = false;
    int n_ubatch = 512;          // positions per graph; longer runs are split
    bool repack = true;          // CPU: copy the weights ggml can repack into its faster layouts
                                 // and give their mapped pages back (false: every weight is used
                                 // in place from the mapped files; loads at once, slower matmuls)
    bool defer_placing = false;  // the constructor only opens and checks the pair; finish_loading()
                                 // then reads, repacks or uploads the weights (on any thread)
};

// The most sequences the KV cache can hold at once (each cell records its sequences in a 64-bit
// mask, docs/design.md §14).
constexpr int MAX_SEQUENCES = 64;

// The K/V rows of one sequence's n_past positions, in position order, copied to host memory
// (prefix reuse).
struct kv_state {
    int n_past = 0;
    std::string layout;                      // restore refuses a state of another cache layout
    std::vector<std::vector<uint8_t>> k, v;  // per layer
    size_t nbytes() const;
};

struct model;  // defined in owl2_model.h

// One run of decoder::eval_runs: n token ids or n embeddings [n, n_embd] (the caller keeps them
// alive for the call), through route 0 (text) or 1 (visual), appended to sequence `seq`.
struct run_input {
    const int32_t * tokens = nullptr;
    const float * embeds = nullptr;
    int64_t n = 0;
    int route = 0;
    int seq = 0;
};

// Which layers a pass runs (decoder::eval_runs): from first_layer's input to the end, its runs
// then being the hidden states at that input (embeddings, each with its route), and the layers
// whose input hidden states it gives out (ascending; n_layer: the final norm's input). The
// recipe chooser runs a lowered group's layers and those after it only, from states it kept.
struct pass_range {
    int first_layer = 0;
    std::vector<int> capture;
};

// Importance statistics of one weight matrix (an importance matrix's entry, llama.cpp's
// imatrix): per input column, the sum over every position that went through the matrix of the
// squared input value, and how many positions that was.
struct importance_entry {
    std::vector<float> sum_sq;  // [n_per_row]
    int64_t count = 0;
};

class decoder {
public:
    decoder(const std::string & base_path, const std::string & mam_path, const decoder_params & params);
    ~decoder();
    decoder(const decoder &) = delete;

    // With params.defer_placing: the slow half of loading (does nothing when it is done already).
    // Every call below except the facts raises decoder_error until it has run.
    void finish_loading();
    // Makes a running finish_loading() stop at its next tensor (decoder_error "cancelled"); takes
    // no lock, so it works while that call holds the decoder. close() does it too.
    void cancel_loading();
    decoder & operator=(const decoder &) = delete;

    // Runs of either kind in one pass (one graph per n_ubatch positions): Q, O and the MLP
    // multiply every position at once, each run's positions take its route's norms and K/V
    // (route 0 = text, 1 = visual). Each run is appended to its sequence, after that sequence's
    // n_past positions; a sequence's runs come one after another, and several sequences may share
    // a call (a decode step: one token of each). A query sees only its own sequence's keys.
    // Returns the logits of every position [n, n_vocab] row-major, or of the last position of each
    // sequence in the call [n_seq, n_vocab], in the order the sequences come.
    // With a pass_range: from its first layer (the cache cells of the layers before it are left
    // unwritten for these positions: such a sequence is only continued by passes from that layer
    // or later), and with `captured` [capture layer][n * n_embd] its hidden states.
    std::vector<float> eval_runs(const std::vector<run_input> & runs, bool all_logits, const pass_range & range = {},
                                 std::vector<std::vector<float>> * captured = nullptr);

    // The cache, per sequence (0 unless said otherwise; 0 <= seq < MAX_SEQUENCES).
    int n_past(int seq = 0) const;               // positions the sequence holds
    void rewind(int n, int seq = 0);             // forget its last n positions
    void clear_sequence(int seq);                // forget all of them
    void copy_sequence(int src, int dst);        // dst becomes src (sharing its cells: no copy of K/V)
    int n_free() const;                          // cells no sequence holds
    // The sequence's first n_positions positions (-1: all it holds), e.g. a prompt's picture prefix.
    std::unique_ptr<kv_state> save_state(int seq = 0, int n_positions = -1) const;
    void restore_state(const kv_state & state, int seq = 0);  // replaces what seq held

    int n_vocab() const;
    int n_embd() const;
    int n_ctx() const;
    int n_layer() const;
    int n_threads() const;
    std::string device_name() const;  // the backend the layers run on, e.g. "CPU" or "CUDA0"
    std::string kv_type() const;
    std::string cache_layout() const;  // what a kv_state's layout must be to restore here
    bool flash_attn() const;

    // While collecting, every run adds the inputs of each weight matrix it multiplies to that
    // matrix's entry, keyed by the weight's ggml name (the sidecar's end in ".visual"). start
    // clears what was collected; take returns it and stops. Runs are slower while collecting.
    void start_importance();
    std::map<std::string, importance_entry> take_importance();

    // A weight matrix replaced by other data (another type's encoding of it) until
    // clear_overrides(): the recipe chooser measures a lowered group without writing a pair.
    // `name` as the base names it; `visual`: the sidecar's copy.
    void override_weight(const std::string & name, bool visual, int ggml_type, const uint8_t * data, size_t n_bytes);
    void clear_overrides();
    int n_overrides() const;

    void close();  // waits for a running call, then frees everything; any later call raises decoder_error
    bool closed() const;

private:
    // Every public method holds this for its whole call, close() included. The bindings release
    // the GIL while a call runs, so calls may come from several threads at once: one runs at a
    // time, and close() can never free the model under a running eval. It lives here, not in the
    // model, because close() destroys the model while holding it.
    mutable std::mutex mutex_;
    std::atomic<bool> cancel_loading_{false};
    std::unique_ptr<model> m_;
    model & live() const;   // the open model (the caller holds mutex_), or decoder_error "closed"
    model & ready() const;  // the open model with its weights placed, or decoder_error
    // One fact of the open model, read under mutex_: fact(const model &).
    template <typename Fact> auto read(Fact fact) const;
};

// Physical cores (Linux: distinct thread-sibling sets), else half the hardware threads, >= 1.
int physical_cores();

// The most threads a caller may ask for: ggml's GGML_MAX_N_THREADS (its CPU backend asserts
// above it) and 4 x the hardware threads (more only adds contention; a mistyped 100000 must not
// start 100000 threads).
int max_n_threads();

// The one default thread count, of the decoder and the quantizer: the physical cores, at most
// max_n_threads().
int default_n_threads();

// The base GGUF's vocabulary, checked before llama.cpp's tokenizer loads it (llama.cpp aborts
// the process on some bad vocabularies, at load or at the first tokenize): the converter's SPM
// ("llama") vocabulary or a decoder_error naming the file, the key and what is wrong. Returns
// n_vocab.
int check_vocab(const std::string & path);

}  // namespace owl2
