// Quantization of float32 rows to any ggml type, for the converter's MAM sidecar.
//
// The base GGUF is quantized by llama.cpp's own quantizer (llama_model_quantize); the sidecar's
// visual K/V matrices must take the very same type per layer, so they go through the same ggml
// routine (ggml_quantize_chunk) one matrix at a time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace owl2 {

// ggml type id for a name as ggml spells it ("q4_0", "q6_K", "f16"...); throws on an unknown name.
int ggml_type_from_name(const std::string & name);
std::string ggml_type_to_name(int type);

// Bytes one row of n_per_row values takes in that type; throws if n_per_row does not fill whole
// blocks of the type.
size_t row_bytes(int type, int64_t n_per_row);

// Quantize nrows x n_per_row float32 values (row-major) into dst (nrows * row_bytes bytes).
// importance: null, or n_per_row weights (an importance matrix's mean squared activation per
// input column), which ggml's k- and i-quants use to spend precision where the inputs are large;
// the types ggml_quantize_requires_imatrix names are refused without it.
void quantize_rows(int type, const float * src, uint8_t * dst, int64_t nrows, int64_t n_per_row,
                   int n_threads, const float * importance = nullptr);

// The inverse, for tests and inspection: dst gets nrows * n_per_row float32 values.
void dequantize_rows(int type, const uint8_t * src, float * dst, int64_t nrows, int64_t n_per_row);

}  // namespace owl2
