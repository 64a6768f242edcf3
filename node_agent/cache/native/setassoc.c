/* The set-associative cache's two hot loops, query and insert, compiled for CPU hosts.
 *
 * The cache's state lives in NumPy arrays owned by node_agent.cache.set_associative (slot keys,
 * owning table, stamps, frequencies, vectors, and the admission sketch); a Kernel holds buffer views
 * of them and changes them in place exactly as the array formulation there does, so the two can be
 * swapped at any step and a test compares every state array after each one. Semantics (the batch
 * acts as its distinct keys handled one at a time in ascending order, stamps, victims, admission)
 * are documented once, in that module; this file only follows them. The GIL is released while a
 * loop runs; the Python side holds the cache's lock around every call.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SKETCH_DEPTH 4

static inline uint64_t mix64(uint64_t z) {
    /* SplitMix64's finaliser, the same as node_agent.plan.bucket_of's */
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

typedef struct {
    PyObject_HEAD
    Py_buffer keys, owner, stamp, freq, values, sketch;
    int has_sketch;
    int64_t sets, ways, slots, row_bytes, tables;
    uint64_t set_salt, table_salt, sketch_salt, sketch_mask, sketch_width;
    int lfu;
    int stamp_bits;
    int32_t freq_cap;
    uint8_t sketch_cap;
} Kernel;

static void kernel_release(Kernel *self) {
    Py_buffer *views[] = {&self->keys, &self->owner, &self->stamp, &self->freq, &self->values, &self->sketch};
    for (size_t i = 0; i < sizeof(views) / sizeof(views[0]); i++) {
        if (views[i]->obj != NULL) PyBuffer_Release(views[i]);
    }
}

static void kernel_dealloc(Kernel *self) {
    kernel_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A writable, C-contiguous view of `obj` holding exactly `count` items of `itemsize` bytes. */
static int take_view(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, Py_ssize_t count, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) return -1;
    if (view->len != itemsize * count) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", name, itemsize * count, view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int kernel_init(Kernel *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"keys", "owner", "stamp", "freq", "values", "sketch", "sets", "ways", "row_bytes",
                             "tables", "lfu", "stamp_bits", "freq_cap", "sketch_cap", "sketch_width",
                             "set_salt", "table_salt", "sketch_salt", NULL};
    PyObject *keys, *owner, *stamp, *freq, *values, *sketch;
    long long sets, ways, row_bytes, tables, sketch_width;
    int lfu, stamp_bits, freq_cap, sketch_cap;
    unsigned long long set_salt, table_salt, sketch_salt;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOLLLLpiiiLKKK", kwlist, &keys, &owner, &stamp, &freq,
                                     &values, &sketch, &sets, &ways, &row_bytes, &tables, &lfu, &stamp_bits,
                                     &freq_cap, &sketch_cap, &sketch_width, &set_salt, &table_salt,
                                     &sketch_salt))
        return -1;
    kernel_release(self);
    if (sets < 1 || ways < 1 || row_bytes < 1 || tables < 1 || stamp_bits < 1 || stamp_bits > 62) {
        PyErr_SetString(PyExc_ValueError, "bad cache geometry");
        return -1;
    }
    self->sets = sets;
    self->ways = ways;
    self->slots = sets * ways;
    self->row_bytes = row_bytes;
    self->tables = tables;
    if (take_view(keys, &self->keys, 8, self->slots, "keys") < 0) return -1;
    if (take_view(owner, &self->owner, 2, self->slots, "owner") < 0) return -1;
    if (take_view(stamp, &self->stamp, 8, self->slots, "stamp") < 0) return -1;
    if (take_view(freq, &self->freq, 4, self->slots, "freq") < 0) return -1;
    if (take_view(values, &self->values, row_bytes, self->slots, "values") < 0) return -1;
    self->has_sketch = sketch != Py_None;
    if (self->has_sketch) {
        /* sketch_width counters a row, SKETCH_DEPTH rows, laid out as 64-byte blocks */
        if (sketch_width < 16 || (sketch_width & (sketch_width - 1)) != 0) {
            PyErr_SetString(PyExc_ValueError, "sketch_width must be a power of two, at least 16");
            return -1;
        }
        if (take_view(sketch, &self->sketch, 1, SKETCH_DEPTH * sketch_width, "sketch") < 0) return -1;
        self->sketch_width = (uint64_t)sketch_width;
        self->sketch_mask = (uint64_t)(SKETCH_DEPTH * sketch_width / 64) - 1;
    }
    self->lfu = lfu;
    self->stamp_bits = stamp_bits;
    self->freq_cap = freq_cap;
    self->sketch_cap = (uint8_t)sketch_cap;
    self->set_salt = set_salt;
    self->table_salt = table_salt;
    self->sketch_salt = sketch_salt;
    return 0;
}

/* -- the pieces both loops share ----------------------------------------------------------------- */

static inline uint64_t salt_of(const Kernel *k, int64_t table_id) {
    return k->set_salt ^ ((uint64_t)table_id * k->table_salt);
}

static inline uint64_t hash_of(const Kernel *k, int64_t key, int64_t table_id) {
    return mix64((uint64_t)key ^ salt_of(k, table_id));
}

/* A key's counters all sit in one 64-byte block (one cache line), 16 counters per row */
static inline void sketch_cells(const Kernel *k, uint64_t z, uint64_t cells[SKETCH_DEPTH]) {
    uint64_t h = mix64(z ^ k->sketch_salt);
    uint64_t block = (h & 0xFFFFFFFFULL) & k->sketch_mask;
    for (uint64_t r = 0; r < SKETCH_DEPTH; r++) cells[r] = block * 64 + r * 16 + ((h >> (32 + 4 * r)) & 15);
}

static inline uint8_t estimate(const Kernel *k, uint64_t z) {
    const uint8_t *sketch = (const uint8_t *)k->sketch.buf;
    uint64_t cells[SKETCH_DEPTH];
    sketch_cells(k, z, cells);
    uint8_t low = sketch[cells[0]];
    for (int r = 1; r < SKETCH_DEPTH; r++)
        if (sketch[cells[r]] < low) low = sketch[cells[r]];
    return low;
}

/* The slot of `key` in its set, or -1. */
static inline int64_t find(const Kernel *k, int64_t key, int64_t table_id, int64_t set) {
    const int64_t *keys = (const int64_t *)k->keys.buf;
    const int16_t *owner = (const int16_t *)k->owner.buf;
    int64_t first = set * k->ways;
    for (int64_t w = 0; w < k->ways; w++) {
        int64_t slot = first + w;
        if (keys[slot] == key && owner[slot] == table_id) return slot;
    }
    return -1;
}

/* The set's next victim: its lowest empty way, else the lowest (frequency, stamp) under LFU or the
 * lowest stamp under LRU (stamps are distinct, so there are no ties). */
static inline int64_t victim_of(const Kernel *k, int64_t set) {
    const int16_t *owner = (const int16_t *)k->owner.buf;
    const int64_t *stamp = (const int64_t *)k->stamp.buf;
    const int32_t *freq = (const int32_t *)k->freq.buf;
    int64_t first = set * k->ways, best = -1, best_priority = 0;
    for (int64_t w = 0; w < k->ways; w++) {
        int64_t slot = first + w;
        if (owner[slot] < 0) return slot;
        int64_t priority = k->lfu ? (((int64_t)freq[slot] << k->stamp_bits) | stamp[slot]) : stamp[slot];
        if (best < 0 || priority < best_priority) {
            best = slot;
            best_priority = priority;
        }
    }
    return best;
}

/* -- prefetching ---------------------------------------------------------------------------------
 * A key costs a handful of cache misses in random places (its set's slot keys, its sketch block, its
 * row, its stamp and frequency), and a loop that waits for each in turn spends most of its time
 * waiting. The loops below ask for the lines of the key PREFETCH_AHEAD places ahead while they work
 * on this one, so the misses of several keys are outstanding at once. Prefetches are hints: they
 * change no result. */

#define PREFETCH_AHEAD 8

static inline void prefetch_lines(const void *start, int64_t bytes, int write) {
    const char *p = (const char *)start;
    for (int64_t b = 0; b < bytes; b += 64) {
        if (write) __builtin_prefetch(p + b, 1, 3);
        else __builtin_prefetch(p + b, 0, 3);
    }
}

/* what finding a key in its set reads: the set's slot keys and owners */
static inline void prefetch_set(const Kernel *k, uint64_t z) {
    int64_t first = (int64_t)(z % (uint64_t)k->sets) * k->ways;
    prefetch_lines((const int64_t *)k->keys.buf + first, 8 * k->ways, 0);
    prefetch_lines((const int16_t *)k->owner.buf + first, 2 * k->ways, 0);
}

/* what choosing a victim in a set reads besides that: its stamps and frequencies */
static inline void prefetch_set_order(const Kernel *k, uint64_t z) {
    int64_t first = (int64_t)(z % (uint64_t)k->sets) * k->ways;
    prefetch_lines((const int64_t *)k->stamp.buf + first, 8 * k->ways, 1);
    prefetch_lines((const int32_t *)k->freq.buf + first, 4 * k->ways, 1);
}

static inline void prefetch_sketch(const Kernel *k, uint64_t z) {
    uint64_t h = mix64(z ^ k->sketch_salt);
    __builtin_prefetch((const uint8_t *)k->sketch.buf + ((h & 0xFFFFFFFFULL) & k->sketch_mask) * 64, 1, 3);
}

/* what a hit reads and writes: its row, stamp and frequency */
static inline void prefetch_slot(const Kernel *k, int64_t slot) {
    prefetch_lines((const uint8_t *)k->values.buf + slot * k->row_bytes, k->row_bytes, 0);
    __builtin_prefetch((const int64_t *)k->stamp.buf + slot, 1, 3);
    __builtin_prefetch((const int32_t *)k->freq.buf + slot, 1, 3);
}

/* -- query ----------------------------------------------------------------------------------------- */

static PyObject *kernel_query(Kernel *self, PyObject *args) {
    Py_buffer keys_view, out_view, hit_view;
    long long table_id, clock;
    if (!PyArg_ParseTuple(args, "y*Lw*w*L", &keys_view, &table_id, &out_view, &hit_view, &clock)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = keys_view.len / 8;
    uint64_t *cells = NULL;
    uint8_t *counts = NULL;
    uint64_t *hashes = NULL;
    int64_t *slots = NULL;
    if (keys_view.len % 8 || out_view.len != n * self->row_bytes || hit_view.len != n) {
        PyErr_SetString(PyExc_ValueError, "query: keys, out and hit disagree in length");
        goto done;
    }
    hashes = malloc(sizeof(uint64_t) * (size_t)(n ? n : 1));
    slots = malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
    if (hashes == NULL || slots == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (self->has_sketch && n) {
        cells = malloc(sizeof(uint64_t) * SKETCH_DEPTH * (size_t)n);
        counts = malloc((size_t)SKETCH_DEPTH * (size_t)n);
        if (cells == NULL || counts == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    const int64_t *keys = (const int64_t *)keys_view.buf;
    uint8_t *out = (uint8_t *)out_view.buf, *hit = (uint8_t *)hit_view.buf;
    const uint8_t *values = (const uint8_t *)self->values.buf;
    int64_t *stamp = (int64_t *)self->stamp.buf;
    int32_t *freq = (int32_t *)self->freq.buf;
    uint8_t *sketch = self->has_sketch ? (uint8_t *)self->sketch.buf : NULL;
    int64_t hits = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) hashes[i] = hash_of(self, keys[i], table_id);
    /* find every key's slot (and read its sketch counters), its set's lines asked for ahead */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) {
            prefetch_set(self, hashes[i + PREFETCH_AHEAD]);
            if (sketch != NULL) prefetch_sketch(self, hashes[i + PREFETCH_AHEAD]);
        }
        uint64_t z = hashes[i];
        if (sketch != NULL) {
            /* every counter of the batch is read before any is written: a counter grows by one per
             * batch however many of its keys collide in it, as the array formulation's scatter does */
            sketch_cells(self, z, cells + SKETCH_DEPTH * i);
            for (int r = 0; r < SKETCH_DEPTH; r++) {
                uint8_t c = sketch[cells[SKETCH_DEPTH * i + r]];
                counts[SKETCH_DEPTH * i + r] = c < self->sketch_cap ? (uint8_t)(c + 1) : c;
            }
        }
        slots[i] = find(self, keys[i], table_id, (int64_t)(z % (uint64_t)self->sets));
    }
    /* then copy the rows out and touch the hits in key order, each hit's lines asked for ahead */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n && slots[i + PREFETCH_AHEAD] >= 0) prefetch_slot(self, slots[i + PREFETCH_AHEAD]);
        int64_t slot = slots[i];
        if (slot < 0) {
            hit[i] = 0;
            memset(out + i * self->row_bytes, 0, (size_t)self->row_bytes);
            continue;
        }
        hit[i] = 1;
        hits++;
        memcpy(out + i * self->row_bytes, values + slot * self->row_bytes, (size_t)self->row_bytes);
        stamp[slot] = clock++;
        if (freq[slot] < self->freq_cap) freq[slot]++;
    }
    if (sketch != NULL)
        for (Py_ssize_t j = 0; j < SKETCH_DEPTH * n; j++) sketch[cells[j]] = counts[j];
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("LL", (long long)hits, (long long)clock);
done:
    free(cells);
    free(counts);
    free(hashes);
    free(slots);
    PyBuffer_Release(&keys_view);
    PyBuffer_Release(&out_view);
    PyBuffer_Release(&hit_view);
    return result;
}

/* -- insert ---------------------------------------------------------------------------------------- */

static PyObject *kernel_insert(Kernel *self, PyObject *args) {
    Py_buffer keys_view, values_view, evictions_view;
    long long table_id, clock;
    int admit_all;
    if (!PyArg_ParseTuple(args, "y*y*LLpw*", &keys_view, &values_view, &table_id, &clock, &admit_all,
                          &evictions_view))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = keys_view.len / 8;
    int64_t *fresh = NULL;
    if (keys_view.len % 8 || values_view.len != n * self->row_bytes ||
        evictions_view.len != 8 * self->tables) {
        PyErr_SetString(PyExc_ValueError, "insert: keys, values and evictions disagree in length");
        goto done;
    }
    if (!admit_all && !self->has_sketch) {
        PyErr_SetString(PyExc_ValueError, "insert: admission needs the sketch");
        goto done;
    }
    fresh = malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
    if (fresh == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const int64_t *keys = (const int64_t *)keys_view.buf;
    const uint8_t *rows = (const uint8_t *)values_view.buf;
    int64_t *slot_keys = (int64_t *)self->keys.buf;
    int16_t *owner = (int16_t *)self->owner.buf;
    int64_t *stamp = (int64_t *)self->stamp.buf;
    int32_t *freq = (int32_t *)self->freq.buf;
    uint8_t *values = (uint8_t *)self->values.buf;
    int64_t *evictions = (int64_t *)evictions_view.buf;
    int64_t inserted = 0;
    Py_BEGIN_ALLOW_THREADS
    /* keys already cached: overwritten and touched, in ascending order, before any victim is chosen */
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + PREFETCH_AHEAD < n) prefetch_set(self, hash_of(self, keys[i + PREFETCH_AHEAD], table_id));
        uint64_t z = hash_of(self, keys[i], table_id);
        int64_t slot = find(self, keys[i], table_id, (int64_t)(z % (uint64_t)self->sets));
        if (slot < 0) {
            fresh[m++] = i;
            continue;
        }
        memcpy(values + slot * self->row_bytes, rows + i * self->row_bytes, (size_t)self->row_bytes);
        stamp[slot] = clock++;
        if (freq[slot] < self->freq_cap) freq[slot]++;
    }
    /* new keys in ascending order, the j-th stamped clock + j whether or not it is placed */
    int64_t first_new = clock;
    for (Py_ssize_t j = 0; j < m; j++) {
        if (j + PREFETCH_AHEAD < m) {
            uint64_t ahead = hash_of(self, keys[fresh[j + PREFETCH_AHEAD]], table_id);
            prefetch_set(self, ahead);
            prefetch_set_order(self, ahead);
            if (!admit_all) prefetch_sketch(self, ahead);
        }
        Py_ssize_t i = fresh[j];
        uint64_t z = hash_of(self, keys[i], table_id);
        int64_t slot = victim_of(self, (int64_t)(z % (uint64_t)self->sets));
        int held = owner[slot] >= 0;
        if (held && !admit_all && !(estimate(self, z) > estimate(self, hash_of(self, slot_keys[slot], owner[slot]))))
            continue;
        if (held && stamp[slot] >= first_new) {
            /* a key placed earlier in this batch is replaced: it never counted as held */
        } else {
            if (held) evictions[owner[slot]]++;
            inserted++;
        }
        slot_keys[slot] = keys[i];
        owner[slot] = (int16_t)table_id;
        memcpy(values + slot * self->row_bytes, rows + i * self->row_bytes, (size_t)self->row_bytes);
        stamp[slot] = first_new + j;
        freq[slot] = 1;
    }
    clock = first_new + m;
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("LL", (long long)inserted, (long long)clock);
done:
    free(fresh);
    PyBuffer_Release(&keys_view);
    PyBuffer_Release(&values_view);
    PyBuffer_Release(&evictions_view);
    return result;
}

static PyMethodDef kernel_methods[] = {
    {"query", (PyCFunction)kernel_query, METH_VARARGS,
     "query(keys, table_id, out, hit, clock) -> (hits, clock): rows of sorted distinct keys into out"},
    {"insert", (PyCFunction)kernel_insert, METH_VARARGS,
     "insert(keys, values, table_id, clock, admit_all, evictions) -> (inserted, clock)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject KernelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "node_agent.cache.native._setassoc.Kernel",
    .tp_doc = "Query and insert of one SetAssociativeCache, on views of its NumPy state arrays.",
    .tp_basicsize = sizeof(Kernel),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)kernel_init,
    .tp_dealloc = (destructor)kernel_dealloc,
    .tp_methods = kernel_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_setassoc", "Compiled query and insert of the set-associative L1 cache.", -1, NULL,
};

PyMODINIT_FUNC PyInit__setassoc(void) {
    if (PyType_Ready(&KernelType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&KernelType);
    if (PyModule_AddObject(m, "Kernel", (PyObject *)&KernelType) < 0) {
        Py_DECREF(&KernelType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
