// Shared by the kernel sources (qmatmul.cpp, decode_layer.cpp): block formats and small SIMD helpers.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>
#include <vector>

enum { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2 };
static constexpr int BB[3] = {34, 18, 20};

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


torch::Tensor qlinear(torch::Tensor x, torch::Tensor w, int64_t fmt, c10::optional<torch::Tensor> bias);
torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor decode_layer(torch::Tensor x, torch::Tensor n1, torch::Tensor qkv, int64_t qkv_fmt,
                           c10::optional<torch::Tensor> qkv_b, torch::Tensor proj, int64_t proj_fmt,
                           c10::optional<torch::Tensor> proj_b, torch::Tensor n2, torch::Tensor fc, int64_t fc_fmt,
                           c10::optional<torch::Tensor> fc_b, torch::Tensor down, int64_t down_fmt,
                           c10::optional<torch::Tensor> down_b, double eps, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor kc, torch::Tensor vc, int64_t pos, int64_t H, int64_t KV,
                           c10::optional<torch::Tensor> mask, bool seq);
