/* gpt2lab's CPU kernels: one shared library built from fused.c, matvec.c and quantized.c by
   gpt2lab.kernels.build, loaded with ctypes. This header holds what the three share: the
   includes, the packing constants the Python side mirrors (gpt2lab.quantize: ROWS, GROUP) and the
   entry points, whose argument types gpt2lab.kernels.build declares to ctypes. Every entry point
   takes the number of OpenMP threads to use, which the caller reads from torch.get_num_threads(). */

#ifndef GPT2LAB_KERNELS_H
#define GPT2LAB_KERNELS_H

#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The int8/int4 packing: blocks of ROWS output rows, CHUNK inputs at a time. */
#define ROWS 4
#define CHUNK 32

/* fused.c: the float32 training kernels. */
void gpt2lab_softmax_cross_entropy(float *logits, int64_t m, int64_t v, const int64_t *targets, float *loss,
                                   int64_t threads);
void gpt2lab_gelu_tanh_forward(const float *x, float *y, int64_t n, int64_t threads);
void gpt2lab_gelu_tanh_backward(const float *x, const float *grad_y, float *grad_x, int64_t n, int64_t threads);

/* matvec.c: y = x W^T + b for up to a few rows; `type` 0 float32, 1 bfloat16, 2 float16. Returns
   non-zero where it could not allocate its scratch memory. */
int gpt2lab_matvec(const void *x, int64_t m, int64_t k, const void *w, const void *bias, int64_t n, void *y,
                   int64_t type, int64_t threads);

/* quantized.c: the int8 and int4 layers' products. */
void gpt2lab_int8_linear(const float *x, int64_t m, int64_t k, int64_t padded, const int8_t *packed,
                         const float *scale, const float *bias, int64_t n, float *y, int64_t threads);
void gpt2lab_int4_linear(const float *x, int64_t m, int64_t k, const uint8_t *packed, const float *bias, int64_t n,
                         float *y, int64_t threads);

#endif
