/*
 * balancer._blocktable: the prefix index's table (block hash -> bitmask of replica slots) as an
 * open-addressing hash table over uint64, and the longest-prefix walk over it in C.
 *
 * Why: a dict of 1M int -> int entries costs ~3 dependent cache misses per probe (index slot,
 * entry, key object for the equality check), and the interpreter runs the probes of a 512-block
 * chain one after the other. Here a probe is one 16-byte slot (key and mask side by side, four
 * to a cache line), and `match` computes the home slots of the next CHUNK hashes and prefetches
 * them before probing any, so the misses of a chunk overlap instead of queueing.
 *
 * Layout:
 *
 *     slots[cap]   cap a power of two (>= MIN_CAP), zeroed memory is an empty table
 *     +------------+------------+
 *     | key  (u64) | mask (u64) |    mask == 0 <=> the slot is empty
 *     +------------+------------+
 *
 * - Empty slots are marked by mask 0, not by a reserved key, so every uint64 (0 and 2**64-1
 *   included) is a valid key. The price: 0 is not a storable value (ValueError). The prefix
 *   index never stores one: a block whose mask becomes empty is deleted (its invariant).
 * - Home slot: Fibonacci hashing, the top log2(cap) bits of key * MULTIPLIER (2**64 / golden
 *   ratio, odd; Knuth, TAOCP vol. 3, 6.4). Our keys are xxh3 digests, already uniform; the
 *   multiply also spreads keys that share their low bits. Like CPython's int hash (the identity
 *   modulo 2**61-1), it is not keyed: the dict it replaces was not either.
 * - Linear probing; the table grows (doubling, by rehash) when more than 7/10 of the slots are
 *   used, and shrinks when fewer than 1/10 are (to a load of 1/4..1/2), so after a rehash the
 *   load is at most 1/2.
 * - Deletion by backward shift (no tombstones): the entries after the freed slot, up to the
 *   next empty one, move back when the freed slot lies between their home and where they are.
 *   So a probe run always ends at an empty slot and lookups never degrade with churn.
 * - Masks are uint64: slots 0..63. The prefix index uses this table only while its replicas
 *   have slots < 64 and falls back to dicts of Python ints beyond (balancer/prefix_index.py).
 *
 * Python API: a mapping (get, [], []=, del, in, len, iteration over keys, keys/values/items as
 * lists, ==/!= with a dict or another BlockTable, clear) plus `match(hashes, owners=None)`, the
 * whole chain walk of prefix_index.match_chain. Lookups of anything that is not an int in
 * [0, 2**64) find nothing (as dict.get would); stores of such keys raise. Iterating while keys
 * are added or removed raises RuntimeError, as for a dict. Not thread-safe (nor is the index);
 * every method holds the GIL and runs no Python code while it touches the slots.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

typedef uint64_t u64;

#define MULTIPLIER 0x9E3779B97F4A7C15ULL
#define MIN_CAP 8      /* slots; a power of two */
#define MIN_SHIFT 61   /* 64 - log2(MIN_CAP) */
#define CHUNK 16       /* hashes whose slots `match` prefetches at once */

typedef struct {
    u64 key;
    u64 mask; /* 0: empty slot */
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    size_t cap;     /* power of two */
    int shift;      /* 64 - log2(cap): home(key) = key * MULTIPLIER >> shift */
    size_t used;
    u64 version;    /* bumped when a key is added or removed (iterators check it) */
} BlockTable;

static PyTypeObject BlockTableType;
static PyTypeObject BlockTableIterType;

static inline size_t home(const BlockTable *t, u64 key)
{
    return (size_t)((key * MULTIPLIER) >> t->shift);
}

/* ---- Python int <-> uint64 ----------------------------------------------------------------- */

/* 1: `o` is an int in [0, 2**64), stored in *out; 0: anything else (no exception set). */
static inline int as_u64(PyObject *o, u64 *out)
{
    if (!PyLong_Check(o))
        return 0;
#if PY_VERSION_HEX < 0x030C0000 && PYLONG_BITS_IN_DIGIT == 30
    /* CPython <= 3.11 layout: Py_SIZE is the signed number of 30-bit digits. Reading them here
     * is several times faster than PyLong_AsUnsignedLongLong, which goes through a byte array
     * for values of more than one digit (almost every hash). */
    const digit *d = ((PyLongObject *)o)->ob_digit;
    switch (Py_SIZE(o)) {
    case 0:
        *out = 0;
        return 1;
    case 1:
        *out = d[0];
        return 1;
    case 2:
        *out = (u64)d[0] | (u64)d[1] << 30;
        return 1;
    case 3:
        if (d[2] >> 4) /* bits 64..89 */
            return 0;
        *out = (u64)d[0] | (u64)d[1] << 30 | (u64)d[2] << 60;
        return 1;
    default: /* negative, or more than 90 bits */
        return 0;
    }
#else
    u64 v = PyLong_AsUnsignedLongLong(o);
    if (v == (u64)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = v;
    return 1;
#endif
}

/* For stores: a key or mask as uint64, or -1 with TypeError / OverflowError set. */
static int parse_u64(PyObject *o, u64 *out, const char *what)
{
    if (as_u64(o, out))
        return 0;
    if (!PyLong_Check(o))
        PyErr_Format(PyExc_TypeError, "BlockTable %s must be an int, not %.100s", what,
                     Py_TYPE(o)->tp_name);
    else
        PyErr_Format(PyExc_OverflowError, "BlockTable %s must be in [0, 2**64)", what);
    return -1;
}

static int parse_mask(PyObject *o, u64 *out)
{
    if (parse_u64(o, out, "masks") < 0)
        return -1;
    if (*out == 0) {
        PyErr_SetString(PyExc_ValueError, "BlockTable masks must be nonzero (0 marks an empty slot)");
        return -1;
    }
    return 0;
}

/* ---- the table ----------------------------------------------------------------------------- */

/* The slot holding `key`, or NULL. */
static inline Slot *find(const BlockTable *t, u64 key)
{
    size_t m = t->cap - 1;
    for (size_t i = home(t, key);; i = (i + 1) & m) {
        Slot *s = &t->slots[i];
        if (s->mask == 0)
            return NULL;
        if (s->key == key)
            return s;
    }
}

/* Smallest capacity (a power of two, >= MIN_CAP) holding n entries at a load of at most 1/2. */
static size_t cap_for(size_t n)
{
    size_t cap = MIN_CAP;
    while (cap / 2 < n)
        cap *= 2;
    return cap;
}

static int resize(BlockTable *t, size_t cap)
{
    if (cap > PY_SSIZE_T_MAX / sizeof(Slot)) {
        PyErr_NoMemory();
        return -1;
    }
    Slot *slots = PyMem_Calloc(cap, sizeof(Slot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int shift = MIN_SHIFT;
    for (size_t c = MIN_CAP; c < cap; c *= 2)
        shift--;
    Slot *old = t->slots;
    size_t old_cap = t->cap;
    t->slots = slots;
    t->cap = cap;
    t->shift = shift;
    size_t m = cap - 1;
    for (size_t j = 0; j < old_cap; j++) {
        if (old[j].mask == 0)
            continue;
        size_t i = home(t, old[j].key);
        while (slots[i].mask != 0)
            i = (i + 1) & m;
        slots[i] = old[j];
    }
    PyMem_Free(old);
    t->version++;
    return 0;
}

static int put(BlockTable *t, u64 key, u64 mask)
{
    size_t m = t->cap - 1;
    size_t i = home(t, key);
    for (; t->slots[i].mask != 0; i = (i + 1) & m) {
        if (t->slots[i].key == key) {
            t->slots[i].mask = mask; /* overwrite: no key added, iterators stay valid */
            return 0;
        }
    }
    if ((t->used + 1) * 10 > t->cap * 7) {
        if (resize(t, t->cap * 2) < 0)
            return -1;
        m = t->cap - 1;
        for (i = home(t, key); t->slots[i].mask != 0; i = (i + 1) & m)
            ;
    }
    t->slots[i].key = key;
    t->slots[i].mask = mask;
    t->used++;
    t->version++;
    return 0;
}

/* Empty slot s, then shift back the entries of its run that may move (see the top comment). */
static void erase(BlockTable *t, Slot *s)
{
    size_t m = t->cap - 1;
    size_t i = (size_t)(s - t->slots);
    size_t j = i;
    for (;;) {
        j = (j + 1) & m;
        if (t->slots[j].mask == 0)
            break;
        size_t h = home(t, t->slots[j].key);
        /* The entry at j may fill the hole at i iff i lies cyclically in [h, j). */
        if (((j - h) & m) >= ((j - i) & m)) {
            t->slots[i] = t->slots[j];
            i = j;
        }
    }
    t->slots[i].mask = 0;
    t->used--;
    t->version++;
    if (t->cap > MIN_CAP && t->used * 10 < t->cap && resize(t, cap_for(t->used)) < 0)
        PyErr_Clear(); /* shrinking is optional: on failure keep the slots */
}

/* ---- type: construction, mapping protocol --------------------------------------------------- */

static PyObject *BlockTable_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", NULL};
    Py_ssize_t capacity = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n:BlockTable", kwlist, &capacity))
        return NULL;
    if (capacity < 0) {
        PyErr_SetString(PyExc_ValueError, "capacity must be >= 0");
        return NULL;
    }
    BlockTable *t = (BlockTable *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    t->slots = NULL;
    t->cap = 0;
    t->used = 0;
    t->version = 0;
    /* capacity: entries to hold without a rehash (load <= 7/10) */
    size_t cap = MIN_CAP;
    while (cap * 7 < (size_t)capacity * 10)
        cap *= 2;
    if (resize(t, cap) < 0) {
        Py_DECREF(t);
        return NULL;
    }
    return (PyObject *)t;
}

static void BlockTable_dealloc(BlockTable *t)
{
    PyMem_Free(t->slots);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static Py_ssize_t BlockTable_len(BlockTable *t) { return (Py_ssize_t)t->used; }

static PyObject *BlockTable_subscript(BlockTable *t, PyObject *key)
{
    u64 k;
    Slot *s = as_u64(key, &k) ? find(t, k) : NULL;
    if (s == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(s->mask);
}

static int BlockTable_ass_subscript(BlockTable *t, PyObject *key, PyObject *value)
{
    u64 k, v;
    if (value == NULL) {
        Slot *s = as_u64(key, &k) ? find(t, k) : NULL;
        if (s == NULL) {
            PyErr_SetObject(PyExc_KeyError, key);
            return -1;
        }
        erase(t, s);
        return 0;
    }
    if (parse_u64(key, &k, "keys") < 0 || parse_mask(value, &v) < 0)
        return -1;
    return put(t, k, v);
}

static int BlockTable_contains(BlockTable *t, PyObject *key)
{
    u64 k;
    return as_u64(key, &k) && find(t, k) != NULL;
}

PyDoc_STRVAR(get_doc, "get(key, default=None, /) -> int | default\n\nThe mask of `key`, or `default`.");

static PyObject *BlockTable_get(BlockTable *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "get expected 1 or 2 arguments, got %zd", nargs);
        return NULL;
    }
    u64 k;
    Slot *s = as_u64(args[0], &k) ? find(t, k) : NULL;
    if (s != NULL)
        return PyLong_FromUnsignedLongLong(s->mask);
    PyObject *dflt = nargs > 1 ? args[1] : Py_None;
    Py_INCREF(dflt);
    return dflt;
}

/* A list of keys (what=0), masks (1) or (key, mask) tuples (2), in slot order. */
static PyObject *listing(BlockTable *t, int what)
{
    PyObject *out = PyList_New((Py_ssize_t)t->used);
    if (out == NULL)
        return NULL;
    Py_ssize_t n = 0;
    for (size_t i = 0; i < t->cap; i++) {
        const Slot *s = &t->slots[i];
        if (s->mask == 0)
            continue;
        PyObject *item;
        if (what == 2)
            item = Py_BuildValue("(KK)", (unsigned long long)s->key, (unsigned long long)s->mask);
        else
            item = PyLong_FromUnsignedLongLong(what == 0 ? s->key : s->mask);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, n++, item);
    }
    return out;
}

static PyObject *BlockTable_keys(BlockTable *t, PyObject *Py_UNUSED(ignored)) { return listing(t, 0); }
static PyObject *BlockTable_values(BlockTable *t, PyObject *Py_UNUSED(ignored)) { return listing(t, 1); }
static PyObject *BlockTable_items(BlockTable *t, PyObject *Py_UNUSED(ignored)) { return listing(t, 2); }

static PyObject *BlockTable_clear(BlockTable *t, PyObject *Py_UNUSED(ignored))
{
    Slot *slots = PyMem_Calloc(MIN_CAP, sizeof(Slot));
    if (slots == NULL)
        return PyErr_NoMemory();
    PyMem_Free(t->slots);
    t->slots = slots;
    t->cap = MIN_CAP;
    t->shift = MIN_SHIFT;
    t->used = 0;
    t->version++;
    Py_RETURN_NONE;
}

static PyObject *BlockTable_sizeof(BlockTable *t, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(sizeof(BlockTable) + t->cap * sizeof(Slot));
}

static PyObject *BlockTable_repr(BlockTable *t)
{
    return PyUnicode_FromFormat("BlockTable(len=%zu, capacity=%zu)", t->used, t->cap);
}

/* == / != against a dict or another BlockTable: the same keys with equal values. */
static PyObject *BlockTable_richcompare(BlockTable *t, PyObject *other, int op)
{
    if ((op != Py_EQ && op != Py_NE) ||
        !(PyDict_Check(other) || PyObject_TypeCheck(other, &BlockTableType)))
        Py_RETURN_NOTIMPLEMENTED;
    int equal = 1;
    if (PyObject_TypeCheck(other, &BlockTableType)) {
        BlockTable *o = (BlockTable *)other;
        equal = o->used == t->used;
        for (size_t i = 0; equal && i < t->cap; i++) {
            const Slot *s = &t->slots[i];
            if (s->mask == 0)
                continue;
            const Slot *q = find(o, s->key);
            equal = q != NULL && q->mask == s->mask;
        }
    } else {
        if (PyDict_GET_SIZE(other) != (Py_ssize_t)t->used) {
            equal = 0;
        } else {
            /* Every dict key must be found here with an equal value: dict items may be any
             * objects, so compare them as Python objects (this runs Python code only for dict
             * values that are not ints; the loop does not read our slots after that). */
            PyObject *key, *value;
            Py_ssize_t pos = 0;
            u64 k;
            while (equal && PyDict_Next(other, &pos, &key, &value)) {
                Slot *s = as_u64(key, &k) ? find(t, k) : NULL;
                if (s == NULL) {
                    equal = 0;
                    break;
                }
                PyObject *mine = PyLong_FromUnsignedLongLong(s->mask);
                if (mine == NULL)
                    return NULL;
                Py_INCREF(key);
                Py_INCREF(value);
                int r = PyObject_RichCompareBool(mine, value, Py_EQ);
                Py_DECREF(value);
                Py_DECREF(key);
                Py_DECREF(mine);
                if (r < 0)
                    return NULL;
                equal = r;
            }
        }
    }
    if (equal == (op == Py_EQ))
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

/* ---- match ----------------------------------------------------------------------------------- */

/* out[owner(slot)] = n for every bit of `lost`, lowest first (owner: owners[slot], or the slot). */
static int report(PyObject *out, PyObject *owners, u64 lost, Py_ssize_t n)
{
    PyObject *length = PyLong_FromSsize_t(n);
    if (length == NULL)
        return -1;
    int rc = 0;
    while (lost && rc == 0) {
        int slot = __builtin_ctzll(lost);
        lost &= lost - 1;
        PyObject *who = owners == NULL ? PyLong_FromLong(slot) : PySequence_GetItem(owners, slot);
        if (who == NULL) {
            rc = -1;
            break;
        }
        rc = PyDict_SetItem(out, who, length);
        Py_DECREF(who);
    }
    Py_DECREF(length);
    return rc;
}

PyDoc_STRVAR(match_doc,
"match(hashes, owners=None, /) -> dict\n"
"\n"
"For each slot whose bit is set in the mask of hashes[0]: how many leading hashes it holds,\n"
"i.e. the first i at which its bit is clear in mask(hashes[i]) (or len(hashes)). Missing hashes\n"
"have mask 0. The walk stops at the first i where no bit is left. Keys of the result are\n"
"owners[slot] when `owners` (a sequence) is given, else the slot numbers; they are inserted\n"
"by increasing length, then slot. `hashes`: a list or tuple of ints, or a bytes-like object of\n"
"uint64 little-endian hashes. Equal to prefix_index.match_chain(t.get, hashes, owners).");

static PyObject *BlockTable_match(BlockTable *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "match expected 1 or 2 arguments, got %zd", nargs);
        return NULL;
    }
    PyObject *seq = args[0];
    PyObject *owners = nargs > 1 && args[1] != Py_None ? args[1] : NULL;

    Py_buffer buf = {0};
    PyObject *fast = NULL;
    PyObject **items = NULL;
    const unsigned char *raw = NULL;
    Py_ssize_t n;
    if (PyList_Check(seq) || PyTuple_Check(seq)) {
        /* No Python code runs below until the walk ends, so a list cannot change under it. */
        items = PySequence_Fast_ITEMS(seq);
        n = PySequence_Fast_GET_SIZE(seq);
    } else if (PyObject_CheckBuffer(seq)) {
        if (PyObject_GetBuffer(seq, &buf, PyBUF_SIMPLE) < 0)
            return NULL;
        if (buf.len % 8) {
            PyBuffer_Release(&buf);
            PyErr_Format(PyExc_ValueError, "a buffer of hashes must hold a whole number of uint64, "
                         "got %zd bytes", buf.len);
            return NULL;
        }
        raw = buf.buf;
        n = buf.len / 8;
    } else {
        fast = PySequence_Fast(seq, "hashes must be a sequence of ints or a bytes-like object");
        if (fast == NULL)
            return NULL;
        items = PySequence_Fast_ITEMS(fast);
        n = PySequence_Fast_GET_SIZE(fast);
    }

    /* Walk first, build the result after: drops[d] = (index, bits lost there). At most 64 drops
     * (each one clears at least one bit). */
    Py_ssize_t drop_at[64];
    u64 drop_bits[64];
    int n_drops = 0;
    u64 acc = ~0ULL;
    Py_ssize_t i = 0;
    const size_t m = t->cap - 1;
    const Slot *slots = t->slots;
    u64 keys[CHUNK];
    size_t pos[CHUNK];
    unsigned char ok[CHUNK];
    for (Py_ssize_t base = 0; base < n; base += CHUNK) {
        Py_ssize_t c = n - base < CHUNK ? n - base : CHUNK;
        /* Phase 1: keys and home slots of the chunk, their slots prefetched; the next chunk's
         * int objects prefetched too (they are read in the next phase 1). */
        for (Py_ssize_t j = 0; j < c; j++) {
            if (raw != NULL) {
                memcpy(&keys[j], raw + 8 * (base + j), 8);
#if !PY_LITTLE_ENDIAN
                keys[j] = __builtin_bswap64(keys[j]);
#endif
                ok[j] = 1;
            } else {
                if (base + CHUNK + j < n)
                    __builtin_prefetch(items[base + CHUNK + j]);
                keys[j] = 0;
                ok[j] = (unsigned char)as_u64(items[base + j], &keys[j]);
            }
            pos[j] = home(t, keys[j]);
            __builtin_prefetch(&slots[pos[j]]);
        }
        /* Phase 2: probe in order, AND-ing masks. */
        for (Py_ssize_t j = 0; j < c; j++) {
            u64 v = 0;
            if (ok[j]) {
                for (size_t p = pos[j];; p = (p + 1) & m) {
                    if (slots[p].mask == 0)
                        break;
                    if (slots[p].key == keys[j]) {
                        v = slots[p].mask;
                        break;
                    }
                }
            }
            u64 next = acc & v;
            if (next != acc) {
                i = base + j;
                if (i > 0) { /* at i == 0, the bits of ~v are replicas that hold nothing */
                    drop_at[n_drops] = i;
                    drop_bits[n_drops++] = acc & ~next;
                }
                acc = next;
                if (acc == 0)
                    goto walked;
            }
        }
    }
walked:
    if (raw != NULL)
        PyBuffer_Release(&buf);
    Py_XDECREF(fast);

    PyObject *out = PyDict_New();
    if (out == NULL)
        return NULL;
    for (int d = 0; d < n_drops; d++)
        if (report(out, owners, drop_bits[d], drop_at[d]) < 0)
            goto fail;
    if (n > 0 && acc != 0 && report(out, owners, acc, n) < 0)
        goto fail;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* ---- iterator over keys ------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    BlockTable *table;
    size_t pos;
    u64 version;
} BlockTableIter;

static PyObject *BlockTable_iter(BlockTable *t)
{
    BlockTableIter *it = PyObject_New(BlockTableIter, &BlockTableIterType);
    if (it == NULL)
        return NULL;
    Py_INCREF(t);
    it->table = t;
    it->pos = 0;
    it->version = t->version;
    return (PyObject *)it;
}

static void BlockTableIter_dealloc(BlockTableIter *it)
{
    Py_DECREF(it->table);
    PyObject_Free(it);
}

static PyObject *BlockTableIter_next(BlockTableIter *it)
{
    BlockTable *t = it->table;
    if (it->version != t->version) {
        it->pos = t->cap; /* stay exhausted */
        PyErr_SetString(PyExc_RuntimeError, "BlockTable changed size during iteration");
        return NULL;
    }
    while (it->pos < t->cap) {
        const Slot *s = &t->slots[it->pos++];
        if (s->mask != 0)
            return PyLong_FromUnsignedLongLong(s->key);
    }
    return NULL;
}

/* ---- type objects and module ------------------------------------------------------------- */

static PyMethodDef BlockTable_methods[] = {
    {"get", (PyCFunction)(void (*)(void))BlockTable_get, METH_FASTCALL, get_doc},
    {"match", (PyCFunction)(void (*)(void))BlockTable_match, METH_FASTCALL, match_doc},
    {"keys", (PyCFunction)BlockTable_keys, METH_NOARGS, "A list of the keys."},
    {"values", (PyCFunction)BlockTable_values, METH_NOARGS, "A list of the masks."},
    {"items", (PyCFunction)BlockTable_items, METH_NOARGS, "A list of (key, mask) tuples."},
    {"clear", (PyCFunction)BlockTable_clear, METH_NOARGS, "Remove every entry."},
    {"__sizeof__", (PyCFunction)BlockTable_sizeof, METH_NOARGS, "Bytes used, slots included."},
    {NULL, NULL, 0, NULL},
};

static PyObject *BlockTable_capacity(BlockTable *t, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(t->cap);
}

static PyGetSetDef BlockTable_getset[] = {
    {"capacity", (getter)BlockTable_capacity, NULL, "Number of slots (a power of two).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMappingMethods BlockTable_as_mapping = {
    .mp_length = (lenfunc)BlockTable_len,
    .mp_subscript = (binaryfunc)BlockTable_subscript,
    .mp_ass_subscript = (objobjargproc)BlockTable_ass_subscript,
};

static PySequenceMethods BlockTable_as_sequence = {
    .sq_contains = (objobjproc)BlockTable_contains,
};

PyDoc_STRVAR(BlockTable_doc,
"BlockTable(capacity=0)\n"
"\n"
"A hash table from uint64 block hashes to nonzero uint64 masks (bit s: replica slot s), with\n"
"`match`, the longest-prefix walk. `capacity`: entries to hold before the first rehash.");

static PyTypeObject BlockTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "balancer._blocktable.BlockTable",
    .tp_basicsize = sizeof(BlockTable),
    .tp_dealloc = (destructor)BlockTable_dealloc,
    .tp_repr = (reprfunc)BlockTable_repr,
    .tp_as_sequence = &BlockTable_as_sequence,
    .tp_as_mapping = &BlockTable_as_mapping,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = BlockTable_doc,
    .tp_richcompare = (richcmpfunc)BlockTable_richcompare,
    .tp_iter = (getiterfunc)BlockTable_iter,
    .tp_methods = BlockTable_methods,
    .tp_getset = BlockTable_getset,
    .tp_new = BlockTable_new,
};

static PyTypeObject BlockTableIterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "balancer._blocktable.BlockTableIterator",
    .tp_basicsize = sizeof(BlockTableIter),
    .tp_dealloc = (destructor)BlockTableIter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)BlockTableIter_next,
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "balancer._blocktable",
    .m_doc = "The prefix index's block table in C (see balancer/_blocktable.c).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__blocktable(void)
{
    if (PyType_Ready(&BlockTableType) < 0 || PyType_Ready(&BlockTableIterType) < 0)
        return NULL;
    PyObject *mod = PyModule_Create(&moduledef);
    if (mod == NULL)
        return NULL;
    Py_INCREF(&BlockTableType);
    if (PyModule_AddObject(mod, "BlockTable", (PyObject *)&BlockTableType) < 0 ||
        PyModule_AddObject(mod, "MULTIPLIER", PyLong_FromUnsignedLongLong(MULTIPLIER)) < 0 ||
        PyModule_AddIntConstant(mod, "MAX_SLOTS", 64) < 0) {
        Py_DECREF(&BlockTableType);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
