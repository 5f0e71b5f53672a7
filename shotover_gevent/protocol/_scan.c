/* Framing in one C call: the run of well-formed requests at the start of a client's buffer,
 * and the run of simple reply frames at the start of a server's.
 *
 * A well-formed request is what Redis reads exactly as it is written: "*<count>\r\n" with
 * 1 <= count, then <count> times "$<length>\r\n<length bytes>\r\n", every number in plain
 * decimal (no sign, no leading zero, at most 18 digits), every line ending in CRLF. Its raw
 * bytes are then its own encoding, so they can be forwarded as they are. Anything else (inline
 * commands, other types, odd numbers, a request cut by the end of the window) ends the run and
 * is left to the step-by-step framer in resp.py, which knows every rule and error.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/socket.h>
#include <time.h>
#include <structmember.h>

/* Parse a plain decimal number at *p, followed by CRLF. 1: parsed (*p moved past the CRLF),
 * 0: the buffer ends first, -1: not plain decimal with CRLF. */
static int
read_number(const char **p, const char *end, long long *value)
{
    const char *s = *p;
    const char *digits = s;
    long long v = 0;
    while (s < end && *s >= '0' && *s <= '9') {
        if (s - digits >= 18)
            return -1;
        v = v * 10 + (*s - '0');
        s++;
    }
    if (s >= end)
        return 0;
    if (s == digits || (s - digits > 1 && *digits == '0') || *s != '\r')
        return -1;
    if (s + 1 >= end)
        return 0;
    if (s[1] != '\n')
        return -1;
    *p = s + 2;
    *value = v;
    return 1;
}

/* A blob at *p, just after its type byte: a plain decimal length up to max_bulk, CRLF, that
 * many bytes, CRLF. 1: read (its bytes at *payload, *length of them; *p moved past it),
 * 0: the buffer ends first, -1: not a well-formed blob. */
static int
read_blob(const char **p, const char *end, long long max_bulk, const char **payload,
          long long *length)
{
    const char *s = *p;
    int status = read_number(&s, end, length);
    if (status <= 0)
        return status;
    if (*length > max_bulk)
        return -1;
    if (end - s < *length + 2)
        return 0;
    if (s[*length] != '\r' || s[*length + 1] != '\n')
        return -1;
    *payload = s;
    *p = s + *length + 2;
    return 1;
}

/* One request at p: 1 (its end in *next, its first argument's bounds in name/name_len),
 * 0: incomplete, -1: not well-formed. */
static int
scan_request(const char *p, const char *end, long long max_bulk, long long max_count,
             const char **next, const char **name, Py_ssize_t *name_len)
{
    long long count, length, i;
    int status;
    if (p >= end)
        return 0;
    if (*p != '*')
        return -1;
    p++;
    status = read_number(&p, end, &count);
    if (status <= 0)
        return status;
    if (count < 1 || count > max_count)
        return -1;
    for (i = 0; i < count; i++) {
        const char *payload;
        if (p >= end)
            return 0;
        if (*p != '$')
            return -1;
        p++;
        status = read_blob(&p, end, max_bulk, &payload, &length);
        if (status <= 0)
            return status;
        if (i == 0) {
            *name = payload;
            *name_len = (Py_ssize_t)length;
        }
    }
    *next = p;
    return 1;
}

/* The run of well-formed requests from p to end: a new list of (raw bytes, first argument
 * bytes) pairs (a name spelled as the one before it is that same object), *stop where the
 * first one not taken begins, *status that of scan_request for it (-1: not well-formed).
 * NULL on a failure (memory). */
static PyObject *
scan_run(const char *p, const char *end, long long max_bulk, long long max_count,
         const char **stop, int *status)
{
    PyObject *out = PyList_New(0), *last = NULL;
    if (out == NULL)
        return NULL;
    for (;;) {
        const char *next = NULL, *name = NULL;
        Py_ssize_t name_len = 0;
        PyObject *raw, *first, *pair;
        *status = scan_request(p, end, max_bulk, max_count, &next, &name, &name_len);
        if (*status != 1)
            break;
        raw = PyBytes_FromStringAndSize(p, next - p);
        if (raw == NULL)
            goto fail;
        if (last != NULL && PyBytes_GET_SIZE(last) == name_len &&
                memcmp(PyBytes_AS_STRING(last), name, (size_t)name_len) == 0) {
            first = last;
            Py_INCREF(first);
        } else {
            first = PyBytes_FromStringAndSize(name, name_len);
            if (first == NULL) {
                Py_DECREF(raw);
                goto fail;
            }
            last = first;  /* borrowed: the list holds it */
        }
        pair = PyTuple_Pack(2, raw, first);
        Py_DECREF(raw);
        Py_DECREF(first);
        if (pair == NULL || PyList_Append(out, pair) < 0) {
            Py_XDECREF(pair);
            goto fail;
        }
        Py_DECREF(pair);
        p = next;
    }
    *stop = p;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* scan_requests(data, start, end, max_bulk, max_count) -> (requests, stop, well_formed)
 *
 * requests: [(raw bytes, first argument bytes)] of the well-formed requests from `start`, one
 * after the other, up to `end` (a name spelled as the one before it is that same object);
 * stop: where the first one not taken begins; well_formed: False when the run ended at a
 * request that is not well-formed (True: at the end of the data, or at a request not
 * complete before `end`). */
static PyObject *
scan_requests(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t start, end;
    long long max_bulk, max_count;
    PyObject *out = NULL, *result = NULL;
    const char *base, *p = NULL;
    int status = 0;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "scan_requests(data, start, end, max_bulk, max_count)");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    end = PyLong_AsSsize_t(args[2]);
    max_bulk = PyLong_AsLongLong(args[3]);
    max_count = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred() || PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (end > view.len)
        end = view.len;
    if (start < 0 || start > end) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "start out of range");
        return NULL;
    }
    base = (const char *)view.buf;
    out = scan_run(base + start, base + end, max_bulk, max_count, &p, &status);
    if (out == NULL)
        goto done;
    result = Py_BuildValue("(On" "O)", out, (Py_ssize_t)(p - base),
                           status < 0 ? Py_False : Py_True);
    Py_DECREF(out);
done:
    PyBuffer_Release(&view);
    return result;
}

/* The name every request of `framed` (a list) has, borrowed; NULL when they differ, when one
 * has no name, or for no request. */
static PyObject *
the_one_name(PyObject *framed)
{
    Py_ssize_t i, count = PyList_GET_SIZE(framed);
    PyObject *name = NULL;
    for (i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(framed, i), *other;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) < 2)
            return NULL;
        other = PyTuple_GET_ITEM(pair, 1);
        if (!PyBytes_Check(other))
            return NULL;
        if (name == NULL)
            name = other;
        else if (other != name && (PyBytes_GET_SIZE(other) != PyBytes_GET_SIZE(name) ||
                                   memcmp(PyBytes_AS_STRING(other), PyBytes_AS_STRING(name),
                                          (size_t)PyBytes_GET_SIZE(name)) != 0))
            return NULL;
    }
    return name;
}

/* one_name(framed) -> the name every request of `framed` has, or None
 *
 * framed: (raw bytes, name bytes or None) pairs, as scan_requests and the framer give them.
 * The name of the first when every one is spelled the same, else (or for no request, or a
 * request without a name) None. */
static PyObject *
one_name(PyObject *self, PyObject *framed)
{
    PyObject *name;
    if (!PyList_Check(framed)) {
        PyErr_SetString(PyExc_TypeError, "one_name(list of pairs)");
        return NULL;
    }
    name = the_one_name(framed);
    if (name == NULL)
        Py_RETURN_NONE;
    Py_INCREF(name);
    return name;
}

/* One simple reply frame at p (what resp.py's run expression takes): a line of type
 * -+:_,#( holding no CR or LF, $-1, *-1, *0, or a blob ($ ! =) of a plain decimal length up to
 * max_bulk followed by CRLF. 1: its end in *next, 0: incomplete, -1: not a simple frame. */
static int
scan_reply(const char *p, const char *end, long long max_bulk, const char **next)
{
    const char *s, *payload;
    long long length;
    int status;
    if (p >= end)
        return 0;
    switch (*p) {
    case '-': case '+': case ':': case '_': case ',': case '#': case '(':
        for (s = p + 1; s < end; s++) {
            if (*s == '\r' || *s == '\n')
                break;
        }
        if (s >= end)
            return 0;
        if (*s != '\r')
            return -1;
        if (s + 1 >= end)
            return 0;
        if (s[1] != '\n')
            return -1;
        *next = s + 2;
        return 1;
    case '*':
        if (end - p < 4)
            return 0;
        if (p[1] == '0' && p[2] == '\r' && p[3] == '\n') {
            *next = p + 4;
            return 1;
        }
        if (end - p < 5)
            return 0;
        if (p[1] == '-' && p[2] == '1' && p[3] == '\r' && p[4] == '\n') {
            *next = p + 5;
            return 1;
        }
        return -1;
    case '$': case '!': case '=':
        s = p + 1;
        if (*p == '$' && s < end && *s == '-') {
            if (end - p < 5)
                return 0;
            if (p[2] == '1' && p[3] == '\r' && p[4] == '\n') {
                *next = p + 5;
                return 1;
            }
            return -1;
        }
        status = read_blob(&s, end, max_bulk, &payload, &length);
        if (status == 1)
            *next = s;
        return status;
    default:
        return -1;
    }
}

/* scan_replies(data, start, count, max_bulk) -> (frames, stop)
 *
 * The run of up to `count` simple reply frames from `start`, each as bytes; stop is where the
 * first one not taken begins (at a frame that is not simple, is incomplete, or the end of the
 * data). */
static PyObject *
scan_replies(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, count, taken = 0;
    long long max_bulk;
    PyObject *out = NULL, *result = NULL;
    const char *base, *p, *stop;

    if (!PyArg_ParseTuple(args, "y*nnL", &view, &start, &count, &max_bulk))
        return NULL;
    if (start < 0 || start > view.len) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "start out of range");
        return NULL;
    }
    if ((out = PyList_New(0)) == NULL)
        goto done;
    base = (const char *)view.buf;
    p = base + start;
    stop = base + view.len;
    while (taken < count) {
        const char *next = NULL;
        PyObject *frame;
        if (scan_reply(p, stop, max_bulk, &next) != 1)
            break;
        frame = PyBytes_FromStringAndSize(p, next - p);
        if (frame == NULL || PyList_Append(out, frame) < 0) {
            Py_XDECREF(frame);
            goto done;
        }
        Py_DECREF(frame);
        p = next;
        taken++;
    }
    result = Py_BuildValue("(On)", out, (Py_ssize_t)(p - base));
done:
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    return result;
}

/* CRC16/XMODEM (polynomial 0x1021, start 0), the checksum Redis Cluster hashes keys with. */
static unsigned short crc_table[256];

static void
make_crc_table(void)
{
    int byte, bit;
    for (byte = 0; byte < 256; byte++) {
        unsigned int value = (unsigned int)byte << 8;
        for (bit = 0; bit < 8; bit++)
            value = (value & 0x8000) ? (value << 1) ^ 0x1021 : value << 1;
        crc_table[byte] = (unsigned short)(value & 0xFFFF);
    }
}

static long
slot_of(const char *key, Py_ssize_t length)
{
    Py_ssize_t i, open = -1, close = -1;
    unsigned int crc = 0;
    for (i = 0; i < length; i++) {
        if (key[i] == '{') {
            open = i;
            break;
        }
    }
    if (open >= 0) {
        for (i = open + 1; i < length; i++) {
            if (key[i] == '}') {
                close = i;
                break;
            }
        }
        if (close > open + 1) {  /* a non-empty hash tag: only it is hashed */
            key += open + 1;
            length = close - open - 1;
        }
    }
    for (i = 0; i < length; i++)
        crc = ((crc << 8) & 0xFFFF) ^ crc_table[((crc >> 8) ^ (unsigned char)key[i]) & 0xFF];
    return (long)(crc & 16383);
}

/* The hash slot of argument 1 of one request (a multibulk of bulks), or -1 when it has none
 * or is not such a request. */
static long
request_key_slot(const char *p, const char *end)
{
    long long count, length, i;
    const char *payload;
    if (p >= end || *p != '*')
        return -1;
    p++;
    if (read_number(&p, end, &count) != 1 || count < 2)
        return -1;
    for (i = 0; i < 2; i++) {
        if (p >= end || *p != '$')
            return -1;
        p++;
        if (read_blob(&p, end, (long long)1 << 60, &payload, &length) != 1)
            return -1;
    }
    return slot_of(payload, (Py_ssize_t)length);
}

/* key_slots(framed, max_length) -> [slot]
 *
 * framed: requests as the framer gives them, (raw bytes, name) pairs; for each, the hash slot
 * of its argument 1, or -1 (no argument 1, not a multibulk of bulks, or longer than
 * max_length bytes). */
static PyObject *
key_slots(PyObject *self, PyObject *args)
{
    Py_ssize_t i, count, max_length;
    PyObject *out, *framed;
    if (!PyArg_ParseTuple(args, "O!n", &PyList_Type, &framed, &max_length))
        return NULL;
    count = PyList_GET_SIZE(framed);
    out = PyList_New(count);
    if (out == NULL)
        return NULL;
    for (i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(framed, i), *raw, *slot;
        long value = -1;
        if (PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) >= 1) {
            raw = PyTuple_GET_ITEM(pair, 0);
            if (PyBytes_Check(raw) && PyBytes_GET_SIZE(raw) <= max_length) {
                const char *data = PyBytes_AS_STRING(raw);
                value = request_key_slot(data, data + PyBytes_GET_SIZE(raw));
            }
        }
        slot = PyLong_FromLong(value);
        if (slot == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, slot);
    }
    return out;
}

/* route_batch(framed, table, max_length) -> node, (nodes, payloads, order) or None
 *
 * framed: requests as the framer gives them, (raw bytes, name) pairs; table: for each of the
 * 16384 hash slots the index of the node serving it, a native unsigned 16-bit integer
 * (65535: none), 32768 bytes in all. Each request goes to the node of its argument 1's slot.
 * When they all go to one node: that node's index (int). Else, per node in the order the
 * batch first names it (a group): nodes, the nodes' indices (tuple of int); payloads, the
 * group's requests' bytes joined (list of bytes); and order, for each request the index of
 * its group (bytes). None when a request has no slot (see key_slots, max_length included),
 * its slot no node, or the batch names more than 255 nodes. */
#define ROUTE_NONE 65535
#define ROUTE_GROUPS 255

static PyObject *
route_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *framed, *order = NULL, *nodes = NULL, *payloads = NULL, *result = NULL;
    Py_ssize_t i, count, max_length, groups = 0;
    const char *map;
    unsigned char *marks;
    unsigned short node_of_group[ROUTE_GROUPS];
    Py_ssize_t sizes[ROUTE_GROUPS], filled[ROUTE_GROUPS];

    if (nargs != 3 || !PyList_Check(args[0]) || !PyBytes_Check(args[1]) ||
            PyBytes_GET_SIZE(args[1]) != 16384 * (Py_ssize_t)sizeof(unsigned short)) {
        PyErr_SetString(PyExc_TypeError, "route_batch(list of pairs, bytes of 16384 unsigned "
                                         "shorts, int)");
        return NULL;
    }
    framed = args[0];
    max_length = PyLong_AsSsize_t(args[2]);
    if (max_length == -1 && PyErr_Occurred())
        return NULL;
    count = PyList_GET_SIZE(framed);
    if (count == 0)
        Py_RETURN_NONE;
    map = PyBytes_AS_STRING(args[1]);
    order = PyBytes_FromStringAndSize(NULL, count);
    if (order == NULL)
        return NULL;
    marks = (unsigned char *)PyBytes_AS_STRING(order);
    for (i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(framed, i), *raw;
        long slot = -1;
        unsigned short node;
        Py_ssize_t group;
        if (PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) >= 1) {
            raw = PyTuple_GET_ITEM(pair, 0);
            if (PyBytes_Check(raw) && PyBytes_GET_SIZE(raw) <= max_length) {
                const char *data = PyBytes_AS_STRING(raw);
                slot = request_key_slot(data, data + PyBytes_GET_SIZE(raw));
            }
        }
        if (slot >= 0)
            memcpy(&node, map + slot * sizeof(unsigned short), sizeof(node));
        if (slot < 0 || node == ROUTE_NONE) {
            Py_DECREF(order);
            Py_RETURN_NONE;
        }
        for (group = 0; group < groups && node_of_group[group] != node; group++)
            ;
        if (group == groups) {
            if (groups == ROUTE_GROUPS) {
                Py_DECREF(order);
                Py_RETURN_NONE;
            }
            node_of_group[group] = node;
            sizes[group] = 0;
            groups++;
        }
        marks[i] = (unsigned char)group;
        sizes[group] += PyBytes_GET_SIZE(PyTuple_GET_ITEM(pair, 0));
    }
    if (groups == 1) {
        Py_DECREF(order);
        return PyLong_FromLong(node_of_group[0]);
    }
    nodes = PyTuple_New(groups);
    payloads = PyList_New(groups);
    if (nodes == NULL || payloads == NULL)
        goto done;
    for (i = 0; i < groups; i++) {
        PyObject *node = PyLong_FromLong(node_of_group[i]), *payload;
        if (node == NULL)
            goto done;
        PyTuple_SET_ITEM(nodes, i, node);
        payload = PyBytes_FromStringAndSize(NULL, sizes[i]);
        if (payload == NULL)
            goto done;
        PyList_SET_ITEM(payloads, i, payload);
        filled[i] = 0;
    }
    for (i = 0; i < count; i++) {
        PyObject *raw = PyTuple_GET_ITEM(PyList_GET_ITEM(framed, i), 0);
        unsigned char group = marks[i];
        memcpy(PyBytes_AS_STRING(PyList_GET_ITEM(payloads, group)) + filled[group],
               PyBytes_AS_STRING(raw), (size_t)PyBytes_GET_SIZE(raw));
        filled[group] += PyBytes_GET_SIZE(raw);
    }
    result = PyTuple_Pack(3, nodes, payloads, order);
done:
    Py_XDECREF(nodes);
    Py_XDECREF(payloads);
    Py_DECREF(order);
    return result;
}

/* Whether a reply frame sends its request again (see redis_sink_cluster._RETRIED). */
static int
retried_frame(const char *frame, Py_ssize_t length)
{
    static const char *const prefixes[] = {"-MOVED ", "-ASK ", "-TRYAGAIN", "-CLUSTERDOWN",
                                           "-LOADING", NULL};
    int k;
    if (length < 1 || frame[0] != '-')
        return 0;
    for (k = 0; prefixes[k] != NULL; k++) {
        size_t size = strlen(prefixes[k]);
        if ((size_t)length >= size && memcmp(frame, prefixes[k], size) == 0)
            return 1;
    }
    return 0;
}

/* merge_replies(order, results) -> the replies in one piece, or None
 *
 * order: as route_batch gives it, each request's group; results: per group, the reply frames
 * (bytes) its node sent, in order. The frames put back in request order, joined; None when a
 * group has fewer frames than requests, or a frame sends its request again (a redirection,
 * a node not ready). */
static PyObject *
merge_replies(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *order, *results, *out;
    Py_ssize_t i, count, groups, total = 0, taken[256];
    const unsigned char *marks;
    char *p;

    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "merge_replies(bytes, list of lists of bytes)");
        return NULL;
    }
    order = args[0];
    results = args[1];
    count = PyBytes_GET_SIZE(order);
    marks = (const unsigned char *)PyBytes_AS_STRING(order);
    groups = PyList_GET_SIZE(results);
    if (groups > 256) {
        PyErr_SetString(PyExc_ValueError, "more than 256 groups");
        return NULL;
    }
    for (i = 0; i < groups; i++) {
        if (!PyList_Check(PyList_GET_ITEM(results, i))) {
            PyErr_SetString(PyExc_TypeError, "merge_replies(bytes, list of lists of bytes)");
            return NULL;
        }
        taken[i] = 0;
    }
    for (i = 0; i < count; i++) {
        PyObject *frames, *frame;
        if (marks[i] >= groups)
            Py_RETURN_NONE;
        frames = PyList_GET_ITEM(results, marks[i]);
        if (taken[marks[i]] >= PyList_GET_SIZE(frames))
            Py_RETURN_NONE;
        frame = PyList_GET_ITEM(frames, taken[marks[i]]);
        if (!PyBytes_Check(frame)) {
            PyErr_SetString(PyExc_TypeError, "a frame is not bytes");
            return NULL;
        }
        if (retried_frame(PyBytes_AS_STRING(frame), PyBytes_GET_SIZE(frame)))
            Py_RETURN_NONE;
        total += PyBytes_GET_SIZE(frame);
        taken[marks[i]]++;
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL)
        return NULL;
    p = PyBytes_AS_STRING(out);
    for (i = 0; i < groups; i++)
        taken[i] = 0;
    for (i = 0; i < count; i++) {
        PyObject *frame = PyList_GET_ITEM(PyList_GET_ITEM(results, marks[i]), taken[marks[i]]++);
        memcpy(p, PyBytes_AS_STRING(frame), (size_t)PyBytes_GET_SIZE(frame));
        p += PyBytes_GET_SIZE(frame);
    }
    return out;
}

/* Where recv_stamped() reads: the bytes are then copied into a bytes object of their size, which
 * costs less than allocating `size` bytes for each read and shrinking them after (the GIL is
 * held throughout, so one buffer serves every call). */
#define RECV_ROOM (256 * 1024)
static char recv_room[RECV_ROOM];

/* recv_stamped(fd, size) -> (data, arrival)
 *
 * One recvmsg() of up to `size` bytes from a non-blocking socket: the bytes (b"" at the end of
 * the stream) and, if the socket has SO_TIMESTAMPNS on, when the kernel received the first of
 * them, in nanoseconds since the epoch (else 0). Nothing to read raises BlockingIOError, any
 * other failure OSError, as socket.recvmsg() does. */
/* One recvmsg() of up to `size` bytes (at most RECV_ROOM) from `fd` into recv_room: how many
 * (-1 with errno set on a failure), and in *arrival when the kernel received the first of them
 * (ns since the epoch, 0 when the socket does not stamp). */
static Py_ssize_t
recv_room_stamped(int fd, Py_ssize_t size, long long *arrival)
{
    Py_ssize_t got;
    struct msghdr message;
    struct iovec vector;
    struct cmsghdr *header;
    union {
        char space[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } control;

    *arrival = 0;
    if (size > RECV_ROOM)
        size = RECV_ROOM;
    memset(&message, 0, sizeof(message));
    vector.iov_base = recv_room;
    vector.iov_len = (size_t)size;
    message.msg_iov = &vector;
    message.msg_iovlen = 1;
    message.msg_control = control.space;
    message.msg_controllen = sizeof(control.space);
    do {
        got = recvmsg(fd, &message, 0);
    } while (got < 0 && errno == EINTR);
    if (got < 0)
        return -1;
    for (header = CMSG_FIRSTHDR(&message); header != NULL;
         header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level == SOL_SOCKET && header->cmsg_type == SCM_TIMESTAMPNS &&
                header->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
            struct timespec when;
            memcpy(&when, CMSG_DATA(header), sizeof(when));
            *arrival = (long long)when.tv_sec * 1000000000LL + when.tv_nsec;
            break;
        }
    }
    return got;
}

static PyObject *
recv_stamped(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    Py_ssize_t size, got;
    long long arrival = 0;
    PyObject *data;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "recv_stamped(fd, size)");
        return NULL;
    }
    fd = (int)PyLong_AsLong(args[0]);
    size = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred())
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "negative size");
        return NULL;
    }
    if (fd < 0) {  /* a closed socket's fileno(): as reading from it would fail */
        errno = EBADF;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    got = recv_room_stamped(fd, size, &arrival);
    if (got < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    data = PyBytes_FromStringAndSize(recv_room, got);
    if (data == NULL)
        return NULL;
    return Py_BuildValue("(NL)", data, arrival);
}

/* relay(src, dst, count, max_bulk, most) -> what one recv() from `src` gave
 *
 * One recv() from the non-blocking socket `src` into the buffer above. When the bytes are
 * exactly `count` simple reply frames (see scan_reply), no more than `most`, and `dst` is a
 * descriptor (>= 0), they are sent to `dst` at once (non-blocking) instead of being copied
 * out: the result is then how many were read (int) if all went, else (how many were read,
 * the bytes not sent, the errno of the send or 0 when the socket was full). Otherwise the
 * bytes read (b"" at the end of the stream or on a failed read, which the caller reads
 * again to tell apart), or None when there was nothing to read. */
static PyObject *relay_fds(int src, int dst, Py_ssize_t count, long long max_bulk,
                           Py_ssize_t most);

static PyObject *
relay(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int src, dst;
    Py_ssize_t count, most;
    long long max_bulk;

    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "relay(src, dst, count, max_bulk, most)");
        return NULL;
    }
    src = (int)PyLong_AsLong(args[0]);
    dst = (int)PyLong_AsLong(args[1]);
    count = PyLong_AsSsize_t(args[2]);
    max_bulk = PyLong_AsLongLong(args[3]);
    most = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    return relay_fds(src, dst, count, max_bulk, most);
}

static PyObject *
relay_fds(int src, int dst, Py_ssize_t count, long long max_bulk, Py_ssize_t most)
{
    Py_ssize_t got, sent, taken = 0;
    const char *p, *end;
    int error = 0;
    PyObject *rest;

    if (src < 0)
        return PyBytes_FromStringAndSize("", 0);
    do {
        got = recv(src, recv_room, RECV_ROOM, 0);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            Py_RETURN_NONE;
        return PyBytes_FromStringAndSize("", 0);
    }
    if (dst >= 0 && got > 0 && got <= most && count > 0) {
        const char *next = NULL;
        p = recv_room;
        end = recv_room + got;
        while (taken < count && scan_reply(p, end, max_bulk, &next) == 1) {
            p = next;
            taken++;
        }
        if (taken == count && p == end) {
            do {
                sent = send(dst, recv_room, (size_t)got, MSG_DONTWAIT | MSG_NOSIGNAL);
            } while (sent < 0 && errno == EINTR);
            if (sent == got)
                return PyLong_FromSsize_t(got);
            if (sent < 0) {
                if (errno != EAGAIN && errno != EWOULDBLOCK)
                    error = errno;
                sent = 0;
            }
            rest = PyBytes_FromStringAndSize(recv_room + sent, got - sent);
            if (rest == NULL)
                return NULL;
            return Py_BuildValue("(nNi)", got, rest, error);
        }
    }
    return PyBytes_FromStringAndSize(recv_room, got);
}

/* ---- the lane's usual case in C ---------------------------------------------------------------
 *
 * A client connection that the lane serves (connection.py, _Lane) on its own server connection
 * (upstream.py, lane_call) costs, per request, two event loop callbacks: the client's socket
 * readable (read, frame, screen, hand to the sink, write to the server) and the server's
 * (read the replies, write them to the client, account for the batch). In Python those are
 * some twenty calls per request. Here, their usual case is one C call each, working on the
 * same objects: the Python classes keep their slots, the C reads and writes them where
 * Python would (their offsets come from the classes' member descriptors, see lane_setup),
 * and whatever is not the usual case is left to the Python methods, called at the very point
 * where the C stops, so that each step has one meaning whichever side runs it. */

enum {
    /* UpstreamConnection */
    U_LANE, U_BATCH, U_REPLY_BUDGET, U_LANE_FRESH, U_LANE_RAW, U_STATE, U_IDLE_WATCHER,
    U_FRAMER, U_QUIET_SINCE, U_HELD, U_ANSWERED, U_REPLIES, U_TICK, U_REPLY_LIMIT,
    U_CLIENT_FOLLOWS, U_QUIET, U_CLOSED, U_TLS, U_PUSH_MODE, U_ADOPTED_INFLIGHT,
    /* _Lane */
    L_CONNECTION, L_FD, L_WATCHER, L_ORDER, L_BUSY, L_STOPPED, L_BATCH, L_OPENING, L_CHAIN,
    L_SINK, L_SCREENS, L_SINK_INDEX, L_RECORD, L_RESUME, L_READABLE,
    /* ClientConnection */
    C_STATE, C_DEFERRED_PUSHES, C_OUTBOX, C_IN_BATCH, C_BATCH, C_HANG_UP, C_FRAMER, C_IDLE,
    /* RequestFramer, ReplyFramer, their _Buffer */
    F_BUF, F_READY, F_PARTIAL, F_LINE_MARK, F_LINE_HIDDEN, F_MAX_BULK_LEN,
    R_BUF, R_READY, R_MAX_BULK_LEN,
    B_DATA, B_OFFSET,
    /* ConnectionState, ChainShared, BatchSeries, RedisSinkSingle, NameTable */
    S_RESP_VERSION, H_RECORDERS, P_PENDING, K_SHARED_SLOT, K_UPSTREAM, N_PASSES,
    /* Chain, CounterCell */
    X_PLAIN_SCREENS, X_PLANS, V_VALUE, K_SHARED_BUSY,
    SLOT_COUNT
};

enum {
    T_UPSTREAM, T_LANE, T_CONNECTION, T_REQUEST_FRAMER, T_REPLY_FRAMER, T_BUFFER, T_STATE,
    T_SHARED, T_SERIES, T_SINK, T_NAMES, T_CHAIN, T_COUNTER, T_CLUSTER, TYPE_COUNT
};

static const char *const type_keys[TYPE_COUNT] = {
    "UpstreamConnection", "_Lane", "ClientConnection", "RequestFramer", "ReplyFramer",
    "_Buffer", "ConnectionState", "ChainShared", "BatchSeries", "RedisSinkSingle", "NameTable",
    "Chain", "CounterCell", "RedisSinkCluster",
};

static const struct { int type; const char *name; } slot_names[SLOT_COUNT] = {
    {T_UPSTREAM, "_lane"}, {T_UPSTREAM, "_batch"}, {T_UPSTREAM, "_reply_budget"},
    {T_UPSTREAM, "_lane_fresh"}, {T_UPSTREAM, "_lane_raw"}, {T_UPSTREAM, "state"},
    {T_UPSTREAM, "_idle_watcher"}, {T_UPSTREAM, "framer"}, {T_UPSTREAM, "_quiet_since"},
    {T_UPSTREAM, "_held"}, {T_UPSTREAM, "_answered"}, {T_UPSTREAM, "_replies"},
    {T_UPSTREAM, "_tick"}, {T_UPSTREAM, "reply_limit"}, {T_UPSTREAM, "client_follows"},
    {T_UPSTREAM, "_quiet"}, {T_UPSTREAM, "closed"}, {T_UPSTREAM, "tls"},
    {T_UPSTREAM, "push_mode"}, {T_UPSTREAM, "_adopted_inflight"},
    {T_LANE, "connection"}, {T_LANE, "fd"}, {T_LANE, "watcher"}, {T_LANE, "order"},
    {T_LANE, "busy"}, {T_LANE, "stopped"}, {T_LANE, "batch"}, {T_LANE, "opening"},
    {T_LANE, "chain"}, {T_LANE, "sink"}, {T_LANE, "screens"}, {T_LANE, "sink_index"},
    {T_LANE, "record"}, {T_LANE, "resume"}, {T_LANE, "readable"},
    {T_CONNECTION, "state"}, {T_CONNECTION, "_deferred_pushes"}, {T_CONNECTION, "_outbox"},
    {T_CONNECTION, "_in_batch"}, {T_CONNECTION, "_batch"}, {T_CONNECTION, "_hang_up"},
    {T_CONNECTION, "framer"}, {T_CONNECTION, "_idle"},
    {T_REQUEST_FRAMER, "_buf"}, {T_REQUEST_FRAMER, "_ready"}, {T_REQUEST_FRAMER, "_partial"},
    {T_REQUEST_FRAMER, "_line_mark"}, {T_REQUEST_FRAMER, "_line_hidden"},
    {T_REQUEST_FRAMER, "max_bulk_len"},
    {T_REPLY_FRAMER, "_buf"}, {T_REPLY_FRAMER, "_ready"}, {T_REPLY_FRAMER, "max_bulk_len"},
    {T_BUFFER, "data"}, {T_BUFFER, "offset"},
    {T_STATE, "resp_version"}, {T_SHARED, "recorders"}, {T_SERIES, "pending"},
    {T_SINK, "_shared_slot"}, {T_SINK, "upstream"}, {T_NAMES, "passes"},
    {T_CHAIN, "_plain_screens"}, {T_CHAIN, "_plans"}, {T_COUNTER, "value"},
    {T_SINK, "_shared_busy"},
};

static PyTypeObject *lane_types[TYPE_COUNT];
static Py_ssize_t slot_offsets[SLOT_COUNT];
/* Set by lane_setup: until then (or without it) every call goes to the Python methods. */
static int lane_ready_to_run = 0;
/* SERVING, HANDED_OVER, CLOSED; the set of server connections that owe a reply and what
 * watches it (upstream._WAITS); the sink's table of the commands a shared connection takes
 * (its own connection takes the same for a lane batch). */
static PyObject *serving, *handed_over, *closed_state, *waits, *owing, *shareable;
static Py_ssize_t large_output, large_message, fold_at, max_batch, canonical_window, recv_size;
static long long max_multibulk;
static PyObject *str_readable, *str_lane_read, *str_lane_done, *str_relayed, *str_written,
    *str_watch, *str_give_back, *str_readable_now, *str_serve, *str_submit, *str_queue,
    *str_waiting, *str_loop, *str_pendingcnt, *str_fd, *str_active, *str_screen_framed,
    *str_drain, *str_lane_unsent, *str_add, *str_greenlet, *str_feed, *str_crashed,
    *str_switch_in_python, *str_deliver, *str_send_failed;
static PyObject *why_eof, *why_error;

#define AT(object, slot) (*(PyObject **)((char *)(object) + slot_offsets[slot]))

/* Store `value` in a slot, as `object.name = value` would. */
static inline void
put(PyObject *object, int slot, PyObject *value)
{
    PyObject **at = &AT(object, slot);
    PyObject *old = *at;
    Py_INCREF(value);
    *at = value;
    Py_XDECREF(old);
}

/* A slot's value taken as a truth value, as an `if` would: 1, 0; -1 when it is not set or
 * the test failed (the caller then leaves the case to Python). */
static inline int
truth(PyObject *object, int slot)
{
    PyObject *value = AT(object, slot);
    if (value == NULL)
        return -1;
    if (value == Py_None || value == Py_False)
        return 0;
    if (value == Py_True)
        return 1;
    if (PyList_CheckExact(value))
        return PyList_GET_SIZE(value) != 0;
    if (PyTuple_CheckExact(value))
        return PyTuple_GET_SIZE(value) != 0;
    return -1;
}

/* A slot holding a small int: its value, or -1 when it is not one. */
static inline Py_ssize_t
small_int(PyObject *object, int slot)
{
    PyObject *value = AT(object, slot);
    Py_ssize_t result;
    if (value == NULL || !PyLong_CheckExact(value))
        return -1;
    result = PyLong_AsSsize_t(value);
    if (result == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return result;
}

static inline int
is_type(PyObject *object, int type)
{
    return object != NULL && Py_TYPE(object) == lane_types[type];
}

/* Bytes buffered by a framer's _Buffer (`buffer`): -1 when it is not the usual shape. */
static inline Py_ssize_t
buffered(PyObject *buffer)
{
    PyObject *data;
    Py_ssize_t offset;
    if (!is_type(buffer, T_BUFFER))
        return -1;
    data = AT(buffer, B_DATA);
    offset = small_int(buffer, B_OFFSET);
    if (data == NULL || !PyByteArray_CheckExact(data) || offset < 0)
        return -1;
    return PyByteArray_GET_SIZE(data) - offset;
}

static inline double
monotonic_seconds(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);  /* what time.perf_counter() reads on Linux */
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* A gevent watcher's descriptor (its `fd`); -2 when it could not be read (an error set). */
static Py_ssize_t
watcher_fd(PyObject *watcher)
{
    PyObject *value = PyObject_GetAttr(watcher, str_fd);
    Py_ssize_t fd;
    if (value == NULL)
        return -2;
    fd = PyLong_AsSsize_t(value);
    Py_DECREF(value);
    return fd == -1 && PyErr_Occurred() ? -2 : fd;
}

/* Whether a gevent watcher is started (its `active`): 1, 0; -1 with an error set. */
static int
watcher_active(PyObject *watcher)
{
    PyObject *value = PyObject_GetAttr(watcher, str_active);
    int active;
    if (value == NULL)
        return -1;
    active = PyObject_IsTrue(value);
    Py_DECREF(value);
    return active;
}

/* Something failed in the middle of a step (memory, say): reported as Python's except clause
 * in the lane reports it, and the connection handed back to its greenlet. */
/* The exception being raised, as an object (a new reference; NULL if none), cleared. */
static PyObject *
raised(void)
{
    PyObject *type, *error, *traceback;
    PyErr_Fetch(&type, &error, &traceback);
    PyErr_NormalizeException(&type, &error, &traceback);
    if (error != NULL && traceback != NULL)
        PyException_SetTraceback(error, traceback);
    Py_XDECREF(type);
    Py_XDECREF(traceback);
    return error;
}

static PyObject *
crashed(PyObject *lane)
{
    PyObject *error = raised(), *result;
    if (error == NULL)
        return NULL;
    result = PyObject_CallMethodOneArg(lane, str_crashed, error);
    Py_DECREF(error);
    return result;
}

/* ---- the server's side: UpstreamConnection._readable --------------------------------------- */

/* Account for a batch done now (ChainShared.record, successful): one append to its series. */
static int
record_batch(PyObject *record, PyObject *started, PyObject *entered)
{
    PyObject *shared, *recorders, *series, *pending, *seconds, *result;
    Py_ssize_t index;
    if (!PyMethod_Check(record) || !is_type(PyMethod_GET_SELF(record), T_SHARED) ||
            !PyFloat_CheckExact(started) || !PyLong_CheckExact(entered))
        goto in_python;
    shared = PyMethod_GET_SELF(record);
    recorders = AT(shared, H_RECORDERS);
    index = PyLong_AsSsize_t(entered);
    if (recorders == NULL || !PyList_CheckExact(recorders) || index < 0 ||
            index >= PyList_GET_SIZE(recorders))
        goto in_python;
    series = PyList_GET_ITEM(recorders, index);
    if (!is_type(series, T_SERIES))
        goto in_python;
    pending = AT(series, P_PENDING);
    if (pending == NULL || !PyList_CheckExact(pending))
        goto in_python;
    seconds = PyFloat_FromDouble(monotonic_seconds() - PyFloat_AS_DOUBLE(started));
    if (seconds == NULL)
        return -1;
    if (PyList_Append(pending, seconds) < 0) {
        Py_DECREF(seconds);
        return -1;
    }
    Py_DECREF(seconds);
    if (PyList_GET_SIZE(pending) >= fold_at) {
        result = PyObject_CallMethodNoArgs(series, str_drain);
        if (result == NULL)
            return -1;
        Py_DECREF(result);
    }
    return 0;
in_python:
    result = PyObject_CallFunctionObjArgs(record, started, entered, Py_False, NULL);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* The lane's batch answered (the start of _Lane.relayed and switch): no longer owed, recorded,
 * the connection's out of its batch. The batch is a (count, started, entered) tuple: the
 * callers looked. 0, or -1 with an error set. */
static int
batch_answered(PyObject *lane, PyObject *connection)
{
    PyObject *batch = AT(lane, L_BATCH);
    int recorded;
    Py_INCREF(batch);
    put(lane, L_BATCH, Py_None);
    recorded = record_batch(AT(lane, L_RECORD), PyTuple_GET_ITEM(batch, 1),
                            PyTuple_GET_ITEM(batch, 2));
    Py_DECREF(batch);
    if (recorded < 0)
        return -1;
    put(connection, C_IN_BATCH, Py_False);
    return 0;
}

/* _Lane.relayed(count) and its _written(), for a batch whose replies all went to the client. */
static PyObject *lane_written(PyObject *lane, PyObject *connection);

static PyObject *
lane_relayed(PyObject *lane, PyObject *connection)
{
    if (batch_answered(lane, connection) < 0)
        return crashed(lane);
    put(connection, C_BATCH, Py_None);
    return lane_written(lane, connection);
}

/* _Lane._written(): the usual case is nothing more to serve, the client's watcher on. */
static PyObject *
lane_written(PyObject *lane, PyObject *connection)
{
    PyObject *framer, *result;
    int hang_up_none, pending_none, active;
    framer = AT(connection, C_FRAMER);
    hang_up_none = AT(connection, C_HANG_UP) == Py_None;
    pending_none = is_type(framer, T_REQUEST_FRAMER) && truth(framer, F_READY) == 0 &&
        buffered(AT(framer, F_BUF)) == 0;
    if (!hang_up_none || !pending_none || AT(connection, C_STATE) != serving)
        return PyObject_CallMethodNoArgs(lane, str_written);
    put(lane, L_BUSY, Py_False);
    put(connection, C_IDLE, Py_True);
    active = watcher_active(AT(lane, L_WATCHER));
    if (active < 0)
        return crashed(lane);
    if (!active) {
        result = PyObject_CallMethodNoArgs(AT(lane, L_READABLE), str_watch);
        if (result == NULL)
            return crashed(lane);
        Py_DECREF(result);
    }
    Py_RETURN_NONE;
}

/* lane_replies(upstream): UpstreamConnection._readable (the server's socket is readable), the
 * event loop's callback of the server connection's watcher. */
static PyObject *
lane_replies(PyObject *self, PyObject *upstream)
{
    PyObject *lane, *connection, *batch, *budget, *state, *framer, *data, *result;
    Py_ssize_t total, most, src, dst, max_bulk, version;
    int deferred, outbox;

    if (!lane_ready_to_run || !is_type(upstream, T_UPSTREAM))
        return PyObject_CallMethodNoArgs(upstream, str_readable);
    lane = AT(upstream, U_LANE);
    if (!is_type(lane, T_LANE) || AT(upstream, U_LANE_FRESH) != Py_True ||
            AT(upstream, U_LANE_RAW) != Py_True)
        return PyObject_CallMethodNoArgs(upstream, str_readable);
    state = AT(upstream, U_STATE);
    version = is_type(state, T_STATE) ? small_int(state, S_RESP_VERSION) : -1;
    connection = AT(lane, L_CONNECTION);
    batch = AT(upstream, U_BATCH);
    budget = AT(upstream, U_REPLY_BUDGET);
    framer = AT(upstream, U_FRAMER);
    if (version != 2 || connection == NULL ||
            !PyObject_TypeCheck(connection, lane_types[T_CONNECTION]) ||
            batch == NULL || !PyList_CheckExact(batch) || budget == NULL ||
            (budget != Py_None && !PyLong_CheckExact(budget)) || !is_type(framer, T_REPLY_FRAMER))
        return PyObject_CallMethodNoArgs(upstream, str_readable);
    /* _Lane.relay_fd() */
    deferred = truth(connection, C_DEFERRED_PUSHES);
    outbox = truth(connection, C_OUTBOX);
    if (AT(lane, L_STOPPED) != Py_False || AT(lane, L_BATCH) == NULL ||
            !PyTuple_CheckExact(AT(lane, L_BATCH)) || PyTuple_GET_SIZE(AT(lane, L_BATCH)) != 3 ||
            deferred != 0 || outbox != 0 ||
            AT(connection, C_STATE) == handed_over || AT(connection, C_STATE) == closed_state)
        return PyObject_CallMethodNoArgs(upstream, str_readable);
    dst = small_int(lane, L_FD);
    max_bulk = small_int(framer, R_MAX_BULK_LEN);
    src = watcher_fd(AT(upstream, U_IDLE_WATCHER));
    if (src == -2)
        return NULL;
    if (dst < 0 || max_bulk < 0)
        return PyObject_CallMethodNoArgs(upstream, str_readable);
    total = PyList_GET_SIZE(batch);
    most = large_output;
    if (budget != Py_None) {
        Py_ssize_t left = PyLong_AsSsize_t(budget);
        if (left == -1 && PyErr_Occurred())
            return NULL;
        if (left <= large_output)
            most = left;
    }
    data = relay_fds((int)src, (int)dst, total, max_bulk, most);
    if (data == NULL || data == Py_None)
        return data;
    if (PyBytes_CheckExact(data)) {  /* read, not relayed: the rest is _lane_read's */
        PyObject *count = PyLong_FromSsize_t(total);
        result = count == NULL ? NULL : PyObject_CallMethodObjArgs(
            upstream, str_lane_read, lane, data, count, budget, NULL);
        Py_XDECREF(count);
        Py_DECREF(data);
        return result;
    }
    put(upstream, U_QUIET_SINCE, Py_None);
    Py_INCREF(lane);
    if (truth(upstream, U_HELD) != 0 || !PyLong_CheckExact(data)) {
        /* pushes to release after the replies, or not all of them written: as Python does */
        result = PyObject_CallMethodNoArgs(upstream, str_lane_done);
        if (result != NULL) {
            Py_DECREF(result);
            result = PyObject_CallMethodOneArg(lane, str_relayed, data);
        }
        Py_DECREF(lane);
        Py_DECREF(data);
        return result;
    }
    Py_DECREF(data);
    /* _lane_done() */
    put(upstream, U_LANE_RAW, Py_False);
    put(upstream, U_ANSWERED, batch);
    put(upstream, U_LANE, Py_None);
    put(upstream, U_BATCH, Py_None);
    put(upstream, U_REPLIES, Py_None);
    put(upstream, U_REPLY_BUDGET, Py_None);
    if (AT(upstream, U_TICK) != Py_None && PySet_Discard(owing, upstream) < 0) {
        Py_DECREF(lane);
        return NULL;
    }
    result = lane_relayed(lane, connection);
    Py_DECREF(lane);
    return result;
}

/* ---- the client's side: _Lane.readable_now, serve, and the sink's submit ----------------- */

/* Append recv_room's first `got` bytes to a RequestFramer's buffer (RequestFramer.feed). */
static int
feed_framer(PyObject *framer, Py_ssize_t got)
{
    PyObject *buffer = AT(framer, F_BUF), *data, *zero;
    Py_ssize_t offset, size;
    if (buffered(buffer) < 0) {  /* not the usual shape: Python's feed */
        PyObject *chunk = PyBytes_FromStringAndSize(recv_room, got), *result;
        if (chunk == NULL)
            return -1;
        result = PyObject_CallMethodOneArg(framer, str_feed, chunk);
        Py_DECREF(chunk);
        Py_XDECREF(result);
        return result == NULL ? -1 : 0;
    }
    data = AT(buffer, B_DATA);
    offset = small_int(buffer, B_OFFSET);
    size = PyByteArray_GET_SIZE(data);
    if (offset && (offset > 65536 || offset * 2 > size)) {
        memmove(PyByteArray_AS_STRING(data), PyByteArray_AS_STRING(data) + offset,
                (size_t)(size - offset));
        if (PyByteArray_Resize(data, size - offset) < 0)
            return -1;
        size -= offset;
        zero = PyLong_FromLong(0);
        put(buffer, B_OFFSET, zero);
        Py_DECREF(zero);
    }
    if (PyByteArray_Resize(data, size + got) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(data) + size, recv_room, (size_t)got);
    return 0;
}

static PyObject *lane_serve(PyObject *lane, PyObject *unused);

/* The lane's callback for the client's socket readable (_Lane.readable_now): bound to the
 * lane by lane_bind. */
static PyObject *
lane_requests(PyObject *lane, PyObject *unused)
{
    PyObject *connection, *framer, *order, *value, *result, *stamp;
    Py_ssize_t fd, got, pendingcnt;
    long long arrival;
    int waiting;

    if (!lane_ready_to_run || !is_type(lane, T_LANE))
        return PyObject_CallMethodNoArgs(lane, str_readable_now);
    connection = AT(lane, L_CONNECTION);
    fd = small_int(lane, L_FD);
    if (AT(lane, L_BUSY) != Py_False || connection == NULL ||
            !PyObject_TypeCheck(connection, lane_types[T_CONNECTION]) ||
            AT(connection, C_STATE) != serving || fd < 0 ||
            !is_type(AT(connection, C_FRAMER), T_REQUEST_FRAMER))
        return PyObject_CallMethodNoArgs(lane, str_readable_now);
    got = recv_room_stamped((int)fd, recv_size, &arrival);
    if (got < 0) {
        PyObject *error, *why;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            Py_RETURN_NONE;
        PyErr_SetFromErrno(PyExc_OSError);
        error = raised();
        if (error == NULL)
            return NULL;
        why = PyTuple_Pack(2, why_error, error);
        Py_DECREF(error);
        if (why == NULL)
            return NULL;
        result = PyObject_CallMethodOneArg(lane, str_give_back, why);
        Py_DECREF(why);
        return result;
    }
    if (got == 0)
        return PyObject_CallMethodOneArg(lane, str_give_back, why_eof);
    Py_INCREF(lane);
    framer = AT(connection, C_FRAMER);
    if (feed_framer(framer, got) < 0) {
        Py_DECREF(lane);
        return NULL;
    }
    put(connection, C_IDLE, Py_False);
    put(lane, L_BUSY, Py_True);
    /* Others may have sent before this client: the arrival time settles it (see netio.py). */
    order = AT(lane, L_ORDER);
    value = PyObject_GetAttr(order, str_waiting);
    if (value == NULL)
        goto fail;
    waiting = PyObject_IsTrue(value);
    Py_DECREF(value);
    if (waiting < 0)
        goto fail;
    if (!waiting) {
        PyObject *loop = PyObject_GetAttr(order, str_loop);
        if (loop == NULL)
            goto fail;
        value = PyObject_GetAttr(loop, str_pendingcnt);
        Py_DECREF(loop);
        if (value == NULL)
            goto fail;
        pendingcnt = PyLong_AsSsize_t(value);
        Py_DECREF(value);
        if (pendingcnt == -1 && PyErr_Occurred())
            goto fail;
        waiting = pendingcnt != 0;
    }
    if (waiting) {
        stamp = PyLong_FromLongLong(arrival);
        if (stamp == NULL)
            goto fail;
        result = PyObject_CallMethodObjArgs(order, str_queue, stamp, AT(lane, L_RESUME), NULL);
        Py_DECREF(stamp);
    } else {
        result = lane_serve(lane, NULL);
    }
    Py_DECREF(lane);
    return result;
fail:
    Py_DECREF(lane);
    return NULL;
}

/* Chain.screen_framed's usual case (Chain._planned): a batch of one command, spelled the same
 * each time, whose plan the chain has made: its counters advanced, how many screens passed it
 * on (a new reference). NULL without an error: not that case (Python's screen_framed then). */
static PyObject *
screened_by_plan(PyObject *chain, PyObject *framed)
{
    PyObject *plans, *name, *plan, *entered, *counters, *size;
    Py_ssize_t i, count = PyList_GET_SIZE(framed);
    if (!is_type(chain, T_CHAIN) || AT(chain, X_PLAIN_SCREENS) != Py_True)
        return NULL;
    plans = AT(chain, X_PLANS);
    name = the_one_name(framed);
    if (plans == NULL || !PyDict_CheckExact(plans) || name == NULL)
        return NULL;
    plan = PyDict_GetItemWithError(plans, name);
    if (plan == NULL || !PyTuple_CheckExact(plan) || PyTuple_GET_SIZE(plan) != 2)
        return NULL;
    entered = PyTuple_GET_ITEM(plan, 0);
    counters = PyTuple_GET_ITEM(plan, 1);
    if (!PyTuple_CheckExact(counters))
        return NULL;
    for (i = 0; i < PyTuple_GET_SIZE(counters); i++) {
        if (!is_type(PyTuple_GET_ITEM(counters, i), T_COUNTER) ||
                AT(PyTuple_GET_ITEM(counters, i), V_VALUE) == NULL)
            return NULL;
    }
    size = PyLong_FromSsize_t(count);
    if (size == NULL)
        return NULL;
    Py_INCREF(plan);  /* the counters' values change; the plan stays */
    for (i = 0; i < PyTuple_GET_SIZE(counters); i++) {
        PyObject *counter = PyTuple_GET_ITEM(counters, i);
        PyObject *value = PyNumber_InPlaceAdd(AT(counter, V_VALUE), size);
        if (value == NULL) {
            Py_DECREF(size);
            Py_DECREF(plan);
            return NULL;
        }
        put(counter, V_VALUE, value);
        Py_DECREF(value);
    }
    Py_DECREF(size);
    Py_INCREF(entered);
    Py_DECREF(plan);
    return entered;
}

/* Whether a sink's own server connection can take a batch from the lane now
 * (UpstreamConnection.lane_ready) and its watcher is on: 1, 0 (-1: failed). */
static int
upstream_takes(PyObject *upstream)
{
    PyObject *framer = AT(upstream, U_FRAMER), *watcher;
    if (AT(upstream, U_QUIET) != Py_True || AT(upstream, U_CLOSED) != Py_False ||
            AT(upstream, U_TLS) != Py_False || AT(upstream, U_PUSH_MODE) != Py_False ||
            AT(upstream, U_BATCH) != Py_None || AT(upstream, U_ADOPTED_INFLIGHT) != Py_None ||
            truth(upstream, U_HELD) != 0 || !is_type(framer, T_REPLY_FRAMER) ||
            truth(framer, R_READY) != 0 || buffered(AT(framer, R_BUF)) != 0 ||
            AT(upstream, U_TICK) == NULL)
        return 0;
    watcher = AT(upstream, U_IDLE_WATCHER);
    if (watcher == NULL || watcher == Py_None)
        return 0;
    return watcher_active(watcher);
}

/* RedisSinkSingle.submit and UpstreamConnection.lane_call for a batch on the client's own
 * server connection: 1 done, 0 not the usual case (nothing changed), -1 failed. */
static int
submit_own(PyObject *lane, PyObject *sink, PyObject *framed, PyObject *started,
           PyObject *entered)
{
    PyObject *upstream, *passes, *batch, *replies = NULL, *payload, *result, *count_object;
    Py_ssize_t i, count = PyList_GET_SIZE(framed), fd, sent;
    int takes;

    if (!is_type(sink, T_SINK) || AT(sink, K_SHARED_SLOT) != Py_None)
        return 0;
    upstream = AT(sink, K_UPSTREAM);
    if (!is_type(upstream, T_UPSTREAM))
        return 0;
    /* _SHAREABLE.all_pass(framed): names it knows to pass (others: Python looks) */
    passes = AT(shareable, N_PASSES);
    if (passes == NULL || !PyDict_CheckExact(passes))
        return 0;
    for (i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(framed, i);
        if (PyDict_GetItemWithError(passes, PyTuple_GET_ITEM(pair, 1)) != Py_True)
            return PyErr_Occurred() ? -1 : 0;
    }
    takes = upstream_takes(upstream);
    if (takes <= 0)
        return takes;
    fd = watcher_fd(AT(upstream, U_IDLE_WATCHER));
    if (fd < 0)
        return fd == -2 ? -1 : 0;
    if (count == 1) {
        payload = PyTuple_GET_ITEM(PyList_GET_ITEM(framed, 0), 0);
        Py_INCREF(payload);
    } else {  /* the requests' bytes joined */
        Py_ssize_t total = 0;
        char *at;
        for (i = 0; i < count; i++)
            total += PyBytes_GET_SIZE(PyTuple_GET_ITEM(PyList_GET_ITEM(framed, i), 0));
        payload = PyBytes_FromStringAndSize(NULL, total);
        if (payload == NULL)
            return -1;
        at = PyBytes_AS_STRING(payload);
        for (i = 0; i < count; i++) {
            PyObject *raw = PyTuple_GET_ITEM(PyList_GET_ITEM(framed, i), 0);
            memcpy(at, PyBytes_AS_STRING(raw), (size_t)PyBytes_GET_SIZE(raw));
            at += PyBytes_GET_SIZE(raw);
        }
    }
    /* _Lane.submit: the batch whose replies are owed */
    count_object = PyLong_FromSsize_t(count);
    batch = count_object == NULL ? NULL : PyTuple_Pack(3, count_object, started, entered);
    Py_XDECREF(count_object);
    replies = PyList_New(0);
    if (batch == NULL || replies == NULL) {
        Py_XDECREF(batch);
        Py_XDECREF(replies);
        Py_DECREF(payload);
        return -1;
    }
    put(lane, L_BATCH, batch);
    Py_DECREF(batch);
    /* lane_call */
    if (AT(upstream, U_TICK) != Py_None) {
        PyObject *greenlet;
        put(upstream, U_QUIET_SINCE, Py_None);
        if (PySet_Add(owing, upstream) < 0)
            goto fail;
        greenlet = PyObject_GetAttr(waits, str_greenlet);
        if (greenlet == NULL)
            goto fail;
        Py_DECREF(greenlet);
        if (greenlet == Py_None) {
            result = PyObject_CallMethodOneArg(waits, str_add, upstream);
            if (result == NULL)
                goto fail;
            Py_DECREF(result);
        }
    }
    put(upstream, U_BATCH, framed);
    put(upstream, U_REPLIES, replies);
    Py_DECREF(replies);
    replies = NULL;
    put(upstream, U_LANE_RAW, Py_True);
    put(upstream, U_LANE_FRESH, Py_True);
    put(upstream, U_REPLY_BUDGET, AT(upstream, U_CLIENT_FOLLOWS) == Py_True &&
        AT(upstream, U_REPLY_LIMIT) != NULL ? AT(upstream, U_REPLY_LIMIT) : Py_None);
    put(upstream, U_LANE, lane);
    do {
        sent = send((int)fd, PyBytes_AS_STRING(payload), (size_t)PyBytes_GET_SIZE(payload),
                    MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0)
        sent = (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    if (sent != PyBytes_GET_SIZE(payload)) {
        PyObject *how_many = PyLong_FromSsize_t(sent);
        result = how_many == NULL ? NULL : PyObject_CallMethodObjArgs(
            upstream, str_lane_unsent, payload, how_many, NULL);
        Py_XDECREF(how_many);
        if (result == NULL)
            goto fail;
        Py_DECREF(result);
    }
    Py_DECREF(payload);
    return 1;
fail:
    Py_XDECREF(replies);
    Py_DECREF(payload);
    return -1;
}

/* The lane's serve (its turn has come): bound to the lane by lane_bind, as its `resume`. */
static PyObject *
lane_serve(PyObject *lane, PyObject *unused)
{
    PyObject *connection, *framer, *buffer, *data, *framed, *started = NULL, *entered = NULL,
        *result, *zero;
    const char *base, *stop = NULL;
    Py_ssize_t offset, size, end;
    long long max_bulk;
    int status = 0, done;

    if (!lane_ready_to_run || !is_type(lane, T_LANE))
        return PyObject_CallMethodNoArgs(lane, str_serve);
    connection = AT(lane, L_CONNECTION);
    if (AT(lane, L_STOPPED) != Py_False || connection == NULL ||
            AT(connection, C_STATE) == handed_over || AT(connection, C_STATE) == closed_state)
        return PyObject_CallMethodNoArgs(lane, str_serve);  /* which does nothing */
    framer = AT(connection, C_FRAMER);
    if (!is_type(framer, T_REQUEST_FRAMER) || truth(framer, F_READY) != 0 ||
            AT(framer, F_PARTIAL) != Py_None || small_int(framer, F_LINE_MARK) != 0 ||
            AT(framer, F_LINE_HIDDEN) != Py_False)
        return PyObject_CallMethodNoArgs(lane, str_serve);
    buffer = AT(framer, F_BUF);
    max_bulk = small_int(framer, F_MAX_BULK_LEN);
    if (buffered(buffer) <= 0 || max_bulk < 0)
        return PyObject_CallMethodNoArgs(lane, str_serve);
    data = AT(buffer, B_DATA);
    offset = small_int(buffer, B_OFFSET);
    size = PyByteArray_GET_SIZE(data);
    base = PyByteArray_AS_STRING(data);
    if (base[offset] != '*')
        return PyObject_CallMethodNoArgs(lane, str_serve);
    end = offset + canonical_window < size ? offset + canonical_window : size;
    framed = scan_run(base + offset, base + end, max_bulk, max_multibulk, &stop, &status);
    if (framed == NULL)
        return NULL;
    /* RequestFramer.pop_requests' usual case: the whole buffer, at most MAX_BATCH requests */
    if (PyList_GET_SIZE(framed) == 0 || stop != base + size ||
            PyList_GET_SIZE(framed) > max_batch) {
        Py_DECREF(framed);
        return PyObject_CallMethodNoArgs(lane, str_serve);
    }
    Py_INCREF(lane);
    if (PyByteArray_Resize(data, 0) < 0)
        goto fail;
    zero = PyLong_FromLong(0);
    put(buffer, B_OFFSET, zero);
    Py_DECREF(zero);
    started = PyFloat_FromDouble(monotonic_seconds());
    if (started == NULL)
        goto fail;
    if (truth(lane, L_SCREENS) != 0) {
        entered = screened_by_plan(AT(lane, L_CHAIN), framed);
        if (entered == NULL) {
            if (PyErr_Occurred())
                goto crash;
            entered = PyObject_CallMethodObjArgs(AT(lane, L_CHAIN), str_screen_framed, framed,
                                                 started, NULL);
            if (entered == NULL)
                goto crash;
        }
    } else {
        entered = PyLong_FromLong(0);
    }
    done = 0;
    if (AT(lane, L_OPENING) == Py_False && PyLong_CheckExact(entered) &&
            AT(lane, L_SINK_INDEX) != NULL && PyLong_CheckExact(AT(lane, L_SINK_INDEX)) &&
            PyObject_RichCompareBool(entered, AT(lane, L_SINK_INDEX), Py_EQ) == 1) {
        done = submit_own(lane, AT(lane, L_SINK), framed, started, entered);
        if (done < 0)
            goto crash;
    }
    if (done) {
        /* where an upgrade finds the batch (the sink's own record of it says more) */
        put(connection, C_BATCH, framed);
        put(connection, C_IN_BATCH, Py_True);
        result = Py_None;
        Py_INCREF(result);
    } else {
        result = PyObject_CallMethodObjArgs(lane, str_submit, framed, started, entered, NULL);
    }
    Py_DECREF(framed);
    Py_DECREF(started);
    Py_DECREF(entered);
    Py_DECREF(lane);
    return result;
crash:
    Py_DECREF(framed);
    Py_XDECREF(started);
    Py_XDECREF(entered);
    result = crashed(lane);
    Py_DECREF(lane);
    return result;
fail:
    Py_DECREF(framed);
    Py_XDECREF(started);
    Py_DECREF(lane);
    return NULL;
}


/* ---- a sink's answer: _Lane.switch ------------------------------------------------------ */

/* The lane's switch (bound to it by lane_bind): the replies of the batch submitted, as the
 * sink gives them (see _Lane.switch_in_python): written to the client, the batch recorded. */
static PyObject *
lane_switch(PyObject *lane, PyObject *answer)
{
    PyObject *batch, *connection, *sink, *payload = NULL, *result;
    Py_ssize_t fd, sent, size;

    if (!lane_ready_to_run || !is_type(lane, T_LANE))
        return PyObject_CallMethodOneArg(lane, str_switch_in_python, answer);
    batch = AT(lane, L_BATCH);
    connection = AT(lane, L_CONNECTION);
    sink = AT(lane, L_SINK);
    if (AT(lane, L_STOPPED) != Py_False || batch == NULL || !PyTuple_CheckExact(batch) ||
            PyTuple_GET_SIZE(batch) != 3 || connection == NULL ||
            !PyObject_TypeCheck(connection, lane_types[T_CONNECTION]) ||
            AT(connection, C_STATE) == handed_over || AT(connection, C_STATE) == closed_state ||
            sink == NULL)
        return PyObject_CallMethodOneArg(lane, str_switch_in_python, answer);
    /* the sink's lane_payload, its usual cases */
    if (is_type(sink, T_CLUSTER) && PyBytes_CheckExact(answer)) {
        payload = answer;  /* the replies in one piece */
    } else if (is_type(sink, T_SINK) && PyTuple_CheckExact(answer) &&
               PyTuple_GET_SIZE(answer) == 2 && PyTuple_GET_ITEM(answer, 1) == Py_None &&
               PyList_CheckExact(PyTuple_GET_ITEM(answer, 0)) &&
               PyList_GET_SIZE(PyTuple_GET_ITEM(answer, 0)) == 1) {
        /* from the shared connection, one frame (frames, failure) */
        payload = PyList_GET_ITEM(PyTuple_GET_ITEM(answer, 0), 0);
        if (!PyBytes_CheckExact(payload) || PyBytes_GET_SIZE(payload) > large_message)
            payload = NULL;
        else
            put(sink, K_SHARED_BUSY, Py_False);
    }
    if (payload == NULL)
        return PyObject_CallMethodOneArg(lane, str_switch_in_python, answer);
    Py_INCREF(payload);
    Py_INCREF(lane);
    if (batch_answered(lane, connection) < 0) {
        result = crashed(lane);
        goto done;
    }
    /* deliver(payload) */
    size = PyBytes_GET_SIZE(payload);
    fd = small_int(lane, L_FD);
    if (size > large_output || truth(connection, C_DEFERRED_PUSHES) != 0 ||
            truth(connection, C_OUTBOX) != 0 || fd < 0) {
        result = PyObject_CallMethodOneArg(lane, str_deliver, payload);
        goto done;
    }
    put(connection, C_BATCH, Py_None);
    do {
        sent = send((int)fd, PyBytes_AS_STRING(payload), (size_t)size,
                    MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent != size) {
        int failure = 0;
        PyObject *how_many, *error_number;
        if (sent < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                failure = errno;
            sent = 0;
        }
        how_many = PyLong_FromSsize_t(sent);
        error_number = PyLong_FromLong(failure);
        result = how_many == NULL || error_number == NULL ? NULL : PyObject_CallMethodObjArgs(
            lane, str_send_failed, payload, how_many, error_number, NULL);
        Py_XDECREF(how_many);
        Py_XDECREF(error_number);
        goto done;
    }
    result = lane_written(lane, connection);
done:
    Py_DECREF(payload);
    Py_DECREF(lane);
    return result;
}

static PyMethodDef lane_requests_def = {
    "lane_requests", lane_requests, METH_NOARGS,
    "the client's socket is readable (_Lane.readable_now)"};
static PyMethodDef lane_serve_def = {
    "lane_serve", lane_serve, METH_NOARGS, "the lane's turn has come (_Lane.serve)"};

static PyMethodDef lane_switch_def = {
    "lane_switch", lane_switch, METH_O, "the sink's answer (_Lane.switch_in_python)"};

/* lane_bind(lane) -> (readable, resume, switch): the lane's callbacks, bound to it */
static PyObject *
lane_bind(PyObject *self, PyObject *lane)
{
    PyObject *readable = PyCFunction_New(&lane_requests_def, lane), *resume, *answer;
    if (readable == NULL)
        return NULL;
    resume = PyCFunction_New(&lane_serve_def, lane);
    if (resume == NULL) {
        Py_DECREF(readable);
        return NULL;
    }
    answer = PyCFunction_New(&lane_switch_def, lane);
    if (answer == NULL) {
        Py_DECREF(readable);
        Py_DECREF(resume);
        return NULL;
    }
    return Py_BuildValue("(NNN)", readable, resume, answer);
}

static PyObject *
intern(PyObject **at, const char *text)
{
    if (*at == NULL)
        *at = PyUnicode_InternFromString(text);
    return *at;
}

/* The names the lane's C part calls and reads by (interned once, at import). */
static int
intern_names(void)
{
    if (!intern(&str_readable, "_readable") || !intern(&str_lane_read, "_lane_read") ||
            !intern(&str_lane_done, "_lane_done") || !intern(&str_relayed, "relayed") ||
            !intern(&str_written, "_written") || !intern(&str_watch, "watch") ||
            !intern(&str_give_back, "give_back") || !intern(&str_readable_now, "readable_now") ||
            !intern(&str_serve, "serve") || !intern(&str_submit, "submit") ||
            !intern(&str_queue, "queue") || !intern(&str_waiting, "waiting") ||
            !intern(&str_loop, "loop") || !intern(&str_pendingcnt, "pendingcnt") ||
            !intern(&str_fd, "fd") || !intern(&str_active, "active") ||
            !intern(&str_screen_framed, "screen_framed") || !intern(&str_drain, "drain") ||
            !intern(&str_lane_unsent, "_lane_unsent") || !intern(&str_add, "add") ||
            !intern(&str_greenlet, "greenlet") || !intern(&str_feed, "feed") ||
            !intern(&str_crashed, "crashed") ||
            !intern(&str_switch_in_python, "switch_in_python") ||
            !intern(&str_deliver, "deliver") || !intern(&str_send_failed, "send_failed"))
        return -1;
    return 0;
}

/* lane_setup(**what): the classes (type_keys) and values the lane's C part works with. */
static PyObject *
lane_setup(PyObject *self, PyObject *args, PyObject *what)
{
    int i;
    PyObject *value;
    static const char *const numbers[] = {
        "LARGE_OUTPUT", "FOLD_AT", "MAX_BATCH", "CANONICAL_WINDOW", "RECV_SIZE",
        "LARGE_MESSAGE", "MAX_MULTIBULK"};
    Py_ssize_t *number_at[] = {&large_output, &fold_at, &max_batch, &canonical_window,
                               &recv_size, &large_message, NULL};
    static const char *const objects[] = {"SERVING", "HANDED_OVER", "CLOSED", "WAITS",
                                          "SHAREABLE"};
    PyObject **object_at[] = {&serving, &handed_over, &closed_state, &waits, &shareable};

    lane_ready_to_run = 0;
    if (what == NULL || PyTuple_GET_SIZE(args) != 0) {
        PyErr_SetString(PyExc_TypeError, "lane_setup(**what)");
        return NULL;
    }
    for (i = 0; i < TYPE_COUNT; i++) {
        value = PyDict_GetItemString(what, type_keys[i]);
        if (value == NULL || !PyType_Check(value)) {
            PyErr_Format(PyExc_TypeError, "lane_setup: %s must be a class", type_keys[i]);
            return NULL;
        }
        Py_INCREF(value);
        Py_XSETREF(lane_types[i], (PyTypeObject *)value);
    }
    for (i = 0; i < SLOT_COUNT; i++) {
        PyObject *descriptor = PyObject_GetAttrString((PyObject *)lane_types[slot_names[i].type],
                                                      slot_names[i].name);
        PyMemberDef *member;
        if (descriptor == NULL)
            return NULL;
        if (!Py_IS_TYPE(descriptor, &PyMemberDescr_Type)) {
            Py_DECREF(descriptor);
            PyErr_Format(PyExc_TypeError, "lane_setup: %s.%s is not a slot",
                         type_keys[slot_names[i].type], slot_names[i].name);
            return NULL;
        }
        member = ((PyMemberDescrObject *)descriptor)->d_member;
        if (member->type != T_OBJECT_EX) {
            Py_DECREF(descriptor);
            PyErr_Format(PyExc_TypeError, "lane_setup: %s.%s is not an object slot",
                         type_keys[slot_names[i].type], slot_names[i].name);
            return NULL;
        }
        slot_offsets[i] = member->offset;
        Py_DECREF(descriptor);
    }
    for (i = 0; i < 7; i++) {
        value = PyDict_GetItemString(what, numbers[i]);
        if (value == NULL || !PyLong_Check(value)) {
            PyErr_Format(PyExc_TypeError, "lane_setup: %s must be an int", numbers[i]);
            return NULL;
        }
        if (number_at[i] != NULL)
            *number_at[i] = PyLong_AsSsize_t(value);
        else
            max_multibulk = PyLong_AsLongLong(value);
        if (PyErr_Occurred())
            return NULL;
    }
    for (i = 0; i < 5; i++) {
        value = PyDict_GetItemString(what, objects[i]);
        if (value == NULL) {
            PyErr_Format(PyExc_TypeError, "lane_setup: %s is missing", objects[i]);
            return NULL;
        }
        Py_INCREF(value);
        Py_XSETREF(*object_at[i], value);
    }
    if (!is_type(shareable, T_NAMES)) {
        PyErr_SetString(PyExc_TypeError, "lane_setup: SHAREABLE must be a NameTable");
        return NULL;
    }
    value = PyObject_GetAttrString(waits, "owing");
    if (value == NULL)
        return NULL;
    if (!PySet_CheckExact(value)) {
        Py_DECREF(value);
        PyErr_SetString(PyExc_TypeError, "lane_setup: WAITS.owing must be a set");
        return NULL;
    }
    Py_XSETREF(owing, value);
    if (why_eof == NULL) {
        why_eof = Py_BuildValue("(s)", "eof");
        why_error = PyUnicode_InternFromString("error");
        if (why_eof == NULL || why_error == NULL)
            return NULL;
    }
    lane_ready_to_run = 1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"key_slots", key_slots, METH_VARARGS,
     "key_slots(framed, max_length) -> the hash slot of each request's argument 1 (-1: none)"},
    {"scan_requests", (PyCFunction)(void (*)(void))scan_requests, METH_FASTCALL,
     "scan_requests(data, start, end, max_bulk, max_count) -> (requests, stop, well_formed)"},
    {"recv_stamped", (PyCFunction)(void (*)(void))recv_stamped, METH_FASTCALL,
     "recv_stamped(fd, size) -> (data, arrival in ns or 0): one recvmsg()"},
    {"relay", (PyCFunction)(void (*)(void))relay, METH_FASTCALL,
     "relay(src, dst, count, max_bulk, most) -> one recv() from src, sent on to dst when it "
     "is exactly count simple reply frames"},
    {"scan_replies", scan_replies, METH_VARARGS,
     "scan_replies(data, start, count, max_bulk) -> (frames, stop)"},
    {"route_batch", (PyCFunction)(void (*)(void))route_batch, METH_FASTCALL,
     "route_batch(framed, table, max_length) -> node, (nodes, payloads, order) or None"},
    {"merge_replies", (PyCFunction)(void (*)(void))merge_replies, METH_FASTCALL,
     "merge_replies(order, results) -> the replies in request order, joined, or None"},
    {"lane_setup", (PyCFunction)(void (*)(void))lane_setup, METH_VARARGS | METH_KEYWORDS,
     "lane_setup(**what) -> None: the classes and values of the lane's C part"},
    {"lane_bind", lane_bind, METH_O,
     "lane_bind(lane) -> (readable, resume, switch): the lane's callbacks in C"},
    {"lane_replies", lane_replies, METH_O,
     "lane_replies(upstream): the server connection's socket is readable"},
    {"one_name", one_name, METH_O,
     "one_name(framed) -> the name every request has, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scan", "Framing in C (see resp.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    make_crc_table();
    if (intern_names() < 0)
        return NULL;
    return PyModule_Create(&module);
}
