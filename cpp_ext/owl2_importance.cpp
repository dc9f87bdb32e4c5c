// Importance collection: while it is on, the inputs of every weight matrix a run multiplies are
// summed per column (an importance matrix, llama.cpp's imatrix, for owl2 imatrix).
#include "ggml-backend.h"
#include "ggml.h"
#include "owl2_model.h"

namespace owl2 {

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

void set_collecting(model & m, bool on) {
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

}  // namespace owl2
