// Python module owl2_edge._decoder: the native half of owl2-edge.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include <thread>

#include "quantize.h"

namespace nb = nanobind;

using FloatMatrix = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using ByteMatrix = nb::ndarray<const uint8_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

static int default_threads() {
    unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : (int) n;
}

NB_MODULE(_decoder, m) {
    m.doc() = "owl2-edge native code on ggml (from the llama-cpp-python install)";

    m.def("ggml_type_from_name", &owl2::ggml_type_from_name, nb::arg("name"));
    m.def("ggml_type_name", &owl2::ggml_type_to_name, nb::arg("type"));
    m.def("row_bytes", &owl2::row_bytes, nb::arg("type"), nb::arg("n_per_row"));

    m.def(
        "quantize",
        [](FloatMatrix values, int type, int n_threads) {
            const int64_t rows = values.shape(0), cols = values.shape(1);
            const size_t rb = owl2::row_bytes(type, cols);
            auto * out = new uint8_t[rows * rb];
            nb::capsule owner(out, [](void * p) noexcept { delete[] static_cast<uint8_t *>(p); });
            {
                nb::gil_scoped_release release;
                owl2::quantize_rows(type, values.data(), out, rows, cols,
                                    n_threads > 0 ? n_threads : default_threads());
            }
            return nb::ndarray<nb::numpy, uint8_t, nb::ndim<2>>(out, {(size_t) rows, rb}, owner);
        },
        nb::arg("values"), nb::arg("type"), nb::arg("n_threads") = 0,
        "Quantize a C-contiguous float32 matrix [rows, cols] to ggml type `type`; returns the raw "
        "blocks as uint8 [rows, row_bytes].");

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
}
