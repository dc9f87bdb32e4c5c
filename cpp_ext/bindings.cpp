// Python module owl2_edge._decoder: the native half of owl2-edge.
#include <algorithm>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include "owl2_decoder.h"
#include "owl2_names.h"
#include "quantize.h"

namespace nb = nanobind;

using FloatMatrix = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using FloatVector = nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using ByteMatrix = nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using TokenVector = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;


// Logits as a numpy array [rows, n_vocab] that owns the decoder's vector. The shape comes from the
// runs, not from asking the decoder again: a close() on another thread right after the eval must
// not turn its finished result into an error.
static nb::object to_numpy(std::vector<float> && logits, size_t rows) {
    auto * owned = new std::vector<float>(std::move(logits));
    nb::capsule owner(owned, [](void * p) noexcept { delete static_cast<std::vector<float> *>(p); });
    return nb::cast(nb::ndarray<nb::numpy, float, nb::ndim<2>>(owned->data(), {rows, owned->size() / rows}, owner));
}

NB_MODULE(_decoder, m) {
    m.doc() = "owl2-edge native code on ggml (from the llama-cpp-python install)";

    m.def("init_backends", &owl2::init_backends_quietly,
          "Build ggml's device registry quietly; returns the number of devices.");
    m.def("ggml_type_from_name", &owl2::ggml_type_from_name, nb::arg("name"));
    m.def("ggml_type_name", &owl2::ggml_type_to_name, nb::arg("type"));
    m.def("row_bytes", &owl2::row_bytes, nb::arg("type"), nb::arg("n_per_row"));

    m.def(
        "quantize",
        [](FloatMatrix values, int type, int n_threads, std::optional<FloatVector> importance) {
            const int64_t rows = values.shape(0), cols = values.shape(1);
            const size_t rb = owl2::row_bytes(type, cols);
            if (importance && (int64_t) importance->shape(0) != cols) {
                throw std::invalid_argument("importance must hold one weight per column (" +
                                            std::to_string(cols) + "), not " +
                                            std::to_string(importance->shape(0)));
            }
            auto * out = new uint8_t[rows * rb];
            nb::capsule owner(out, [](void * p) noexcept { delete[] static_cast<uint8_t *>(p); });
            {
                nb::gil_scoped_release release;
                owl2::quantize_rows(type, values.data(), out, rows, cols,
                                    n_threads > 0 ? n_threads : owl2::default_n_threads(),
                                    importance ? importance->data() : nullptr);
            }
            return nb::ndarray<nb::numpy, uint8_t, nb::ndim<2>>(out, {(size_t) rows, rb}, owner);
        },
        nb::arg("values"), nb::arg("type"), nb::arg("n_threads") = 0, nb::arg("importance") = nb::none(),
        "Quantize a C-contiguous float32 matrix [rows, cols] to ggml type `type`; returns the raw "
        "blocks as uint8 [rows, row_bytes]. importance: None or float32 [cols], the importance "
        "matrix's weights for these columns.");

    m.def(
        "dequantize",
        [](ByteMatrix blocks, int type, int64_t n_per_row) {
            const int64_t rows = blocks.shape(0);
            if ((size_t) blocks.shape(1) != owl2::row_bytes(type, n_per_row)) {
                throw std::invalid_argument("blocks do not have the row size of that type and width");
            }
            auto * out = new float[rows * n_per_row];
            nb::capsule owner(out, [](void * p) noexcept { delete[] static_cast<float *>(p); });
            {
                nb::gil_scoped_release release;
                owl2::dequantize_rows(type, blocks.data(), out, rows, n_per_row);
            }
            return nb::ndarray<nb::numpy, float, nb::ndim<2>>(out, {(size_t) rows, (size_t) n_per_row}, owner);
        },
        nb::arg("blocks"), nb::arg("type"), nb::arg("n_per_row"),
        "Convert raw ggml blocks [rows, row_bytes] back to float32 [rows, n_per_row].");

    // --- the decoder (owl2_edge/decoder.py wraps this and maps the errors) ---------------------

    // Native errors keep their own Python types here; decoder.py turns them into
    // owl2_edge.errors.DecoderError / ContextFullError (the runtime's one set of error types).
    auto decoder_error = nb::exception<owl2::decoder_error>(m, "NativeDecoderError");
    nb::exception<owl2::context_full_error>(m, "NativeContextFullError", decoder_error);

    m.attr("MAX_SEQUENCES") = owl2::MAX_SEQUENCES;
    m.def("names_digest", [] { return std::string(owl2::names::DIGEST); },
          "Digest of the names header this extension was built from (see cpp_ext/gen_names_header.py).");
    m.def("default_n_threads", &owl2::default_n_threads,
          "The one default thread count (physical cores, at most max_n_threads()) of the decoder, the "
          "quantizer, llama.cpp's quantizer and ONNX Runtime.");
    m.def("max_n_threads", &owl2::max_n_threads,
          "The most threads Decoder(n_threads=) and quantize(n_threads=) accept: ggml's GGML_MAX_N_THREADS, "
          "and at most 4 x the hardware threads.");
    m.def(
        "check_vocab",
        [](const std::string & path) {
            nb::gil_scoped_release release;
            return owl2::check_vocab(path);
        },
        nb::arg("path"),
        "Check the vocabulary of a base (decoder) GGUF before llama.cpp's tokenizer loads it, which "
        "aborts the process on some bad ones; returns n_vocab. Raises NativeDecoderError naming the file, "
        "the key and what is wrong.");

    nb::class_<owl2::kv_state>(m, "KVState", "A copy of the KV cache's first n_past positions.")
        .def_ro("n_past", &owl2::kv_state::n_past)
        .def_ro("layout", &owl2::kv_state::layout, "The cache's layers, width, type and V layout: "
                "restore_state refuses a state of another.")
        .def_prop_ro("nbytes", &owl2::kv_state::nbytes)
        .def(
            "parts",
            [](const owl2::kv_state & st) {
                // Copies (bytes own their memory): the state may be freed while they are written out.
                nb::list out;
                for (size_t i = 0; i < st.k.size(); ++i) {
                    out.append(nb::bytes(reinterpret_cast<const char *>(st.k[i].data()), st.k[i].size()));
                    out.append(nb::bytes(reinterpret_cast<const char *>(st.v[i].data()), st.v[i].size()));
                }
                return out;
            },
            "Its bytes, each layer's K then V: what from_parts takes back (owl2_edge/disk_cache.py).")
        .def_static(
            "from_parts",
            [](int n_past, const std::string & layout, const std::vector<nb::bytes> & parts) {
                if (parts.size() % 2 != 0) throw owl2::decoder_error("a state needs a K and a V part per layer");
                auto st = std::make_unique<owl2::kv_state>();
                st->n_past = n_past;
                st->layout = layout;
                for (size_t i = 0; i < parts.size(); i += 2) {
                    const auto * k = static_cast<const uint8_t *>(parts[i].data());
                    const auto * v = static_cast<const uint8_t *>(parts[i + 1].data());
                    st->k.emplace_back(k, k + parts[i].size());
                    st->v.emplace_back(v, v + parts[i + 1].size());
                }
                return st;
            },
            nb::arg("n_past"), nb::arg("layout"), nb::arg("parts"),
            "A state from parts() and its n_past and layout; restore_state checks that they fit its cache.");

    // Every decoder method waits for the decoder's lock (owl2_decoder.h) while a call on another
    // thread runs: wait without the GIL, so that the other Python threads are not stalled for an eval.
    const auto without_gil = nb::call_guard<nb::gil_scoped_release>();

    nb::class_<owl2::decoder>(m, "Decoder")
        .def(
            "__init__",
            [](owl2::decoder * self, const std::string & base, const std::string & mam, int n_ctx, int n_threads,
               const std::string & device, int n_gpu_layers, const std::string & kv_type, bool flash_attn,
               int n_ubatch, bool repack, bool defer_placing) {
                owl2::decoder_params p;
                p.n_ctx = n_ctx;
                p.n_threads = n_threads;
                p.device = device;
                p.n_gpu_layers = n_gpu_layers;
                p.kv_type = kv_type;
                p.flash_attn = flash_attn;
                p.n_ubatch = n_ubatch;
                p.repack = repack;
                p.defer_placing = defer_placing;
                nb::gil_scoped_release release;
                new (self) owl2::decoder(base, mam, p);
            },
            nb::arg("base_path"), nb::arg("mam_path"), nb::arg("n_ctx"), nb::arg("n_threads") = 0,
            nb::arg("device") = "auto", nb::arg("n_gpu_layers") = -1, nb::arg("kv_type") = "f16",
            nb::arg("flash_attn") = false, nb::arg("n_ubatch") = 512, nb::arg("repack") = true,
            nb::arg("defer_placing") = false)
        .def("finish_loading", &owl2::decoder::finish_loading, without_gil)
        .def("cancel_loading", &owl2::decoder::cancel_loading)
        .def(
            "eval_runs",
            [](owl2::decoder & d, const std::vector<std::tuple<nb::object, int, int>> & runs, bool all_logits,
               int first_layer, const std::vector<int> & capture) -> nb::object {
                // Token ids are copied; embeddings are read in place (the caller's list keeps them).
                std::vector<std::vector<int32_t>> ids(runs.size());
                std::vector<owl2::run_input> inputs;
                int64_t total = 0, n_seq = 0;
                for (size_t i = 0; i < runs.size(); ++i) {
                    owl2::run_input in;
                    const nb::object & data = std::get<0>(runs[i]);
                    in.route = std::get<1>(runs[i]);
                    in.seq = std::get<2>(runs[i]);
                    n_seq += i == 0 || std::get<2>(runs[i - 1]) != in.seq;
                    TokenVector tokens;
                    FloatMatrix embeds;
                    if (nb::try_cast(data, tokens)) {
                        ids[i].assign(tokens.data(), tokens.data() + tokens.shape(0));
                        in.tokens = ids[i].data();
                        in.n = (int64_t) ids[i].size();
                    } else if (nb::try_cast(data, embeds)) {
                        if ((int64_t) embeds.shape(1) != d.n_embd()) {
                            throw owl2::decoder_error("embeddings must be [n, " + std::to_string(d.n_embd()) +
                                                      "], got width " + std::to_string(embeds.shape(1)));
                        }
                        in.embeds = embeds.data();
                        in.n = (int64_t) embeds.shape(0);
                    } else {
                        throw owl2::decoder_error("a run is int32 ids [n] or float32 embeddings [n, n_embd]");
                    }
                    total += in.n;
                    inputs.push_back(in);
                }
                std::vector<float> out;
                std::vector<std::vector<float>> captured;
                {
                    nb::gil_scoped_release release;
                    out = d.eval_runs(inputs, all_logits, owl2::pass_range{first_layer, capture}, &captured);
                }
                nb::object logits = to_numpy(std::move(out), (size_t) std::max<int64_t>(all_logits ? total : n_seq, 1));
                if (capture.empty()) return logits;
                nb::list states;
                for (std::vector<float> & rows : captured) states.append(to_numpy(std::move(rows), (size_t) total));
                return nb::make_tuple(logits, states);
            },
            nb::arg("runs"), nb::arg("all_logits"), nb::arg("first_layer") = 0, nb::arg("capture") = std::vector<int>(),
            "runs: (int32 ids [n] or float32 embeddings [n, n_embd], route, sequence) each. Logits "
            "[positions, n_vocab], or [sequences, n_vocab]: each sequence's last position. "
            "first_layer: the runs are hidden states at that layer's input (pass_range); capture: "
            "layers whose input states are returned too, as (logits, [float32 [positions, n_embd]]).")
        .def("n_past", &owl2::decoder::n_past, nb::arg("seq") = 0, without_gil)
        .def("n_free", &owl2::decoder::n_free, without_gil)
        .def("rewind", &owl2::decoder::rewind, nb::arg("n"), nb::arg("seq") = 0, without_gil)
        .def("clear_sequence", &owl2::decoder::clear_sequence, nb::arg("seq"), without_gil)
        .def("copy_sequence", &owl2::decoder::copy_sequence, nb::arg("src"), nb::arg("dst"), without_gil)
        .def("start_importance", &owl2::decoder::start_importance, without_gil)
        .def(
            "take_importance",
            [](owl2::decoder & d) {
                std::map<std::string, owl2::importance_entry> got;
                {
                    nb::gil_scoped_release release;
                    got = d.take_importance();
                }
                nb::dict out;
                for (auto & [name, e] : got) {
                    auto * sums = new std::vector<float>(std::move(e.sum_sq));
                    nb::capsule owner(sums, [](void * p) noexcept { delete static_cast<std::vector<float> *>(p); });
                    out[nb::str(name.c_str())] = nb::make_tuple(
                        nb::ndarray<nb::numpy, float, nb::ndim<1>>(sums->data(), {sums->size()}, owner), e.count);
                }
                return out;
            },
            "What start_importance collected, and stop: {ggml weight name: (sum of squared inputs "
            "per column float32 [n_per_row], positions)}.")
        .def(
            "override_weight",
            [](owl2::decoder & d, const std::string & name, bool visual, int type,
               nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> data) {
                nb::gil_scoped_release release;
                d.override_weight(name, visual, type, data.data(), data.size());
            },
            nb::arg("name"), nb::arg("visual"), nb::arg("type"), nb::arg("data"),
            "Replace one weight matrix (as the base names it; visual: the sidecar's copy) by "
            "another type's encoding of it (uint8 [n_bytes]) until clear_overrides().")
        .def("clear_overrides", &owl2::decoder::clear_overrides, without_gil)
        .def_prop_ro("n_overrides", &owl2::decoder::n_overrides, without_gil)
        .def("save_state", &owl2::decoder::save_state, nb::arg("seq") = 0, nb::arg("n_positions") = -1, without_gil)
        .def("restore_state", &owl2::decoder::restore_state, nb::arg("state"), nb::arg("seq") = 0, without_gil)
        .def_prop_ro("n_vocab", &owl2::decoder::n_vocab, without_gil)
        .def_prop_ro("n_embd", &owl2::decoder::n_embd, without_gil)
        .def_prop_ro("n_ctx", &owl2::decoder::n_ctx, without_gil)
        .def_prop_ro("n_layer", &owl2::decoder::n_layer, without_gil)
        .def_prop_ro("n_threads", &owl2::decoder::n_threads, without_gil)
        .def_prop_ro("device", &owl2::decoder::device_name, without_gil)
        .def_prop_ro("kv_type", &owl2::decoder::kv_type, without_gil)
        .def_prop_ro("cache_layout", &owl2::decoder::cache_layout, without_gil)
        .def_prop_ro("flash_attn", &owl2::decoder::flash_attn, without_gil)
        .def_prop_ro("closed", &owl2::decoder::closed, without_gil)
        .def("close", &owl2::decoder::close, without_gil);
}
