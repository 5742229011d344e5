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
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

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

static PyObject *s_sent, *s_answered, *s_next, *s_pending, *s_pending_sec, *s_flush, *s_eof, *s_fail,
    *s_crashed, *s_start, *s_stop, *s_close, *s_answers_delivered, *s_block;

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

/* -- TimerState and Pending: the latency state the hot path writes, as C values ---------- */
/* latency.Timer's head and largest latency (and its FIFO) live in this base type when the
 * extension is built, so that the hot path reads and writes doubles and integers in place:
 * as Python objects in __slots__, each write allocated a float (the head's time per chunk of
 * REQs) and each read went through a member descriptor.  latency.py's pure-Python base has
 * the same five attributes as __slots__, and Timer's Python methods use either the same way. */
typedef struct {
    PyObject_HEAD
    double head_t;           /* when the oldest owed chunk was sent */
    long long head_r, head_o; /* its REQs and its other lines still owed */
    double max_s;            /* the session's largest latency */
    PyObject *fifo;          /* the owed entries behind the head: a list of (when, reqs, others) */
} TimerState;

static int
TimerState_traverse(TimerState *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fifo);
    return 0;
}

static int
TimerState_clear(TimerState *self)
{
    Py_CLEAR(self->fifo);
    return 0;
}

static void
TimerState_dealloc(TimerState *self)
{
    PyObject_GC_UnTrack(self);
    TimerState_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef TimerState_members[] = {
    {"head_t", T_DOUBLE, offsetof(TimerState, head_t), 0, "When the oldest owed chunk was sent."},
    {"head_r", T_LONGLONG, offsetof(TimerState, head_r), 0, "Its REQs still owed an answer."},
    {"head_o", T_LONGLONG, offsetof(TimerState, head_o), 0, "Its other lines still owed an answer."},
    {"max_s", T_DOUBLE, offsetof(TimerState, max_s), 0, "The session's largest latency, in seconds."},
    {"fifo", T_OBJECT_EX, offsetof(TimerState, fifo), 0, "The owed entries behind the head, oldest first."},
    {NULL}};

static PyTypeObject TimerStateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fooproxy._flow.TimerState",
    .tp_basicsize = sizeof(TimerState),
    .tp_dealloc = (destructor)TimerState_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "latency.Timer's state as C values: the head, the largest latency and the FIFO.",
    .tp_traverse = (traverseproc)TimerState_traverse,
    .tp_clear = (inquiry)TimerState_clear,
    .tp_members = TimerState_members,
    .tp_new = PyType_GenericNew,
};

/* Stats._pending: latency counts not yet in the block, a fixed sequence of cells, the first
 * `nint` integers (the ACK and NAK buckets) and the rest floats (the sums and the max).
 * Stats.record's Python indexes it as it would its list; the C Flows add to the cells in
 * place, where the list took a PyNumber_Add and an allocation per cell.  Stats.flush
 * empties it with take(), in place, because the Flows keep a reference to it. */
typedef union {
    long long i;
    double d;
} cell_t;

typedef struct {
    PyObject_HEAD
    Py_ssize_t n, nint;
    cell_t *cells;
} Pending;

static PyObject *
Pending_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *names[] = {"ints", "floats", NULL};
    Py_ssize_t nint, nfloat;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "nn:Pending", names, &nint, &nfloat))
        return NULL;
    if (nint < 0 || nfloat < 0 || nint > 1 << 20 || nfloat > 1 << 20) {
        PyErr_SetString(PyExc_ValueError, "Pending: ints and floats are counts of cells");
        return NULL;
    }
    Pending *self = (Pending *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->cells = PyMem_Calloc(nint + nfloat ? nint + nfloat : 1, sizeof(cell_t));
    if (self->cells == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    self->n = nint + nfloat;
    self->nint = nint;
    for (Py_ssize_t k = nint; k < self->n; k++)
        self->cells[k].d = 0.0;
    return (PyObject *)self;
}

static void
Pending_dealloc(Pending *self)
{
    PyMem_Free(self->cells);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t
Pending_len(Pending *self)
{
    return self->n;
}

static PyObject *
Pending_item(Pending *self, Py_ssize_t k)
{
    if (k < 0 || k >= self->n) {
        PyErr_SetString(PyExc_IndexError, "Pending index out of range");
        return NULL;
    }
    return k < self->nint ? PyLong_FromLongLong(self->cells[k].i) : PyFloat_FromDouble(self->cells[k].d);
}

static int
Pending_ass_item(Pending *self, Py_ssize_t k, PyObject *v)
{
    if (k < 0 || k >= self->n) {
        PyErr_SetString(PyExc_IndexError, "Pending assignment index out of range");
        return -1;
    }
    if (v == NULL) {
        PyErr_SetString(PyExc_TypeError, "Pending cells cannot be deleted");
        return -1;
    }
    if (k < self->nint) {
        long long x = PyLong_AsLongLong(v);
        if (x == -1 && PyErr_Occurred())
            return -1;
        self->cells[k].i = x;
    }
    else {
        double x = PyFloat_AsDouble(v);
        if (x == -1.0 && PyErr_Occurred())
            return -1;
        self->cells[k].d = x;
    }
    return 0;
}

static PyObject *
Pending_take(Pending *self, PyObject *unused)
{
    PyObject *out = PyList_New(self->n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < self->n; k++) {
        PyObject *v = Pending_item(self, k);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, k, v);
    }
    for (Py_ssize_t k = 0; k < self->n; k++) {
        if (k < self->nint)
            self->cells[k].i = 0;
        else
            self->cells[k].d = 0.0;
    }
    return out;
}

static PySequenceMethods Pending_as_sequence = {
    .sq_length = (lenfunc)Pending_len,
    .sq_item = (ssizeargfunc)Pending_item,
    .sq_ass_item = (ssizeobjargproc)Pending_ass_item,
};

static PyMethodDef Pending_methods[] = {
    {"take", (PyCFunction)Pending_take, METH_NOARGS, "The cells' values as a list; the cells are zeroed."},
    {NULL}};

static PyTypeObject PendingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fooproxy._flow.Pending",
    .tp_basicsize = sizeof(Pending),
    .tp_dealloc = (destructor)Pending_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pending(ints, floats): Stats' latency counts not yet in the block, as C cells.",
    .tp_as_sequence = &Pending_as_sequence,
    .tp_methods = Pending_methods,
    .tp_new = Pending_new,
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
    PyObject *pending;  /* stats._pending (a Pending) when this Flow records */
    PyObject *on_readable, *on_writable; /* bound methods, made once */
    PyObject *chunk;    /* a chunk dst did not take in full, or NULL */
    Py_ssize_t chunk_sent;
    long long lines, nbytes;
    Py_ssize_t messages_cell;
    int src_fd, dst_fd;
    int err_later;      /* errno of the extra read (read_more), reported at the next wake-up, or 0 */
    char to_server, watch_answers;
} Flow;

static PyTypeObject FlowType;

/* Every object reference a Flow holds, once: what the cyclic GC visits and what clear drops. */
#define FLOW_REFS(X)                                                                                         \
    X(bus) X(loop) X(reader) X(writer) X(counter) X(timer) X(stats) X(block) X(py_record) X(pending)         \
        X(on_readable)                                                                                       \
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

/* Spare read watchers: a closed Flow's reader, stopped, for the next Flow to take with a new fd.
 * A new gevent io watcher costs a Cython object, an fcntl(F_GETFD) (gevent's check that the fd
 * is open) and its dealloc; setting a stopped one's fd is ev_io_set (its callback and arguments
 * were dropped by stop()).  Only the loop of the first pooled watcher is pooled for: the hub's. */
#define SPARE_MAX 64
static PyObject *spare_readers[SPARE_MAX];
static Py_ssize_t n_spare;
static PyObject *spare_loop; /* the loop the spares belong to (a strong reference), or NULL */
static PyObject *s_fd;

/* A read watcher on fd from loop: a spare one, or loop.io(fd, 1). */
static PyObject *
reader_for(PyObject *loop, int fd)
{
    if (n_spare == 0 || loop != spare_loop)
        return PyObject_CallMethod(loop, "io", "ii", fd, 1);
    if (fd < 0 || fcntl(fd, F_GETFD) < 0) { /* gevent's own check, with its errors */
        if (fd < 0)
            PyErr_Format(PyExc_ValueError, "fd must be non-negative: %d", fd);
        else
            PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    PyObject *w = spare_readers[--n_spare];
    PyObject *fdobj = PyLong_FromLong(fd);
    if (fdobj == NULL || PyObject_SetAttr(w, s_fd, fdobj) < 0) {
        Py_XDECREF(fdobj);
        Py_DECREF(w);
        return NULL;
    }
    Py_DECREF(fdobj);
    return w;
}

/* Flow.close's end of the reader: stopped and kept as a spare, or closed.  0, or -1 with an error. */
static int
retire_reader(Flow *self)
{
    PyObject *w = self->reader, *r;
    if (spare_loop == NULL) {
        Py_INCREF(self->loop);
        spare_loop = self->loop;
    }
    if (self->loop != spare_loop || n_spare >= SPARE_MAX)
        r = PyObject_CallMethodNoArgs(w, s_close);
    else if ((r = PyObject_CallMethodNoArgs(w, s_stop)) != NULL) {
        Py_INCREF(w);
        spare_readers[n_spare++] = w;
        Py_INCREF(Py_None);
        Py_SETREF(self->reader, Py_None);
    }
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
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
        self->pending = PyObject_GetAttr(stats, s_pending);
        if (self->pending == NULL)
            goto fail;
        Pending *p = (Pending *)self->pending;
        if (!Py_IS_TYPE(self->pending, &PendingType) || p->nint != 2 * L.nb || L.p_ack_sum < p->nint ||
            L.p_nak_sum < p->nint || L.p_max < p->nint || L.p_ack_sum >= p->n || L.p_nak_sum >= p->n ||
            L.p_max >= p->n) {
            PyErr_SetString(PyExc_TypeError, "Flow: stats._pending is not a Pending of the configured layout");
            goto fail;
        }
    }
    self->counter = (Counter *)CounterType.tp_alloc(&CounterType, 0);
    if (self->counter == NULL)
        goto fail;
    self->on_readable = PyObject_GetAttrString((PyObject *)self, "on_readable");
    if (self->on_readable == NULL) /* on_writable: made on the first short write (most sessions have none) */
        goto fail;
    self->reader = reader_for(loop, src_fd);
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

static int
get_ll(PyObject *obj, PyObject *name, long long *out)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
set_ll(PyObject *obj, PyObject *name, long long v)
{
    PyObject *o = PyLong_FromLongLong(v);
    if (o == NULL)
        return -1;
    int rc = PyObject_SetAttr(obj, name, o);
    Py_DECREF(o);
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

/* A Timer.fifo entry, (when, reqs, others): 0, or -1 with an error set when it is not one. */
static int
entry_of(PyObject *e, double *when, long long *r, long long *o)
{
    if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 3) {
        PyErr_SetString(PyExc_TypeError, "Timer.fifo holds (when, reqs, others) tuples");
        return -1;
    }
    *when = PyFloat_AsDouble(PyTuple_GET_ITEM(e, 0));
    if (*when == -1.0 && PyErr_Occurred())
        return -1;
    *r = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 1));
    if (*r == -1 && PyErr_Occurred())
        return -1;
    *o = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 2));
    return (*o == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* The head was answered in full: Timer.next() when something is owed behind it.  For a
 * list of (when, reqs, others) tuples, done here: fifo.pop(0) into the head, without a
 * Python call per entry (pipelined traffic takes one per chunk of REQs). */
static int
timer_next(Flow *self)
{
    TimerState *t = (TimerState *)self->timer;
    PyObject *fifo = t->fifo;
    if (fifo == NULL)
        return 0; /* never set: nothing owed behind the head */
    if (!PyList_CheckExact(fifo)) { /* another sequence: Timer.next's Python takes from it */
        int more = PyObject_IsTrue(fifo);
        if (more <= 0)
            return more;
        PyObject *r = PyObject_CallMethodNoArgs(self->timer, s_next);
        Py_XDECREF(r);
        return r ? 0 : -1;
    }
    if (PyList_GET_SIZE(fifo) == 0)
        return 0;
    double when;
    long long r, o;
    if (entry_of(PyList_GET_ITEM(fifo, 0), &when, &r, &o) < 0 || PySequence_DelItem(fifo, 0) < 0)
        return -1;
    t->head_t = when;
    t->head_r = r;
    t->head_o = o;
    return 0;
}

/* The s2c answer to the timer's head, as Stats.record inlines it. */
static int
answer_head(Flow *self, const counts_t *c, long long resp, long long owed, double now)
{
    TimerState *t = (TimerState *)self->timer;
    double seconds = now - t->head_t;
    t->head_r = owed - resp;
    if (resp == owed && timer_next(self) < 0)
        return -1;
    if (seconds > t->max_s)
        t->max_s = seconds;
    Py_ssize_t i = bucket_of(seconds);
    cell_t *p = ((Pending *)self->pending)->cells;
    if (c->ack) {
        p[i].i += c->ack;
        p[L.p_ack_sum].d += seconds * c->ack;
    }
    if (c->nak) {
        p[L.nb + i].i += c->nak;
        p[L.p_nak_sum].d += seconds * c->nak;
    }
    if (seconds > p[L.p_max].d)
        p[L.p_max].d = seconds;
    return 0;
}

/* The answer kinds (K_ACK/K_NAK) of a chunk's complete lines, in order, as protocol.answer_types
 * gives them: the lines after the first '\n' classified here, and the first line's kind what the
 * chunk's counts say they do not account for (it may have begun in an earlier chunk, and only the
 * Counter saw all of it).  Returns how many, or -1 when they do not add up to ack + nak. */
static unsigned char akind[BUFSIZE / 6 + 2]; /* "ACK 0\n" is the shortest answer line */

static Py_ssize_t
answer_kinds(const counts_t *c, const unsigned char *buf, Py_ssize_t n)
{
    const unsigned char *first = memchr(buf, '\n', n), *end = buf + n;
    if (first == NULL)
        return -1;
    while (end > first + 1 && end[-1] != '\n')
        end--;
    Py_ssize_t m = 1;
    long long acks = 0, naks = 0;
    for (const unsigned char *s = first + 1; s < end;) {
        const unsigned char *nl = memchr(s, '\n', end - s);
        int kind = classify(s, nl - s);
        if (kind == K_ACK || kind == K_NAK) {
            if (m >= (Py_ssize_t)sizeof(akind))
                return -1;
            akind[m++] = (unsigned char)kind;
            if (kind == K_ACK)
                acks++;
            else
                naks++;
        }
        s = nl + 1;
    }
    Py_ssize_t from = 1;
    if (c->ack - acks == 1 && c->nak == naks)
        akind[from = 0] = K_ACK;
    else if (c->nak - naks == 1 && c->ack == acks)
        akind[from = 0] = K_NAK;
    else if (c->ack != acks || c->nak != naks)
        return -1;
    if (from == 1) /* the first line is no answer: shift nothing, start at 1 */
        memmove(akind, akind + 1, m - 1);
    return m - from;
}

/* Whether the fifo entries that `need` answers take after the head are all of REQs (no other
 * lines owed among them): then the order of the answers' kinds decides each entry's latencies. */
static int
entries_all_reqs(TimerState *t, long long need)
{
    PyObject *fifo = t->fifo;
    if (need <= 0 || fifo == NULL)
        return 1;
    if (!PyList_CheckExact(fifo))
        return 0;
    for (Py_ssize_t j = 0; need > 0 && j < PyList_GET_SIZE(fifo); j++) {
        double when;
        long long r, o;
        if (entry_of(PyList_GET_ITEM(fifo, j), &when, &r, &o) < 0) {
            PyErr_Clear();
            return 0;
        }
        if (o != 0 || r <= 0)
            return 0;
        need -= r;
    }
    return 1;
}

/* Answers that take more than the head: the head, then each entry behind it in turn (Timer.next),
 * one latency per entry with its ACKs and NAKs, as Timer.answered takes them.  Pipelined traffic
 * (W1) lands here whenever a chunk of answers crosses from one chunk of REQs to the next.  Answers
 * of one kind split by count; what an entry of other lines would take goes to Timer.answered.
 * Answers of both kinds split by their order in the chunk (answer_kinds), which Timer.answered
 * needs the whole chunk for: so only over entries of REQs, checked first, else it takes it all. */
static int
answer_entries(Flow *self, const counts_t *c, long long resp, PyObject **data, const unsigned char *buf,
               Py_ssize_t n, double now)
{
    TimerState *t = (TimerState *)self->timer;
    int mixed = c->ack && c->nak;
    if (mixed && (!entries_all_reqs(t, resp - t->head_r) || answer_kinds(c, buf, n) != resp))
        return call_timer(self, s_answered, c, data, buf, n, now);
    long long pos = 0;
    while (pos < resp) {
        long long head_r = t->head_r, left = resp - pos;
        if (head_r == 0 && t->head_o == 0)
            return 0; /* nothing owed: answers nobody asked for are not timed */
        if (head_r == 0 || t->head_o != 0) { /* one kind only: entries_all_reqs ruled it out for both */
            counts_t rest = {0, c->ack ? left : 0, c->ack ? 0 : left, 0};
            return call_timer(self, s_answered, &rest, data, buf, n, now);
        }
        long long take = left < head_r ? left : head_r, acks = c->ack ? take : 0;
        if (mixed) {
            acks = 0;
            for (Py_ssize_t j = pos; j < pos + take; j++)
                acks += akind[j] == K_ACK;
        }
        counts_t part = {0, acks, take - acks, 0};
        if (answer_head(self, &part, take, head_r, now) < 0)
            return -1;
        pos += take;
    }
    return 0;
}

/* A Timer.fifo entry of REQs, (when, reqs, 0), built directly (Py_BuildValue parses its format
 * string per call, one entry per pipelined chunk of REQs). */
static PyObject *
fifo_entry(double when, long long reqs)
{
    PyObject *e = PyTuple_New(3), *w = PyFloat_FromDouble(when), *r = PyLong_FromLongLong(reqs);
    PyObject *zero = PyLong_FromLong(0);
    if (e == NULL || w == NULL || r == NULL || zero == NULL) {
        Py_XDECREF(e);
        Py_XDECREF(w);
        Py_XDECREF(r);
        Py_XDECREF(zero);
        return NULL;
    }
    PyTuple_SET_ITEM(e, 0, w);
    PyTuple_SET_ITEM(e, 1, r);
    PyTuple_SET_ITEM(e, 2, zero);
    return e;
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
    TimerState *t = (TimerState *)self->timer;
    if (self->to_server) {
        if (c->inv || resp) {
            rc = call_timer(self, s_sent, c, data, buf, n, now);
            goto done;
        }
        if (t->head_r == 0 && t->head_o == 0) { /* nothing owed: this chunk's REQs are the head */
            t->head_t = now;
            t->head_r = c->req;
            goto done;
        }
        if (t->fifo != NULL && PyList_CheckExact(t->fifo) && PyList_GET_SIZE(t->fifo) < L.behind) {
            PyObject *entry = fifo_entry(now, c->req);
            if (entry == NULL || PyList_Append(t->fifo, entry) < 0) {
                Py_XDECREF(entry);
                goto fail;
            }
            Py_DECREF(entry);
            goto done;
        }
        rc = call_timer(self, s_sent, c, data, buf, n, now); /* too much owed (coalesced), or not a list */
        goto done;
    }
    if (!resp)
        goto done;
    if (resp <= t->head_r && t->head_o == 0) /* all of them answer the head: one latency */
        rc = answer_head(self, c, resp, t->head_r, now);
    else if (t->head_r > 0 && t->head_o == 0) /* the head and entries behind it */
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

/* databus.Flow._read_more: the chunk in rbuf[0:n] ends inside a line; one more non-blocking read
 * takes whatever of the rest has already arrived, so that it goes out in the same send.  The
 * reference server writes an answer in three pieces ("ACK 11", " c0b3...", "\n"): a wake-up on
 * the first often finds the others there a moment later, and each send saved is a segment, a
 * wake-up of the peer and most of a message's kernel time (W2 against server-linux: 1.02-1.04
 * sends per message before, 1.00-1.02 after).  It never waits: EAGAIN sends what there is.
 * EOF is seen again by the next read; an error is kept in err_later and reported at the next
 * wake-up, after this chunk is delivered (the socket stays readable). */
static Py_ssize_t
read_more(Flow *self, Py_ssize_t n)
{
    ssize_t more;
    do
        more = recv(self->src_fd, rbuf + n, BUFSIZE - n, 0);
    while (more < 0 && errno == EINTR);
    if (more > 0)
        return n + more;
    if (more < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
        self->err_later = errno;
    return n;
}

static PyObject *
Flow_on_readable(Flow *self, PyObject *unused)
{
    PyObject *r = NULL;
    if (self->bus == Py_None || self->on_readable == NULL)
        Py_RETURN_NONE; /* closed: a callback already queued this turn */
    Py_INCREF(self);
    if (self->err_later) { /* the extra read's error, after the chunk it followed was delivered */
        errno = self->err_later;
        self->err_later = 0;
        PyErr_SetFromErrno(PyExc_OSError);
        r = handled(self);
        goto out;
    }
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
    if (rbuf[n - 1] != '\n' && n < BUFSIZE)
        n = read_more(self, n);
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
        if (x != NULL && self->writer == NULL) {
            self->writer = PyObject_CallMethod(self->loop, "io", "ii", self->dst_fd, 2);
            if (self->on_writable == NULL && self->writer != NULL)
                self->on_writable = PyObject_GetAttrString((PyObject *)self, "on_writable");
            if (self->on_writable == NULL)
                Py_CLEAR(self->writer); /* the error is set: handled below */
        }
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
    PyObject *r;
    if (self->reader != Py_None && retire_reader(self) < 0) /* None: closed before */
        return NULL;
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
    if (value != Py_None && !PyObject_TypeCheck(value, &TimerStateType)) {
        PyErr_SetString(PyExc_TypeError, "Flow.timer: a latency.Timer (a TimerState) or None");
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

/* -- per connection: accept, connect, close without the GIL's drop and take ------------------ */
/* Python's socket methods release the GIL around every call, also a call that cannot wait: on
 * a thread-aware interpreter each release is a drop and a take of the GIL, ~800 instructions
 * (callgrind, W4), and a client costs eight of them (accept and its EAGAIN, socket, two
 * connects, setblocking, two closes).  These make the same non-blocking calls holding it, and
 * accept4 passes O_NONBLOCK on (no ioctl after).  fooproxy/sockops.py is their Python fallback
 * and says what each returns. */

/* A socket object of `type` (socket.socket or _socket.socket) on fd, non-blocking; closes fd
 * when it cannot be made. */
static PyObject *
socket_of(PyObject *type, int fd, int family)
{
    PyObject *sock = PyObject_CallFunction(type, "iiii", family, SOCK_STREAM | SOCK_NONBLOCK, 0, fd);
    if (sock == NULL)
        close(fd);
    return sock;
}

static PyObject *
address_of(const struct sockaddr_storage *ss, socklen_t len)
{
    char host[NI_MAXHOST];
    int port, rc = getnameinfo((const struct sockaddr *)ss, len, host, sizeof host, NULL, 0, NI_NUMERICHOST);
    if (rc != 0) {
        PyErr_Format(PyExc_OSError, "getnameinfo: %s", gai_strerror(rc));
        return NULL;
    }
    if (ss->ss_family == AF_INET) {
        port = ntohs(((const struct sockaddr_in *)ss)->sin_port);
        return Py_BuildValue("(si)", host, port);
    }
    const struct sockaddr_in6 *a6 = (const struct sockaddr_in6 *)ss;
    return Py_BuildValue("(siII)", host, (int)ntohs(a6->sin6_port), (unsigned int)ntohl(a6->sin6_flowinfo),
                         (unsigned int)a6->sin6_scope_id);
}

static PyObject *
sock_accept(PyObject *module, PyObject *args)
{
    int listen_fd;
    PyObject *type;
    if (!PyArg_ParseTuple(args, "iO:accept", &listen_fd, &type))
        return NULL;
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int fd = accept4(listen_fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
        /* Nobody waiting ends every accept loop, once per wake-up: None, not BlockingIOError,
         * whose errno mapping, strerror text and traceback cost more than the accept itself. */
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError); /* EINTR: InterruptedError; EMFILE... */
    }
    if (ss.ss_family != AF_INET && ss.ss_family != AF_INET6) {
        close(fd); /* the listener is TCP over IP (listeners.bind): not reached */
        PyErr_SetString(PyExc_OSError, "accept: not an IP client");
        return NULL;
    }
    PyObject *address = address_of(&ss, len);
    if (address == NULL) {
        close(fd);
        return NULL;
    }
    PyObject *sock = socket_of(type, fd, ss.ss_family);
    if (sock == NULL) {
        Py_DECREF(address);
        return NULL;
    }
    return Py_BuildValue("(NN)", sock, address);
}

static PyObject *
sock_connect_now(PyObject *module, PyObject *args)
{
    int family, port;
    const char *host;
    PyObject *type, *sockaddr;
    if (!PyArg_ParseTuple(args, "iOO:connect_now", &family, &sockaddr, &type))
        return NULL;
    struct sockaddr_storage ss;
    socklen_t len;
    memset(&ss, 0, sizeof ss);
    if (!PyTuple_Check(sockaddr) || PyTuple_GET_SIZE(sockaddr) < 2 ||
        (host = PyUnicode_AsUTF8(PyTuple_GET_ITEM(sockaddr, 0))) == NULL ||
        (port = (int)PyLong_AsLong(PyTuple_GET_ITEM(sockaddr, 1))) < 0 || port > 65535) {
        PyErr_Clear();
        Py_RETURN_NONE; /* not a (host, port, ...) tuple of getaddrinfo's: the full way */
    }
    if (family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)&ss;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &a->sin_addr) != 1)
            Py_RETURN_NONE;
        len = sizeof *a;
    } else if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host, &a->sin6_addr) != 1)
            Py_RETURN_NONE;
        len = sizeof *a;
    } else
        Py_RETURN_NONE;
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        Py_RETURN_NONE; /* EMFILE: the full way reports it */
    int rc = connect(fd, (struct sockaddr *)&ss, len);
    if (rc < 0 && errno == EINPROGRESS)
        rc = connect(fd, (struct sockaddr *)&ss, len); /* loopback: the handshake is done by now */
    if (rc < 0 && errno == EISCONN)
        rc = 0;
    int one = 1;
    if (rc < 0 || setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) {
        close(fd);
        Py_RETURN_NONE;
    }
    return socket_of(type, fd, family);
}

static PyObject *s_detach;

static PyObject *
sock_close(PyObject *module, PyObject *args)
{
    PyObject *sock, *type;
    if (!PyArg_ParseTuple(args, "OO:close", &sock, &type))
        return NULL;
    if (Py_TYPE(sock) != (PyTypeObject *)type) /* a gevent socket: its own close cancels its waiters */
        return PyObject_CallMethodNoArgs(sock, s_close);
    PyObject *fd = PyObject_CallMethodNoArgs(sock, s_detach);
    if (fd == NULL)
        return NULL;
    long n = PyLong_AsLong(fd);
    Py_DECREF(fd);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n >= 0)
        close((int)n); /* a socket without SO_LINGER: close(2) does not wait; EINTR still closes (Linux) */
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"accept", sock_accept, METH_VARARGS,
     "accept(listen_fd, socket_type): (sock, address), sock non-blocking; OSError (BlockingIOError: none)."},
    {"connect_now", sock_connect_now, METH_VARARGS,
     "connect_now(family, sockaddr, socket_type): a connected socket when the connect finished at once, else None."},
    {"close", sock_close, METH_VARARGS, "close(sock, socket_type): close a bare socket (others: sock.close())."},
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
    if (PyType_Ready(&CounterType) < 0 || PyType_Ready(&FlowType) < 0 || PyType_Ready(&TimerStateType) < 0 ||
        PyType_Ready(&PendingType) < 0)
        return NULL;
#define INTERN(var, text)                                                                                    \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                                     \
        return NULL;
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
    INTERN(s_detach, "detach");
    INTERN(s_fd, "fd");
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    Py_INCREF(&CounterType);
    Py_INCREF(&FlowType);
    Py_INCREF(&TimerStateType);
    Py_INCREF(&PendingType);
    if (PyModule_AddObject(m, "Counter", (PyObject *)&CounterType) < 0 ||
        PyModule_AddObject(m, "Flow", (PyObject *)&FlowType) < 0 ||
        PyModule_AddObject(m, "TimerState", (PyObject *)&TimerStateType) < 0 ||
        PyModule_AddObject(m, "Pending", (PyObject *)&PendingType) < 0 ||
        PyModule_AddIntConstant(m, "BUFSIZE", BUFSIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
