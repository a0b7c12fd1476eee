// Kernels on the 16-row interleaved layout ("r16") of the 32-value formats Q8_0 / Q4_0 / Q4_1
// (lmstack/models/qformats.py repack_r16_ and repack_r16 below make it from GGUF's bytes, r16_block in common.h and
// qformats.unrepack_r16 give them back).
//
// Every 16 consecutive rows of W (a group) keep their bytes in place, regrouped per block b as
//   d[16] (f16) | m[16] (f16, Q4_1 only) | chunk 0 | chunk 1 | ... where chunk c = row 0's quant bytes 4c..4c+3,
//   row 1's, ..., row 15's (64 bytes; Q4: 4 chunks of nibbles, Q8_0: 8 chunks of int8).
// Rows past the last whole group stay in GGUF's layout. With it one vector load holds the same 4 quant bytes of 8
// (256-bit) or 16 rows: a dot product of x's 4 bytes (broadcast) against it leaves one int32 per row in its own lane,
// so the per-block scales of 8 rows are one vector (one vcvtph2ps) and no horizontal sums or scale shuffles remain:
// ~2 instructions per row and block instead of ~8 in the row-at-a-time tiles of qmatmul.cpp. Q4 nibbles: byte k's
// low half is value k, its high half value k + 16, so chunk c pairs with x's values 4c.. (low) and 16 + 4c.. (high).
#include "common.h"

#include <atomic>

// how far ahead of the block being read its group's stream is prefetched, into L2 (16 KB: 2.0 ms for SmolLM2's 66 MB
// of layer weights per token vs 3.2 ms without prefetching, Zen 5, 2 threads; 4 KB 2.7 ms)
#ifndef R16_PF
#define R16_PF 16384
#endif

static constexpr bool R16_OK[NFMT] = {true, true, true, false, false, false, false, false};

static inline __m256i bcast4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm256_set1_epi32(v); }

static inline __m256i dp_add(__m256i acc, __m256i u, __m256i s) {  // acc + the 8 sums of 4 adjacent u8 * s8
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// y[m0 + m][n0 + 16 g + r] for m < MT, g < NG, r < 16; w: the first group's bytes
template <int FMT, int MT, int NG>
static inline void tile_r16(const uint8_t* w, int64_t ws, const XQ& x, int64_t m0, int64_t n0, float* y, int64_t N,
                            const float* bias) {
    constexpr int NC = FMT == Q8_0 ? 8 : 4, QOFF = FMT == Q4_1 ? 64 : 32, BG = 16 * BB[FMT];
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    constexpr bool VNNI = true;  // u8 x s8 without saturation: Q8_0 as (q + 128) with a -128 * d * xs offset
#else
    constexpr bool VNNI = false;  // maddubs saturates at 2 * 255 * 127: Q8_0 as |q| x sign(x, q)
#endif
    __m256 acc[MT][2 * NG];
    for (int m = 0; m < MT; ++m)
        for (int h = 0; h < 2 * NG; ++h) acc[m][h] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x80);
    for (int64_t b = 0; b < x.nb; ++b) {
        __m256i bx[MT][8];
        __m256 xd[MT], xc[MT];
        for (int m = 0; m < MT; ++m) {
            const int8_t* xq = x.q + (m0 + m) * x.K + b * 32;
            for (int c = 0; c < 8; ++c) bx[m][c] = bcast4(xq + 4 * c);
            xd[m] = _mm256_set1_ps(x.c[(m0 + m) * x.nb * 2 + 2 * b]);
            xc[m] = _mm256_set1_ps(x.c[(m0 + m) * x.nb * 2 + 2 * b + 1]);
        }
        for (int g = 0; g < NG; ++g) {
            const uint8_t* blk = w + g * 16 * ws + b * BG;
            for (int o = 0; o < BG; o += 64) _mm_prefetch((const char*)(blk + R16_PF + o), _MM_HINT_T1);
            for (int h = 0; h < 2; ++h) {  // rows 8h .. 8h + 7 of the group
                const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 16 * h)));
                const __m256 mo = FMT == Q4_1 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(blk + 32 + 16 * h)))
                                              : d;
                __m256i ia[MT];
                for (int m = 0; m < MT; ++m) ia[m] = _mm256_setzero_si256();
                for (int c = 0; c < NC; ++c) {
                    const __m256i v = _mm256_loadu_si256((const __m256i*)(blk + QOFF + 64 * c + 32 * h));
                    if (FMT == Q8_0) {
                        const __m256i u = VNNI ? _mm256_xor_si256(v, flip) : _mm256_abs_epi8(v);
                        for (int m = 0; m < MT; ++m)
                            ia[m] = dp_add(ia[m], u, VNNI ? bx[m][c] : _mm256_sign_epi8(bx[m][c], v));
                    } else {
                        const __m256i lo = _mm256_and_si256(v, low4);
                        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                        for (int m = 0; m < MT; ++m) ia[m] = dp_add(dp_add(ia[m], lo, bx[m][c]), hi, bx[m][4 + c]);
                    }
                }
                for (int m = 0; m < MT; ++m) {
                    __m256& a = acc[m][2 * g + h];
                    a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[m]), _mm256_mul_ps(d, xd[m]), a);
                    if (FMT != Q8_0 || VNNI) a = _mm256_fmadd_ps(mo, xc[m], a);  // m * xs, -8 / -128 * d * xs
                }
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int h = 0; h < 2 * NG; ++h) {
            __m256 a = acc[m][h];
            if (bias) a = _mm256_add_ps(a, _mm256_loadu_ps(bias + n0 + 8 * h));
            _mm256_storeu_ps(y + (m0 + m) * N + n0 + 8 * h, a);
        }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
// the same on 512-bit registers: one chunk = all 16 rows of the group, one dpbusd per chunk and row of x
template <int FMT, int MT, int NG>
static inline void tile_r16_512(const uint8_t* w, int64_t ws, const XQ& x, int64_t m0, int64_t n0, float* y,
                                int64_t N, const float* bias) {
    constexpr int NC = FMT == Q8_0 ? 8 : 4, QOFF = FMT == Q4_1 ? 64 : 32, BG = 16 * BB[FMT];
    __m512 acc[MT][NG];
    for (int m = 0; m < MT; ++m)
        for (int g = 0; g < NG; ++g) acc[m][g] = _mm512_setzero_ps();
    const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x80);
    for (int64_t b = 0; b < x.nb; ++b) {
        const int8_t* xq[MT];
        __m512 xd[MT], xc[MT];
        for (int m = 0; m < MT; ++m) {
            xq[m] = x.q + (m0 + m) * x.K + b * 32;
            xd[m] = _mm512_set1_ps(x.c[(m0 + m) * x.nb * 2 + 2 * b]);
            xc[m] = _mm512_set1_ps(x.c[(m0 + m) * x.nb * 2 + 2 * b + 1]);
        }
        for (int g = 0; g < NG; ++g) {
            const uint8_t* blk = w + g * 16 * ws + b * BG;
            for (int o = 0; o < BG; o += 64) _mm_prefetch((const char*)(blk + R16_PF + o), _MM_HINT_T1);
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)blk));
            const __m512 mo = FMT == Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(blk + 32))) : d;
            __m512i ia[MT];
            for (int m = 0; m < MT; ++m) ia[m] = _mm512_setzero_si512();
            for (int c = 0; c < NC; ++c) {
                const __m512i v = _mm512_loadu_si512((const void*)(blk + QOFF + 64 * c));
                int32_t x0[MT], x1[MT];
                for (int m = 0; m < MT; ++m) {
                    std::memcpy(&x0[m], xq[m] + 4 * c, 4);
                    if (FMT != Q8_0) std::memcpy(&x1[m], xq[m] + 16 + 4 * c, 4);
                }
                if (FMT == Q8_0) {
                    const __m512i u = _mm512_xor_si512(v, flip);
                    for (int m = 0; m < MT; ++m) ia[m] = _mm512_dpbusd_epi32(ia[m], u, _mm512_set1_epi32(x0[m]));
                } else {
                    const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
                    for (int m = 0; m < MT; ++m) {
                        ia[m] = _mm512_dpbusd_epi32(ia[m], lo, _mm512_set1_epi32(x0[m]));
                        ia[m] = _mm512_dpbusd_epi32(ia[m], hi, _mm512_set1_epi32(x1[m]));
                    }
                }
            }
            for (int m = 0; m < MT; ++m) {
                acc[m][g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[m]), _mm512_mul_ps(d, xd[m]), acc[m][g]);
                acc[m][g] = _mm512_fmadd_ps(mo, xc[m], acc[m][g]);  // m * xs, -8 / -128 * d * xs
            }
        }
    }
    for (int m = 0; m < MT; ++m)
        for (int g = 0; g < NG; ++g) {
            __m512 a = acc[m][g];
            if (bias) a = _mm512_add_ps(a, _mm512_loadu_ps(bias + n0 + 16 * g));
            _mm512_storeu_ps(y + (m0 + m) * N + n0 + 16 * g, a);
        }
}
#define TILE_R16 tile_r16_512
#else
#define TILE_R16 tile_r16
#endif

template <int FMT>
static void run_r16_fmt(const uint8_t* w, int64_t ws, const XQ& x, int64_t M, int64_t G, int64_t ldy, float* y,
                        const float* bias) {
#if defined(__AVX512F__)
    constexpr int MT = 4;  // 32 vector registers
#else
    constexpr int MT = 2;
#endif
    // two chunks per thread, handed out dynamically (a preempted thread's second chunk goes to another): long runs
    // of one stream for the prefetchers (chunks of 4 groups cost ~15% at decode; measured on Zen 5)
    const int64_t parts = 2 * at::get_num_threads(), C = std::max<int64_t>(1, (G + parts - 1) / parts);
    const int64_t chunks = (G + C - 1) / C;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
        for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) {
            const int64_t g1 = std::min(G, (c + 1) * C);
            for (int64_t g = c * C; g < g1;) {
                const uint8_t* wg = w + g * 16 * ws;
                if (M == 1 && g + 2 <= g1) {
                    TILE_R16<FMT, 1, 2>(wg, ws, x, 0, 16 * g, y, ldy, bias);
                    g += 2;
                    continue;
                }
                int64_t m = 0;
                for (; m + MT <= M; m += MT) TILE_R16<FMT, MT, 1>(wg, ws, x, m, 16 * g, y, ldy, bias);
                for (; m < M; ++m) TILE_R16<FMT, 1, 1>(wg, ws, x, m, 16 * g, y, ldy, bias);
                ++g;
            }
        }
    });
}

bool r16_format(int64_t fmt) { return fmt >= 0 && fmt < NFMT && R16_OK[fmt]; }

// y (M, 16 G; rows ldy apart) = x @ W^T for the G whole groups of an r16 weight
void run_r16(int64_t fmt, const uint8_t* w, int64_t ws, const XQ& x, int64_t M, int64_t G, int64_t ldy, float* y,
             const float* bias) {
    switch (fmt) {
        case Q8_0: run_r16_fmt<Q8_0>(w, ws, x, M, G, ldy, y, bias); break;
        case Q4_0: run_r16_fmt<Q4_0>(w, ws, x, M, G, ldy, y, bias); break;
        case Q4_1: run_r16_fmt<Q4_1>(w, ws, x, M, G, ldy, y, bias); break;
        default: TORCH_CHECK(false, "r16 layout: Q8_0, Q4_0 or Q4_1 only");
    }
}

// GGUF's layout -> the r16 layout in place, for the whole groups of a (rows, bytes) run of one format (the inverse of
// r16_block; one group's bytes at a time through a per-thread buffer, so no second copy of the weight)
void repack_r16(torch::Tensor w, int64_t fmt) {
    TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous() && r16_format(fmt),
                "repack_r16: a contiguous (rows, bytes) uint8 run of Q8_0, Q4_0 or Q4_1");
    const int64_t ws = w.size(1), G = w.size(0) / 16, bb = BB[fmt], nb = ws / bb;
    TORCH_CHECK(nb * bb == ws, "repack_r16: rows of whole blocks");
    const int QS = QS_AT[fmt], QOFF = fmt == Q4_1 ? 64 : 32, nq = bb - QS;
    uint8_t* p = w.data_ptr<uint8_t>();
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
        std::vector<uint8_t> src(16 * ws);
        for (int64_t g = g0; g < g1; ++g) {
            uint8_t* grp = p + g * 16 * ws;
            std::memcpy(src.data(), grp, 16 * ws);
            for (int64_t b = 0; b < nb; ++b) {
                uint8_t* dst = grp + b * 16 * bb;
                for (int r = 0; r < 16; ++r) {
                    const uint8_t* row = src.data() + r * ws + b * bb;
                    std::memcpy(dst + 2 * r, row, 2);
                    if (fmt == Q4_1) std::memcpy(dst + 32 + 2 * r, row + 2, 2);
                    for (int c = 0; c < nq / 4; ++c) std::memcpy(dst + QOFF + 64 * c + 4 * r, row + QS + 4 * c, 4);
                }
            }
        }
    });
}
