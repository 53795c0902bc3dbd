/*
 * kernels._cpu_decode: paged decode attention for the CPU engine, reading K/V in place.
 *
 * The torch path (`_planned_decode` in kernels/paged_attention.py) gathers every decoding
 * sequence's blocks into one [B, L, Hkv, D] copy per layer and then runs SDPA over a transposed
 * view of it: at batch 32 and ~600-token contexts that is two 10 MB copies per layer and an
 * attention over strided memory. Here each sequence's blocks are read where they lie, once,
 * row by row (a token's K row holds every KV head: Hkv * D contiguous floats), for all query
 * heads at a time:
 *
 *   pass 1  s[hq][l] = scale * <q[hq], K[l][hq / G]>        (G = Hq / Hkv query heads per KV head)
 *   pass 2  p = softmax(s[hq][0 .. L))                       (max-subtracted, per query head)
 *   pass 3  out[hq] = sum_l p[hq][l] * V[l][hq / G]
 *
 * Layouts (checked by the Python wrapper, kernels/cpu_decode.py): q rows [B][Hq][D] with row
 * stride q_stride (floats); caches [num_blocks][block_size][Hkv][D] float32, contiguous;
 * blocks [B][nblk] int64 (each sequence's first nblk block ids); lens [B] int64; out [B][Hq][D].
 * Single-threaded; the GIL is released. Vectorised by the compiler per CPU (target_clones).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(_M_X64))
#define KV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KV_CLONES
#endif

#define DECODE_ONE(NAME, DIM)                                                                    \
KV_CLONES static void NAME(const float *q, const float *kc, const float *vc, const int64_t *blocks, int64_t L, \
                 float *out, int Hq, int Hkv, int D_, int bs, float scale, float *s, float *acc) { \
    const int D = (DIM) ? (DIM) : D_; \
    const int G = Hq / Hkv; \
    const int64_t row = (int64_t)Hkv * D; /* floats per token row */ \
    const int64_t nblk = (L + bs - 1) / bs; \
    /* pass 1: scores */ \
    for (int64_t n = 0; n < nblk; n++) { \
        const float *kb = kc + blocks[n] * bs * row; \
        const float *knext = n + 1 < nblk ? kc + blocks[n + 1] * bs * row : NULL; \
        const int64_t cnt = (n == nblk - 1) ? L - n * bs : bs; \
        for (int64_t o = 0; o < cnt; o++) { \
            const float *kr = kb + o * row; \
            if (knext != NULL) /* the next block's row, a block ahead: blocks lie anywhere */ \
                for (int64_t c = 0; c < row; c += 16) __builtin_prefetch(knext + o * row + c, 0, 3); \
            const int64_t l = n * bs + o; \
            for (int hq = 0; hq < Hq; hq++) { \
                const float *kh = kr + (hq / G) * D; \
                const float *qh = q + (int64_t)hq * D; \
                float dot = 0.f; \
_Pragma("omp simd reduction(+ : dot)") \
                for (int d = 0; d < D; d++) dot += qh[d] * kh[d]; \
                s[(int64_t)hq * L + l] = dot * scale; \
            } \
        } \
    } \
    /* pass 2: softmax per query head */ \
    for (int hq = 0; hq < Hq; hq++) { \
        float *sh = s + (int64_t)hq * L; \
        float m = -INFINITY; \
        for (int64_t l = 0; l < L; l++) m = sh[l] > m ? sh[l] : m; \
        float sum = 0.f; \
        for (int64_t l = 0; l < L; l++) { \
            sh[l] = expf(sh[l] - m); \
            sum += sh[l]; \
        } \
        const float inv = 1.f / sum; \
        for (int64_t l = 0; l < L; l++) sh[l] *= inv; \
    } \
    /* pass 3: weighted sum of V rows */ \
    memset(acc, 0, sizeof(float) * (size_t)Hq * D); \
    for (int64_t n = 0; n < nblk; n++) { \
        const float *vb = vc + blocks[n] * bs * row; \
        const float *vnext = n + 1 < nblk ? vc + blocks[n + 1] * bs * row : NULL; \
        const int64_t cnt = (n == nblk - 1) ? L - n * bs : bs; \
        for (int64_t o = 0; o < cnt; o++) { \
            const float *vr = vb + o * row; \
            if (vnext != NULL) /* the next block's row, a block ahead: blocks lie anywhere */ \
                for (int64_t c = 0; c < row; c += 16) __builtin_prefetch(vnext + o * row + c, 0, 3); \
            const int64_t l = n * bs + o; \
            for (int hq = 0; hq < Hq; hq++) { \
                const float p = s[(int64_t)hq * L + l]; \
                const float *vh = vr + (hq / G) * D; \
                float *ah = acc + (int64_t)hq * D; \
_Pragma("omp simd") \
                for (int d = 0; d < D; d++) ah[d] += p * vh[d]; \
            } \
        } \
    } \
    memcpy(out, acc, sizeof(float) * (size_t)Hq * D); \
}

DECODE_ONE(decode_one_32, 32)
DECODE_ONE(decode_one_64, 64)
DECODE_ONE(decode_one_128, 128)
DECODE_ONE(decode_one_any, 0)

static PyObject *decode(PyObject *self, PyObject *args) {
    unsigned long long q_p, kc_p, vc_p, blocks_p, lens_p, out_p;
    Py_ssize_t q_stride, nblk_stride;
    int B, Hq, Hkv, D, bs;
    float scale;
    if (!PyArg_ParseTuple(args, "KnKKKnKKiiiiif", &q_p, &q_stride, &kc_p, &vc_p, &blocks_p, &nblk_stride, &lens_p,
                          &out_p, &B, &Hq, &Hkv, &D, &bs, &scale))
        return NULL;
    if (B < 0 || Hq <= 0 || Hkv <= 0 || D <= 0 || bs <= 0 || Hq % Hkv != 0) {
        PyErr_SetString(PyExc_ValueError, "bad shapes: need B >= 0, positive Hq, Hkv, D, bs, Hq % Hkv == 0");
        return NULL;
    }
    const float *q = (const float *)(uintptr_t)q_p;
    const float *kc = (const float *)(uintptr_t)kc_p, *vc = (const float *)(uintptr_t)vc_p;
    const int64_t *blocks = (const int64_t *)(uintptr_t)blocks_p, *lens = (const int64_t *)(uintptr_t)lens_p;
    float *out = (float *)(uintptr_t)out_p;
    int64_t max_len = 0;
    for (int b = 0; b < B; b++) max_len = lens[b] > max_len ? lens[b] : max_len;
    float *s = malloc(sizeof(float) * ((size_t)Hq * (size_t)(max_len > 0 ? max_len : 1) + (size_t)Hq * D));
    if (s == NULL) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    for (int b = 0; b < B; b++) {
        if (lens[b] <= 0) {
            memset(out + (int64_t)b * Hq * D, 0, sizeof(float) * (size_t)Hq * D);
            continue;
        }
        void (*one)(const float *, const float *, const float *, const int64_t *, int64_t, float *, int, int, int, int,
                    float, float *, float *) =
            D == 32 ? decode_one_32 : D == 64 ? decode_one_64 : D == 128 ? decode_one_128 : decode_one_any;
        one(q + (int64_t)b * q_stride, kc, vc, blocks + (int64_t)b * nblk_stride, lens[b], out + (int64_t)b * Hq * D,
            Hq, Hkv, D, bs, scale, s, s + (size_t)Hq * (size_t)max_len);
    }
    Py_END_ALLOW_THREADS
    free(s);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(q, q_stride, k_cache, v_cache, blocks, nblk, lens, out, B, Hq, Hkv, D, block_size, scale): "
     "paged decode attention over raw float32/int64 buffers (addresses); see kernels/cpu_decode.py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_decode",
                                    "Paged decode attention for the CPU engine (see kernels/cpu_decode.py).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__cpu_decode(void) { return PyModule_Create(&module); }
