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
 * is not the reply of an HMGET raises ValueError (the connection is then unusable). The GIL is released
 * while it parses (the rows' copies are the bulk of a read's work): the agent's other requests go on.
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

/* Why a parse stopped short of its replies. */
typedef enum { PARSED, ERROR_REPLY, BAD_REPLY, BAD_DEST } Outcome;

typedef struct {
    Outcome outcome;
    const char *what;     /* BAD_REPLY: what was wrong */
    Py_ssize_t at;        /* BAD_REPLY: where; ERROR_REPLY: the message's first byte */
    Py_ssize_t length;    /* ERROR_REPLY: the message's length */
    int64_t row;          /* BAD_DEST: the row */
} Stop;

static Stop bad(const char *what, Py_ssize_t at) {
    Stop stop = {BAD_REPLY, what, at, 0, 0};
    return stop;
}

/* The parse itself, on plain memory: runs without the GIL. */
static Stop parse(const char *base, Py_ssize_t end, int64_t *state, const int64_t *dest, Py_ssize_t fields_asked,
                  char *out, uint8_t *found, Py_ssize_t rows, Py_ssize_t row_bytes) {
    Stop ok = {PARSED, NULL, 0, 0, 0};
    const char *p = base + state[POS];
    const char *stop = base + end;
    while (state[REPLIES] > 0 && p < stop) {
        int malformed_line = 0;
        int64_t n;
        const char *next;
        if (state[FIELDS] < 0) { /* a reply's header: *<fields>, or an error */
            if (*p == '-') {
                const char *cr = memchr(p, '\r', (size_t)(stop - p));
                if (cr == NULL || cr + 1 >= stop) break;
                state[POS] = (cr + 2) - base;
                Stop error = {ERROR_REPLY, NULL, (p + 1) - base, cr - p - 1, 0};
                return error;
            }
            if (*p != '*') return bad("expected an array", p - base);
            next = read_line_int(p + 1, stop, &n, &malformed_line);
            if (malformed_line || (next != NULL && n < 0)) return bad("bad array header", p - base);
            if (next == NULL) break;
            state[FIELDS] = n;
            p = next;
        } else if (state[FIELDS] == 0) {
            state[FIELDS] = -1;
            state[REPLIES]--;
            continue;
        } else { /* a field: $<len> <bytes>, $-1 or _ (null) */
            if (state[DONE] >= fields_asked) return bad("more fields than asked", p - base);
            if (*p == '_') {
                if (stop - p < 3) break;
                if (p[1] != '\r' || p[2] != '\n') return bad("bad null", p - base);
                next = p + 3;
            } else if (*p == '$') {
                next = read_line_int(p + 1, stop, &n, &malformed_line);
                if (malformed_line || (next != NULL && n < -1)) return bad("bad bulk header", p - base);
                if (next == NULL) break;
                if (n >= 0) {
                    if (stop - next < n + 2) break;
                    if (next[n] != '\r' || next[n + 1] != '\n') return bad("bulk string without its CRLF", next + n - base);
                    int64_t row = dest[state[DONE]];
                    if (row < 0 || row >= rows) {
                        Stop outside = {BAD_DEST, NULL, 0, 0, row};
                        return outside;
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
                return bad("expected a bulk string or null", p - base);
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
    return ok;
}

static PyObject *feed(PyObject *self, PyObject *args) {
    Py_buffer buf, state_view, dest_view, out_view, found_view;
    Py_ssize_t end, row_bytes;
    if (!PyArg_ParseTuple(args, "y*nw*y*w*w*n", &buf, &end, &state_view, &dest_view, &out_view, &found_view,
                          &row_bytes))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t rows = found_view.len;
    if (state_view.len != STATE_LEN * (Py_ssize_t)sizeof(int64_t) || end < 0 || end > buf.len || row_bytes <= 0 ||
        out_view.len != rows * row_bytes) {
        PyErr_SetString(PyExc_ValueError, "feed: state must be int64[5], end within buf, out (rows, row_bytes)");
    } else if (((int64_t *)state_view.buf)[POS] < 0 || ((int64_t *)state_view.buf)[POS] > end) {
        PyErr_SetString(PyExc_ValueError, "feed: state's position is outside the bytes given");
    } else {
        Stop stop;
        Py_BEGIN_ALLOW_THREADS
        stop = parse(buf.buf, end, state_view.buf, dest_view.buf, dest_view.len / (Py_ssize_t)sizeof(int64_t),
                     out_view.buf, found_view.buf, rows, row_bytes);
        Py_END_ALLOW_THREADS
        switch (stop.outcome) {
        case PARSED:
            Py_INCREF(Py_None);
            result = Py_None;
            break;
        case ERROR_REPLY:
            result = PyBytes_FromStringAndSize((const char *)buf.buf + stop.at, stop.length);
            break;
        case BAD_REPLY:
            PyErr_Format(PyExc_ValueError, "not an HMGET reply: %s at byte %zd", stop.what, stop.at);
            break;
        case BAD_DEST:
            PyErr_Format(PyExc_ValueError, "feed: dest row %lld outside the %zd rows", (long long)stop.row, rows);
            break;
        }
    }
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
