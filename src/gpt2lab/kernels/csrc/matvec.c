/* Products of a few input rows with a float32, bfloat16 or float16 weight matrix, for decoding on
   x86 CPUs with AVX2 (and FMA, F16C).

   At batch 1 a decoding step reads every weight once and does two flops with each, so its speed is
   the rate at which the weights stream from memory. MKL's row-major matrix-vector product runs on
   one thread; PyTorch's bfloat16 product converts element by element. These kernels read the
   weights as they lie in the model ((n, k) row-major, no packed copy), one output row after
   another, so that each thread reads one sequential stream: interleaving two or four rows, as the
   int8 kernels do, measured slower for these layouts (docs/benchmarks.md). Each weight row is read
   once and multiplied by every input row from the L1 cache. Sums are in float32, in eight
   lanes of four accumulators; the result (plus the bias) is rounded once to the weights' type. */

#include "gpt2lab_kernels.h"

enum { FLOAT32 = 0, BFLOAT16 = 1, FLOAT16 = 2 };

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float bfloat16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Round to nearest, ties to even, as PyTorch's float-to-bfloat16 conversion; NaN stays NaN. */
static inline uint16_t float_to_bfloat16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if (isnan(f)) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

static inline __m256 load8_float32(const float *p) { return _mm256_loadu_ps(p); }
static inline __m256 load8_bfloat16(const uint16_t *p) {
    __m256i widened = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(widened, 16));
}
static inline __m256 load8_float16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline float load1_float32(const float *p) { return *p; }
static inline float load1_bfloat16(const uint16_t *p) { return bfloat16_to_float(*p); }
static inline float load1_float16(const uint16_t *p) { return _cvtsh_ss(*p); }

/* dot_T(x, w, k): x float32, w of type T, both k long. */
#define DOT(NAME, T)                                                                                  \
    static inline float dot_##NAME(const float *x, const T *w, int64_t k) {                           \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                                    \
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();                                    \
        int64_t i = 0;                                                                                \
        for (; i + 32 <= k; i += 32) {                                                                \
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8_##NAME(w + i), a0);                    \
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), load8_##NAME(w + i + 8), a1);            \
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), load8_##NAME(w + i + 16), a2);          \
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), load8_##NAME(w + i + 24), a3);          \
        }                                                                                             \
        for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8_##NAME(w + i), a0); \
        float sum = sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));                \
        for (; i < k; i++) sum += x[i] * load1_##NAME(w + i);                                         \
        return sum;                                                                                   \
    }
DOT(float32, float)
DOT(bfloat16, uint16_t)
DOT(float16, uint16_t)

static inline float load_any(const void *p, int64_t i, int type) {
    if (type == FLOAT32) return ((const float *)p)[i];
    if (type == BFLOAT16) return load1_bfloat16((const uint16_t *)p + i);
    return load1_float16((const uint16_t *)p + i);
}

static inline void store_any(void *p, int64_t i, float value, int type) {
    if (type == FLOAT32) ((float *)p)[i] = value;
    else if (type == BFLOAT16) ((uint16_t *)p)[i] = float_to_bfloat16(value);
    else ((uint16_t *)p)[i] = _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT);
}

/* y (m x n) = x (m x k) @ W.T (+ bias), x, W, bias and y all of `type`. Returns 0, or -1 where
   memory for the widened 16-bit input could not be had (y then untouched). */
int gpt2lab_matvec(const void *x, int64_t m, int64_t k, const void *w, const void *bias, int64_t n, void *y,
                   int64_t type, int64_t threads) {
    float *widened = NULL;
    const float *x32 = x;
    if (type != FLOAT32) {
        widened = malloc((size_t)(m * k) * sizeof(float));
        if (!widened) return -1;
        for (int64_t i = 0; i < m * k; i++) widened[i] = load_any(x, i, (int)type);
        x32 = widened;
    }
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t out = 0; out < n; out++) {
        float added = bias ? load_any(bias, out, (int)type) : 0.f;
        for (int64_t row = 0; row < m; row++) {
            const float *x_row = x32 + row * k;
            float sum;
            if (type == FLOAT32) sum = dot_float32(x_row, (const float *)w + out * k, k);
            else if (type == BFLOAT16) sum = dot_bfloat16(x_row, (const uint16_t *)w + out * k, k);
            else sum = dot_float16(x_row, (const uint16_t *)w + out * k, k);
            store_any(y, row * n + out, sum + added, (int)type);
        }
    }
    free(widened);
    return 0;
}
