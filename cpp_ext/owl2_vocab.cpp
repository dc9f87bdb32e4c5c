// check_vocab(): the base GGUF's vocabulary, checked before llama.cpp's tokenizer loads it.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <unordered_map>

#include "llama.h"  // llama_token_type only: the vocabulary check accepts what llama.cpp's tokenizer reads
#include "owl2_model.h"

namespace owl2 {

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

}  // namespace owl2
