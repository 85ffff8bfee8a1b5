/* gpt2lab's fused float32 CPU kernels for training (gpt2lab.kernels.fused):
   - gpt2lab_softmax_cross_entropy: a chunk of logits turned in place into the gradient of the
     cross-entropy (softmax minus the one-hot target), and each row's loss, in one exp per logit
     (PyTorch's log_softmax then exp take two, and a pass more);
   - gpt2lab_gelu_tanh_forward / _backward: the tanh GELU, and its gradient times the incoming one,
     with the tanh written through one exp (PyTorch's vectorized tanh costs about four times as
     much here).
   Each is parallel over rows or elements with OpenMP, on `threads` threads. */

#include "gpt2lab_kernels.h"

/* e^x, about 1 ulp (Cephes' single-precision polynomial); 0 below -87.3 (underflow). */
static inline __m256 exp8(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.33654f), highest = _mm256_set1_ps(88.37626f);
    __m256 underflow = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lowest), highest);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* r = x - n ln 2, with ln 2 in two parts so that r keeps its low bits. */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

static inline float horizontal_max(__m256 v) {
    float lanes[8], best;
    _mm256_storeu_ps(lanes, v);
    best = lanes[0];
    for (int i = 1; i < 8; i++) best = lanes[i] > best ? lanes[i] : best;
    return best;
}

static inline double horizontal_sum(__m256 v) {
    float lanes[8];
    double total = 0;
    _mm256_storeu_ps(lanes, v);
    for (int i = 0; i < 8; i++) total += lanes[i];
    return total;
}

/* Sums of this many exponentials are taken in float32, then added up in double: 50,304 terms in
   float32 alone could drift by 1e-5 of the sum. */
#define SUM_BLOCK 512

/* logits (m, v) row-major, targets[r] in [0, v) (checked by the caller): row r becomes
   softmax(row) - onehot(targets[r]), and loss[r] = logsumexp(row) - row[targets[r]]. */
void gpt2lab_softmax_cross_entropy(float *logits, int64_t m, int64_t v, const int64_t *targets, float *loss,
                                   int64_t threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < m; r++) {
        float *x = logits + r * v;
        int64_t j = 0;
        __m256 vmax = _mm256_set1_ps(-INFINITY), unordered = _mm256_setzero_ps();
        for (; j + 8 <= v; j += 8) {
            __m256 values = _mm256_loadu_ps(x + j);
            vmax = _mm256_max_ps(vmax, values);  /* may keep a NaN or lose it: `unordered` tells */
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(values, values, _CMP_UNORD_Q));
        }
        float top = horizontal_max(vmax);
        int nan_seen = _mm256_movemask_ps(unordered) != 0;
        for (; j < v; j++) {
            top = x[j] > top ? x[j] : top;
            nan_seen |= x[j] != x[j];
        }
        if (nan_seen || !isfinite(top)) {  /* as log_softmax: NaN, +inf, or nothing but -inf */
            for (j = 0; j < v; j++) x[j] = NAN;
            loss[r] = NAN;
            continue;
        }
        float picked = x[targets[r]];
        __m256 shift = _mm256_set1_ps(top);
        double sum = 0;
        for (j = 0; j + 8 <= v;) {
            __m256 block = _mm256_setzero_ps();
            for (int64_t end = j + SUM_BLOCK; j + 8 <= v && j < end; j += 8) {
                __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), shift));
                _mm256_storeu_ps(x + j, e);
                block = _mm256_add_ps(block, e);
            }
            sum += horizontal_sum(block);
        }
        for (; j < v; j++) {
            x[j] = expf(x[j] - top);
            sum += x[j];
        }
        float inverse = (float)(1.0 / sum);
        __m256 scale = _mm256_set1_ps(inverse);
        for (j = 0; j + 8 <= v; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), scale));
        for (; j < v; j++) x[j] *= inverse;
        x[targets[r]] -= 1.0f;
        loss[r] = (float)(log(sum) + (double)top - (double)picked);
    }
}

#define GELU_S 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_C 0.044715f

/* p = (1 + tanh u) / 2 and q = (1 - tanh u) / 2 through e = exp(-2|u|), which lies in [0, 1] and
   underflows to 0 where tanh is +-1 in float32: for u >= 0, p = 1 / (1 + e) and q = e / (1 + e),
   mirrored for u < 0. Neither cancels as 1 + tanh u does near -1, and far out (or at +-inf) one
   of them is exactly 0, so that x p and x p q stay 0 there however large x is. */
static inline __m256 half_one_plus_tanh(__m256 u, __m256 *q) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 negative = _mm256_cmp_ps(u, _mm256_setzero_ps(), _CMP_LT_OQ);
    __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), u);
    __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), magnitude));
    __m256 near_one = _mm256_div_ps(one, _mm256_add_ps(one, e));
    __m256 near_zero = _mm256_mul_ps(e, near_one);
    *q = _mm256_blendv_ps(near_zero, near_one, negative);
    return _mm256_blendv_ps(near_one, near_zero, negative);
}

static inline __m256 gelu_inner(__m256 x, __m256 x2) {
    return _mm256_mul_ps(_mm256_set1_ps(GELU_S), _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(GELU_C), x), x2, x));
}

static inline float gelu_tanh_of(float x) {
    return 0.5f * x * (1.0f + tanhf(GELU_S * (x + GELU_C * x * x * x)));
}

static inline float gelu_tanh_slope(float x) {
    float t = tanhf(GELU_S * (x + GELU_C * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_S * (1.0f + 3.0f * GELU_C * x * x);
}

/* y = x p(u(x)); NaN in, NaN out through the factor x. */
void gpt2lab_gelu_tanh_forward(const float *x, float *y, int64_t n, int64_t threads) {
    int64_t whole = n / 8 * 8;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < whole; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), q;
        __m256 p = half_one_plus_tanh(gelu_inner(v, _mm256_mul_ps(v, v)), &q);
        _mm256_storeu_ps(y + i, _mm256_mul_ps(v, p));
    }
    for (int64_t i = whole; i < n; i++) y[i] = gelu_tanh_of(x[i]);
}

/* grad_x = grad_y (p + x p' u') with p' = 2 p q and u' = s (1 + 3 c x^2). */
void gpt2lab_gelu_tanh_backward(const float *x, const float *grad_y, float *grad_x, int64_t n, int64_t threads) {
    int64_t whole = n / 8 * 8;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < whole; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), v2 = _mm256_mul_ps(v, v), q;
        __m256 p = half_one_plus_tanh(gelu_inner(v, v2), &q);
        /* capped below infinity: past |x| ~ 3e19 it would meet p q = 0 as inf * 0 */
        __m256 du = _mm256_min_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f * GELU_S),
                                                _mm256_fmadd_ps(_mm256_set1_ps(3.0f * GELU_C), v2, _mm256_set1_ps(1.0f))),
                                  _mm256_set1_ps(3.0e38f));
        __m256 slope = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(v, p), q), du, p);
        _mm256_storeu_ps(grad_x + i, _mm256_mul_ps(_mm256_loadu_ps(grad_y + i), slope));
    }
    for (int64_t i = whole; i < n; i++) grad_x[i] = grad_y[i] * gelu_tanh_slope(x[i]);
}
