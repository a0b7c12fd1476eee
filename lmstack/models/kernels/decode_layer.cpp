// The fused one-token decoder layer (lmstack/models/fused_decode.py), on the quantized matmuls of qmatmul.cpp.
#include "common.h"

// y = x / sqrt(mean(x^2) + eps) * w over the last dim (x float32 contiguous): one call for the decode step's norms
torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps) {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && w.scalar_type() == torch::kFloat32 &&
                w.is_contiguous() && w.numel() == x.size(-1), "rmsnorm: float32 contiguous x (..., D), w (D,)");
    const int64_t D = x.size(-1), R = x.numel() / D;
    auto y = torch::empty_like(x);
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* xr = xp + r * D;
            float* yr = yp + r * D;
            __m256 acc = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 8 <= D; i += 8) { __m256 v = _mm256_loadu_ps(xr + i); acc = _mm256_fmadd_ps(v, v, acc); }
            float ss = hsum(acc);
            for (; i < D; ++i) ss += xr[i] * xr[i];
            const float inv = 1.f / std::sqrt(ss / (float)D + (float)eps);
            const __m256 s = _mm256_set1_ps(inv);
            for (i = 0; i + 8 <= D; i += 8)
                _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), s), _mm256_loadu_ps(wp + i)));
            for (; i < D; ++i) yr[i] = xr[i] * inv * wp[i];
        }
    });
    return y;
}

// exp of 8 floats (Cephes-style: 2^n * p(r), |r| <= ln2/2, degree-6 polynomial; ~2 ulp); -inf -> 0
static inline __m256 exp8(__m256 x) {
    const __m256 zero_mask = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_GE_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), zero_mask);
}

// the dot products of q (D floats, D % 8 == 0) with 8 consecutive keys K[0..7] (rows D apart), as one vector
static inline __m256 dot8(const float* q, const float* K, int64_t D) {
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + j * D + i), a[j]);
    }
    // transpose-reduce: lane j of the result = sum of a[j]'s lanes
    const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

static inline float dot1(const float* q, const float* k, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), acc);
    return hsum(acc);
}

// o (D) = sum_t w[t] V[t] over t < T (D % 8 == 0): 32 columns at a time in registers
static inline void weighted_sum(const float* w, const float* V, int64_t T, int64_t D, float* o) {
    int64_t c = 0;
    for (; c + 32 <= D; c += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t t = 0; t < T; ++t) {
            const __m256 wv = _mm256_set1_ps(w[t]);
            const float* v = V + t * D + c;
            a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v), a0);
            a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + 8), a1);
            a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + 16), a2);
            a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + 24), a3);
        }
        _mm256_storeu_ps(o + c, a0); _mm256_storeu_ps(o + c + 8, a1);
        _mm256_storeu_ps(o + c + 16, a2); _mm256_storeu_ps(o + c + 24, a3);
    }
    for (; c < D; c += 8) {
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t t = 0; t < T; ++t) a0 = _mm256_fmadd_ps(_mm256_set1_ps(w[t]), _mm256_loadu_ps(V + t * D + c), a0);
        _mm256_storeu_ps(o + c, a0);
    }
}

// softmax(q . K[t] * scale) V over slots t < T whose mask is true (mrow null: all): o (D floats), sc scratch >= T
static void attend(const float* q, const float* K, const float* V, int64_t T, int64_t D, float scale,
                   const bool* mrow, float* sc, float* o) {
    int64_t t = 0;
    const __m256 sv = _mm256_set1_ps(scale);
    for (; t + 8 <= T; t += 8) _mm256_storeu_ps(sc + t, _mm256_mul_ps(dot8(q, K + t * D, D), sv));
    for (; t < T; ++t) sc[t] = dot1(q, K + t * D, D) * scale;
    if (mrow)
        for (t = 0; t < T; ++t) if (!mrow[t]) sc[t] = -INFINITY;
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (t = 0; t + 8 <= T; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(sc + t));
    alignas(32) float m8[8];
    _mm256_store_ps(m8, mv);
    float mx = m8[0];
    for (int j = 1; j < 8; ++j) mx = std::max(mx, m8[j]);
    for (; t < T; ++t) mx = std::max(mx, sc[t]);
    const int64_t T8 = (T + 7) / 8 * 8;  // sc has room for T8 (the tail lanes are -inf: exp -> 0)
    for (t = T; t < T8; ++t) sc[t] = -INFINITY;
    __m256 sum = _mm256_setzero_ps();
    const __m256 mxv = _mm256_set1_ps(mx);
    for (t = 0; t < T8; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + t), mxv));
        _mm256_storeu_ps(sc + t, e);
        sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.f / hsum(sum));
    for (t = 0; t < T8; t += 8) _mm256_storeu_ps(sc + t, _mm256_mul_ps(_mm256_loadu_ps(sc + t), inv));
    weighted_sum(sc, V, T, D, o);
}

// One decoder layer of a Llama-style block for one new token in each of B rows: RMSNorm -> qkv -> RoPE (rotate-half;
// cos/sin (1 or B, D): one shared or per-row position) -> write k, v at slot `pos` of the layer's cache (>= B, KV, L, D)
// -> attention over slots [0, pos] (GQA, softmax(q.k / sqrt(D)); mask (B, pos + 1) bool, optional: False slots are
// skipped, e.g. a continuous batch's left padding) -> proj -> residual -> RMSNorm -> [gate; up] -> silu(gate) * up ->
// down -> residual. The Python decode step is ~40 small ops per layer; this is one call (models/fused_decode.py).
// seq = true: the B rows are instead B consecutive new tokens of one sequence (a short prompt chunk, or the tokens a
// speculative step verifies): row r has position pos + r (cos/sin (B, D)), is written at slot pos + r of cache row 0,
// and attends to slots [0, pos + r] (causal); no mask.
static torch::Tensor decode_layer(torch::Tensor x, const LayerW& w, const torch::Tensor& cos,
                                  const torch::Tensor& sin, const torch::Tensor& kc, const torch::Tensor& vc,
                                  int64_t pos, int64_t H, int64_t KV, const c10::optional<torch::Tensor>& mask,
                                  bool seq) {
    const double eps = w.eps;
    const int64_t D = cos.size(-1), L = kc.size(2), half = D / 2, d = x.size(-1), B = x.numel() / d;
    TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.scalar_type() == torch::kFloat32 &&
                pos + (seq ? B : 1) <= L && kc.size(0) >= (seq ? 1 : B) && cos.is_contiguous() && sin.is_contiguous() &&
                (cos.numel() == D || cos.numel() == B * D) && !(seq && mask.has_value()) && D % 8 == 0,
                "decode_layer: float32 contiguous caches with room for the new slots, cos/sin (1 or B, D), "
                "no mask in seq mode, head_dim a multiple of 8");
    const bool* mp = nullptr;
    int64_t mstride = 0;
    if (mask.has_value()) {
        TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->is_contiguous() && mask->size(0) == B &&
                    mask->size(-1) >= pos + 1, "decode_layer: mask (B, >= pos + 1) bool");
        mp = mask->data_ptr<bool>();
        mstride = mask->size(-1);
    }
    auto h = qlinear(rmsnorm(x, w.n1, eps), w.qkv, w.qkv_fmt, w.qkv_b);  // (B, (H + 2 KV) D)
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
        std::vector<float> sc(pos + (seq ? B : 1) + 8);
        for (int64_t bh = i0; bh < i1; ++bh) {
            const int64_t b = bh / H, hh = bh % H, cb = seq ? 0 : b, T = (seq ? pos + b : pos) + 1;
            const int64_t kv = (cb * KV + hh / rep) * L * D;
            attend(hp + b * hw + hh * D, kp + kv, vp + kv, T, D, scale, mp ? mp + b * mstride : nullptr, sc.data(),
                   ap + b * H * D + hh * D);
        }
    });
    auto ashape = x.sizes().vec();
    ashape.back() = H * D;
    auto x1 = x + qlinear(att.view(ashape), w.proj, w.proj_fmt, w.proj_b);
    auto g = qlinear(rmsnorm(x1, w.n2, eps), w.fc, w.fc_fmt, w.fc_b);  // (..., 2F) = [gate; up]
    const int64_t F = g.size(-1) / 2;  // silu(gate) * up with ATen's vectorized, threaded silu (a scalar expf loop
    // here cost ~0.2 ms a layer at batch 8)
    auto act = at::silu(g.narrow(-1, 0, F)).mul_(g.narrow(-1, F, F)).contiguous();
    return x1 + qlinear(act, w.down, w.down_fmt, w.down_b);
}

// decode_layer over every layer (layer i on caches kc[i], vc[i]): one call per decode step
torch::Tensor decode_layers(torch::Tensor x, const std::vector<std::shared_ptr<LayerW>>& layers, torch::Tensor cos,
                            torch::Tensor sin, const std::vector<torch::Tensor>& kc,
                            const std::vector<torch::Tensor>& vc, int64_t pos, int64_t H, int64_t KV,
                            c10::optional<torch::Tensor> mask, bool seq) {
    TORCH_CHECK(kc.size() == layers.size() && vc.size() == layers.size(), "decode_layers: one k and v cache a layer");
    for (size_t i = 0; i < layers.size(); ++i) {
        x = decode_layer(x, *layers[i], cos, sin, kc[i], vc[i], pos, H, KV, mask, seq);
    }
    return x;
}
