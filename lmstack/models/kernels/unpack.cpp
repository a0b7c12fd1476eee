// Packed blocks -> float32 / bfloat16 for lmstack: whole weights for prefill-sized float GEMMs (dequantize) and
// an embedding's rows (embed_rows), in GGUF's layout or the 16-row interleaved one (interleaved.cpp).
#include "common.h"

// output row i = weight row (idx ? idx[i] : i), for i < N; r16: the weight's first G groups of 16 rows are
// interleaved (interleaved.cpp)
template <typename T>
static void dequantize_blocks(const uint8_t* wp, int64_t row_bytes, int64_t N, int64_t nb, int64_t fmt, T* op,
                              int64_t G, const int64_t* idx = nullptr) {
    at::parallel_for(0, N, 16, [&](int64_t i0, int64_t i1) {
        uint8_t tmp[64];
        for (int64_t i = i0; i < i1; ++i)
            for (int64_t b = 0, n = idx ? idx[i] : i; b < nb; ++b) {
                const uint8_t* blk = wp + n * row_bytes + b * BB[fmt];
                if (n < 16 * G) blk = r16_block(fmt, wp + n / 16 * 16 * row_bytes + b * 16 * BB[fmt], n % 16, tmp);
                T* o = op + (i * nb + b) * 32;
                const __m256 d = _mm256_set1_ps(f16(blk));
                __m256i q;
                __m256 m = _mm256_setzero_ps();
                if (fmt == Q8_0) q = _mm256_loadu_si256((const __m256i*)(blk + 2));
                else {
                    q = fmt == Q4_0 ? unpack_q<Q4_0>(blk) : fmt == Q4_1 ? unpack_q<Q4_1>(blk)
                        : fmt == Q5_0 ? unpack_q<Q5_0>(blk) : unpack_q<Q5_1>(blk);
                    if (fmt == Q4_0 || fmt == Q5_0) q = _mm256_sub_epi8(q, _mm256_set1_epi8(fmt == Q4_0 ? 8 : 16));
                    else m = _mm256_set1_ps(f16(blk + 2));
                }
                const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
                const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
                for (int j = 0; j < 4; ++j)
                    store8(o + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[j])), d, m));
            }
    });
}

// packed blocks (N, K/32 * block bytes) -> out (N, K) float32 or bfloat16 (a caller-kept buffer: no page faults
// per call): for prefill-sized batches, where a float GEMM on the unpacked weight wins
void dequantize(torch::Tensor w, int64_t fmt, torch::Tensor out) {
    const bool r16 = fmt & R16;  // one format's rows with their whole groups of 16 interleaved
    fmt &= ~R16;
    TORCH_CHECK(!r16 || r16_format(fmt), "r16 w: Q8_0, Q4_0 or Q4_1");
    TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.is_contiguous() && fmt >= 0 && fmt < NFMT, "w: packed blocks");
    const int64_t N = w.size(0), nb = w.size(1) / BB[fmt];
    TORCH_CHECK(out.is_contiguous() && out.numel() == N * nb * QK[fmt] && out.scalar_type() != torch::kFloat16,
                "out: (N, K) contiguous float32 or bfloat16");
    if (fmt >= Q4_K && out.scalar_type() == torch::kFloat32)
        dequantize_k(w.data_ptr<uint8_t>(), w.size(1), N, fmt, out.data_ptr<float>());
    else if (fmt >= Q4_K && out.scalar_type() == torch::kBFloat16)
        dequantize_k(w.data_ptr<uint8_t>(), w.size(1), N, fmt, out.data_ptr<at::BFloat16>());
    else if (out.scalar_type() == torch::kFloat32)
        dequantize_blocks(w.data_ptr<uint8_t>(), w.size(1), N, nb, fmt, out.data_ptr<float>(), r16 ? N / 16 : 0);
    else if (out.scalar_type() == torch::kBFloat16)
        dequantize_blocks(w.data_ptr<uint8_t>(), w.size(1), N, nb, fmt, out.data_ptr<at::BFloat16>(),
                          r16 ? N / 16 : 0);
    else TORCH_CHECK(false, "out: float32 or bfloat16");
}

// rows idx of packed 32-value blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; r16 flag: whole groups interleaved) as float32
// (len(idx), K): an embedding's lookup in one call, for either layout
torch::Tensor embed_rows(torch::Tensor w, int64_t fmt, torch::Tensor idx) {
    const bool r16 = fmt & R16;
    fmt &= ~R16;
    TORCH_CHECK(w.scalar_type() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous() && fmt >= 0 && fmt < Q4_K &&
                (!r16 || r16_format(fmt)), "embed_rows: (N, bytes) packed blocks of a 32-value format");
    TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous(), "embed_rows: int64 contiguous ids");
    const int64_t N = w.size(0), nb = w.size(1) / BB[fmt], R = idx.numel();
    const int64_t* ip = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < R; ++i)
        TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "embed_rows: id ", ip[i], " outside [0, ", N, ")");
    auto out = torch::empty({R, nb * 32}, torch::kFloat32);
    dequantize_blocks(w.data_ptr<uint8_t>(), w.size(1), R, nb, fmt, out.data_ptr<float>(), r16 ? N / 16 : 0, ip);
    return out;
}

