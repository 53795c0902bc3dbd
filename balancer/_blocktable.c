/*
 * balancer._blocktable: the prefix index's table (block hash -> bitset of replica slots) as an
 * open-addressing hash table over uint64, and the longest-prefix walk over it in C.
 *
 * Why: a dict of 1M int -> int entries costs ~3 dependent cache misses per probe (index slot,
 * entry, key object for the equality check), and the interpreter runs the probes of a 512-block
 * chain one after the other. Here a probe is one slot (key and mask side by side; 16 bytes, four
 * to a cache line, in a fleet of up to 64 replicas), and `match` computes the home slots of the
 * next CHUNK hashes and prefetches them before probing any, so the misses of a chunk overlap
 * instead of queueing.
 *
 * Layout (W = `words`, the mask width in 64-bit words; slot s is bit s % 64 of word s / 64):
 *
 *     slots[cap * (1 + W)]   cap a power of two (>= MIN_CAP), zeroed memory is an empty table
 *     +------------+----------------+-----+--------------------+
 *     | key  (u64) | mask[0]  (u64) | ... | mask[W - 1]  (u64) |   all mask words 0 <=> empty
 *     +------------+----------------+-----+--------------------+
 *
 * - Empty slots are marked by an all-zero mask, not by a reserved key, so every uint64 (0 and
 *   2**64-1 included) is a valid key. The price: 0 is not a storable value (ValueError). The
 *   prefix index never stores one: a block whose mask becomes empty is deleted (its invariant).
 * - Any fleet size: W starts at 1 (slots 0..63; `BlockTable(slots=n)` asks for more up front)
 *   and grows, by re-allocating every slot at the new width, when a store names a slot >= 64 * W.
 *   It never shrinks (the index reuses freed slots but never gives them back). Every loop over
 *   mask words is written once, for a W known at run time, and inlined a second time with W = 1
 *   (`WIDTH_DISPATCH`) so a fleet of <= 64 replicas runs the 16-byte code of a single word.
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
 *
 * Python API: a mapping (get, [], []=, del, in, len, iteration over keys, keys/values/items as
 * lists, ==/!= with a dict or another BlockTable, clear; masks are Python ints of any width
 * below 2**MAX_SLOTS), `set_bit(key, slot)` / `clear_bit(key, slot)`, the prefix index's store
 * and removal of one (block, replica) pair, and `match(hashes, owners=None)`, the whole chain
 * walk of prefix_index.match_chain. prefix_index.DictTable is the same API over a dict: the
 * fallback where this is not built, and the oracle of the tests. Lookups of anything that is
 * not an int in [0, 2**64) find nothing (as dict.get would); stores of such keys raise.
 * Iterating while keys are added or removed raises RuntimeError, as for a dict. Not
 * thread-safe (nor is the index); every method holds the GIL and runs no Python code while it
 * touches the slots.
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
/* Replica slots a table may hold: 1024 mask words, 8 KiB an entry. A bound on what one wrong
 * slot number can allocate, far above the fleet one balancer fronts. */
#define MAX_SLOTS 65536
#define MAX_WORDS (MAX_SLOTS / 64)

/* For the helpers taking the mask width W: inlined into each caller, once with W = 1. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

typedef struct {
    PyObject_HEAD
    u64 *slots;     /* cap entries of 1 + words u64 each: the key, then the mask words */
    size_t cap;     /* power of two */
    int shift;      /* 64 - log2(cap): home(key) = key * MULTIPLIER >> shift */
    size_t words;   /* mask width: replica slots 0 .. 64 * words - 1 */
    size_t used;
    u64 version;    /* bumped when a key is added or removed (iterators check it) */
} BlockTable;

static PyTypeObject BlockTableType;
static PyTypeObject BlockTableIterType;

static inline size_t home(const BlockTable *t, u64 key)
{
    return (size_t)((key * MULTIPLIER) >> t->shift);
}

/* Entry i: e[0] the key, e[1..W] the mask. */
ALWAYS_INLINE u64 *entry(const BlockTable *t, size_t i, size_t W)
{
    return t->slots + i * (1 + W);
}

ALWAYS_INLINE int empty(const u64 *e, size_t W)
{
    for (size_t w = 1; w <= W; w++)
        if (e[w] != 0)
            return 0;
    return 1;
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

/* For stores: a key as uint64, or -1 with TypeError / OverflowError set. */
static int parse_key(PyObject *o, u64 *out)
{
    if (as_u64(o, out))
        return 0;
    if (!PyLong_Check(o))
        PyErr_Format(PyExc_TypeError, "BlockTable keys must be an int, not %.100s",
                     Py_TYPE(o)->tp_name);
    else
        PyErr_SetString(PyExc_OverflowError, "BlockTable keys must be in [0, 2**64)");
    return -1;
}

/* A replica slot for set_bit / clear_bit, in [0, MAX_SLOTS); -1 with an exception set. */
static int parse_slot(PyObject *o, Py_ssize_t *out)
{
    Py_ssize_t s = PyLong_AsSsize_t(o);
    if (s == -1 && PyErr_Occurred())
        return -1;
    if (s < 0 || s >= MAX_SLOTS) {
        PyErr_Format(PyExc_ValueError,
                     "replica slot %zd is outside [0, %d): a BlockTable holds at most %d replica "
                     "slots; split the fleet over more balancers", s, MAX_SLOTS, MAX_SLOTS);
        return -1;
    }
    *out = s;
    return 0;
}

/* A mask as words: *n_words (>= 1) of them in *words, which is `small` when one word holds it,
 * else PyMem memory the caller frees. -1 with TypeError / OverflowError / ValueError set. */
static int parse_mask(PyObject *o, u64 *small, u64 **words, size_t *n_words)
{
    *words = small;
    *n_words = 1;
    if (as_u64(o, small)) {
        if (*small == 0) {
            PyErr_SetString(PyExc_ValueError,
                            "BlockTable masks must be nonzero (0 marks an empty slot)");
            return -1;
        }
        return 0;
    }
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "BlockTable masks must be an int, not %.100s",
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow < 0 || (overflow == 0 && v < 0)) {
        PyErr_SetString(PyExc_OverflowError, "BlockTable masks must not be negative");
        return -1;
    }
    /* Above 2**64 (as_u64 took the rest): one word at a time, low first. */
    PyObject *bits_obj = PyObject_CallMethod(o, "bit_length", NULL);
    if (bits_obj == NULL)
        return -1;
    size_t bits = PyLong_AsSize_t(bits_obj);
    Py_DECREF(bits_obj);
    if (bits == (size_t)-1 && PyErr_Occurred())
        return -1;
    if (bits > MAX_SLOTS) {
        PyErr_Format(PyExc_OverflowError, "BlockTable masks must be below 2**%d (its replica "
                     "slot limit)", MAX_SLOTS);
        return -1;
    }
    size_t n = (bits + 63) / 64;
    u64 *out = PyMem_Malloc(n * sizeof(u64));
    PyObject *shift = PyLong_FromLong(64);
    if (out == NULL || shift == NULL) {
        PyMem_Free(out);
        Py_XDECREF(shift);
        PyErr_NoMemory();
        return -1;
    }
    Py_INCREF(o);
    PyObject *rest = o;
    for (size_t w = 0; w < n && rest != NULL; w++) {
        out[w] = (u64)PyLong_AsUnsignedLongLongMask(rest);
        PyObject *next = PyNumber_Rshift(rest, shift);
        Py_DECREF(rest);
        rest = next;
    }
    Py_DECREF(shift);
    if (rest == NULL) {
        PyMem_Free(out);
        return -1;
    }
    Py_DECREF(rest);
    *words = out;
    *n_words = n;
    return 0;
}

/* The W-word mask m as a Python int. */
static PyObject *mask_to_long(const u64 *m, size_t W)
{
    size_t top = W - 1;
    while (top > 0 && m[top] == 0)
        top--;
    PyObject *r = PyLong_FromUnsignedLongLong(m[top]);
    if (top == 0 || r == NULL)
        return r;
    PyObject *shift = PyLong_FromLong(64);
    for (size_t w = top; r != NULL && w-- > 0;) {
        PyObject *hi = shift != NULL ? PyNumber_Lshift(r, shift) : NULL;
        Py_DECREF(r);
        PyObject *lo = hi != NULL ? PyLong_FromUnsignedLongLong(m[w]) : NULL;
        r = lo != NULL ? PyNumber_Or(hi, lo) : NULL;
        Py_XDECREF(hi);
        Py_XDECREF(lo);
    }
    Py_XDECREF(shift);
    return r;
}

/* ---- the table ----------------------------------------------------------------------------- */

/* The entry holding `key`, or NULL. */
ALWAYS_INLINE u64 *find_w(const BlockTable *t, u64 key, size_t W)
{
    size_t m = t->cap - 1;
    for (size_t i = home(t, key);; i = (i + 1) & m) {
        u64 *e = entry(t, i, W);
        if (empty(e, W))
            return NULL;
        if (e[0] == key)
            return e;
    }
}

static u64 *find(const BlockTable *t, u64 key)
{
    return t->words == 1 ? find_w(t, key, 1) : find_w(t, key, t->words);
}

/* Smallest capacity (a power of two, >= MIN_CAP) holding n entries at a load of at most 1/2. */
static size_t cap_for(size_t n)
{
    size_t cap = MIN_CAP;
    while (cap / 2 < n)
        cap *= 2;
    return cap;
}

/* Rehash into `cap` entries of `words` mask words (never fewer words than now). */
static int resize(BlockTable *t, size_t cap, size_t words)
{
    size_t stride = 1 + words;
    if (cap > PY_SSIZE_T_MAX / (stride * sizeof(u64))) {
        PyErr_NoMemory();
        return -1;
    }
    u64 *slots = PyMem_Calloc(cap * stride, sizeof(u64));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int shift = MIN_SHIFT;
    for (size_t c = MIN_CAP; c < cap; c *= 2)
        shift--;
    u64 *old = t->slots;
    size_t old_cap = t->cap, old_words = t->words;
    t->slots = slots;
    t->cap = cap;
    t->shift = shift;
    t->words = words;
    size_t m = cap - 1;
    for (size_t j = 0; j < old_cap; j++) {
        const u64 *e = old + j * (1 + old_words);
        if (empty(e, old_words))
            continue;
        size_t i = home(t, e[0]);
        while (!empty(entry(t, i, words), words))
            i = (i + 1) & m;
        memcpy(entry(t, i, words), e, (1 + old_words) * sizeof(u64)); /* new words stay 0 */
    }
    PyMem_Free(old);
    t->version++;
    return 0;
}

/* Masks at least `words` wide. */
static int widen(BlockTable *t, size_t words)
{
    return words <= t->words ? 0 : resize(t, t->cap, words);
}

/* The entry of `key`; added if absent, with an all-zero mask that the caller makes nonzero
 * before anything else reads the table. NULL with MemoryError set. */
ALWAYS_INLINE u64 *lookup_or_add_w(BlockTable *t, u64 key, size_t W)
{
    size_t m = t->cap - 1;
    size_t i = home(t, key);
    for (;; i = (i + 1) & m) {
        u64 *e = entry(t, i, W);
        if (empty(e, W))
            break;
        if (e[0] == key)
            return e; /* no key added: iterators stay valid */
    }
    if ((t->used + 1) * 10 > t->cap * 7) {
        if (resize(t, t->cap * 2, W) < 0)
            return NULL;
        m = t->cap - 1;
        for (i = home(t, key); !empty(entry(t, i, W), W); i = (i + 1) & m)
            ;
    }
    u64 *e = entry(t, i, W);
    e[0] = key;
    t->used++;
    t->version++;
    return e;
}

static u64 *lookup_or_add(BlockTable *t, u64 key)
{
    return t->words == 1 ? lookup_or_add_w(t, key, 1) : lookup_or_add_w(t, key, t->words);
}

/* Empty entry e, then shift back the entries of its run that may move (see the top comment). */
ALWAYS_INLINE void erase_w(BlockTable *t, u64 *e, size_t W)
{
    size_t m = t->cap - 1;
    size_t i = (size_t)(e - t->slots) / (1 + W);
    size_t j = i;
    for (;;) {
        j = (j + 1) & m;
        u64 *next = entry(t, j, W);
        if (empty(next, W))
            break;
        size_t h = home(t, next[0]);
        /* The entry at j may fill the hole at i iff i lies cyclically in [h, j). */
        if (((j - h) & m) >= ((j - i) & m)) {
            memcpy(entry(t, i, W), next, (1 + W) * sizeof(u64));
            i = j;
        }
    }
    memset(entry(t, i, W) + 1, 0, W * sizeof(u64));
    t->used--;
    t->version++;
    if (t->cap > MIN_CAP && t->used * 10 < t->cap && resize(t, cap_for(t->used), W) < 0)
        PyErr_Clear(); /* shrinking is optional: on failure keep the slots */
}

static void erase(BlockTable *t, u64 *e)
{
    if (t->words == 1)
        erase_w(t, e, 1);
    else
        erase_w(t, e, t->words);
}

/* Equal masks, the narrower one read as zero beyond its words. */
static int masks_equal(const u64 *a, size_t wa, const u64 *b, size_t wb)
{
    size_t n = wa > wb ? wa : wb;
    for (size_t w = 0; w < n; w++)
        if ((w < wa ? a[w] : 0) != (w < wb ? b[w] : 0))
            return 0;
    return 1;
}

/* ---- type: construction, mapping protocol --------------------------------------------------- */

static PyObject *BlockTable_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", "slots", NULL};
    Py_ssize_t capacity = 0, n_slots = 64;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nn:BlockTable", kwlist, &capacity, &n_slots))
        return NULL;
    if (capacity < 0) {
        PyErr_SetString(PyExc_ValueError, "capacity must be >= 0");
        return NULL;
    }
    if (n_slots < 1 || n_slots > MAX_SLOTS) {
        PyErr_Format(PyExc_ValueError, "slots must be in [1, %d], got %zd", MAX_SLOTS, n_slots);
        return NULL;
    }
    BlockTable *t = (BlockTable *)type->tp_alloc(type, 0);
    if (t == NULL)
        return NULL;
    t->slots = NULL;
    t->cap = 0;
    t->words = 1;
    t->used = 0;
    t->version = 0;
    /* capacity: entries to hold without a rehash (load <= 7/10) */
    size_t cap = MIN_CAP;
    while (cap * 7 < (size_t)capacity * 10)
        cap *= 2;
    if (resize(t, cap, (size_t)(n_slots + 63) / 64) < 0) {
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
    u64 *e = as_u64(key, &k) ? find(t, k) : NULL;
    if (e == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return mask_to_long(e + 1, t->words);
}

static int BlockTable_ass_subscript(BlockTable *t, PyObject *key, PyObject *value)
{
    u64 k;
    if (value == NULL) {
        u64 *e = as_u64(key, &k) ? find(t, k) : NULL;
        if (e == NULL) {
            PyErr_SetObject(PyExc_KeyError, key);
            return -1;
        }
        erase(t, e);
        return 0;
    }
    u64 small, *words;
    size_t n;
    if (parse_key(key, &k) < 0 || parse_mask(value, &small, &words, &n) < 0)
        return -1;
    int rc = widen(t, n);
    u64 *e = rc == 0 ? lookup_or_add(t, k) : NULL;
    if (e != NULL) {
        memset(e + 1, 0, t->words * sizeof(u64));
        memcpy(e + 1, words, n * sizeof(u64));
    } else {
        rc = -1;
    }
    if (words != &small)
        PyMem_Free(words);
    return rc;
}

static int BlockTable_contains(BlockTable *t, PyObject *key)
{
    u64 k;
    return as_u64(key, &k) && find(t, k) != NULL;
}

/* 0 if a METH_FASTCALL method got lo..hi arguments, else -1 with TypeError set. */
static int check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi)
{
    if (nargs >= lo && nargs <= hi)
        return 0;
    if (lo == hi)
        PyErr_Format(PyExc_TypeError, "%s expected %zd arguments, got %zd", name, lo, nargs);
    else
        PyErr_Format(PyExc_TypeError, "%s expected %zd or %zd arguments, got %zd", name, lo, hi, nargs);
    return -1;
}

PyDoc_STRVAR(get_doc, "get(key, default=None, /) -> int | default\n\nThe mask of `key`, or `default`.");

static PyObject *BlockTable_get(BlockTable *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("get", nargs, 1, 2) < 0)
        return NULL;
    u64 k;
    u64 *e = as_u64(args[0], &k) ? find(t, k) : NULL;
    if (e != NULL)
        return mask_to_long(e + 1, t->words);
    PyObject *dflt = nargs > 1 ? args[1] : Py_None;
    Py_INCREF(dflt);
    return dflt;
}

PyDoc_STRVAR(set_bit_doc,
"set_bit(key, slot, /) -> bool\n"
"\n"
"Set bit `slot` in the mask of `key` (adding the key, and widening every mask when the slot\n"
"is beyond the current width). True if the bit was clear, False if it was already set.");

/* set_bit (set = 1) and clear_bit (set = 0): True if the call flipped the bit. */
static PyObject *flip_bit(BlockTable *t, PyObject *const *args, Py_ssize_t nargs, int set)
{
    if (check_nargs(set ? "set_bit" : "clear_bit", nargs, 2, 2) < 0)
        return NULL;
    Py_ssize_t slot;
    u64 k, *e;
    if (parse_slot(args[1], &slot) < 0)
        return NULL;
    if (set) {
        if (parse_key(args[0], &k) < 0 || widen(t, (size_t)slot / 64 + 1) < 0 ||
            (e = lookup_or_add(t, k)) == NULL)
            return NULL;
    } else {
        e = as_u64(args[0], &k) && (size_t)slot / 64 < t->words ? find(t, k) : NULL;
        if (e == NULL)
            Py_RETURN_FALSE;
    }
    u64 *word = e + 1 + slot / 64;
    u64 bit = 1ULL << (slot % 64);
    if (((*word & bit) != 0) == set)
        Py_RETURN_FALSE;
    *word ^= bit;
    if (!set && empty(e, t->words))
        erase(t, e);
    Py_RETURN_TRUE;
}

static PyObject *BlockTable_set_bit(BlockTable *t, PyObject *const *args, Py_ssize_t nargs)
{
    return flip_bit(t, args, nargs, 1);
}

PyDoc_STRVAR(clear_bit_doc,
"clear_bit(key, slot, /) -> bool\n"
"\n"
"Clear bit `slot` in the mask of `key`, deleting the key when its mask becomes empty. True if\n"
"the bit was set; False if it was not, or the key is absent (or not a uint64).");

static PyObject *BlockTable_clear_bit(BlockTable *t, PyObject *const *args, Py_ssize_t nargs)
{
    return flip_bit(t, args, nargs, 0);
}

/* A list of keys (what=0), masks (1) or (key, mask) tuples (2), in slot order. */
static PyObject *listing(BlockTable *t, int what)
{
    PyObject *out = PyList_New((Py_ssize_t)t->used);
    if (out == NULL)
        return NULL;
    Py_ssize_t n = 0;
    const size_t W = t->words;
    for (size_t i = 0; i < t->cap; i++) {
        const u64 *e = entry(t, i, W);
        if (empty(e, W))
            continue;
        PyObject *item;
        if (what == 0) {
            item = PyLong_FromUnsignedLongLong(e[0]);
        } else {
            PyObject *mask = mask_to_long(e + 1, W);
            item = what == 1 || mask == NULL ? mask : Py_BuildValue("(KN)", (unsigned long long)e[0], mask);
        }
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
    /* The width stays: the slots that needed it are still assigned. */
    u64 *slots = PyMem_Calloc(MIN_CAP * (1 + t->words), sizeof(u64));
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
    return PyLong_FromSize_t(sizeof(BlockTable) + t->cap * (1 + t->words) * sizeof(u64));
}

static PyObject *BlockTable_repr(BlockTable *t)
{
    return PyUnicode_FromFormat("BlockTable(len=%zu, capacity=%zu, slots=%zu)", t->used, t->cap,
                                64 * t->words);
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
            const u64 *e = entry(t, i, t->words);
            if (empty(e, t->words))
                continue;
            const u64 *q = find(o, e[0]);
            equal = q != NULL && masks_equal(e + 1, t->words, q + 1, o->words);
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
                u64 *e = as_u64(key, &k) ? find(t, k) : NULL;
                if (e == NULL) {
                    equal = 0;
                    break;
                }
                PyObject *mine = mask_to_long(e + 1, t->words);
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

/* A replica slot that left the walk at `at` (its prefix length). */
typedef struct {
    Py_ssize_t at;
    Py_ssize_t slot;
} Drop;

/* Append a Drop for each bit of `lost` (bits of mask word w), lowest first. */
static inline Py_ssize_t add_drops(Drop *drops, Py_ssize_t n_drops, u64 lost, size_t w, Py_ssize_t at)
{
    while (lost) {
        drops[n_drops].at = at;
        drops[n_drops++].slot = (Py_ssize_t)(64 * w) + __builtin_ctzll(lost);
        lost &= lost - 1;
    }
    return n_drops;
}

/* The walk of `match` over a table W words wide. acc (W words, all ones on entry) is AND-ed
 * with each hash's mask in turn (a missing hash: mask 0), until it is empty; each slot whose
 * bit drops at i > 0 becomes a Drop (at i == 0, the bits outside the first mask are replicas
 * that hold nothing). Returns the number of drops: each slot drops at most once, so at most
 * 64 * W. Either items (n int objects) or raw (n uint64 little-endian) is set. */
ALWAYS_INLINE Py_ssize_t walk_w(const BlockTable *t, PyObject **items, const unsigned char *raw,
                                Py_ssize_t n, u64 *acc, Drop *drops, size_t W)
{
    Py_ssize_t n_drops = 0;
    const size_t m = t->cap - 1;
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
            __builtin_prefetch(entry(t, pos[j], W));
        }
        /* Phase 2: probe in order, AND-ing masks. */
        for (Py_ssize_t j = 0; j < c; j++) {
            const u64 *v = NULL; /* the mask, NULL: 0 */
            if (ok[j]) {
                for (size_t p = pos[j];; p = (p + 1) & m) {
                    const u64 *e = entry(t, p, W);
                    if (empty(e, W))
                        break;
                    if (e[0] == keys[j]) {
                        v = e + 1;
                        break;
                    }
                }
            }
            Py_ssize_t i = base + j;
            int changed = 0;
            u64 left = 0;
            for (size_t w = 0; w < W; w++) {
                u64 next = v != NULL ? acc[w] & v[w] : 0;
                if (next != acc[w]) {
                    changed = 1;
                    if (i > 0)
                        n_drops = add_drops(drops, n_drops, acc[w] & ~next, w, i);
                    acc[w] = next;
                }
                left |= next;
            }
            if (changed && left == 0)
                return n_drops;
        }
    }
    return n_drops;
}

/* out[owner(slot)] = at, owner: owners[slot], or the slot number when owners is NULL. */
static int report(PyObject *out, PyObject *owners, Py_ssize_t slot, PyObject *at)
{
    PyObject *who = owners == NULL ? PyLong_FromSsize_t(slot) : PySequence_GetItem(owners, slot);
    if (who == NULL)
        return -1;
    int rc = PyDict_SetItem(out, who, at);
    Py_DECREF(who);
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
    if (check_nargs("match", nargs, 1, 2) < 0)
        return NULL;
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

    /* Walk first, build the result after. One word: the accumulator and its (at most 64)
     * drops on the stack; wider masks: on the heap. */
    const size_t W = t->words;
    u64 acc1 = ~0ULL;
    Drop drops1[64];
    u64 *acc = &acc1;
    Drop *drops = drops1;
    if (W > 1) {
        acc = PyMem_Malloc(W * sizeof(u64));
        drops = PyMem_Malloc(64 * W * sizeof(Drop));
        if (acc == NULL || drops == NULL) {
            PyErr_NoMemory();
            n = -1;
        } else {
            memset(acc, 0xFF, W * sizeof(u64));
        }
    }
    Py_ssize_t n_drops = 0;
    if (n > 0)
        n_drops = W == 1 ? walk_w(t, items, raw, n, acc, drops, 1)
                         : walk_w(t, items, raw, n, acc, drops, W);
    if (raw != NULL)
        PyBuffer_Release(&buf);
    Py_XDECREF(fast);

    PyObject *out = n < 0 ? NULL : PyDict_New();
    PyObject *at = NULL;
    if (out == NULL)
        goto done;
    for (Py_ssize_t d = 0; d < n_drops; d++) {
        if (d == 0 || drops[d].at != drops[d - 1].at) {
            Py_XDECREF(at);
            if ((at = PyLong_FromSsize_t(drops[d].at)) == NULL)
                goto fail;
        }
        if (report(out, owners, drops[d].slot, at) < 0)
            goto fail;
    }
    Py_CLEAR(at);
    if (n > 0) { /* the slots that hold the whole chain */
        for (size_t w = 0; w < W; w++) {
            for (u64 left = acc[w]; left; left &= left - 1) {
                if (at == NULL && (at = PyLong_FromSsize_t(n)) == NULL)
                    goto fail;
                if (report(out, owners, (Py_ssize_t)(64 * w) + __builtin_ctzll(left), at) < 0)
                    goto fail;
            }
        }
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    Py_XDECREF(at);
    if (acc != &acc1)
        PyMem_Free(acc);
    if (drops != drops1)
        PyMem_Free(drops);
    return out;
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
        const u64 *e = entry(t, it->pos++, t->words);
        if (!empty(e, t->words))
            return PyLong_FromUnsignedLongLong(e[0]);
    }
    return NULL;
}

/* ---- type objects and module ------------------------------------------------------------- */

static PyMethodDef BlockTable_methods[] = {
    {"get", (PyCFunction)(void (*)(void))BlockTable_get, METH_FASTCALL, get_doc},
    {"match", (PyCFunction)(void (*)(void))BlockTable_match, METH_FASTCALL, match_doc},
    {"set_bit", (PyCFunction)(void (*)(void))BlockTable_set_bit, METH_FASTCALL, set_bit_doc},
    {"clear_bit", (PyCFunction)(void (*)(void))BlockTable_clear_bit, METH_FASTCALL, clear_bit_doc},
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

static PyObject *BlockTable_slots(BlockTable *t, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(64 * t->words);
}

static PyGetSetDef BlockTable_getset[] = {
    {"capacity", (getter)BlockTable_capacity, NULL, "Number of entries (a power of two).", NULL},
    {"slots", (getter)BlockTable_slots, NULL,
     "Replica slots the masks hold now (64 x their width in words; grows on demand).", NULL},
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
"BlockTable(capacity=0, slots=64)\n"
"\n"
"A hash table from uint64 block hashes to nonzero masks (bit s: replica slot s, any s below\n"
"MAX_SLOTS), with `match`, the longest-prefix walk. `capacity`: entries to hold before the\n"
"first rehash; `slots`: replica slots to size the masks for (they widen on demand).");

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
        PyModule_AddIntConstant(mod, "MAX_SLOTS", MAX_SLOTS) < 0) {
        Py_DECREF(&BlockTableType);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
