// Shared by the kernel sources (qmatmul.cpp, decode_layer.cpp): block formats and small SIMD helpers.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

// How many register tiles ahead each tile prefetches its weight rows (the rows are a few hundred bytes: too short
// for the hardware prefetcher to ramp up). One tile of work hides less than a DRAM round trip on some VMs.
#ifndef PF_TILES
#define PF_TILES 1
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T0
#endif

// format ids as lmstack/models/qformats.py FORMAT_IDS; BB: bytes per block, QK: values per block. For the 32-value
// formats QS_AT / QH_AT: where the nibbles / the 4 bytes of high bits (Q5) start; HAS_M: a float min follows d.
enum { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, Q5_0 = 3, Q5_1 = 4, Q4_K = 5, Q5_K = 6, Q6_K = 7, NFMT = 8 };
static constexpr int BB[NFMT] = {34, 18, 20, 22, 24, 144, 176, 210};
static constexpr int QK[NFMT] = {32, 32, 32, 32, 32, 256, 256, 256};
static constexpr int QS_AT[5] = {2, 2, 4, 6, 8};
static constexpr int QH_AT[5] = {0, 0, 0, 2, 4};
static constexpr bool HAS_M[5] = {false, false, true, false, true};
static constexpr bool IS_Q5[5] = {false, false, false, true, true};

#if defined(__AVX512F__)
static constexpr int MT_MAX = 4, NT_MAX = 4;  // 32 vector registers
#else
static constexpr int MT_MAX = 4, NT_MAX = 2;  // 16 vector registers
#endif

static inline float f16(const uint8_t* p) { uint16_t h; std::memcpy(&h, p, 2); return _cvtsh_ss(h); }

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

static inline __m256i dot_u8s8(__m256i u, __m256i s) {  // 8 int32 sums of 4 adjacent u8*s8 products
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline __m256i unpack_q4(const uint8_t* qs) {  // 16 bytes of nibbles -> 32 bytes 0..15 in value order
    __m128i t = _mm_loadu_si128((const __m128i*)qs);
    __m256i v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

static inline __m256i high_bits(const uint8_t* qh) {  // 4 bytes (32 bits) -> 32 bytes, 0x10 where bit j is set
    uint32_t x;
    std::memcpy(&x, qh, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_and_si256(_mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10));
}

template <int FMT>
static inline __m256i unpack_q(const uint8_t* blk) {  // a 32-value 4/5-bit block -> 32 bytes 0..15 / 0..31
    const __m256i q = unpack_q4(blk + QS_AT[FMT]);
    return IS_Q5[FMT] ? _mm256_or_si256(q, high_bits(blk + QH_AT[FMT])) : q;
}

static inline void store8(float* o, __m256 v) { _mm256_storeu_ps(o, v); }
static inline void store8(at::BFloat16* o, __m256 v) {  // round to nearest even (finite values)
    __m256i b = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
    b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    _mm_storeu_si128((__m128i*)o, p);
}

// x quantized per block of 32: q (M, K) int8, d and s = d * sum(q) (M, nb), c (M, 2 nb) = [d, cm * s] pairs
struct XQ { const int8_t* q; const float* d; const float* s; const float* c; int64_t K, nb; };

// the K-quant kernels (kquants.cpp): y (M, N; rows ldy apart) = x @ W^T, and packed super-blocks -> float /
// bfloat16 rows
void run_k(int64_t fmt, const uint8_t* w, int64_t ws, const XQ& x, int64_t M, int64_t N, int64_t ldy, float* y,
           const float* bias);
void dequantize_k(const uint8_t* w, int64_t ws, int64_t N, int64_t fmt, float* out);
void dequantize_k(const uint8_t* w, int64_t ws, int64_t N, int64_t fmt, at::BFloat16* out);

// the 16-row interleaved layout of Q8_0 / Q4_0 / Q4_1 (interleaved.cpp): R16 set in a format code says that each run
// of rows in one of those formats has its whole groups of 16 rows in that layout (its other rows, and runs in other
// formats, stay in GGUF's)
static constexpr int64_t R16 = int64_t(1) << 61;
bool r16_format(int64_t fmt);
void run_r16(int64_t fmt, const uint8_t* w, int64_t ws, const XQ& x, int64_t M, int64_t G, int64_t ldy, float* y,
             const float* bias);

// row r's block (GGUF's bytes) gathered from an interleaved group's block `gb` into tmp (>= BB[fmt] bytes)
static inline const uint8_t* r16_block(int64_t fmt, const uint8_t* gb, int r, uint8_t* tmp) {
    const int QS = QS_AT[fmt], QOFF = fmt == Q4_1 ? 64 : 32, nq = BB[fmt] - QS;
    std::memcpy(tmp, gb + 2 * r, 2);
    if (fmt == Q4_1) std::memcpy(tmp + 2, gb + 32 + 2 * r, 2);
    for (int c = 0; c < nq / 4; ++c) std::memcpy(tmp + QS + 4 * c, gb + QOFF + 64 * c + 4 * r, 4);
    return tmp;
}

torch::Tensor qlinear(torch::Tensor x, torch::Tensor w, int64_t fmt, c10::optional<torch::Tensor> bias);
torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps);

// One layer's weights for decode_layer(s), gathered once per model (models/fused_decode.py): the whole decode step's
// layers are then one native call, with the GIL released once instead of once per layer.
struct LayerW {
    torch::Tensor n1, qkv;
    int64_t qkv_fmt;
    c10::optional<torch::Tensor> qkv_b;
    torch::Tensor proj;
    int64_t proj_fmt;
    c10::optional<torch::Tensor> proj_b;
    torch::Tensor n2, fc;
    int64_t fc_fmt;
    c10::optional<torch::Tensor> fc_b;
    torch::Tensor down;
    int64_t down_fmt;
    c10::optional<torch::Tensor> down_b;
    double eps;
};
torch::Tensor decode_layers(torch::Tensor x, const std::vector<std::shared_ptr<LayerW>>& layers, torch::Tensor cos,
                            torch::Tensor sin, const std::vector<torch::Tensor>& kc,
                            const std::vector<torch::Tensor>& vc, int64_t pos, int64_t H, int64_t KV,
                            c10::optional<torch::Tensor> mask, bool seq);
