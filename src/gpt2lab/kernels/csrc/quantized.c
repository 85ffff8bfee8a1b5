/* Matrix-vector products of gpt2lab's int8 and int4 linear layers on x86 CPUs with AVX2.

   At batch 1 a decoding step reads every weight once and does little with it, so its speed is the
   rate at which weights stream from memory. PyTorch has no AVX2 kernel that keeps up with that for
   quantized weights: fbgemm's int8 GEMM is built for larger batches, and its int4 kernel unpacks to
   floating point. These kernels quantize the input row to int8 and multiply with integer dot
   products (vpmaddubsw: 32 multiply-adds an instruction), as ggml does.

   Weights are packed in blocks of 4 output rows, and within a block in chunks of 32 inputs, so
   that each thread reads one sequential stream (the prefetcher's best case) and each input chunk
   loaded is used 4 times:
     int8: block b, chunk c -> 4 x 32 signed levels (128 bytes); a float scale per row.
     int4: block b, group g -> 4 x 16 bytes of levels 0..15 (low nibbles hold the group's inputs
           0-15, high nibbles 16-31), then the 4 rows' float16 scales, then their float16 minimums
           (80 bytes); a weight is scale * level + minimum.
   The input is quantized per row: x ~ x_scale * xq, x_scale = max|x| / 127, xq rounded half to
   even (as torch.round). gpt2lab.quantize holds the same arithmetic in PyTorch. */

#include "gpt2lab_kernels.h"

#define INT4_BLOCK_BYTES (ROWS * CHUNK / 2 + ROWS * 2 * 2)

static inline int32_t sum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

static inline float sum_f128(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Row x (width k) as int8 levels, zero-padded to `padded` inputs; returns its scale, NaN where
   the row holds NaN or infinity (so that the products are NaN, as in PyTorch, not quietly wrong). */
static float quantize_row(const float *x, int64_t k, int64_t padded, int8_t *levels) {
    float largest = 0.f;
    int finite = 1;
    for (int64_t i = 0; i < k; i++) {
        float magnitude = fabsf(x[i]);
        finite &= magnitude <= FLT_MAX;
        largest = fmaxf(largest, magnitude);
    }
    if (!finite) {
        for (int64_t i = 0; i < padded; i++) levels[i] = 0;
        return NAN;
    }
    float scale = largest / 127.f;
    /* A subnormal scale's reciprocal overflows: such a row is taken as zeros (in PyTorch too). */
    float inverse = scale >= FLT_MIN ? 1.f / scale : 0.f;
    for (int64_t i = 0; i < k; i++) levels[i] = (int8_t)nearbyintf(x[i] * inverse);
    for (int64_t i = k; i < padded; i++) levels[i] = 0;
    return scale;
}

/* Products of 32 signed levels of x with 32 signed levels of w, summed in pairs to 8 int32s. The
   sign trick makes x's side unsigned for vpmaddubsw; levels stay within +-127, so no pair of
   products (at most 2 * 127 * 127) saturates its int16. */
static inline __m256i dot_int8(__m256i x_magnitude, __m256i x, __m256i w) {
    __m256i pairs = _mm256_maddubs_epi16(x_magnitude, _mm256_sign_epi8(w, x));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/* y (m x n) = x (m x k) @ W.T * scale (+ bias), W packed int8 as above, k padded to `padded`. */
void gpt2lab_int8_linear(const float *x, int64_t m, int64_t k, int64_t padded, const int8_t *packed,
                         const float *scale, const float *bias, int64_t n, float *y, int64_t threads) {
    int8_t *levels = malloc((size_t)(m * padded));
    float *x_scale = malloc((size_t)m * sizeof(float));
    if (!levels || !x_scale) abort();
    for (int64_t row = 0; row < m; row++) x_scale[row] = quantize_row(x + row * k, k, padded, levels + row * padded);
    int64_t blocks = (n + ROWS - 1) / ROWS;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t block = 0; block < blocks; block++) {
        const int8_t *w = packed + block * ROWS * padded;
        for (int64_t row = 0; row < m; row++) {
            const int8_t *xq = levels + row * padded;
            __m256i acc[ROWS] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int64_t c = 0; c < padded; c += CHUNK) {
                const int8_t *chunk = w + c * ROWS;
                _mm_prefetch((const char *)(chunk + 1024), _MM_HINT_T0);
                _mm_prefetch((const char *)(chunk + 1088), _MM_HINT_T0);
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + c));
                __m256i magnitude = _mm256_sign_epi8(xv, xv);
                for (int r = 0; r < ROWS; r++)
                    acc[r] = _mm256_add_epi32(acc[r], dot_int8(magnitude, xv, _mm256_loadu_si256((const __m256i *)(chunk + CHUNK * r))));
            }
            for (int r = 0; r < ROWS; r++) {
                int64_t out = block * ROWS + r;
                if (out < n) y[row * n + out] = (float)sum_i32(acc[r]) * scale[out] * x_scale[row] + (bias ? bias[out] : 0.f);
            }
        }
    }
    free(levels);
    free(x_scale);
}

/* y (m x n) = x (m x k) @ W.T (+ bias), W packed int4 as above, k a whole number of groups.
   Per group: scale * sum(level * xq) + minimum * sum(xq), times the row's x_scale at the end.
   Two rows share each instruction: a 32-byte load holds rows r and r + 1's 16 bytes of a group,
   its low nibbles are both rows' inputs 0-15 and its high nibbles their inputs 16-31, multiplied
   by the matching half of x copied to both lanes. Products of levels (<= 15) and xq (<= 127) sum
   in pairs to at most 3,810, so the two halves add in int16 before widening. */
void gpt2lab_int4_linear(const float *x, int64_t m, int64_t k, const uint8_t *packed, const float *bias,
                         int64_t n, float *y, int64_t threads) {
    int64_t groups = k / CHUNK;
    /* Per row and group: xq's inputs 0-15 twice, then its inputs 16-31 twice (64 bytes). */
    int8_t *halves = malloc((size_t)(m * groups * 64));
    int8_t *levels = malloc((size_t)k);
    float *x_scale = malloc((size_t)m * sizeof(float));
    float *level_sums = malloc((size_t)(m * groups) * sizeof(float));
    if (!halves || !levels || !x_scale || !level_sums) abort();
    for (int64_t row = 0; row < m; row++) {
        x_scale[row] = quantize_row(x + row * k, k, k, levels);
        for (int64_t g = 0; g < groups; g++) {
            int8_t *out = halves + (row * groups + g) * 64;
            const int8_t *in = levels + g * CHUNK;
            int32_t sum = 0;
            for (int i = 0; i < CHUNK / 2; i++) {
                out[i] = out[16 + i] = in[i];
                out[32 + i] = out[48 + i] = in[16 + i];
                sum += in[i] + in[16 + i];
            }
            level_sums[row * groups + g] = (float)sum;
        }
    }
    int64_t blocks = (n + ROWS - 1) / ROWS;
    const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i first_pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const __m256i second_pair = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t block = 0; block < blocks; block++) {
        const uint8_t *w = packed + block * groups * INT4_BLOCK_BYTES;
        for (int64_t row = 0; row < m; row++) {
            const int8_t *xh = halves + row * groups * 64;
            const float *xsum = level_sums + row * groups;
            __m256 acc01 = _mm256_setzero_ps(), acc23 = _mm256_setzero_ps();
            __m128 minimum_terms = _mm_setzero_ps();
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *group = w + g * INT4_BLOCK_BYTES;
                _mm_prefetch((const char *)(group + 640), _MM_HINT_T0);
                __m256i x_low = _mm256_loadu_si256((const __m256i *)(xh + g * 64));
                __m256i x_high = _mm256_loadu_si256((const __m256i *)(xh + g * 64 + 32));
                __m128 scales = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(group + ROWS * CHUNK / 2)));
                __m128 minimums = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(group + ROWS * CHUNK / 2 + 8)));
                minimum_terms = _mm_fmadd_ps(minimums, _mm_set1_ps(xsum[g]), minimum_terms);
                __m256 scales8 = _mm256_castps128_ps256(scales);
#define TWO_ROWS(offset, pair, acc) { \
                __m256i bytes = _mm256_loadu_si256((const __m256i *)(group + (offset))); \
                __m256i low = _mm256_and_si256(bytes, low_nibbles); \
                __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low_nibbles); \
                __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, x_low), _mm256_maddubs_epi16(high, x_high)); \
                __m256 sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)); \
                acc = _mm256_fmadd_ps(sums, _mm256_permutevar8x32_ps(scales8, pair), acc); }
                TWO_ROWS(0, first_pair, acc01)
                TWO_ROWS(CHUNK, second_pair, acc23)
#undef TWO_ROWS
            }
            float minimum_of[ROWS], row_sums[ROWS];
            _mm_storeu_ps(minimum_of, minimum_terms);
            __m128 halves01[2] = {_mm256_castps256_ps128(acc01), _mm256_extractf128_ps(acc01, 1)};
            __m128 halves23[2] = {_mm256_castps256_ps128(acc23), _mm256_extractf128_ps(acc23, 1)};
            row_sums[0] = sum_f128(halves01[0]);
            row_sums[1] = sum_f128(halves01[1]);
            row_sums[2] = sum_f128(halves23[0]);
            row_sums[3] = sum_f128(halves23[1]);
            for (int r = 0; r < ROWS; r++) {
                int64_t out = block * ROWS + r;
                if (out < n) y[row * n + out] = (row_sums[r] + minimum_of[r]) * x_scale[row] + (bias ? bias[out] : 0.f);
            }
        }
    }
    free(halves);
    free(levels);
    free(x_scale);
    free(level_sums);
}
