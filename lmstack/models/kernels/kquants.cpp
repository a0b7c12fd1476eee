// K-quant matmul kernels (Q4_K, Q5_K, Q6_K) on the super-blocks of 256 values exactly as ggml stores them:
//   Q4_K (144 B): f16 d, f16 dmin, u8 scales[12] (8 six-bit scales sc and mins m), u8 qs[128]
//                 w = d * sc[s] * q - dmin * m[s] for sub-block s of 32 values; chunk c of 64 values: qs[32c..32c+31],
//                 low nibbles = sub-block 2c, high nibbles = sub-block 2c + 1
//   Q5_K (176 B): as Q4_K with u8 qh[32] before qs: q |= (qh[l] >> s & 1) << 4 for value l of sub-block s
//   Q6_K (210 B): u8 ql[128], u8 qh[64], int8 scales[16], f16 d; w = d * scales[v / 16] * (q - 32), q 6-bit:
//                 half h (128 values): ql[64h..], qh[32h..]; its 4 groups of 32 take ql[l] & 15, ql[l + 32] & 15,
//                 ql[l] >> 4, ql[l + 32] >> 4 with qh[l] bits 0-1, 2-3, 4-5, 6-7 on top
// x is quantized per 32 values as for the other formats (qmatmul.cpp), so each sub-block of 32 is one integer dot
// product: Q4_K / Q5_K  d*sc*xd*sum(q*x8) - dmin*m*xs (dpbusd with AVX-512 VNNI, maddubs + madd on AVX2);
// Q6_K  d*xd*(sc0*sum0 + sc1*sum1) over its two 16-value halves: |q - 32| * sign(x8), then madd with the scales.
// 256-bit code for every build (the AVX-512 builds get the VNNI dot product through dot_u8s8).
#include "common.h"

#include <atomic>

static inline void scale_min_k4(const uint8_t* s, float d, float dmin, float* dsc, float* dm) {
    for (int j = 0; j < 4; ++j) { dsc[j] = d * (s[j] & 63); dm[j] = dmin * (s[j + 4] & 63); }
    for (int j = 4; j < 8; ++j) {
        dsc[j] = d * ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        dm[j] = dmin * ((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

static inline __m256i bit_to_4(__m256i qh, int i) {  // bit i of every byte -> 0x10
    const __m256i v = i <= 4 ? _mm256_slli_epi16(qh, 4 - i) : _mm256_srli_epi16(qh, i - 4);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

// q[s] = the 32 unsigned values (0..15 / 0..31) of sub-block s (Q4_K / Q5_K)
template <int FMT>
static inline void unpack_k45(const uint8_t* blk, int c, __m256i& lo, __m256i& hi) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i qs = _mm256_loadu_si256((const __m256i*)(blk + (FMT == Q4_K ? 16 : 48) + 32 * c));
    lo = _mm256_and_si256(qs, low4);
    hi = _mm256_and_si256(_mm256_srli_epi16(qs, 4), low4);
    if (FMT == Q5_K) {
        const __m256i qh = _mm256_loadu_si256((const __m256i*)(blk + 16));
        lo = _mm256_or_si256(lo, bit_to_4(qh, 2 * c));
        hi = _mm256_or_si256(hi, bit_to_4(qh, 2 * c + 1));
    }
}

// Q6_K: the four groups of 32 of half h, as signed q - 32
static inline void unpack_q6(const uint8_t* blk, int h, __m256i* q) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
    const __m256i l0 = _mm256_loadu_si256((const __m256i*)(blk + 64 * h));
    const __m256i l1 = _mm256_loadu_si256((const __m256i*)(blk + 64 * h + 32));
    const __m256i qh = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h));
    q[0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2));
    q[1] = _mm256_or_si256(_mm256_and_si256(l1, low4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4), _mm256_and_si256(qh, m2));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                           _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2));
    for (int i = 0; i < 4; ++i) q[i] = _mm256_sub_epi8(q[i], off);
}

// y[m][n0 + j] for m < MT, j < NT: a register tile over whole super-blocks
template <int FMT, int MT, int NT>
static inline void tile_k(const uint8_t* w, int64_t ws, const XQ& x, int64_t m0, int64_t n0, float* y, int64_t N,
                          const float* bias) {
    __m256 acc[MT][NT];
    float off[MT][NT];
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j) { acc[m][j] = _mm256_setzero_ps(); off[m][j] = 0.f; }
    const uint8_t* wr = w + n0 * ws;
    for (int64_t o = 0; o < NT * ws; o += 64)  // the next tile's rows, from DRAM while this one computes
        _mm_prefetch((const char*)(wr + PF_TILES * NT * ws + o), PF_HINT);
    const int64_t nsb = x.nb / 8;
    for (int64_t sb = 0; sb < nsb; ++sb) {
        for (int j = 0; j < NT; ++j) {
            const uint8_t* blk = wr + j * ws + sb * BB[FMT];
            if (FMT == Q6_K) {
                const float d = f16(blk + 208);
                const int8_t* sc = (const int8_t*)(blk + 192);
                for (int h = 0; h < 2; ++h) {
                    __m256i q[4];
                    unpack_q6(blk, h, q);
                    for (int i = 0; i < 4; ++i) {
                        const int g = 4 * h + i;  // sub-block of 32 in the super-block
                        const int64_t xb = sb * 8 + g;
                        const __m256i s16 = _mm256_set_m128i(_mm_set1_epi16(sc[2 * g + 1]), _mm_set1_epi16(sc[2 * g]));
                        const __m256i aq = _mm256_abs_epi8(q[i]);
                        for (int m = 0; m < MT; ++m) {
                            const __m256i xv = _mm256_loadu_si256((const __m256i*)(x.q + (m0 + m) * x.K + xb * 32));
                            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, _mm256_sign_epi8(xv, q[i])), s16);
                            acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x.d[(m0 + m) * x.nb + xb]),
                                                        acc[m][j]);
                        }
                    }
                }
            } else {
                float dsc[8], dm[8];
                scale_min_k4(blk + 4, f16(blk), f16(blk + 2), dsc, dm);
                for (int c = 0; c < 4; ++c) {
                    __m256i q[2];
                    unpack_k45<FMT>(blk, c, q[0], q[1]);
                    for (int u = 0; u < 2; ++u) {
                        const int s = 2 * c + u;
                        const int64_t xb = sb * 8 + s;
                        for (int m = 0; m < MT; ++m) {
                            const int64_t r = (m0 + m) * x.nb + xb;
                            const __m256i xv = _mm256_loadu_si256((const __m256i*)(x.q + (m0 + m) * x.K + xb * 32));
                            const __m256i p = dot_u8s8(q[u], xv);
                            acc[m][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dsc[s] * x.d[r]), acc[m][j]);
                            off[m][j] -= dm[s] * x.s[r];
                        }
                    }
                }
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int j = 0; j < NT; ++j)
            y[(m0 + m) * N + n0 + j] = hsum(acc[m][j]) + off[m][j] + (bias ? bias[n0 + j] : 0.f);
}

template <int FMT, int MT>
static void row_tiles_k(const uint8_t* w, int64_t ws, const XQ& x, int64_t m0, int64_t n0, int64_t n1, float* y,
                        int64_t N, const float* bias) {
    constexpr int NT = MT == 1 ? 4 : NT_MAX;
    int64_t n = n0;
    for (; n + NT <= n1; n += NT) tile_k<FMT, MT, NT>(w, ws, x, m0, n, y, N, bias);
    for (; n < n1; ++n) tile_k<FMT, MT, 1>(w, ws, x, m0, n, y, N, bias);
}

// chunks of 64 weight rows handed out dynamically, as run() in qmatmul.cpp
template <int FMT>
static void run_kt(const uint8_t* w, int64_t ws, const XQ& x, int64_t M, int64_t N, int64_t ldy, float* y,
                   const float* bias) {
    constexpr int64_t C = 64;
    const int64_t chunks = (N + C - 1) / C;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
        for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
            const int64_t c0 = c * C, c1 = std::min(N, c0 + C);
            int64_t m = 0;
            for (; m + MT_MAX <= M; m += MT_MAX) row_tiles_k<FMT, MT_MAX>(w, ws, x, m, c0, c1, y, ldy, bias);
            for (; m < M; ++m) row_tiles_k<FMT, 1>(w, ws, x, m, c0, c1, y, ldy, bias);
        }
    });
}

void run_k(int64_t fmt, const uint8_t* w, int64_t ws, const XQ& x, int64_t M, int64_t N, int64_t ldy, float* y,
           const float* bias) {
    if (fmt == Q4_K) run_kt<Q4_K>(w, ws, x, M, N, ldy, y, bias);
    else if (fmt == Q5_K) run_kt<Q5_K>(w, ws, x, M, N, ldy, y, bias);
    else run_kt<Q6_K>(w, ws, x, M, N, ldy, y, bias);
}

// o[0..32) = q * a0 (values 0..15), q * a1 (16..31), + b; q signed bytes
template <typename T>
static inline void store32(T* o, __m256i q, float a0, float a1, float b) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    const __m256 bb = _mm256_set1_ps(b);
    for (int i = 0; i < 4; ++i)
        store8(o + 8 * i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i])),
                                          _mm256_set1_ps(i < 2 ? a0 : a1), bb));
}

template <typename T>
static void dequant_rows(const uint8_t* wp, int64_t ws, int64_t N, int64_t fmt, T* op) {
    const int64_t nsb = ws / BB[fmt];
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n)
            for (int64_t b = 0; b < nsb; ++b) {
                const uint8_t* blk = wp + n * ws + b * BB[fmt];
                T* o = op + (n * nsb + b) * 256;
                if (fmt == Q6_K) {
                    const float d = f16(blk + 208);
                    const int8_t* sc = (const int8_t*)(blk + 192);
                    for (int h = 0; h < 2; ++h) {
                        __m256i q[4];
                        unpack_q6(blk, h, q);
                        for (int i = 0; i < 4; ++i) {
                            const int g = 4 * h + i;
                            store32(o + 32 * g, q[i], d * sc[2 * g], d * sc[2 * g + 1], 0.f);
                        }
                    }
                    continue;
                }
                float dsc[8], dm[8];
                scale_min_k4(blk + 4, f16(blk), f16(blk + 2), dsc, dm);
                for (int c = 0; c < 4; ++c) {
                    __m256i q[2];
                    if (fmt == Q4_K) unpack_k45<Q4_K>(blk, c, q[0], q[1]);
                    else unpack_k45<Q5_K>(blk, c, q[0], q[1]);
                    for (int u = 0; u < 2; ++u) {
                        const int s = 2 * c + u;
                        store32(o + 32 * s, q[u], dsc[s], dsc[s], -dm[s]);
                    }
                }
            }
    });
}

void dequantize_k(const uint8_t* w, int64_t ws, int64_t N, int64_t fmt, float* out) { dequant_rows(w, ws, N, fmt, out); }
void dequantize_k(const uint8_t* w, int64_t ws, int64_t N, int64_t fmt, at::BFloat16* out) {
    dequant_rows(w, ws, N, fmt, out);
}
