/*
 * protocol._hashchain: the block-hash chain of protocol/hashing.py (design §3) in C.
 *
 *     h_i = XXH3_64bits(h_{i-1} as 8 bytes little-endian ‖ block i as uint32 little-endian)
 *
 * XXH3_64bits (seed 0, default secret) is written here from the public specification,
 * "xxHash fast digest algorithm", doc/xxhash_spec.md in https://github.com/Cyan4973/xxHash
 * (document version 0.1.1, read at commit 0e1d320d5c90): the constants, the default secret and
 * the four length classes (0-16, 17-128, 129-240, 241+ bytes) all come from its sections
 * "XXH3 Algorithm Overview" and "XXH3 Algorithm Description". The seed is always 0, so every "+ seed" / "- seed" and
 * the seed-dependent secret derivation of the spec drop out. No xxHash source code is used.
 *
 * Every multi-byte read of input or secret is little-endian by the spec; read_le64/read_le32
 * make that explicit (memcpy, then a byte swap on a big-endian host), so the digests are the
 * same on every machine. The result is checked against the `xxhash` package in
 * tests/test_hashing_native.py for every length 0..2100 (so up to two 1024-byte blocks of the
 * large path and a partial third).
 *
 * Only used through protocol/hashing.py, which falls back to a pure-Python loop when this
 * extension is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint8_t u8;

/* ---- constants (spec: "XXH3 Algorithm Overview") ---------------------------------------- */

#define PRIME32_1 0x9E3779B1U
#define PRIME32_2 0x85EBCA77U
#define PRIME32_3 0xC2B2AE3DU
#define PRIME64_1 0x9E3779B185EBCA87ULL
#define PRIME64_2 0xC2B2AE3D27D4EB4FULL
#define PRIME64_3 0x165667B19E3779F9ULL
#define PRIME64_4 0x85EBCA77C2B2AE63ULL
#define PRIME64_5 0x27D4EB2F165667C5ULL
#define PRIME_MX1 0x165667919E3779F9ULL
#define PRIME_MX2 0x9FB21C651E98DF25ULL

/* The default 192-byte secret (spec: "Seed and Secret"). */
#define SECRET_LEN 192
static const u8 kSecret[SECRET_LEN] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

/* Large inputs (spec: "XXH3 Algorithm Description (for large inputs)", default secret). */
#define STRIPE_LEN 64
#define STRIPES_PER_BLOCK ((SECRET_LEN - STRIPE_LEN) / 8) /* 16 */
#define BLOCK_LEN (STRIPE_LEN * STRIPES_PER_BLOCK)         /* 1024 bytes */

/* ---- primitives -------------------------------------------------------------------------- */

static inline u64 bswap64(u64 x)
{
    x = ((x & 0x00FF00FF00FF00FFULL) << 8) | ((x >> 8) & 0x00FF00FF00FF00FFULL);
    x = ((x & 0x0000FFFF0000FFFFULL) << 16) | ((x >> 16) & 0x0000FFFF0000FFFFULL);
    return (x << 32) | (x >> 32);
}

static inline u32 bswap32(u32 x)
{
    x = ((x & 0x00FF00FFU) << 8) | ((x >> 8) & 0x00FF00FFU);
    return (x << 16) | (x >> 16);
}

/* PY_LITTLE_ENDIAN comes from pyport.h (CPython's own configure-time byte-order check). */
static inline u64 read_le64(const u8 *p)
{
    u64 v;
    memcpy(&v, p, sizeof v);
#if PY_LITTLE_ENDIAN
    return v;
#else
    return bswap64(v);
#endif
}

static inline u32 read_le32(const u8 *p)
{
    u32 v;
    memcpy(&v, p, sizeof v);
#if PY_LITTLE_ENDIAN
    return v;
#else
    return bswap32(v);
#endif
}

static inline void write_le64(u8 *p, u64 v)
{
#if !PY_LITTLE_ENDIAN
    v = bswap64(v);
#endif
    memcpy(p, &v, sizeof v);
}

static inline u64 rotl64(u64 x, int r) { return (x << r) | (x >> (64 - r)); }

/* 64x64 -> 128-bit multiply, folded: low half xor high half. */
static inline u64 mul128_fold64(u64 a, u64 b)
{
#if defined(__SIZEOF_INT128__)
    __extension__ typedef unsigned __int128 u128; /* __extension__: quiet under -Wpedantic */
    u128 p = (u128)a * b;
    return (u64)p ^ (u64)(p >> 64);
#else
    /* Schoolbook on 32-bit halves, for compilers without a 128-bit integer type. */
    u64 lo_lo = (a & 0xFFFFFFFFULL) * (b & 0xFFFFFFFFULL);
    u64 hi_lo = (a >> 32) * (b & 0xFFFFFFFFULL);
    u64 lo_hi = (a & 0xFFFFFFFFULL) * (b >> 32);
    u64 hi_hi = (a >> 32) * (b >> 32);
    u64 cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFULL) + lo_hi;
    u64 hi = hi_hi + (hi_lo >> 32) + (cross >> 32);
    u64 lo = (cross << 32) | (lo_lo & 0xFFFFFFFFULL);
    return lo ^ hi;
#endif
}

/* spec: "Final Mixing Step (avalanche)" */
static inline u64 avalanche(u64 x)
{
    x ^= x >> 37;
    x *= PRIME_MX1;
    x ^= x >> 32;
    return x;
}

static inline u64 avalanche_xxh64(u64 x)
{
    x ^= x >> 33;
    x *= PRIME64_2;
    x ^= x >> 29;
    x *= PRIME64_3;
    x ^= x >> 32;
    return x;
}

/* spec: mixStep, with seed 0 */
static inline u64 mix16(const u8 *data, const u8 *secret)
{
    return mul128_fold64(read_le64(data) ^ read_le64(secret),
                         read_le64(data + 8) ^ read_le64(secret + 8));
}

/* ---- length classes ---------------------------------------------------------------------- */

static u64 xxh3_0to16(const u8 *p, size_t len)
{
    if (len > 8) { /* 9-16 */
        u64 lo = (read_le64(kSecret + 24) ^ read_le64(kSecret + 32)) ^ read_le64(p);
        u64 hi = (read_le64(kSecret + 40) ^ read_le64(kSecret + 48)) ^ read_le64(p + len - 8);
        return avalanche((u64)len + bswap64(lo) + hi + mul128_fold64(lo, hi));
    }
    if (len >= 4) { /* 4-8; modifiedSeed is 0 when seed is 0 */
        u64 combined = (u64)read_le32(p + len - 4) | ((u64)read_le32(p) << 32);
        u64 v = (read_le64(kSecret + 8) ^ read_le64(kSecret + 16)) ^ combined;
        v ^= rotl64(v, 49) ^ rotl64(v, 24);
        v *= PRIME_MX2;
        v ^= (v >> 35) + (u64)len;
        v *= PRIME_MX2;
        v ^= v >> 28;
        return v;
    }
    if (len > 0) { /* 1-3 */
        u32 combined = (u32)p[len - 1] | ((u32)len << 8) | ((u32)p[0] << 16) |
                       ((u32)p[len >> 1] << 24);
        u64 v = (u64)(read_le32(kSecret) ^ read_le32(kSecret + 4)) ^ (u64)combined;
        return avalanche_xxh64(v);
    }
    return avalanche_xxh64(read_le64(kSecret + 56) ^ read_le64(kSecret + 64));
}

static u64 xxh3_17to128(const u8 *p, size_t len)
{
    u64 acc = (u64)len * PRIME64_1;
    /* spec: numRounds = ((len - 1) >> 5) + 1, i from numRounds-1 down to 0 */
    for (Py_ssize_t i = (Py_ssize_t)((len - 1) >> 5); i >= 0; i--) {
        acc += mix16(p + 16 * i, kSecret + 32 * i);
        acc += mix16(p + len - 16 * i - 16, kSecret + 32 * i + 16);
    }
    return avalanche(acc);
}

static u64 xxh3_129to240(const u8 *p, size_t len)
{
    u64 acc = (u64)len * PRIME64_1;
    size_t n_chunks = len >> 4;
    for (size_t i = 0; i < 8; i++)
        acc += mix16(p + 16 * i, kSecret + 16 * i);
    acc = avalanche(acc);
    for (size_t i = 8; i < n_chunks; i++)
        acc += mix16(p + 16 * i, kSecret + 16 * (i - 8) + 3);
    /* spec: the last 16 bytes with secret offset 119 (= 136 - 17) */
    acc += mix16(p + len - 16, kSecret + 119);
    return avalanche(acc);
}

/* spec: accumulate(stripe, secretOffset) */
static inline void accumulate_stripe(u64 acc[8], const u8 *stripe, const u8 *secret)
{
    for (int i = 0; i < 8; i++) {
        u64 lane = read_le64(stripe + 8 * i);
        u64 v = lane ^ read_le64(secret + 8 * i);
        acc[i ^ 1] += lane;
        acc[i] += (v & 0xFFFFFFFFULL) * (v >> 32);
    }
}

/* spec: round_scramble, with the last 64 bytes of the secret */
static inline void scramble(u64 acc[8])
{
    const u8 *secret = kSecret + SECRET_LEN - STRIPE_LEN;
    for (int i = 0; i < 8; i++) {
        u64 a = acc[i];
        a ^= a >> 47;
        a ^= read_le64(secret + 8 * i);
        acc[i] = a * PRIME32_1;
    }
}

static u64 xxh3_large(const u8 *p, size_t len)
{
    u64 acc[8] = {PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3,
                  PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1};
    /* Full blocks, leaving the last 1..BLOCK_LEN bytes to lastRound (spec, step 2). */
    size_t n_blocks = (len - 1) / BLOCK_LEN;
    for (size_t b = 0; b < n_blocks; b++) {
        const u8 *block = p + b * BLOCK_LEN;
        for (size_t n = 0; n < STRIPES_PER_BLOCK; n++)
            accumulate_stripe(acc, block + n * STRIPE_LEN, kSecret + n * 8);
        scramble(acc);
    }
    /* spec, step 3: lastRound */
    const u8 *last = p + n_blocks * BLOCK_LEN;
    size_t last_len = len - n_blocks * BLOCK_LEN;
    size_t n_stripes = (last_len - 1) / STRIPE_LEN;
    for (size_t n = 0; n < n_stripes; n++)
        accumulate_stripe(acc, last + n * STRIPE_LEN, kSecret + n * 8);
    accumulate_stripe(acc, p + len - STRIPE_LEN, kSecret + SECRET_LEN - 71);
    /* spec, step 4: finalMerge(len * PRIME64_1, 11) */
    u64 result = (u64)len * PRIME64_1;
    for (int i = 0; i < 4; i++)
        result += mul128_fold64(acc[2 * i] ^ read_le64(kSecret + 11 + 16 * i),
                                acc[2 * i + 1] ^ read_le64(kSecret + 11 + 16 * i + 8));
    return avalanche(result);
}

static u64 xxh3_64(const u8 *p, size_t len)
{
    if (len <= 16)
        return xxh3_0to16(p, len);
    if (len <= 128)
        return xxh3_17to128(p, len);
    if (len <= 240)
        return xxh3_129to240(p, len);
    return xxh3_large(p, len);
}

/* ---- Python API -------------------------------------------------------------------------- */

/* `parent` as a Python int reduced modulo 2**64 (what hashing.py's `parent & _U64_MASK` does). */
static int parse_parent(PyObject *obj, u64 *out)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "parent must be an int, not %.100s", Py_TYPE(obj)->tp_name);
        return 0;
    }
    *out = (u64)PyLong_AsUnsignedLongLongMask(obj);
    return !(*out == (u64)-1 && PyErr_Occurred());
}

PyDoc_STRVAR(xxh3_64_doc,
"xxh3_64(data, /) -> int\n"
"\n"
"XXH3_64bits of a bytes-like object, seed 0 (equal to xxhash.xxh3_64_intdigest(data)).");

static PyObject *py_xxh3_64(PyObject *self, PyObject *arg)
{
    (void)self;
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    u64 h = xxh3_64((const u8 *)buf.buf, (size_t)buf.len);
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLongLong(h);
}

PyDoc_STRVAR(hash_chain_doc,
"hash_chain(data, block_size, parent, n_blocks, /) -> list[int]\n"
"\n"
"The first n_blocks chained block hashes of `data` (token ids as uint32 little-endian bytes):\n"
"h_i = xxh3_64(h_{i-1} as 8 bytes little-endian + data[4*block_size*i : 4*block_size*(i+1)]),\n"
"with h_{-1} = parent modulo 2**64. `data` must hold at least 4*block_size*n_blocks bytes.");

static PyObject *py_hash_chain(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data;
    Py_ssize_t block_size, n_blocks;
    PyObject *parent_obj;
    if (!PyArg_ParseTuple(args, "y*nOn:hash_chain", &data, &block_size, &parent_obj, &n_blocks))
        return NULL;

    PyObject *out = NULL;
    u8 *buf = NULL;
    u64 h;
    if (!parse_parent(parent_obj, &h))
        goto done;
    if (block_size <= 0) {
        PyErr_Format(PyExc_ValueError, "block_size must be positive, got %zd", block_size);
        goto done;
    }
    if (n_blocks < 0) {
        PyErr_Format(PyExc_ValueError, "n_blocks must be >= 0, got %zd", n_blocks);
        goto done;
    }
    /* step = 4 * block_size bytes per block; both products checked against overflow. */
    if (block_size > (PY_SSIZE_T_MAX - 8) / 4) {
        PyErr_Format(PyExc_OverflowError, "block_size %zd is too large", block_size);
        goto done;
    }
    Py_ssize_t step = 4 * block_size;
    if (n_blocks > 0 && (n_blocks > data.len / step)) {
        PyErr_Format(PyExc_ValueError,
                     "data holds %zd bytes, fewer than the %zd blocks x %zd bytes asked for",
                     data.len, n_blocks, step);
        goto done;
    }

    out = PyList_New(n_blocks);
    if (out == NULL || n_blocks == 0)
        goto done;
    /* One input buffer reused for every block: parent (8 bytes LE) then the block's tokens. */
    buf = PyMem_Malloc((size_t)(8 + step));
    if (buf == NULL) {
        Py_CLEAR(out);
        PyErr_NoMemory();
        goto done;
    }
    const u8 *src = (const u8 *)data.buf;
    for (Py_ssize_t i = 0; i < n_blocks; i++) {
        write_le64(buf, h);
        memcpy(buf + 8, src + i * step, (size_t)step);
        h = xxh3_64(buf, (size_t)(8 + step));
        PyObject *item = PyLong_FromUnsignedLongLong(h);
        if (item == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, item);
    }

done:
    PyMem_Free(buf);
    PyBuffer_Release(&data);
    return out;
}

PyDoc_STRVAR(pack_u32_doc,
"pack_u32(tokens, /) -> bytes\n"
"\n"
"A list or tuple of ints as uint32 little-endian bytes (what hash_chain reads).\n"
"ValueError if an id is outside [0, 2**32); TypeError if `tokens` is not a list or tuple or an\n"
"item is not an int (the caller then takes its general path, e.g. for numpy integers).");

static PyObject *py_pack_u32(PyObject *self, PyObject *seq)
{
    (void)self;
    if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
        PyErr_Format(PyExc_TypeError, "tokens must be a list or tuple, not %.100s",
                     Py_TYPE(seq)->tp_name);
        return NULL;
    }
    /* Only ints are read and no Python code runs in the loop, so a list cannot change under it. */
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    if (n > PY_SSIZE_T_MAX / 4)
        return PyErr_NoMemory();
    PyObject *out = PyBytes_FromStringAndSize(NULL, 4 * n);
    if (out == NULL)
        return NULL;
    u8 *dst = (u8 *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = items[i];
        if (!PyLong_Check(item)) {
            Py_DECREF(out);
            PyErr_Format(PyExc_TypeError, "token id at index %zd is a %.100s, not an int", i,
                         Py_TYPE(item)->tp_name);
            return NULL;
        }
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
        if (overflow != 0 || v < 0 || v > 0xFFFFFFFFLL) {
            Py_DECREF(out);
            if (v == -1 && PyErr_Occurred())
                return NULL;
            PyErr_Format(PyExc_ValueError, "token ids must fit in uint32: index %zd holds %R", i,
                         item);
            return NULL;
        }
        u32 w = (u32)v;
#if !PY_LITTLE_ENDIAN
        w = bswap32(w);
#endif
        memcpy(dst + 4 * i, &w, sizeof w);
    }
    return out;
}

static PyMethodDef methods[] = {
    {"xxh3_64", py_xxh3_64, METH_O, xxh3_64_doc},
    {"hash_chain", py_hash_chain, METH_VARARGS, hash_chain_doc},
    {"pack_u32", py_pack_u32, METH_O, pack_u32_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "protocol._hashchain",
    "XXH3-64 block-hash chain in C (see protocol/hashing.py and design §3).",
    0,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__hashchain(void)
{
    return PyModule_Create(&module);
}
