// Quantized matmul kernels for lmstack: y = x @ W^T with W kept in GGUF's block formats (no float copy).
//
// Block formats, 32 values per block, bytes exactly as in a GGUF file:
//   Q8_0 (34 B): f16 d, int8 q[32]          w = d * q
//   Q4_0 (18 B): f16 d, u8 qs[16]           w = d * (q - 8)   q = qs[j] & 15 for j < 16, qs[j-16] >> 4 for j >= 16
//   Q4_1 (20 B): f16 d, f16 m, u8 qs[16]    w = d * q + m
//   Q5_0 (22 B): f16 d, u32 qh, u8 qs[16]   w = d * (q - 16)   q = nibble as Q4 | bit j of qh << 4
//   Q5_1 (24 B): f16 d, f16 m, u32 qh, qs   w = d * q + m
// and the K-quants Q4_K / Q5_K / Q6_K (256-value super-blocks; layouts and kernels in kquants.cpp).
// As llama.cpp does, x is quantized per block of 32 to int8 (xd = max|x|/127, xs = xd * sum(q)), so a block's dot
// product is one integer multiply-add over 32 bytes: maddubs+madd on AVX2, one dpbusd with AVX-512 VNNI (built from
// this same file with different flags; the compiler's __AVX512VNNI__ picks the instruction).
//   Q8_0: dw*xd*sum(w8*x8)     Q4_0: dw*xd*sum(q*x8) - 8*dw*xs     Q4_1: dw*xd*sum(q*x8) + m*xs (Q5 alike, -16)
// Tiles of MT rows of x by NT rows of W keep the accumulators in registers; threads split the rows of W.
#include "common.h"

#include <atomic>

// x (K floats) -> q (K int8), d and s per block of 32 (s = d * sum q)
static void quantize_row(const float* x, int64_t K, int8_t* q, float* d, float* s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < K / 32; ++b) {
        const float* xb = x + b * 32;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8), v2 = _mm256_loadu_ps(xb + 16),
               v3 = _mm256_loadu_ps(xb + 24);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float dd = amax / 127.f;
        const __m256 mul = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, mul)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, mul)),
                i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, mul)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, mul));
        __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i*)(q + b * 32), _mm256_permutevar8x32_epi32(p, perm));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        d[b] = dd;
        s[b] = dd * (float)_mm_cvtsi128_si32(s4);
    }
}


// y[m][n0 + j] for m < MT, j < NT
template <int FMT, int MT, int NT>
static inline void tile(const uint8_t* w, int64_t wstride, const XQ& x, int64_t m0, int64_t n0, float* y,
                        int64_t N, const float* bias) {
    __m256 acc[MT][NT];
    float off[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) { acc[m][j] = _mm256_setzero_ps(); off[m][j] = 0.f; }
    const uint8_t* wr = w + n0 * wstride;
    for (int64_t o = 0; o < NT * wstride; o += 64)  // the next tile's rows, from DRAM while this one computes
        _mm_prefetch((const char*)(wr + PF_TILES * NT * wstride + o), PF_HINT);
    for (int64_t b = 0; b < x.nb; ++b) {
        __m256i xv[MT];
        float xd[MT], xs[MT];
        for (int m = 0; m < MT; ++m) {
            const int64_t r = (m0 + m) * x.nb + b;
            xv[m] = _mm256_loadu_si256((const __m256i*)(x.q + (m0 + m) * x.K + b * 32));
            xd[m] = x.d[r];
            xs[m] = x.s[r];
        }
        for (int j = 0; j < NT; ++j) {
            const uint8_t* blk = wr + j * wstride + b * BB[FMT];
            const float dw = f16(blk);
            if (FMT == Q8_0) {
                const __m256i wv = _mm256_loadu_si256((const __m256i*)(blk + 2));
                const __m256i ua = _mm256_abs_epi8(wv);
                for (int m = 0; m < MT; ++m) {
                    __m256i p = dot_u8s8(ua, _mm256_sign_epi8(xv[m], wv));
                    acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xd[m]), acc[m][j]);
                }
            } else {
                const __m256i wv = unpack_q<FMT>(blk);
                const float c = HAS_M[FMT] ? f16(blk + 2) : (FMT == Q4_0 ? -8.f : -16.f) * dw;
                for (int m = 0; m < MT; ++m) {
                    __m256i p = dot_u8s8(wv, xv[m]);
                    acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * xd[m]), acc[m][j]);
                    off[m][j] += c * xs[m];
                }
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j)
            y[(m0 + m) * N + n0 + j] = hsum(acc[m][j]) + off[m][j] + (bias ? bias[n0 + j] : 0.f);
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
// One row of x (decode) against NT rows of W, two blocks per 512-bit dpbusd. Q4: the two blocks' nibbles unpack to
// [lo0 lo1 hi0 hi1] (128-bit lanes) and x's lanes are shuffled to match; Q8_0: bytes + 128 (dpbusd wants unsigned),
// corrected by -128 * dw * xs. Needs an even number of blocks per row.
template <int FMT, int MT, int NT>
static inline void tile_512(const uint8_t* w, int64_t ws, const XQ& x, int64_t m0, int64_t n0, float* y,
                            int64_t N, const float* bias) {
    __m512 acc[MT][NT];
    __m128 macc[MT][NT];  // lanes 1 and 3 collect the offset terms (m * xs, or -8 / -128 * d * xs)
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) { acc[m][j] = _mm512_setzero_ps(); macc[m][j] = _mm_setzero_ps(); }
    const uint8_t* wr = w + n0 * ws;
    for (int64_t o = 0; o < NT * ws; o += 64)  // the next tile's rows, from DRAM while this one computes
        _mm_prefetch((const char*)(wr + PF_TILES * NT * ws + o), PF_HINT);
    const __m512i idx = FMT == Q8_0 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2)
                                    : _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b + 2 <= x.nb; b += 2) {
        __m512i xv[MT];
        __m128 xs4[MT];  // [xd0, c xs0, xd1, c xs1] per row of x
        for (int m = 0; m < MT; ++m) {
            xv[m] = _mm512_loadu_si512((const void*)(x.q + (m0 + m) * x.K + b * 32));
            if (FMT != Q8_0) xv[m] = _mm512_shuffle_i64x2(xv[m], xv[m], _MM_SHUFFLE(3, 1, 2, 0));
            xs4[m] = _mm_loadu_ps(x.c + (m0 + m) * x.nb * 2 + 2 * b);
        }
        for (int j = 0; j < NT; ++j) {
            const uint8_t* b0 = wr + j * ws + b * BB[FMT];
            const uint8_t* b1 = b0 + BB[FMT];
            uint32_t u0, u1;  // d (and m for Q4_1) of both blocks, as halves
            std::memcpy(&u0, b0, 4);
            std::memcpy(&u1, b1, 4);
            if (!HAS_M[FMT]) { u0 = (u0 & 0xFFFFu) * 0x10001u; u1 = (u1 & 0xFFFFu) * 0x10001u; }
            const __m128 wd = _mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128((int)u0), (int)u1, 1));
            __m512i wv;
            if (FMT == Q8_0) {
                wv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(b0 + 2))),
                                        _mm256_loadu_si256((const __m256i*)(b1 + 2)), 1);
                wv = _mm512_xor_si512(wv, _mm512_set1_epi8((char)0x80));
            } else {
                const int o = QS_AT[FMT];
                const __m256i t = _mm256_set_m128i(_mm_loadu_si128((const __m128i*)(b1 + o)),
                                                   _mm_loadu_si128((const __m128i*)(b0 + o)));
                __m256i lo = _mm256_and_si256(t, low4), hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), low4);
                if (IS_Q5[FMT]) {  // each block's high bits are [values 0..15 | 16..31]: regroup as the nibbles
                    const __m256i h0 = high_bits(b0 + QH_AT[FMT]), h1 = high_bits(b1 + QH_AT[FMT]);
                    lo = _mm256_or_si256(lo, _mm256_permute2x128_si256(h0, h1, 0x20));
                    hi = _mm256_or_si256(hi, _mm256_permute2x128_si256(h0, h1, 0x31));
                }
                wv = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            }
            for (int m = 0; m < MT; ++m) {
                const __m128 prod = _mm_mul_ps(wd, xs4[m]);  // [d0 xd0, c0 xs0, d1 xd1, c1 xs1]
                macc[m][j] = _mm_add_ps(macc[m][j], prod);
                const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[m]);
                acc[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p),
                                            _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(prod)), acc[m][j]);
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) {
            alignas(16) float m4[4];
            _mm_store_ps(m4, macc[m][j]);
            y[(m0 + m) * N + n0 + j] = _mm512_reduce_add_ps(acc[m][j]) + m4[1] + m4[3] + (bias ? bias[n0 + j] : 0.f);
        }
}
#endif

#if !(defined(__AVX512F__) && defined(__AVX512VNNI__))
// The AVX2 build's matvec (one row of x, decode): two blocks per step, both blocks' f16 scales converted in one
// vcvtph2ps and multiplied with x's [xd, c * xs] pair at once (as the 512-bit tile), maddubs + madd per block.
template <int FMT, int NT>
static inline void tile_m1_256x2(const uint8_t* w, int64_t ws, const XQ& x, int64_t m0, int64_t n0, float* y,
                                 int64_t N, const float* bias) {
    __m256 acc[NT];
    __m128 macc[NT];
    for (int j = 0; j < NT; ++j) { acc[j] = _mm256_setzero_ps(); macc[j] = _mm_setzero_ps(); }
    const uint8_t* wr = w + n0 * ws;
    for (int64_t o = 0; o < NT * ws; o += 64)  // the next tile's rows, from DRAM while this one computes
        _mm_prefetch((const char*)(wr + PF_TILES * NT * ws + o), PF_HINT);
    const __m256i lo = _mm256_set1_epi32(0), hi = _mm256_set1_epi32(2);
    for (int64_t b = 0; b + 2 <= x.nb; b += 2) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i*)(x.q + m0 * x.K + b * 32));
        const __m256i x1 = _mm256_loadu_si256((const __m256i*)(x.q + m0 * x.K + b * 32 + 32));
        const __m128 xs4 = _mm_loadu_ps(x.c + m0 * x.nb * 2 + 2 * b);
        for (int j = 0; j < NT; ++j) {
            const uint8_t* b0 = wr + j * ws + b * BB[FMT];
            const uint8_t* b1 = b0 + BB[FMT];
            uint32_t u0, u1;
            std::memcpy(&u0, b0, 4);
            std::memcpy(&u1, b1, 4);
            if (!HAS_M[FMT]) { u0 = (u0 & 0xFFFFu) * 0x10001u; u1 = (u1 & 0xFFFFu) * 0x10001u; }
            const __m128 prod = _mm_mul_ps(_mm_cvtph_ps(_mm_insert_epi32(_mm_cvtsi32_si128((int)u0), (int)u1, 1)),
                                           xs4);  // [d0 xd0, c0 xs0, d1 xd1, c1 xs1]
            __m256i p0, p1;
            if (FMT == Q8_0) {  // signed x signed: |w| with x carrying w's sign (no offset term)
                const __m256i w0 = _mm256_loadu_si256((const __m256i*)(b0 + 2));
                const __m256i w1 = _mm256_loadu_si256((const __m256i*)(b1 + 2));
                p0 = dot_u8s8(_mm256_abs_epi8(w0), _mm256_sign_epi8(x0, w0));
                p1 = dot_u8s8(_mm256_abs_epi8(w1), _mm256_sign_epi8(x1, w1));
            } else {
                p0 = dot_u8s8(unpack_q<FMT>(b0), x0);
                p1 = dot_u8s8(unpack_q<FMT>(b1), x1);
                macc[j] = _mm_add_ps(macc[j], prod);
            }
            const __m256 pr = _mm256_castps128_ps256(prod);
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_permutevar8x32_ps(pr, lo), acc[j]);
            acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_permutevar8x32_ps(pr, hi), acc[j]);
        }
    }
    for (int j = 0; j < NT; ++j) {
        alignas(16) float m4[4];
        _mm_store_ps(m4, macc[j]);
        y[m0 * N + n0 + j] = hsum(acc[j]) + m4[1] + m4[3] + (bias ? bias[n0 + j] : 0.f);
    }
}
#endif

template <int FMT, int MT>
static void row_tiles(const uint8_t* w, int64_t ws, const XQ& x, int64_t m0, int64_t n0, int64_t n1, float* y,
                      int64_t N, const float* bias) {
    int64_t n = n0;
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    if (x.nb % 2 == 0) {  // two blocks per 512-bit dpbusd; NT rows of W per tile (fewer when MT rows of x share it)
        constexpr int NT5 = MT == 1 ? 4 : 2;
        for (; n + NT5 <= n1; n += NT5) tile_512<FMT, MT, NT5>(w, ws, x, m0, n, y, N, bias);
        for (; n < n1; ++n) tile_512<FMT, MT, 1>(w, ws, x, m0, n, y, N, bias);
        return;
    }
#else
    if (MT == 1 && x.nb % 2 == 0) {
        for (; n + 4 <= n1; n += 4) tile_m1_256x2<FMT, 4>(w, ws, x, m0, n, y, N, bias);
        for (; n < n1; ++n) tile_m1_256x2<FMT, 1>(w, ws, x, m0, n, y, N, bias);
        return;
    }
#endif
    for (; n + NT_MAX <= n1; n += NT_MAX) tile<FMT, MT, NT_MAX>(w, ws, x, m0, n, y, N, bias);
    for (; n < n1; ++n) tile<FMT, MT, 1>(w, ws, x, m0, n, y, N, bias);
}

// Chunks of 64 weight rows (they stay in cache while all rows of x pass), handed out dynamically: a thread the OS
// preempts (a server's stream threads, a noisy VM) leaves its remaining chunks to the others instead of holding the
// whole step at the end of a static split.
template <int FMT>
static void run(const uint8_t* w, int64_t ws, const XQ& x, int64_t M, int64_t N, int64_t ldy, float* y,
                const float* bias) {  // y (M, N) with rows ldy apart
    constexpr int64_t C = 64;
    const int64_t chunks = (N + C - 1) / C;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
        for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
            const int64_t c0 = c * C, c1 = std::min(N, c0 + C);
            int64_t m = 0;
            for (; m + MT_MAX <= M; m += MT_MAX) row_tiles<FMT, MT_MAX>(w, ws, x, m, c0, c1, y, ldy, bias);
            for (; m < M; ++m) row_tiles<FMT, 1>(w, ws, x, m, c0, c1, y, ldy, bias);
        }
    });
}

// A layer's weight in one format: w (N, K / QK * block bytes), fmt = its id. A fused layer whose GGUF tensors have
// different formats (a Q4_K_M file's q/k Q4_K + v Q6_K): w is the segments' bytes one after the other (1-D) and
// fmt = SEGMENTED | sum_i ((fmt_i + 1) | rows_i << 4) << (20 i) for up to 3 segments (lmstack/models/qlinear.py).
static constexpr int64_t SEGMENTED = int64_t(1) << 62;
struct Seg { int64_t fmt, rows; };

static std::vector<Seg> segments(const torch::Tensor& w, int64_t code, int64_t K) {
    std::vector<Seg> segs;
    if (!(code & SEGMENTED)) {
        TORCH_CHECK(code >= 0 && code < NFMT && w.dim() == 2, "w: packed blocks (N, bytes) with a format id");
        segs.push_back({code, w.size(0)});
    } else {
        for (int i = 0; i < 3; ++i) {
            const int64_t v = (code >> (20 * i)) & 0xFFFFF;
            if (v) segs.push_back({(v & 15) - 1, v >> 4});
        }
        TORCH_CHECK(w.dim() == 1 && !segs.empty(), "segmented w: 1-D bytes");
    }
    int64_t bytes = 0;
    for (const Seg& s : segs) {
        TORCH_CHECK(s.fmt >= 0 && s.fmt < NFMT && K % QK[s.fmt] == 0, "format ", s.fmt, " needs K divisible by ",
                    QK[s.fmt >= 0 && s.fmt < NFMT ? s.fmt : 0], ", K=", K);
        bytes += s.rows * (K / QK[s.fmt] * BB[s.fmt]);
    }
    TORCH_CHECK(bytes == w.numel(), "w has ", w.numel(), " bytes; K=", K, " and its format(s) need ", bytes);
    return segs;
}

// x (..., K) float32 contiguous, w packed (see segments), bias (N,) float32 or None -> (..., N)
void repack_r16(torch::Tensor w, int64_t fmt);  // interleaved.cpp
void dequantize(torch::Tensor w, int64_t fmt, torch::Tensor out);  // unpack.cpp
torch::Tensor embed_rows(torch::Tensor w, int64_t fmt, torch::Tensor idx);  // unpack.cpp

torch::Tensor qlinear(torch::Tensor x, torch::Tensor w, int64_t fmt, c10::optional<torch::Tensor> bias) {
    TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: (..., K) float32");
    TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous(), "w: packed blocks (uint8, contiguous)");
    const int64_t K = x.size(-1), M = x.numel() / K, nb = K / 32;
    const bool r16 = fmt & R16;
    const std::vector<Seg> segs = segments(w, fmt & ~R16, K);
    int64_t N = 0;
    for (const Seg& s : segs) N += s.rows;
    auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
    auto xd = torch::empty({M, nb}, x.options()), xs = torch::empty({M, nb}, x.options());
    const float* xp = x.data_ptr<float>();
    int8_t* qp = xq.data_ptr<int8_t>();
    float *dp = xd.data_ptr<float>(), *sp = xs.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) quantize_row(xp + m * K, K, qp + m * K, dp + m * nb, sp + m * nb);
    });
    auto out_shape = x.sizes().vec();
    out_shape.back() = N;
    auto y = torch::empty(out_shape, x.options());
    auto xc = torch::empty({M, nb * 2}, x.options());
    float* cp = xc.data_ptr<float>();
    const XQ xqs{qp, dp, sp, cp, K, nb};
    const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    const uint8_t* wp = w.data_ptr<uint8_t>();
    float* yp = y.data_ptr<float>();
    int64_t n0 = 0;
    for (const Seg& s : segs) {
        const int64_t f = s.fmt, ws = K / QK[f] * BB[f];
        if (f < Q4_K) {  // per block [xd, c * xs] (c = 1 for Q4_1's / Q5_1's m, -8 for Q4_0, -16 for Q5_0, -128
            // for Q8_0's unsigned shift): the paired-block paths
            const float cm = f == Q4_1 || f == Q5_1 ? 1.f : f == Q4_0 ? -8.f : f == Q5_0 ? -16.f : -128.f;
            for (int64_t i = 0; i < M * nb; ++i) { cp[2 * i] = dp[i]; cp[2 * i + 1] = cm * sp[i]; }
        }
        const float* b = bp ? bp + n0 : nullptr;
        const int64_t G = r16 && r16_format(f) ? s.rows / 16 : 0, g = 16 * G;  // interleaved groups, then GGUF rows
        if (G) run_r16(f, wp, ws, xqs, M, G, N, yp + n0, b);
        const uint8_t* wt = wp + g * ws;
        float* yt = yp + n0 + g;
        const float* bt = b ? b + g : nullptr;
        const int64_t rows = s.rows - g;
        switch (rows ? f : -1) {
            case -1: break;
            case Q8_0: run<Q8_0>(wt, ws, xqs, M, rows, N, yt, bt); break;
            case Q4_0: run<Q4_0>(wt, ws, xqs, M, rows, N, yt, bt); break;
            case Q4_1: run<Q4_1>(wt, ws, xqs, M, rows, N, yt, bt); break;
            case Q5_0: run<Q5_0>(wt, ws, xqs, M, rows, N, yt, bt); break;
            case Q5_1: run<Q5_1>(wt, ws, xqs, M, rows, N, yt, bt); break;
            default: run_k(f, wt, ws, xqs, M, rows, N, yt, bt);
        }
        wp += s.rows * ws;
        n0 += s.rows;
    }
    return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    // The GIL is released while a kernel runs: a server's event loop and stream threads keep working during a decode
    // step instead of waiting for it (measured with py-spy: the batcher held the GIL ~76% of the time without this).
    using nogil = py::call_guard<py::gil_scoped_release>;
    py::class_<LayerW, std::shared_ptr<LayerW>>(m, "Layer", py::module_local())  // per build (avx2, avx512)
        .def(py::init([](torch::Tensor n1, torch::Tensor qkv, int64_t qkv_fmt, c10::optional<torch::Tensor> qkv_b,
                         torch::Tensor proj, int64_t proj_fmt, c10::optional<torch::Tensor> proj_b, torch::Tensor n2,
                         torch::Tensor fc, int64_t fc_fmt, c10::optional<torch::Tensor> fc_b, torch::Tensor down,
                         int64_t down_fmt, c10::optional<torch::Tensor> down_b, double eps) {
            return std::make_shared<LayerW>(LayerW{n1, qkv, qkv_fmt, qkv_b, proj, proj_fmt, proj_b, n2, fc, fc_fmt,
                                                   fc_b, down, down_fmt, down_b, eps});
        }));
    m.def("decode_layers", &decode_layers, "the fused Llama-style decoder layers for one new token per row (seq: a "
          "few tokens of one row), all layers in one call", nogil());
    m.def("rmsnorm", &rmsnorm, "fused RMSNorm (float32)", nogil());
    m.def("qlinear", &qlinear, "quantized linear (GGUF block formats)", nogil());
    m.def("dequantize", &dequantize, "packed blocks -> float32", nogil());
    m.def("embed_rows", &embed_rows, "rows of packed blocks -> float32 (an embedding lookup)", nogil());
    m.def("repack_r16", &repack_r16, "GGUF layout -> the 16-row interleaved layout, in place", nogil());
}
