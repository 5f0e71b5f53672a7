"""Socket helpers shared by the client side and the server side of the proxy."""

import socket as stdlib_socket


def send_all(sock, payload: bytes) -> None:
    """Write everything; one send() in the common case. (gevent's sendall() asks the kernel for
    the socket's buffer size on every call: a system call per write that this skips.)"""
    sent = sock.send(payload)
    if sent < len(payload):
        sock.sendall(memoryview(payload)[sent:])


def close_for_good(sock) -> None:
    """Close a connection so that its peer sees it end now, even while another process still
    holds a copy of the socket (during an upgrade the next image inherits every socket until it
    has adopted what it needs): a blocked command on the server must not outlive its client."""
    try:
        sock.shutdown(stdlib_socket.SHUT_RDWR)
    except OSError:
        pass  # not connected any more
    try:
        sock.close()
    except OSError:
        pass
