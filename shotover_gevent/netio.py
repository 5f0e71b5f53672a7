"""Socket helpers shared by the client side and the server side of the proxy."""


def send_all(sock, payload: bytes) -> None:
    """Write everything; one send() in the common case. (gevent's sendall() asks the kernel for
    the socket's buffer size on every call: a system call per write that this skips.)"""
    sent = sock.send(payload)
    if sent < len(payload):
        sock.sendall(memoryview(payload)[sent:])
