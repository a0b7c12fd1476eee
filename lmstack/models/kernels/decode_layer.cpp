// The fused one-token decoder layer (lmstack/models/fused_decode.py), on the quantized matmuls of qmatmul.cpp.
#include "common.h"

// One decoder layer of a Llama-style block for one new token in each of B rows: RMSNorm -> qkv -> RoPE (rotate-half;
// cos/sin (1 or B, D): one shared or per-row position) -> write k, v at slot `pos` of the layer's cache (>= B, KV, L, D)
// -> attention over slots [0, pos] (GQA, softmax(q.k / sqrt(D)); mask (B, pos + 1) bool, optional: False slots are
// skipped, e.g. a continuous batch's left padding) -> proj -> residual -> RMSNorm -> [gate; up] -> silu(gate) * up ->
// down -> residual. The Python decode step is ~40 small ops per layer; this is one call (models/fused_decode.py).
// seq = true: the B rows are instead B consecutive new tokens of one sequence (a short prompt chunk, or the tokens a
// speculative step verifies): row r has position pos + r (cos/sin (B, D)), is written at slot pos + r of cache row 0,
// and attends to slots [0, pos + r] (causal); no mask.
torch::Tensor decode_layer(torch::Tensor x, torch::Tensor n1, torch::Tensor qkv, int64_t qkv_fmt,
                           c10::optional<torch::Tensor> qkv_b, torch::Tensor proj, int64_t proj_fmt,
                           c10::optional<torch::Tensor> proj_b, torch::Tensor n2, torch::Tensor fc, int64_t fc_fmt,
                           c10::optional<torch::Tensor> fc_b, torch::Tensor down, int64_t down_fmt,
                           c10::optional<torch::Tensor> down_b, double eps, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor kc, torch::Tensor vc, int64_t pos, int64_t H, int64_t KV,
                           c10::optional<torch::Tensor> mask, bool seq) {
    const int64_t D = cos.size(-1), L = kc.size(2), half = D / 2, d = x.size(-1), B = x.numel() / d;
    TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.scalar_type() == torch::kFloat32 &&
                pos + (seq ? B : 1) <= L && kc.size(0) >= (seq ? 1 : B) && cos.is_contiguous() && sin.is_contiguous() &&
                (cos.numel() == D || cos.numel() == B * D) && !(seq && mask.has_value()),
                "decode_layer: float32 contiguous caches with room for the new slots, cos/sin (1 or B, D), "
                "no mask in seq mode");
    const bool* mp = nullptr;
    int64_t mstride = 0;
    if (mask.has_value()) {
        TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->is_contiguous() && mask->size(0) == B &&
                    mask->size(-1) >= pos + 1, "decode_layer: mask (B, >= pos + 1) bool");
        mp = mask->data_ptr<bool>();
        mstride = mask->size(-1);
    }
    auto h = qlinear(rmsnorm(x, n1, eps), qkv, qkv_fmt, qkv_b);  // (B, (H + 2 KV) D)
    const int64_t hw = (H + 2 * KV) * D;
    float* hp = h.data_ptr<float>();
    const float *cp0 = cos.data_ptr<float>(), *sp0 = sin.data_ptr<float>();
    float *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
        const float *cp = cos.numel() == D ? cp0 : cp0 + b * D, *sp = sin.numel() == D ? sp0 : sp0 + b * D;
        const int64_t cb = seq ? 0 : b, slot = seq ? pos + b : pos;  // cache row and slot of this row's k, v
        float* hb = hp + b * hw;
        for (int64_t hh = 0; hh < H + KV; ++hh) {  // q heads, then k heads
            float* v = hb + hh * D;
            for (int64_t i = 0; i < half; ++i) {
                const float a = v[i], c = v[i + half];
                v[i] = a * cp[i] - c * sp[i];
                v[i + half] = c * cp[i + half] + a * sp[i + half];
            }
        }
        for (int64_t g = 0; g < KV; ++g) {
            std::memcpy(kp + ((cb * KV + g) * L + slot) * D, hb + (H + g) * D, D * sizeof(float));
            std::memcpy(vp + ((cb * KV + g) * L + slot) * D, hb + (H + KV + g) * D, D * sizeof(float));
        }
    }
    auto att = torch::empty({B, H * D}, x.options());
    float* ap = att.data_ptr<float>();
    const float scale = 1.f / std::sqrt((float)D);
    const int64_t rep = H / KV;
    at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> sc(pos + (seq ? B : 1));
        for (int64_t bh = i0; bh < i1; ++bh) {
            const int64_t b = bh / H, hh = bh % H, cb = seq ? 0 : b, T = (seq ? pos + b : pos) + 1;
            const float* q = hp + b * hw + hh * D;
            const float* K = kp + (cb * KV + hh / rep) * L * D;
            const float* V = vp + (cb * KV + hh / rep) * L * D;
            const bool* mrow = mp ? mp + b * mstride : nullptr;
            float mx = -INFINITY;
            for (int64_t t = 0; t < T; ++t) {
                if (mrow && !mrow[t]) { sc[t] = -INFINITY; continue; }
                __m256 acc = _mm256_setzero_ps();
                int64_t i = 0;
                for (; i + 8 <= D; i += 8)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(K + t * D + i), acc);
                float dd = hsum(acc);
                for (; i < D; ++i) dd += q[i] * K[t * D + i];
                sc[t] = dd * scale;
                mx = std::max(mx, sc[t]);
            }
            float sum = 0.f;
            for (int64_t t = 0; t < T; ++t) { sc[t] = sc[t] == -INFINITY ? 0.f : std::exp(sc[t] - mx); sum += sc[t]; }
            float* o = ap + b * H * D + hh * D;
            for (int64_t i = 0; i < D; ++i) o[i] = 0.f;
            for (int64_t t = 0; t < T; ++t) {
                if (sc[t] == 0.f) continue;
                const float w = sc[t] / sum;
                const __m256 wv = _mm256_set1_ps(w);
                int64_t i = 0;
                for (; i + 8 <= D; i += 8)
                    _mm256_storeu_ps(o + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(V + t * D + i), _mm256_loadu_ps(o + i)));
                for (; i < D; ++i) o[i] += w * V[t * D + i];
            }
        }
    });
    auto ashape = x.sizes().vec();
    ashape.back() = H * D;
    auto x1 = x + qlinear(att.view(ashape), proj, proj_fmt, proj_b);
    auto g = qlinear(rmsnorm(x1, n2, eps), fc, fc_fmt, fc_b);  // (..., 2F) = [gate; up]
    const int64_t F = g.size(-1) / 2;  // silu(gate) * up with ATen's vectorized, threaded silu (a scalar expf loop
    // here cost ~0.2 ms a layer at batch 8)
    auto act = at::silu(g.narrow(-1, 0, F)).mul_(g.narrow(-1, F, F)).contiguous();
    return x1 + qlinear(act, down, down_fmt, down_b);
}
