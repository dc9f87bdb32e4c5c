// build_graph(run): what MAM computes for a run's positions, layer by layer, as
// docs/architecture.md §4 writes it, and the inputs the graph takes (set_inputs). The run and
// graph structs are in owl2_model.h.
#include <cmath>

#include "ggml-backend.h"
#include "ggml.h"
#include "owl2_model.h"

namespace owl2 {

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

void find_spans(run & r) {
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

void build_graph(graph & g, model & m, const run & r) {
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
    // Positions and mask for the attention (none in a pass of the head alone: an input no node
    // reads gets no buffer).
    ggml_tensor * kq_mask = nullptr;
    if (r.first_layer < hp.n_layer) {
        g.inp_pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
        ggml_set_input(g.inp_pos);
        g.inp_mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, r.n_kv, n);
        ggml_set_input(g.inp_mask);
        // Flash attention takes its mask in f16; one cast serves every layer.
        kq_mask = m.params.flash_attn ? ggml_cast(ctx, g.inp_mask, GGML_TYPE_F16) : g.inp_mask;
    }

    // A layer's input hidden states given out (run.capture); n_layer: the final norm's input.
    size_t next_capture = 0;
    auto capture_at = [&](int il) {
        if (next_capture < r.capture.size() && r.capture[next_capture] == il) {
            ggml_set_output(x);  // kept whole until the graph is read
            g.captured.push_back(x);
            ++next_capture;
        }
    };

    for (int il = r.first_layer; il < hp.n_layer; ++il) {
        const layer & L = m.layers[il];
        capture_at(il);
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
    capture_at(hp.n_layer);
    for (ggml_tensor * t : g.captured) ggml_build_forward_expand(g.gf, t);

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

void set_inputs(const graph & g, const model & m, const run & r) {
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
    if (g.inp_pos) {
        ggml_backend_tensor_set(g.inp_pos, pos.data(), 0, ggml_nbytes(g.inp_pos));
        ggml_backend_tensor_set(g.inp_mask, mask.data(), 0, ggml_nbytes(g.inp_mask));
    }
    if (g.inp_outputs) ggml_backend_tensor_set(g.inp_outputs, r.outputs.data(), 0, ggml_nbytes(g.inp_outputs));
}

}  // namespace owl2
