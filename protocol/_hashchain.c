/*
 * protocol._hashchain: the block-hash chain of protocol/hashing.py (design §3) in C.
 *
 *     h_i = XXH3_64bits(h_{i-1} as 8 bytes little-endian ‖ block i as uint32 little-endian)
 *
 * XXH3_64bits (seed 0, default secret) is upstream xxHash's own code: protocol/vendor/xxhash.h
 * is xxHash v0.8.4's single header (BSD-2-Clause, protocol/vendor/LICENSE), copied unchanged
 * from deps/xxhash/ of the `xxhash` 4.1.0 sdist on PyPI, the same C the `xxhash` package (the
 * pure-Python path's hash) compiles. XXH_INLINE_ALL makes every XXH function static inline in
 * this translation unit, so nothing is exported and no separate xxhash.c is built.
 *
 * Only used through protocol/hashing.py, which falls back to a pure-Python loop when this
 * extension is not built; tests/test_hashing_native.py checks the two agree.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include "xxhash.h" /* protocol/vendor/, on the include path by setup.py */

typedef uint64_t u64;
typedef uint32_t u32;
typedef uint8_t u8;

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
static inline void write_le64(u8 *p, u64 v)
{
#if !PY_LITTLE_ENDIAN
    v = bswap64(v);
#endif
    memcpy(p, &v, sizeof v);
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
    u64 h = XXH3_64bits(buf.buf, (size_t)buf.len);
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
        h = XXH3_64bits(buf, (size_t)(8 + step));
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
    "XXH3-64 block-hash chain in C, upstream xxHash (see protocol/hashing.py and design §3).",
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
