/* fooproxy._flow: the per-chunk hot path in C (issue 10 §3), with databus.py's
 * pure-Python Flow as its fallback and its specification.
 *
 * What it replaces, and why each part is here (callgrind, `foo-harness
 * msgcost`, W2 lockstep against server-linux: ~27,000 instructions per
 * message in Python, most of them in the interpreter's evaluation loop, the
 * counting regex, object allocation and the socket module's argument parsing
 * and GIL release around each non-blocking call):
 *
 *  - Counter: protocol.MessageCounter, the line grammar of
 *    protocol.parse_line decided per line with a byte scan instead of a regex;
 *  - Flow: databus.Flow, one direction of a session.  Its on_readable is the
 *    libev callback itself (gevent calls a builtin method with no Python frame),
 *    and it calls recv(2) and send(2) on the raw descriptors without releasing
 *    the GIL: both are non-blocking, so releasing it would only cost a
 *    take/drop per call;
 *  - record(): stats.Stats.record, the same cell updates in the same order.
 *
 * Only the common paths are here.  Everything rare calls back into the Python
 * that specifies it: EOF and errors (DataBus.eof/fail/crashed), a short write
 * (the chunk is held and sent by on_writable, as databus.Flow._hold does), the
 * latency Timer's FIFO (Timer.sent/answered/next), the new second's
 * Stats.flush, and a Stats whose record is not Stats.record (a subclass).
 * tests/unit/test_flow_speedups.py holds this file and the Python together:
 * the same chunks through both must give the same counts and the same cells.
 *
 * Layout constants are never written here: fooproxy/speedups.py passes them in
 * from stats.py, timetable.py, latency.py and protocol.py (configure()).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BUFSIZE 65536

/* -- configuration (configure()) -------------------------------------------- */
static struct {
    int ready;
    Py_ssize_t header, ticks, slots, stride;                 /* the time table */
    Py_ssize_t req, ack, nak, inv, b_c2s, b_s2c;              /* counter cells */
    Py_ssize_t cells;                                         /* cells a block must have */
    Py_ssize_t max_line;
    Py_ssize_t behind;                                        /* FIFO entries behind the head */
    Py_ssize_t nb, p_ack_sum, p_nak_sum, p_max;               /* Stats._pending layout */
    double fast_per_s, fast_s;
    const unsigned char *fast;
    Py_ssize_t fast_len;
    double *bounds;
    Py_ssize_t nbounds;
} L;

static PyObject *Counts, *ZERO, *ONE[4];  /* protocol.Counts and its prebuilt one-line values */
static PyObject *fast_obj;                /* keeps L.fast alive */

static PyObject *s_head_t, *s_head_r, *s_head_o, *s_fifo, *s_max_s, *s_sent, *s_answered,
    *s_next, *s_pending, *s_pending_sec, *s_flush, *s_eof, *s_fail, *s_crashed, *s_start,
    *s_stop, *s_close, *s_answers_delivered, *s_block, *s_append;

static unsigned char rbuf[BUFSIZE]; /* one process, one hub thread: a chunk lives here until counted */

/* -- the grammar ---------------------------------------------------------------- */
enum { K_REQ = 0, K_ACK = 1, K_NAK = 2, K_INV = 3 };

typedef struct {
    long long req, ack, nak, inv;
} counts_t;

static const char MAX_DIGITS[] = "9223372036854775807", MIN_DIGITS[] = "9223372036854775808";

/* protocol.parse_seq: a signed 64-bit decimal, sign and leading zeros allowed. */
static int
seq_valid(const unsigned char *s, Py_ssize_t n)
{
    int negative = 0;
    if (n > 0 && (s[0] == '+' || s[0] == '-')) {
        negative = s[0] == '-';
        s++, n--;
    }
    if (n == 0)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return 0;
    while (n > 0 && s[0] == '0')
        s++, n--;
    if (n > 19)
        return 0;
    if (n == 19 && memcmp(s, negative ? MIN_DIGITS : MAX_DIGITS, 19) > 0)
        return 0;
    return 1;
}

/* protocol.parse_line's verdict on one line, its '\n' already cut off. */
static int
classify(const unsigned char *s, Py_ssize_t n)
{
    int kind;
    if (n > 0 && s[n - 1] == '\r') { /* the reference drops two trailing \r, not all */
        n--;
        if (n > 0 && s[n - 1] == '\r')
            n--;
    }
    if (n < 5 || s[3] != ' ')
        return K_INV;
    if (s[0] == 'R' && s[1] == 'E' && s[2] == 'Q')
        kind = K_REQ;
    else if (s[0] == 'A' && s[1] == 'C' && s[2] == 'K')
        kind = K_ACK;
    else if (s[0] == 'N' && s[1] == 'A' && s[2] == 'K')
        kind = K_NAK;
    else
        return K_INV;
    const unsigned char *seq = s + 4, *end = s + n;
    const unsigned char *sp = memchr(seq, ' ', end - seq);
    if (sp != NULL && memchr(sp + 1, ' ', end - sp - 1) != NULL)
        return K_INV; /* a fourth field */
    if (!seq_valid(seq, (sp ? sp : end) - seq))
        return K_INV;
    return kind;
}

static inline void
add_kind(counts_t *c, int kind)
{
    switch (kind) {
    case K_REQ: c->req++; break;
    case K_ACK: c->ack++; break;
    case K_NAK: c->nak++; break;
    default: c->inv++;
    }
}

/* Every line of s[0:n], which ends with '\n'. */
static void
count_span(const unsigned char *s, Py_ssize_t n, counts_t *c)
{
    const unsigned char *end = s + n;
    while (s < end) {
        const unsigned char *nl = memchr(s, '\n', end - s);
        add_kind(c, classify(s, nl - s));
        s = nl + 1;
    }
}

/* -- Counter: protocol.MessageCounter ------------------------------------------- */
typedef struct {
    PyObject_HEAD
    unsigned char *partial; /* the start of an unfinished line, at most max_line bytes */
    Py_ssize_t plen;
    int oversized;
} Counter;

static PyTypeObject CounterType;

static int
counter_extend(Counter *self, const unsigned char *piece, Py_ssize_t n)
{
    if (self->oversized)
        return 0;
    if (self->plen + n > L.max_line) {
        self->plen = 0;
        self->oversized = 1;
        return 0;
    }
    if (self->partial == NULL) {
        self->partial = PyMem_Malloc(L.max_line);
        if (self->partial == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    memcpy(self->partial + self->plen, piece, n);
    self->plen += n;
    return 0;
}

static int
counter_feed(Counter *self, const unsigned char *data, Py_ssize_t n, counts_t *c)
{
    const unsigned char *last = NULL;
    memset(c, 0, sizeof(*c));
    for (Py_ssize_t i = n; i > 0; i--)
        if (data[i - 1] == '\n') {
            last = data + i - 1;
            break;
        }
    if (last == NULL)
        return n ? counter_extend(self, data, n) : 0;
    Py_ssize_t upto = last - data + 1;
    if (self->plen || self->oversized) {
        const unsigned char *first = memchr(data, '\n', n);
        Py_ssize_t cut = first - data + 1;
        if (self->oversized || self->plen + cut > L.max_line)
            c->inv++;
        else {
            memcpy(self->partial + self->plen, data, cut - 1);
            add_kind(c, classify(self->partial, self->plen + cut - 1));
        }
        self->plen = 0;
        self->oversized = 0;
        if (cut < upto)
            count_span(data + cut, upto - cut, c);
    }
    else
        count_span(data, upto, c);
    return upto < n ? counter_extend(self, data + upto, n - upto) : 0;
}

static PyObject *
make_counts(const counts_t *c)
{
    long long lines = c->req + c->ack + c->nak + c->inv;
    if (lines == 0) {
        Py_INCREF(ZERO);
        return ZERO;
    }
    if (lines == 1) {
        PyObject *one = ONE[c->req ? K_REQ : c->ack ? K_ACK : c->nak ? K_NAK : K_INV];
        Py_INCREF(one);
        return one;
    }
    return PyObject_CallFunction(Counts, "LLLL", c->req, c->ack, c->nak, c->inv);
}

static PyObject *
Counter_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (!L.ready) {
        PyErr_SetString(PyExc_RuntimeError, "fooproxy._flow is not configured");
        return NULL;
    }
    if ((kw != NULL && PyDict_GET_SIZE(kw)) || PyTuple_GET_SIZE(args)) {
        PyErr_SetString(PyExc_TypeError, "Counter() takes no arguments");
        return NULL;
    }
    Counter *self = (Counter *)type->tp_alloc(type, 0);
    return (PyObject *)self;
}

static void
Counter_dealloc(Counter *self)
{
    PyMem_Free(self->partial);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Counter_feed(Counter *self, PyObject *arg)
{
    Py_buffer view;
    counts_t c;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int rc = counter_feed(self, view.buf, view.len, &c);
    PyBuffer_Release(&view);
    return rc < 0 ? NULL : make_counts(&c);
}

static PyObject *
Counter_pending(Counter *self, void *closure)
{
    return PyBool_FromLong(self->plen > 0 || self->oversized);
}

static PyMethodDef Counter_methods[] = {
    {"feed", (PyCFunction)Counter_feed, METH_O,
     "Account for a chunk; return the Counts (req, ack, nak, invalid) of the lines it completed."},
    {NULL}};

static PyGetSetDef Counter_getset[] = {
    {"pending", (getter)Counter_pending, NULL, "True while an unfinished line is open.", NULL}, {NULL}};

static PyTypeObject CounterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fooproxy._flow.Counter",
    .tp_basicsize = sizeof(Counter),
    .tp_dealloc = (destructor)Counter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "protocol.MessageCounter in C: counts whole messages in a stream of any segmentation.",
    .tp_methods = Counter_methods,
    .tp_getset = Counter_getset,
    .tp_new = Counter_new,
};

/* -- Flow: databus.Flow ------------------------------------------------------------ */
typedef struct {
    PyObject_HEAD
    PyObject *bus;      /* the DataBus; None once closed */
    PyObject *loop;     /* the hub's loop: watchers come from it */
    PyObject *reader, *writer;
    Counter *counter;
    PyObject *timer;    /* the session's latency Timer, or None */
    PyObject *stats;    /* the Stats whose record() this is */
    PyObject *block;    /* stats.block */
    PyObject *py_record; /* a Stats subclass's record: called instead of ours */
    PyObject *on_readable, *on_writable; /* bound methods, made once */
    PyObject *chunk;    /* a chunk dst did not take in full, or NULL */
    Py_ssize_t chunk_sent;
    long long lines, nbytes;
    Py_ssize_t messages_cell;
    int src_fd, dst_fd;
    char to_server, watch_answers;
} Flow;

static PyTypeObject FlowType;

/* Every object reference a Flow holds, once: what the cyclic GC visits and what clear drops. */
#define FLOW_REFS(X)                                                                                         \
    X(bus) X(loop) X(reader) X(writer) X(counter) X(timer) X(stats) X(block) X(py_record) X(on_readable)     \
        X(on_writable) X(chunk)

static int
Flow_traverse(Flow *self, visitproc visit, void *arg)
{
#define VISIT_REF(field) Py_VISIT(self->field);
    FLOW_REFS(VISIT_REF)
#undef VISIT_REF
    return 0;
}

static int
Flow_clear(Flow *self)
{
#define CLEAR_REF(field) Py_CLEAR(self->field);
    FLOW_REFS(CLEAR_REF)
#undef CLEAR_REF
    return 0;
}

static void
Flow_dealloc(Flow *self)
{
    PyObject_GC_UnTrack(self);
    Flow_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Flow_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *names[] = {"bus", "src_fd", "dst_fd", "to_server", "loop", "stats", "record",
                            "messages_cell", NULL};
    PyObject *bus, *loop, *stats, *record;
    int src_fd, dst_fd, to_server;
    Py_ssize_t messages_cell;
    if (!L.ready) {
        PyErr_SetString(PyExc_RuntimeError, "fooproxy._flow is not configured");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OiipOOOn:Flow", names, &bus, &src_fd, &dst_fd, &to_server,
                                     &loop, &stats, &record, &messages_cell))
        return NULL;
    Flow *self = (Flow *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(bus);
    self->bus = bus;
    Py_INCREF(loop);
    self->loop = loop;
    Py_INCREF(stats);
    self->stats = stats;
    Py_INCREF(Py_None);
    self->timer = Py_None;
    self->src_fd = src_fd;
    self->dst_fd = dst_fd;
    self->to_server = (char)to_server;
    self->messages_cell = messages_cell;
    if (record != Py_None) {
        Py_INCREF(record);
        self->py_record = record;
    }
    else {
        Py_buffer view;
        self->block = PyObject_GetAttr(stats, s_block);
        if (self->block == NULL)
            goto fail;
        if (PyObject_GetBuffer(self->block, &view, PyBUF_WRITABLE) < 0)
            goto fail;
        Py_ssize_t len = view.len;
        PyBuffer_Release(&view);
        if (len < L.cells * 8 || messages_cell < 0 || messages_cell >= len / 8) {
            PyErr_SetString(PyExc_ValueError, "Flow: the stats block is too small");
            goto fail;
        }
    }
    self->counter = (Counter *)CounterType.tp_alloc(&CounterType, 0);
    if (self->counter == NULL)
        goto fail;
    self->on_readable = PyObject_GetAttrString((PyObject *)self, "on_readable");
    self->on_writable = PyObject_GetAttrString((PyObject *)self, "on_writable");
    if (self->on_readable == NULL || self->on_writable == NULL)
        goto fail;
    self->reader = PyObject_CallMethod(loop, "io", "ii", src_fd, 1);
    if (self->reader == NULL)
        goto fail;
    return (PyObject *)self;
fail:
    Py_DECREF(self);
    return NULL;
}

/* time.monotonic(), with its own arithmetic (_PyTime_AsSecondsDouble): the fast path runs only
 * for a Stats whose clock is time.monotonic (speedups.py decides), so both read the same time. */
static PyObject *test_clock; /* set_clock(): a test's clock in place of CLOCK_MONOTONIC */

static int
now_of(Flow *self, double *now)
{
    struct timespec ts;
    if (test_clock != NULL) {
        PyObject *t = PyObject_CallNoArgs(test_clock);
        if (t == NULL)
            return -1;
        *now = PyFloat_AsDouble(t);
        Py_DECREF(t);
        return (*now == -1.0 && PyErr_Occurred()) ? -1 : 0;
    }
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    int64_t t = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    *now = t % 1000000000 == 0 ? (double)(t / 1000000000) : (double)t / 1e9;
    return 0;
}

/* The chunk as a bytes object, made once and only for the Python that needs it. */
static PyObject *
data_of(PyObject **data, const unsigned char *buf, Py_ssize_t n)
{
    if (*data == NULL)
        *data = PyBytes_FromStringAndSize((const char *)buf, n);
    return *data;
}

static int
call_timer(Flow *self, PyObject *method, const counts_t *c, PyObject **data, const unsigned char *buf,
           Py_ssize_t n, double now)
{
    PyObject *counts = make_counts(c);
    if (counts == NULL || data_of(data, buf, n) == NULL) {
        Py_XDECREF(counts);
        return -1;
    }
    PyObject *t = PyFloat_FromDouble(now);
    PyObject *r = t ? PyObject_CallMethodObjArgs(self->timer, method, counts, *data, t, NULL) : NULL;
    Py_DECREF(counts);
    Py_XDECREF(t);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* The latency Timer's __slots__, read and written in place at their member descriptors'
 * offsets (what member_get and member_set do) rather than through an attribute lookup each:
 * ~100 instructions per access, several per message.  Only for latency.Timer itself (a
 * subclass, or a Timer whose slot is unset, goes through getattr); configure() finds them. */
#define TIMER_SLOTS 5
static PyTypeObject *timer_type;
static PyObject **timer_names[TIMER_SLOTS] = {&s_head_t, &s_head_r, &s_head_o, &s_fifo, &s_max_s};
static Py_ssize_t timer_offsets[TIMER_SLOTS];

static PyObject **
slot_of(PyObject *obj, PyObject *name)
{
    if (Py_TYPE(obj) != timer_type)
        return NULL;
    for (int k = 0; k < TIMER_SLOTS; k++)
        if (*timer_names[k] == name)
            return (PyObject **)((char *)obj + timer_offsets[k]);
    return NULL;
}

static PyObject *
get_attr(PyObject *obj, PyObject *name)
{
    PyObject **slot = slot_of(obj, name);
    if (slot != NULL && *slot != NULL) {
        Py_INCREF(*slot);
        return *slot;
    }
    return PyObject_GetAttr(obj, name);
}

/* obj.name = v, stealing the reference to v (NULL: an error is set already). */
static int
set_attr(PyObject *obj, PyObject *name, PyObject *v)
{
    if (v == NULL)
        return -1;
    PyObject **slot = slot_of(obj, name);
    if (slot != NULL) {
        Py_XSETREF(*slot, v);
        return 0;
    }
    int rc = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return rc;
}

static int
find_timer_slots(PyObject *type)
{
    timer_type = NULL;
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "configure: Timer must be a class");
        return -1;
    }
    for (int k = 0; k < TIMER_SLOTS; k++) {
        PyObject *d = PyObject_GetAttr(type, *timer_names[k]);
        if (d == NULL)
            return -1;
        int ok = Py_IS_TYPE(d, &PyMemberDescr_Type) && ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX &&
                 !(((PyMemberDescrObject *)d)->d_member->flags & READONLY);
        if (ok)
            timer_offsets[k] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
        if (!ok)
            return 0; /* not plain slots: every access goes through getattr */
    }
    timer_type = (PyTypeObject *)type;
    return 0;
}

static int
get_ll(PyObject *obj, PyObject *name, long long *out)
{
    PyObject *v = get_attr(obj, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
get_d(PyObject *obj, PyObject *name, double *out)
{
    PyObject *v = get_attr(obj, name);
    if (v == NULL)
        return -1;
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

static int
set_ll(PyObject *obj, PyObject *name, long long v)
{
    return set_attr(obj, name, PyLong_FromLongLong(v));
}

static int
set_d(PyObject *obj, PyObject *name, double v)
{
    return set_attr(obj, name, PyFloat_FromDouble(v));
}

/* pending[i] += v, with Python's arithmetic (an int cell becomes a float when v is one). */
static int
pending_add(PyObject *pending, Py_ssize_t i, PyObject *v)
{
    PyObject *old = PyList_GET_ITEM(pending, i);
    PyObject *sum = PyNumber_Add(old, v);
    if (sum == NULL)
        return -1;
    PyList_SET_ITEM(pending, i, sum);
    Py_DECREF(old);
    return 0;
}

static int
pending_add_ll(PyObject *pending, Py_ssize_t i, long long v)
{
    PyObject *o = PyLong_FromLongLong(v);
    int rc = o ? pending_add(pending, i, o) : -1;
    Py_XDECREF(o);
    return rc;
}

static int
pending_add_d(PyObject *pending, Py_ssize_t i, double v)
{
    PyObject *o = PyFloat_FromDouble(v);
    int rc = o ? pending_add(pending, i, o) : -1;
    Py_XDECREF(o);
    return rc;
}

/* Stats.answered's bucket: the half-microsecond table below fast_s, bisect above. */
static Py_ssize_t
bucket_of(double seconds)
{
    if (seconds < L.fast_s) {
        /* never negative (the clock is monotonic); if it were, as Python indexes bytes */
        Py_ssize_t k = (Py_ssize_t)floor(seconds * L.fast_per_s);
        if (k < 0)
            k += L.fast_len;
        return k < 0 ? L.nbounds : L.fast[k];
    }
    Py_ssize_t lo = 0, hi = L.nbounds;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (L.bounds[mid] < seconds)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* The head was answered in full: Timer.next() when something is owed behind it.  For
 * latency.Timer's list of (when, reqs, others) tuples, done here: fifo.pop(0) into the head
 * slots, without a Python call per entry (pipelined traffic takes one per chunk of REQs). */
static int
timer_next(PyObject *timer)
{
    PyObject *fifo = get_attr(timer, s_fifo);
    if (fifo == NULL)
        return -1;
    int more = PyObject_IsTrue(fifo);
    if (more <= 0) {
        Py_DECREF(fifo);
        return more;
    }
    PyObject *e = PyList_CheckExact(fifo) ? PyList_GET_ITEM(fifo, 0) : NULL;
    if (Py_TYPE(timer) != timer_type || e == NULL || !PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 3) {
        Py_DECREF(fifo);
        PyObject *r = PyObject_CallMethodNoArgs(timer, s_next);
        Py_XDECREF(r);
        return r ? 0 : -1;
    }
    Py_INCREF(e);
    int rc = PySequence_DelItem(fifo, 0);
    Py_DECREF(fifo);
    for (int k = 0; k < 3 && rc == 0; k++) {
        PyObject *v = PyTuple_GET_ITEM(e, k);
        Py_INCREF(v);
        rc = set_attr(timer, k == 0 ? s_head_t : k == 1 ? s_head_r : s_head_o, v);
    }
    Py_DECREF(e);
    return rc;
}

/* The s2c answer to the timer's head, as Stats.record inlines it. */
static int
answer_head(Flow *self, const counts_t *c, long long resp, long long owed, double now)
{
    double head_t, max_s;
    PyObject *timer = self->timer;
    if (get_d(timer, s_head_t, &head_t) < 0)
        return -1;
    double seconds = now - head_t;
    if (set_ll(timer, s_head_r, owed - resp) < 0)
        return -1;
    if (resp == owed && timer_next(timer) < 0)
        return -1;
    if (get_d(timer, s_max_s, &max_s) < 0)
        return -1;
    if (seconds > max_s && set_d(timer, s_max_s, seconds) < 0)
        return -1;
    Py_ssize_t i = bucket_of(seconds);
    PyObject *pending = PyObject_GetAttr(self->stats, s_pending);
    if (pending == NULL)
        return -1;
    int rc = -1;
    if (!PyList_CheckExact(pending) || PyList_GET_SIZE(pending) <= L.p_max) {
        PyErr_SetString(PyExc_TypeError, "Stats._pending is not its list");
        goto done;
    }
    if (c->ack) {
        if (pending_add_ll(pending, i, c->ack) < 0 || pending_add_d(pending, L.p_ack_sum, seconds * c->ack) < 0)
            goto done;
    }
    if (c->nak) {
        if (pending_add_ll(pending, L.nb + i, c->nak) < 0 ||
            pending_add_d(pending, L.p_nak_sum, seconds * c->nak) < 0)
            goto done;
    }
    PyObject *top = PyFloat_FromDouble(seconds);
    if (top == NULL)
        goto done;
    int bigger = PyObject_RichCompareBool(top, PyList_GET_ITEM(pending, L.p_max), Py_GT);
    if (bigger > 0) {
        PyObject *old = PyList_GET_ITEM(pending, L.p_max);
        PyList_SET_ITEM(pending, L.p_max, top);
        Py_DECREF(old);
    }
    else
        Py_DECREF(top);
    rc = bigger < 0 ? -1 : 0;
done:
    Py_DECREF(pending);
    return rc;
}

/* Answers of one kind (all ACK or all NAK) that take more than the head: the head, then each
 * entry behind it in turn (Timer.next), one latency each, as Timer.answered takes them.  What
 * an entry of other lines would take, or what is left when nothing is owed, goes to
 * Timer.answered itself.  Pipelined traffic (W1) lands here whenever a chunk of answers
 * crosses from one chunk of REQs to the next. */
static int
answer_entries(Flow *self, const counts_t *c, long long resp, PyObject **data, const unsigned char *buf,
               Py_ssize_t n, double now)
{
    long long left = resp;
    while (left > 0) {
        long long head_r, head_o;
        if (get_ll(self->timer, s_head_r, &head_r) < 0 || get_ll(self->timer, s_head_o, &head_o) < 0)
            return -1;
        if (head_r == 0 || head_o != 0) {
            counts_t rest = {0, c->ack ? left : 0, c->ack ? 0 : left, 0};
            return call_timer(self, s_answered, &rest, data, buf, n, now);
        }
        long long take = left < head_r ? left : head_r;
        counts_t part = {0, c->ack ? take : 0, c->ack ? 0 : take, 0};
        if (answer_head(self, &part, take, head_r, now) < 0)
            return -1;
        left -= take;
    }
    return 0;
}

/* Stats.record(to_server, n, counts, timer, data, messages_cell), the same updates in the same order. */
static int
record(Flow *self, const counts_t *c, const unsigned char *buf, Py_ssize_t n, PyObject **data)
{
    Py_buffer view;
    double now;
    int rc = -1;
    if (PyObject_GetBuffer(self->block, &view, PyBUF_WRITABLE) < 0)
        return -1;
    int64_t *cell = view.buf;
    int has_timer = self->timer != Py_None;
    long long resp = c->ack + c->nak;
    cell[self->to_server ? L.b_c2s : L.b_s2c] += n;
    cell[L.inv] += c->inv;
    cell[L.req] += c->req;
    cell[L.ack] += c->ack;
    cell[L.nak] += c->nak;
    if (!resp && !c->req) {
        rc = 0;
        if (c->inv && self->to_server && has_timer)
            rc = now_of(self, &now) < 0 ? -1 : call_timer(self, s_sent, c, data, buf, n, now);
        goto done;
    }
    if (self->messages_cell)
        cell[self->messages_cell] += c->req + resp;
    if (now_of(self, &now) < 0)
        goto done;
    int64_t b = (int64_t)(now * L.ticks);
    Py_ssize_t i = L.header + (Py_ssize_t)(b % L.slots) * L.stride;
    if (cell[i] != b) {
        cell[i] = b;
        cell[i + 1] = c->req;
        cell[i + 2] = resp;
        long long sec;
        if (get_ll(self->stats, s_pending_sec, &sec) < 0)
            goto done;
        if (b / L.ticks != sec) { /* a new second: the pending latencies belong to the last */
            PyObject *r = PyObject_CallMethodNoArgs(self->stats, s_flush);
            if (r == NULL)
                goto done;
            Py_DECREF(r);
            if (set_ll(self->stats, s_pending_sec, b / L.ticks) < 0)
                goto done;
        }
    }
    else {
        cell[i + 1] += c->req;
        cell[i + 2] += resp;
    }
    rc = 0;
    if (!has_timer)
        goto done;
    PyObject *timer = self->timer;
    long long head_r, head_o;
    if (self->to_server) {
        if (c->inv || resp) {
            rc = call_timer(self, s_sent, c, data, buf, n, now);
            goto done;
        }
        if (get_ll(timer, s_head_r, &head_r) < 0 || get_ll(timer, s_head_o, &head_o) < 0)
            goto fail;
        if (head_r == 0 && head_o == 0) { /* nothing owed: this chunk's REQs are the head */
            if (set_d(timer, s_head_t, now) < 0 || set_ll(timer, s_head_r, c->req) < 0)
                goto fail;
            goto done;
        }
        PyObject *fifo = get_attr(timer, s_fifo);
        if (fifo == NULL)
            goto fail;
        Py_ssize_t behind = PyObject_Length(fifo);
        if (behind >= 0 && behind < L.behind) {
            PyObject *entry = Py_BuildValue("(dLi)", now, c->req, 0);
            PyObject *r = entry ? PyObject_CallMethodOneArg(fifo, s_append, entry) : NULL;
            Py_XDECREF(entry);
            Py_XDECREF(r);
            Py_DECREF(fifo);
            if (r == NULL)
                goto fail;
            goto done;
        }
        Py_DECREF(fifo);
        if (behind < 0)
            goto fail;
        rc = call_timer(self, s_sent, c, data, buf, n, now); /* too much owed: coalesced */
        goto done;
    }
    if (!resp)
        goto done;
    if (get_ll(timer, s_head_r, &head_r) < 0 || get_ll(timer, s_head_o, &head_o) < 0)
        goto fail;
    if (resp <= head_r && head_o == 0) /* all of them answer the head: one latency */
        rc = answer_head(self, c, resp, head_r, now);
    else if (head_r > 0 && head_o == 0 && (c->ack == 0 || c->nak == 0)) /* the head and entries behind it */
        rc = answer_entries(self, c, resp, data, buf, n, now);
    else
        rc = call_timer(self, s_answered, c, data, buf, n, now);
    goto done;
fail:
    rc = -1;
done:
    PyBuffer_Release(&view);
    return rc;
}

/* Flow.delivered: count a chunk dst has taken in full. */
static int
delivered(Flow *self, const unsigned char *buf, Py_ssize_t n, PyObject *data)
{
    counts_t c;
    int rc = -1;
    Py_XINCREF(data);
    if (counter_feed(self->counter, buf, n, &c) < 0)
        goto done;
    if (self->py_record != NULL) {
        PyObject *counts = make_counts(&c);
        if (counts == NULL || data_of(&data, buf, n) == NULL) {
            Py_XDECREF(counts);
            goto done;
        }
        PyObject *r = PyObject_CallFunction(self->py_record, "OnOOOn", self->to_server ? Py_True : Py_False, n,
                                            counts, self->timer, data, self->messages_cell);
        Py_DECREF(counts);
        if (r == NULL)
            goto done;
        Py_DECREF(r);
    }
    else if (record(self, &c, buf, n, &data) < 0)
        goto done;
    self->lines += c.req + c.ack + c.nak + c.inv;
    self->nbytes += n;
    rc = 0;
    if (self->watch_answers && self->bus != Py_None) {
        PyObject *r = PyObject_CallMethodNoArgs(self->bus, s_answers_delivered);
        rc = r ? 0 : -1;
        Py_XDECREF(r);
    }
done:
    Py_XDECREF(data);
    return rc;
}

/* An exception is set: an OSError goes to bus.fail (as databus.Flow's handlers do), any other
 * Exception to bus.crashed (logged with its traceback); anything else (GreenletExit,
 * KeyboardInterrupt) propagates.  Returns what the callback returns. */
static PyObject *
handled(Flow *self)
{
    PyObject *value, *bus = self->bus, *r = NULL;
    if (!PyErr_ExceptionMatches(PyExc_Exception) || bus == Py_None)
        return NULL;
#if PY_VERSION_HEX >= 0x030C0000
    value = PyErr_GetRaisedException();
#else
    PyObject *type, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
#endif
    Py_INCREF(bus);
    if (PyErr_GivenExceptionMatches(value, PyExc_OSError))
        r = PyObject_CallMethodObjArgs(bus, s_fail, (PyObject *)self, value, NULL);
    else {
        PyObject *was = PyErr_GetHandledException();
        PyErr_SetHandledException(value); /* what log.exception reads */
        r = PyObject_CallMethodNoArgs(bus, s_crashed);
        PyErr_SetHandledException(was);
        Py_XDECREF(was);
    }
    Py_DECREF(bus);
    Py_XDECREF(value);
    return r;
}

static int
is_retry(int err)
{
    return err == EAGAIN || err == EWOULDBLOCK || err == EINTR;
}

static PyObject *
Flow_on_readable(Flow *self, PyObject *unused)
{
    PyObject *r = NULL;
    if (self->bus == Py_None || self->on_writable == NULL)
        Py_RETURN_NONE; /* closed: a callback already queued this turn */
    Py_INCREF(self);
    ssize_t n = recv(self->src_fd, rbuf, BUFSIZE, 0);
    if (n < 0) {
        if (is_retry(errno)) { /* woken, but another reader was faster (or a signal): wait again */
            r = Py_None;
            Py_INCREF(r);
        }
        else {
            PyErr_SetFromErrno(PyExc_OSError);
            r = handled(self);
        }
        goto out;
    }
    if (n == 0) {
        r = PyObject_CallMethodObjArgs(self->bus, s_eof, (PyObject *)self, NULL);
        if (r == NULL)
            r = handled(self);
        goto out;
    }
    ssize_t sent;
    do
        sent = send(self->dst_fd, rbuf, n, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            PyErr_SetFromErrno(PyExc_OSError);
            r = handled(self);
            goto out;
        }
        sent = 0;
    }
    if (sent == n) {
        if (delivered(self, rbuf, n, NULL) < 0) {
            r = handled(self);
            goto out;
        }
    }
    else { /* dst is full: stop reading, send the rest when it is writable (Flow._hold) */
        self->chunk = PyBytes_FromStringAndSize((const char *)rbuf, n);
        self->chunk_sent = sent;
        PyObject *x = self->chunk ? PyObject_CallMethodNoArgs(self->reader, s_stop) : NULL;
        Py_XDECREF(x);
        if (x != NULL && self->writer == NULL)
            self->writer = PyObject_CallMethod(self->loop, "io", "ii", self->dst_fd, 2);
        x = (x != NULL && self->writer != NULL)
                ? PyObject_CallMethodObjArgs(self->writer, s_start, self->on_writable, NULL)
                : NULL;
        if (x == NULL) {
            r = handled(self);
            goto out;
        }
        Py_DECREF(x);
    }
    r = Py_None;
    Py_INCREF(r);
out:
    Py_DECREF(self);
    return r;
}

static PyObject *
Flow_on_writable(Flow *self, PyObject *unused)
{
    PyObject *r = NULL, *x;
    if (self->bus == Py_None || self->chunk == NULL || self->on_readable == NULL)
        Py_RETURN_NONE;
    Py_INCREF(self);
    const char *buf = PyBytes_AS_STRING(self->chunk);
    Py_ssize_t n = PyBytes_GET_SIZE(self->chunk);
    ssize_t sent;
    do
        sent = send(self->dst_fd, buf + self->chunk_sent, n - self->chunk_sent, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            r = Py_None;
            Py_INCREF(r);
        }
        else {
            PyErr_SetFromErrno(PyExc_OSError);
            r = handled(self);
        }
        goto out;
    }
    self->chunk_sent += sent;
    if (self->chunk_sent < n) {
        r = Py_None;
        Py_INCREF(r);
        goto out;
    }
    PyObject *data = self->chunk;
    self->chunk = NULL;
    x = PyObject_CallMethodNoArgs(self->writer, s_stop);
    Py_XDECREF(x);
    if (x != NULL) { /* before counting: counting may end the session */
        x = PyObject_CallMethodObjArgs(self->reader, s_start, self->on_readable, NULL);
        Py_XDECREF(x);
    }
    if (x == NULL || delivered(self, (const unsigned char *)PyBytes_AS_STRING(data), n, data) < 0)
        r = handled(self);
    else {
        r = Py_None;
        Py_INCREF(r);
    }
    Py_DECREF(data);
out:
    Py_DECREF(self);
    return r;
}

static PyObject *
Flow_start(Flow *self, PyObject *unused)
{
    if (self->on_readable == NULL) {
        PyErr_SetString(PyExc_ValueError, "Flow.start: the flow is closed");
        return NULL;
    }
    return PyObject_CallMethodObjArgs(self->reader, s_start, self->on_readable, NULL);
}

static PyObject *
Flow_close(Flow *self, PyObject *unused)
{
    PyObject *r = PyObject_CallMethodNoArgs(self->reader, s_close);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    if (self->writer != NULL) {
        r = PyObject_CallMethodNoArgs(self->writer, s_close);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
    /* breaks the bus <-> flow cycle at once, without the cyclic GC */
    Py_INCREF(Py_None);
    Py_SETREF(self->bus, Py_None);
    Py_CLEAR(self->on_readable); /* the bound methods refer back to this flow */
    Py_CLEAR(self->on_writable);
    Py_RETURN_NONE;
}

static PyObject *
Flow_direction(Flow *self, void *closure)
{
    return PyUnicode_FromString(self->to_server ? "client->server" : "server->client");
}

static PyObject *
Flow_unsent(Flow *self, void *closure)
{
    if (self->chunk == NULL)
        Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(PyBytes_AS_STRING(self->chunk) + self->chunk_sent,
                                     PyBytes_GET_SIZE(self->chunk) - self->chunk_sent);
}

static PyObject *
Flow_get_timer(Flow *self, void *closure)
{
    Py_INCREF(self->timer);
    return self->timer;
}

static int
Flow_set_timer(Flow *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "timer cannot be deleted");
        return -1;
    }
    Py_INCREF(value);
    Py_SETREF(self->timer, value);
    return 0;
}

static PyMethodDef Flow_methods[] = {
    {"on_readable", (PyCFunction)Flow_on_readable, METH_NOARGS, "libev callback, in the hub: move one chunk."},
    {"on_writable", (PyCFunction)Flow_on_writable, METH_NOARGS,
     "libev callback, in the hub: send more of the held chunk."},
    {"start", (PyCFunction)Flow_start, METH_NOARGS, "Start reading the source."},
    {"close", (PyCFunction)Flow_close, METH_NOARGS, "Close the watchers and let go of the bus."},
    {NULL}};

static PyMemberDef Flow_members[] = {
    {"bus", T_OBJECT, offsetof(Flow, bus), READONLY, "The DataBus, None once closed."},
    {"reader", T_OBJECT, offsetof(Flow, reader), READONLY, "The source's read watcher."},
    {"writer", T_OBJECT, offsetof(Flow, writer), READONLY, "The destination's write watcher, once needed."},
    {"counter", T_OBJECT, offsetof(Flow, counter), READONLY, "This direction's line Counter."},
    {"lines", T_LONGLONG, offsetof(Flow, lines), READONLY, "Lines handed to the destination."},
    {"nbytes", T_LONGLONG, offsetof(Flow, nbytes), READONLY, "Bytes handed to the destination."},
    {"to_server", T_BOOL, offsetof(Flow, to_server), READONLY, "True for client->server."},
    {"watch_answers", T_BOOL, offsetof(Flow, watch_answers), 0, "End the session once every answer is out."},
    {NULL}};

static PyGetSetDef Flow_getset[] = {
    {"direction", (getter)Flow_direction, NULL, "client->server or server->client", NULL},
    {"unsent", (getter)Flow_unsent, NULL, "The part of a held chunk not sent yet, or None.", NULL},
    {"timer", (getter)Flow_get_timer, (setter)Flow_set_timer, "The session's latency Timer, or None.", NULL},
    {NULL}};

static PyTypeObject FlowType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fooproxy._flow.Flow",
    .tp_basicsize = sizeof(Flow),
    .tp_dealloc = (destructor)Flow_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "databus.Flow in C: one direction of a session, src to dst, counted.",
    .tp_traverse = (traverseproc)Flow_traverse,
    .tp_clear = (inquiry)Flow_clear,
    .tp_methods = Flow_methods,
    .tp_members = Flow_members,
    .tp_getset = Flow_getset,
    .tp_new = Flow_new,
};

/* -- configure() -------------------------------------------------------------------- */
static int
get_n(PyObject *d, const char *key, Py_ssize_t *out)
{
    PyObject *v = PyDict_GetItemString(d, key);
    if (v == NULL) {
        PyErr_Format(PyExc_KeyError, "configure: %s missing", key);
        return -1;
    }
    *out = PyLong_AsSsize_t(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static PyObject *
configure(PyObject *module, PyObject *d)
{
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "configure takes a dict");
        return NULL;
    }
    Py_ssize_t fast_per_s;
    if (get_n(d, "header", &L.header) || get_n(d, "ticks", &L.ticks) || get_n(d, "slots", &L.slots) ||
        get_n(d, "stride", &L.stride) || get_n(d, "req", &L.req) || get_n(d, "ack", &L.ack) ||
        get_n(d, "nak", &L.nak) || get_n(d, "inv", &L.inv) || get_n(d, "b_c2s", &L.b_c2s) ||
        get_n(d, "b_s2c", &L.b_s2c) || get_n(d, "cells", &L.cells) || get_n(d, "max_line", &L.max_line) ||
        get_n(d, "behind", &L.behind) || get_n(d, "nb", &L.nb) || get_n(d, "p_ack_sum", &L.p_ack_sum) ||
        get_n(d, "p_nak_sum", &L.p_nak_sum) || get_n(d, "p_max", &L.p_max) || get_n(d, "fast_per_s", &fast_per_s))
        return NULL;
    L.fast_per_s = (double)fast_per_s;
    PyObject *fast = PyDict_GetItemString(d, "fast"), *bounds = PyDict_GetItemString(d, "bounds");
    PyObject *counts = PyDict_GetItemString(d, "Counts");
    if (fast == NULL || !PyBytes_Check(fast) || bounds == NULL || !PyTuple_Check(bounds) || counts == NULL) {
        PyErr_SetString(PyExc_TypeError, "configure: fast (bytes), bounds (tuple), Counts needed");
        return NULL;
    }
    Py_ssize_t nbounds = PyTuple_GET_SIZE(bounds);
    double *b = PyMem_Malloc(sizeof(double) * (nbounds ? nbounds : 1));
    if (b == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < nbounds; i++) {
        b[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(bounds, i));
        if (b[i] == -1.0 && PyErr_Occurred()) {
            PyMem_Free(b);
            return NULL;
        }
    }
    PyMem_Free(L.bounds);
    L.bounds = b;
    L.nbounds = nbounds;
    Py_INCREF(fast);
    Py_XSETREF(fast_obj, fast);
    L.fast = (const unsigned char *)PyBytes_AS_STRING(fast);
    L.fast_len = PyBytes_GET_SIZE(fast);
    PyObject *fs = PyDict_GetItemString(d, "fast_s");
    L.fast_s = fs ? PyFloat_AsDouble(fs) : -1.0;
    if (L.fast_s < 0 || L.fast_s * L.fast_per_s > (double)L.fast_len) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "configure: fast_s missing or past the table");
        return NULL;
    }
    Py_INCREF(counts);
    Py_XSETREF(Counts, counts);
    static const long long one[4][4] = {{1, 0, 0, 0}, {0, 1, 0, 0}, {0, 0, 1, 0}, {0, 0, 0, 1}};
    Py_XSETREF(ZERO, PyObject_CallFunction(Counts, "iiii", 0, 0, 0, 0));
    if (ZERO == NULL)
        return NULL;
    for (int k = 0; k < 4; k++) {
        Py_XSETREF(ONE[k], PyObject_CallFunction(Counts, "LLLL", one[k][0], one[k][1], one[k][2], one[k][3]));
        if (ONE[k] == NULL)
            return NULL;
    }
    PyObject *timer = PyDict_GetItemString(d, "Timer");
    if (timer == NULL) {
        PyErr_SetString(PyExc_KeyError, "configure: Timer missing");
        return NULL;
    }
    if (find_timer_slots(timer) < 0)
        return NULL;
    Py_INCREF(timer); /* kept: timer_type points at it */
    L.ready = 1;
    Py_RETURN_NONE;
}

static PyObject *
classify_line(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int kind = classify(view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromLong(kind);
}

static PyObject *
set_clock(PyObject *module, PyObject *clock)
{
    if (clock == Py_None)
        Py_CLEAR(test_clock);
    else {
        Py_INCREF(clock);
        Py_XSETREF(test_clock, clock);
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_clock", set_clock, METH_O,
     "For tests only: every Flow reads this clock instead of CLOCK_MONOTONIC (None: back to it)."},
    {"configure", configure, METH_O, "Take the layout constants (a dict; fooproxy/speedups.py makes it)."},
    {"classify", classify_line, METH_O, "0 REQ, 1 ACK, 2 NAK, 3 invalid: one line without its newline."},
    {NULL}};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "fooproxy._flow", "The per-chunk hot path in C (see fooproxy/speedups.py).", -1,
    module_methods};

PyMODINIT_FUNC
PyInit__flow(void)
{
    if (PyType_Ready(&CounterType) < 0 || PyType_Ready(&FlowType) < 0)
        return NULL;
#define INTERN(var, text)                                                                                    \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                                     \
        return NULL;
    INTERN(s_head_t, "head_t");
    INTERN(s_head_r, "head_r");
    INTERN(s_head_o, "head_o");
    INTERN(s_fifo, "fifo");
    INTERN(s_max_s, "max_s");
    INTERN(s_sent, "sent");
    INTERN(s_answered, "answered");
    INTERN(s_next, "next");
    INTERN(s_pending, "_pending");
    INTERN(s_pending_sec, "_pending_sec");
    INTERN(s_flush, "flush");
    INTERN(s_eof, "eof");
    INTERN(s_fail, "fail");
    INTERN(s_crashed, "crashed");
    INTERN(s_start, "start");
    INTERN(s_stop, "stop");
    INTERN(s_close, "close");
    INTERN(s_answers_delivered, "answers_delivered");
    INTERN(s_block, "block");
    INTERN(s_append, "append");
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    Py_INCREF(&CounterType);
    Py_INCREF(&FlowType);
    if (PyModule_AddObject(m, "Counter", (PyObject *)&CounterType) < 0 ||
        PyModule_AddObject(m, "Flow", (PyObject *)&FlowType) < 0 ||
        PyModule_AddIntConstant(m, "BUFSIZE", BUFSIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
