/* The replies of a lookup's pipelined HMGETs, parsed straight into the rows of the answer.
 *
 * A lookup's misses go to Redis as one HMGET per hash (node_agent.tiers.redis_tier); their replies
 * are arrays of bulk strings, one per field asked, each a row's raw bytes or null. Parsed by hiredis,
 * every row becomes a Python bytes object, the replies a list each, and the rows are then joined and
 * scattered into the answer: per-row Python work on the hottest path of a Redis-backed agent. Here the
 * bytes read off the socket are parsed in place and each row copied once, into its place in the answer.
 *
 * feed(buf, end, state, dest, out, found, row_bytes) parses buf[state.pos:end] as far as whole
 * elements go and records where it stopped in `state` (an int64[5]: pos, replies left, fields left in
 * the current reply or -1 before its header, fields done, rows of the wrong length), so the caller reads
 * more bytes and calls again. The k-th field answered overall is the row of answer row dest[k]: its
 * bytes go to out[dest[k]] and found[dest[k]] is set when it is exactly row_bytes long; a null leaves
 * it unset; any other length counts as malformed and leaves it unset (never a wrong vector).
 *
 * Returns None while more bytes are needed or once every reply is read (state's replies left is then
 * 0); an error reply (-ERR ..., MOVED ...) returns its text, as bytes, and stops there. Anything that
 * is not the reply of an HMGET raises ValueError (the connection is then unusable). No GIL release:
 * a call handles one recv's worth of bytes, microseconds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { POS, REPLIES, FIELDS, DONE, MALFORMED, STATE_LEN };

/* The integer of a line starting at p (after its type byte); its CRLF must lie before end. Returns the
 * position after the CRLF, or NULL when the line is not whole yet; *bad is set on a malformed line. */
static const char *read_line_int(const char *p, const char *end, int64_t *value, int *bad) {
    const char *cr = memchr(p, '\r', (size_t)(end - p));
    if (cr == NULL || cr + 1 >= end) return NULL;
    if (cr[1] != '\n' || cr == p) {
        *bad = 1;
        return NULL;
    }
    int negative = 0;
    if (*p == '-') {
        negative = 1;
        p++;
    }
    if (p == cr || cr - p > 18) {
        *bad = 1;
        return NULL;
    }
    int64_t v = 0;
    for (; p < cr; p++) {
        if (*p < '0' || *p > '9') {
            *bad = 1;
            return NULL;
        }
        v = v * 10 + (*p - '0');
    }
    *value = negative ? -v : v;
    return cr + 2;
}

static PyObject *protocol_error(const char *what, Py_ssize_t at) {
    PyErr_Format(PyExc_ValueError, "not an HMGET reply: %s at byte %zd", what, at);
    return NULL;
}

static PyObject *feed(PyObject *self, PyObject *args) {
    Py_buffer buf, state_view, dest_view, out_view, found_view;
    Py_ssize_t end, row_bytes;
    if (!PyArg_ParseTuple(args, "y*nw*y*w*w*n", &buf, &end, &state_view, &dest_view, &out_view, &found_view,
                          &row_bytes))
        return NULL;
    PyObject *result = NULL;
    int64_t *state = state_view.buf;
    const int64_t *dest = dest_view.buf;
    Py_ssize_t fields_asked = dest_view.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t rows = found_view.len;
    uint8_t *found = found_view.buf;
    char *out = out_view.buf;
    if (state_view.len != STATE_LEN * (Py_ssize_t)sizeof(int64_t) || end > buf.len || row_bytes <= 0 ||
        out_view.len != rows * row_bytes) {
        PyErr_SetString(PyExc_ValueError, "feed: state must be int64[5], end within buf, out (rows, row_bytes)");
        goto done;
    }
    const char *base = buf.buf;
    const char *p = base + state[POS];
    const char *stop = base + end;
    while (state[REPLIES] > 0 && p < stop) {
        int bad = 0;
        int64_t n;
        const char *next;
        if (state[FIELDS] < 0) { /* a reply's header: *<fields>, or an error */
            if (*p == '-') {
                const char *cr = memchr(p, '\r', (size_t)(stop - p));
                if (cr == NULL || cr + 1 >= stop) break;
                state[POS] = (cr + 2) - base;
                result = PyBytes_FromStringAndSize(p + 1, cr - p - 1);
                goto done;
            }
            if (*p != '*') {
                protocol_error("expected an array", p - base);
                goto done;
            }
            next = read_line_int(p + 1, stop, &n, &bad);
            if (bad || (next != NULL && n < 0)) {
                protocol_error("bad array header", p - base);
                goto done;
            }
            if (next == NULL) break;
            state[FIELDS] = n;
            p = next;
        } else if (state[FIELDS] == 0) {
            state[FIELDS] = -1;
            state[REPLIES]--;
            continue;
        } else { /* a field: $<len> <bytes>, $-1 or _ (null) */
            if (state[DONE] >= fields_asked) {
                protocol_error("more fields than asked", p - base);
                goto done;
            }
            if (*p == '_') {
                if (stop - p < 3) break;
                if (p[1] != '\r' || p[2] != '\n') {
                    protocol_error("bad null", p - base);
                    goto done;
                }
                next = p + 3;
            } else if (*p == '$') {
                next = read_line_int(p + 1, stop, &n, &bad);
                if (bad || (next != NULL && n < -1)) {
                    protocol_error("bad bulk header", p - base);
                    goto done;
                }
                if (next == NULL) break;
                if (n >= 0) {
                    if (stop - next < n + 2) break;
                    if (next[n] != '\r' || next[n + 1] != '\n') {
                        protocol_error("bulk string without its CRLF", next + n - base);
                        goto done;
                    }
                    int64_t row = dest[state[DONE]];
                    if (row < 0 || row >= rows) {
                        PyErr_Format(PyExc_ValueError, "feed: dest row %lld outside the %zd rows", (long long)row,
                                     rows);
                        goto done;
                    }
                    if (n == row_bytes) {
                        memcpy(out + row * row_bytes, next, (size_t)n);
                        found[row] = 1;
                    } else {
                        state[MALFORMED]++;
                    }
                    next += n + 2;
                }
            } else {
                protocol_error("expected a bulk string or null", p - base);
                goto done;
            }
            state[DONE]++;
            state[FIELDS]--;
            p = next;
        }
        state[POS] = p - base;
    }
    /* a reply whose last field was just read, or one of no fields, is finished without more bytes */
    while (state[REPLIES] > 0 && state[FIELDS] == 0) {
        state[FIELDS] = -1;
        state[REPLIES]--;
    }
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&state_view);
    PyBuffer_Release(&dest_view);
    PyBuffer_Release(&out_view);
    PyBuffer_Release(&found_view);
    return result;
}

static PyMethodDef methods[] = {
    {"feed", feed, METH_VARARGS,
     "feed(buf, end, state, dest, out, found, row_bytes) -> None | error text: parse HMGET replies into rows"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_resp", "HMGET replies parsed straight into the rows of a lookup's answer.", -1, methods,
};

PyMODINIT_FUNC PyInit__resp(void) { return PyModule_Create(&module); }
