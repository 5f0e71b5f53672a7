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
    PyObject *out = NULL, *result = NULL, *last = NULL;
    const char *base, *p, *stop;
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
    out = PyList_New(0);
    if (out == NULL)
        goto done;
    base = (const char *)view.buf;
    p = base + start;
    stop = base + end;
    for (;;) {
        const char *next = NULL, *name = NULL;
        Py_ssize_t name_len = 0;
        PyObject *raw, *first, *pair;
        status = scan_request(p, stop, max_bulk, max_count, &next, &name, &name_len);
        if (status != 1)
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
    result = Py_BuildValue("(On" "O)", out, (Py_ssize_t)(p - base),
                           status < 0 ? Py_False : Py_True);
fail:
    Py_DECREF(out);
done:
    PyBuffer_Release(&view);
    return result;
}

/* one_name(framed) -> the name every request of `framed` has, or None
 *
 * framed: (raw bytes, name bytes or None) pairs, as scan_requests and the framer give them.
 * The name of the first when every one is spelled the same, else (or for no request, or a
 * request without a name) None. */
static PyObject *
one_name(PyObject *self, PyObject *framed)
{
    Py_ssize_t i, count;
    PyObject *name = NULL;
    if (!PyList_Check(framed)) {
        PyErr_SetString(PyExc_TypeError, "one_name(list of pairs)");
        return NULL;
    }
    count = PyList_GET_SIZE(framed);
    for (i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(framed, i), *other;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) < 2)
            Py_RETURN_NONE;
        other = PyTuple_GET_ITEM(pair, 1);
        if (!PyBytes_Check(other))
            Py_RETURN_NONE;
        if (name == NULL)
            name = other;
        else if (other != name && (PyBytes_GET_SIZE(other) != PyBytes_GET_SIZE(name) ||
                                   memcmp(PyBytes_AS_STRING(other), PyBytes_AS_STRING(name),
                                          (size_t)PyBytes_GET_SIZE(name)) != 0))
            Py_RETURN_NONE;
    }
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
static PyObject *
recv_stamped(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int fd;
    Py_ssize_t size, got;
    long long arrival = 0;
    PyObject *data;
    struct msghdr message;
    struct iovec vector;
    struct cmsghdr *header;
    union {
        char space[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } control;

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
        return PyErr_SetFromErrno(PyExc_OSError);
    for (header = CMSG_FIRSTHDR(&message); header != NULL;
         header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level == SOL_SOCKET && header->cmsg_type == SCM_TIMESTAMPNS &&
                header->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
            struct timespec when;
            memcpy(&when, CMSG_DATA(header), sizeof(when));
            arrival = (long long)when.tv_sec * 1000000000LL + when.tv_nsec;
            break;
        }
    }
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
static PyObject *
relay(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int src, dst;
    Py_ssize_t count, most, got, sent, taken = 0;
    long long max_bulk;
    const char *p, *end;
    int error = 0;
    PyObject *rest;

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
    return PyModule_Create(&module);
}
