"""Seeded fuzzing: mutated RESP frames, cut at random points, from hostile clients, beside
well-behaved clients whose every reply is checked. The proxy stays up, answers the others
correctly and does not grow."""

from __future__ import annotations

import random
import socket
import threading
import time

from helpers import HOST, RawClient, encode

SEED = 20261202

VALID = [
    encode("SET", "fuzz:k", "v"), encode("GET", "fuzz:k"), encode("PING"),
    encode("MSET", "a", "1", "b", "2"), encode("HSET", "h", "f", "v"), encode("LPUSH", "l", "x"),
    encode("MULTI"), encode("EXEC"), encode("SUBSCRIBE", "c"), encode("UNSUBSCRIBE"),
    encode("HELLO", "3"), encode("HELLO", "2"), encode("CLIENT", "REPLY", "SKIP"),
    encode("SELECT", "1"), encode("EVAL", "return {1,{2,{3}}}", "0"), b"PING\r\n",
    b"SET fuzz:inline value\r\n", encode("BLPOP", "fuzz:nothing", "0.01"),
]


def mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 3)):
        choice = rng.random()
        if not data:
            data += bytes([rng.randrange(256)])
        elif choice < 0.3:  # flip a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice < 0.5:  # drop a byte
            del data[rng.randrange(len(data))]
        elif choice < 0.7:  # insert a byte
            data.insert(rng.randrange(len(data) + 1), rng.choice(b"*$:+-\r\n0123456789"))
        elif choice < 0.85:  # a length made absurd
            data += b"$" + str(rng.choice([-2, 0, 7, 10 ** 9, 2 ** 63])).encode() + b"\r\n"
        else:  # cut short
            del data[rng.randrange(len(data)):]
    return bytes(data)


def hostile(port: int, seed: int, frames: int, errors: list) -> None:
    rng = random.Random(seed)
    sock = None
    deadline = time.monotonic() + 30
    try:
        for _ in range(frames):
            if time.monotonic() > deadline:
                return
            if sock is None:
                sock = socket.create_connection((HOST, port), timeout=5)
                sock.setblocking(False)
            frame = rng.choice(VALID)
            payload = mutate(rng, frame) if rng.random() < 0.7 else frame
            # Cut at random points, each piece sent on its own.
            cuts = sorted(rng.sample(range(len(payload) + 1), min(3, len(payload) + 1)))
            pieces = [payload[a:b] for a, b in zip([0] + cuts, cuts + [len(payload)])]
            try:
                for piece in pieces:
                    if piece:
                        sock.send(piece)
                try:
                    sock.recv(65536)  # whatever came back; it is not checked
                except BlockingIOError:
                    pass
            except OSError:
                sock.close()  # closed by the proxy (a protocol error): connect again
                sock = None
            if rng.random() < 0.05 and sock is not None:
                sock.close()
                sock = None
    except Exception as error:  # noqa: BLE001 - reported by the test
        errors.append(f"hostile {seed}: {error!r}")
    finally:
        if sock is not None:
            sock.close()


def well_behaved(port: int, index: int, stop: threading.Event, errors: list,
                 counts: list) -> None:
    try:
        with RawClient(port, timeout=10) as client:
            n = 0
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline and n < 5000:
                n += 1
                value = f"{index}:{n}".encode()
                if client.call("SET", f"good:{index}", value) != b"OK":
                    errors.append(f"client {index}: SET failed at {n}")
                    return
                got = client.call("GET", f"good:{index}")
                if got != value:
                    errors.append(f"client {index}: GET gave {got!r}, expected {value!r}")
                    return
                counts[index] = n
    except Exception as error:  # noqa: BLE001 - reported by the test
        errors.append(f"client {index}: {error!r}")


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_fuzzed_frames_beside_well_behaved_clients(proxy):
    errors: list = []
    counts = [0, 0, 0]
    stop = threading.Event()
    before = _rss(proxy.pid)
    good = [threading.Thread(target=well_behaved, args=(proxy.port, i, stop, errors, counts),
                             daemon=True) for i in range(3)]
    bad = [threading.Thread(target=hostile, args=(proxy.port, SEED + i, 400, errors),
                            daemon=True) for i in range(4)]
    for thread in good + bad:
        thread.start()
    for thread in bad:
        thread.join(60)
    stop.set()
    for thread in good:
        thread.join(60)
    assert not errors, errors[:5]
    assert all(counts), counts  # the well-behaved clients were served throughout
    with RawClient(proxy.port) as check:
        assert check.call("PING") == b"PONG"
    grown = _rss(proxy.pid) - before
    assert grown < 64 * 1024 * 1024, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert "Traceback" not in proxy.log_text(), proxy.log_text()[-3000:]
