"""The model of a Redis connection's state (protocol/state.py): fed request and reply bytes, it
must say how many frames answer each request and what the connection's state is after each one,
first against recorded bytes, then against a real redis-server driven with the same requests."""

from __future__ import annotations

import random
import signal
import socket
import time
from typing import Dict, List, Sequence, Tuple

import pytest

from feature_support import ByteClient
from helpers import HOST, encode, free_port, source_entry, wait_for
from shotover_gevent.message import Message
from shotover_gevent.protocol import state as model
from shotover_gevent.protocol.state import OFF, ON, Conversation
from shotover_gevent.session import Session

OK = b"+OK\r\n"
QUEUED = b"+QUEUED\r\n"


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def confirmation(kind: bytes, name, count: int, push: bool = False) -> bytes:
    head = b">3\r\n" if push else b"*3\r\n"
    return head + bulk(kind) + (b"$-1\r\n" if name is None else bulk(name)) + b":%d\r\n" % count


def talk(conversation: Conversation, *requests: Sequence, replies: bytes = b"",
         byte_by_byte: bool = True) -> List[int]:
    """Send `requests`, then `replies` (one byte at a time by default); the frame count of
    each request answered, in order."""
    before = len(conversation.answered)
    conversation.send(b"".join(encode(*request) for request in requests))
    if byte_by_byte:
        for index in range(len(replies)):
            conversation.receive(replies[index:index + 1])
    else:
        conversation.receive(replies)
    return [len(frames) for _request, frames in conversation.answered[before:]]


# ---- recorded bytes ---------------------------------------------------------------------------


def test_plain_commands_are_one_frame_each():
    conversation = Conversation()
    assert talk(conversation, ("SET", "k", "v"), ("GET", "k"),
                replies=OK + bulk(b"v")) == [1, 1]
    assert conversation.state.plain and conversation.waiting == 0


def test_client_reply_off_skip_on():
    conversation = Conversation()
    counts = talk(conversation, ("CLIENT", "REPLY", "OFF"), ("SET", "k", "v"), ("GET", "k"),
                  replies=b"")
    assert counts == [0, 0, 0]
    assert conversation.state.reply_mode == OFF
    # SKIP while OFF changes nothing; ON answers even now.
    assert talk(conversation, ("CLIENT", "REPLY", "SKIP"), ("CLIENT", "REPLY", "ON"),
                replies=OK) == [0, 1]
    assert conversation.state.reply_mode == ON
    # SKIP silences the next request only; a SKIP after a SKIP silences the one after it.
    counts = talk(conversation, ("CLIENT", "REPLY", "SKIP"), ("GET", "k"),
                  ("CLIENT", "REPLY", "SKIP"), ("CLIENT", "REPLY", "SKIP"), ("GET", "k"),
                  ("GET", "k"), replies=bulk(b"v"))
    assert counts == [0, 0, 0, 0, 0, 1]
    assert conversation.state.reply_mode == ON
    # A malformed mode is an error, and errors are silenced like any reply.
    assert talk(conversation, ("CLIENT", "REPLY", "SKIP"), ("CLIENT", "REPLY", "MAYBE"),
                ("CLIENT", "REPLY", "MAYBE"), replies=b"-ERR syntax error\r\n") == [0, 0, 1]


def test_skip_then_reset_gets_no_reply_and_clears_everything():
    conversation = Conversation()
    talk(conversation, ("SELECT", "3"), ("HELLO", "3"), ("CLIENT", "TRACKING", "ON"),
         replies=OK + b"%1\r\n+proto\r\n:3\r\n" + OK)
    state = conversation.state
    assert (state.selected_db, state.resp_version, state.tracking) == (3, 3, True)
    # RESET keeps the SKIP of the command before it: +RESET is not sent, the PING after is.
    assert talk(conversation, ("CLIENT", "REPLY", "SKIP"), ("RESET",), ("PING",),
                replies=b"+PONG\r\n") == [0, 0, 1]
    assert (state.selected_db, state.resp_version, state.tracking, state.reply_mode) == \
        (0, 2, False, ON)


def test_off_then_reset_answers_reset():
    conversation = Conversation()
    assert talk(conversation, ("CLIENT", "REPLY", "OFF"), ("SELECT", "2"), ("RESET",),
                ("GET", "k"), replies=b"+RESET\r\n$-1\r\n") == [0, 0, 1, 1]
    assert conversation.state.selected_db == 0 and conversation.state.reply_mode == ON


def test_select_inside_multi_applies_when_exec_succeeds():
    conversation = Conversation()
    state = conversation.state
    talk(conversation, ("MULTI",), ("SELECT", "5"), ("SET", "k", "v"),
         replies=OK + QUEUED + QUEUED)
    assert state.in_multi and len(state.queued) == 2 and state.selected_db == 0
    assert talk(conversation, ("EXEC",), replies=b"*2\r\n+OK\r\n+OK\r\n") == [1]
    assert not state.in_multi and state.selected_db == 5
    # A WATCHed key changed: EXEC answers a null array, nothing ran.
    talk(conversation, ("WATCH", "k"), ("MULTI",), ("SELECT", "7"), ("EXEC",),
         replies=OK + OK + QUEUED + b"*-1\r\n")
    assert state.selected_db == 5 and not state.watching and not state.in_multi
    # One queued SELECT failed when EXEC ran it, the other did not.
    talk(conversation, ("MULTI",), ("SELECT", "99"), ("SELECT", "1"), ("EXEC",),
         replies=OK + QUEUED + QUEUED + b"*2\r\n-ERR DB index is out of range\r\n+OK\r\n")
    assert state.selected_db == 1


def test_multi_with_an_error_is_aborted():
    conversation = Conversation()
    state = conversation.state
    counts = talk(conversation, ("MULTI",), ("SELECT", "4"), ("NOSUCH",), ("GET", "k"),
                  replies=OK + QUEUED + b"-ERR unknown command 'NOSUCH'\r\n" + QUEUED)
    assert counts == [1, 1, 1, 1]
    assert state.in_multi and state.aborted and len(state.queued) == 1
    assert talk(conversation, ("EXEC",), replies=b"-EXECABORT Transaction discarded because "
                b"of previous errors.\r\n") == [1]
    assert not state.in_multi and not state.aborted and state.selected_db == 0


def test_a_wrong_argument_count_is_refused_first():
    conversation = Conversation()
    state = conversation.state
    # Inside MULTI, a WATCH without keys is refused as a request (the transaction is aborted),
    # a WATCH with keys by WATCH itself (it is not).
    talk(conversation, ("MULTI",), ("WATCH", "k"), replies=OK + b"-ERR WATCH inside MULTI is "
         b"not allowed\r\n")
    assert state.in_multi and not state.aborted
    talk(conversation, ("WATCH",), ("GET", "k"),
         replies=b"-ERR wrong number of arguments for 'watch' command\r\n" + QUEUED)
    assert state.aborted and state.queued == []  # nothing is queued once EXEC is bound to fail
    # An EXEC refused so ends the transaction.
    assert talk(conversation, ("EXEC", "now"), ("SELECT", "2"), replies=(
        b"-EXECABORT Transaction discarded because of: wrong number of arguments\r\n" + OK)) \
        == [1, 1]
    assert not state.in_multi and state.selected_db == 2
    # Not answered, a SUBSCRIBE without channels changes nothing, sends nothing.
    assert talk(conversation, ("CLIENT", "REPLY", "OFF"), ("SUBSCRIBE",), ("UNSUBSCRIBE",),
                replies=confirmation(b"unsubscribe", None, 0)) == [0, 0, 1]


def test_discard_and_the_errors_of_exec_and_multi():
    conversation = Conversation()
    state = conversation.state
    talk(conversation, ("WATCH", "k"), ("MULTI",), ("SELECT", "4"), ("MULTI",), ("DISCARD",),
         replies=OK + OK + QUEUED + b"-ERR MULTI calls can not be nested\r\n" + OK)
    assert not state.in_multi and not state.watching and state.selected_db == 0
    talk(conversation, ("EXEC",), ("DISCARD",),
         replies=b"-ERR EXEC without MULTI\r\n-ERR DISCARD without MULTI\r\n")
    assert not state.in_multi


def test_hello_3_and_pushes():
    conversation = Conversation()
    state = conversation.state
    hello = b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n"
    assert talk(conversation, ("HELLO", "3", "SETNAME", "app"), replies=hello) == [1]
    assert state.resp_version == 3 and state.client_name == b"app"
    counts = talk(conversation, ("SUBSCRIBE", "a", "b"), ("GET", "k"), replies=(
        confirmation(b"subscribe", b"a", 1, push=True)
        + confirmation(b"subscribe", b"b", 2, push=True)
        + b">3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n" + b"_\r\n"))
    assert counts == [2, 1]  # RESP3: GET is allowed while subscribed; the message is a push
    assert conversation.pushes == [b">3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"]
    assert state.channels == {b"a", b"b"}
    # A failed HELLO changes nothing.
    talk(conversation, ("HELLO", "4"), replies=b"-NOPROTO unsupported protocol version\r\n")
    assert state.resp_version == 3


def test_subscribe_and_unsubscribe_counts():
    conversation = Conversation()
    state = conversation.state
    assert talk(conversation, ("SUBSCRIBE", "a", "b", "a"), replies=(
        confirmation(b"subscribe", b"a", 1) + confirmation(b"subscribe", b"b", 2)
        + confirmation(b"subscribe", b"a", 2))) == [3]
    assert talk(conversation, ("PSUBSCRIBE", "p*"), replies=confirmation(b"psubscribe", b"p*",
                                                                         3)) == [1]
    # RESP2 with subscriptions: anything but (un)subscribe, PING, QUIT, RESET is refused.
    assert talk(conversation, ("GET", "k"), ("SELECT", "2"), replies=b"-ERR only ...\r\n" * 2) \
        == [1, 1]
    assert state.selected_db == 0
    # A delivery in between is a push, not a reply.
    assert talk(conversation, ("UNSUBSCRIBE", "x"), replies=(
        b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"
        + confirmation(b"unsubscribe", b"x", 3))) == [1]
    assert len(conversation.pushes) == 1
    # Without arguments: one confirmation per name subscribed.
    assert talk(conversation, ("UNSUBSCRIBE",), replies=(
        confirmation(b"unsubscribe", b"a", 2) + confirmation(b"unsubscribe", b"b", 1))) == [2]
    assert talk(conversation, ("PUNSUBSCRIBE",), replies=confirmation(b"punsubscribe", b"p*",
                                                                      0)) == [1]
    assert not state.subscribed and state.plain
    # With nothing subscribed: one confirmation with a null name.
    assert talk(conversation, ("SUNSUBSCRIBE",), replies=confirmation(b"sunsubscribe", None,
                                                                      0)) == [1]
    # Confirmations are sent whatever CLIENT REPLY says; the argument error is not.
    assert talk(conversation, ("CLIENT", "REPLY", "OFF"), ("SUBSCRIBE",), ("SUBSCRIBE", "c"),
                replies=confirmation(b"subscribe", b"c", 1)) == [0, 0, 1]
    assert state.channels == {b"c"}


def test_a_refused_subscription_is_one_error():
    conversation = Conversation()
    assert talk(conversation, ("SUBSCRIBE", "a", "b"), ("GET", "k"), replies=(
        b"-NOPERM this user has no permissions to access one of the channels used as "
        b"arguments\r\n$-1\r\n")) == [1, 1]
    assert not conversation.state.subscribed


def test_subscriptions_inside_exec():
    conversation = Conversation()
    state = conversation.state
    counts = talk(conversation, ("MULTI",), ("SUBSCRIBE", "a", "b"), ("SSUBSCRIBE", "c", "d"),
                  ("EXEC",), ("PING",), replies=(
                      OK + QUEUED + QUEUED + b"*2\r\n" + confirmation(b"subscribe", b"a", 1)
                      + confirmation(b"subscribe", b"b", 2)
                      + b"-ERR SSUBSCRIBE isn't allowed for a DENY BLOCKING client\r\n"
                      + b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"))
    # The array holds a's confirmation and b's; SSUBSCRIBE's error comes after it.
    assert counts == [1, 1, 1, 2, 1]
    assert state.channels == {b"a", b"b"} and not state.shard_channels


def test_reset_clears_everything():
    conversation = Conversation()
    state = conversation.state
    talk(conversation, ("AUTH", "pw"), ("SELECT", "9"), ("CLIENT", "SETNAME", "n"),
         ("CLIENT", "NO-EVICT", "ON"), ("CLIENT", "TRACKING", "ON"), ("WATCH", "k"),
         ("SUBSCRIBE", "a"), replies=OK * 6 + confirmation(b"subscribe", b"a", 1))
    assert (state.auth_password, state.selected_db, state.client_name, state.no_evict,
            state.tracking, state.watching) == (b"pw", 9, b"n", True, True, True)
    talk(conversation, ("MONITOR",), replies=b"-ERR only ...\r\n")
    assert not state.monitor
    talk(conversation, ("RESET",), replies=b"+RESET\r\n")
    assert snapshot(state) == snapshot(model.ConnectionState())


def test_monitor_lines_are_pushes_and_quit_ends_counting():
    conversation = Conversation()
    assert talk(conversation, ("MONITOR",), ("GET", "k"), replies=(
        OK + b'+1700000000.123456 [0 127.0.0.1:5000] "GET" "k"\r\n' + b"$-1\r\n")) == [1, 1]
    assert conversation.state.monitor and len(conversation.pushes) == 1
    # A MONITOR on a monitoring connection is ignored: no reply at all.
    assert talk(conversation, ("MONITOR",), ("ECHO", "x"), replies=bulk(b"x")) == [0, 1]
    assert talk(conversation, ("QUIT",), ("GET", "k"), replies=OK) == [1, 0]


def test_auth_needs_its_reply():
    conversation = Conversation()
    state = conversation.state
    talk(conversation, ("AUTH", "bob", "wrong"), replies=b"-WRONGPASS invalid\r\n")
    assert state.auth_password is None
    # Not answered (CLIENT REPLY OFF): a SELECT of a valid index is assumed to have worked,
    # credentials never are, nor a HELLO that names some (it may be refused as a whole).
    talk(conversation, ("CLIENT", "REPLY", "OFF"), ("AUTH", "bob", "pw"), ("SELECT", "6"),
         ("HELLO", "3", "AUTH", "bob", "pw"), ("CLIENT", "SETNAME", "a b"), ("READONLY",))
    assert state.auth_password is None and state.selected_db == 6
    assert state.resp_version == 2 and state.client_name is None and not state.readonly
    talk(conversation, ("HELLO", "3", "SETNAME", "app"), ("MULTI",))
    assert state.resp_version == 3 and state.client_name == b"app" and state.in_multi


def test_blocking_commands():
    conversation = Conversation()
    conversation.send(encode("BLPOP", "q", "0") + encode("GET", "k"))
    assert conversation.blocked_on.args == [b"BLPOP", b"q", b"0"]
    assert model.own_wait("BLPOP", [b"BLPOP", b"q", b"0"]) is None
    assert model.own_wait("BLPOP", [b"BLPOP", b"q", b"1.5"]) == 1.5
    assert model.own_wait("XREAD", [b"XREAD", b"COUNT", b"1", b"STREAMS", b"s", b"0"]) == 0.0
    assert model.own_wait("XREAD", [b"XREAD", b"BLOCK", b"200", b"STREAMS", b"s", b"$"]) == 0.2
    conversation.receive(b"*2\r\n$1\r\nq\r\n$1\r\nv\r\n")
    assert conversation.blocked_on is None and conversation.waiting == 1


def test_hello_and_auth_arguments():
    assert model.auth_credentials([b"AUTH", b"pw"]) == (None, b"pw")
    assert model.auth_credentials([b"AUTH", b"u", b"pw"]) == (b"u", b"pw")
    assert model.auth_credentials([b"AUTH"]) is None
    options = model.hello_options([b"HELLO", b"3", b"auth", b"u", b"p", b"SETNAME", b"n"])
    assert options == (3, (b"u", b"p"), b"n", None)
    assert model.hello_options([b"HELLO", b"x"]).problem.startswith(b"-ERR Protocol version")
    assert model.hello_options([b"HELLO", b"4"]).problem.startswith(b"-NOPROTO")
    assert model.hello_options([b"HELLO", b"3", b"AUTH", b"u"]).problem == \
        b"-ERR Syntax error in HELLO option 'AUTH'\r\n"


# ---- against a real server ----------------------------------------------------------------------

#: The last request of every sequence: allowed in every state, and used nowhere else.
SENTINEL = ("PING", "end")


def client_info(admin, client_id: int) -> Dict[str, str]:
    line = admin.execute_command("CLIENT", "LIST", "ID", client_id)
    if isinstance(line, bytes):
        line = line.decode()
    fields = dict(item.split("=", 1) for item in line.strip().split(" ") if "=" in item)
    return fields


def drive(server, requests: Sequence[Sequence]) -> Conversation:
    """Send `requests` (then the sentinel) to `server` on one connection, read every frame it
    sends, and check that the model counted exactly those frames and ended in the state the
    server reports for the connection."""
    admin = server.client()
    conversation = Conversation()
    sock = socket.create_connection((HOST, server.port), timeout=5)
    try:
        conversation.send(encode("CLIENT", "ID"))
        sock.sendall(encode("CLIENT", "ID"))
        deadline = time.monotonic() + 5
        while conversation.waiting:
            assert time.monotonic() < deadline, "no reply to CLIENT ID"
            conversation.receive(sock.recv(65536))
        client_id = int(conversation.answered[0][1][0][1:-2])
        conversation.send(b"".join(encode(*request) for request in [*requests, SENTINEL]))
        sock.sendall(b"".join(encode(*request) for request in [*requests, SENTINEL]))
        while conversation.waiting:
            assert time.monotonic() < deadline, \
                f"the server sent fewer frames than the model expects: {conversation.answered}"
            conversation.receive(sock.recv(65536))

        def everything_sent() -> Dict[str, str]:
            info = client_info(admin, client_id)
            done = info.get("cmd") == "ping" and info["qbuf"] == "0" and \
                info["obl"] == "0" and info["oll"] == "0"
            return info if done else {}

        info = wait_for(everything_sent, 5, "the server to answer every request")
        # Whatever the server wrote is in our socket now: nothing may answer a request.
        sock.setblocking(False)
        try:
            extra = sock.recv(65536)
        except BlockingIOError:
            extra = b""
        answered = len(conversation.answered)
        conversation.receive(extra)
        assert len(conversation.answered) == answered, \
            f"the server sent more frames than the model expects: {extra!r}"
        version = server_version(admin)
    finally:
        sock.close()
        admin.close()
    state = conversation.state
    flags = info["flags"]
    assert int(info["db"]) == state.selected_db
    assert int(info["resp"]) == state.resp_version
    assert int(info["multi"]) == (len(state.queued) if state.in_multi else -1)
    assert ("x" in flags) == state.in_multi
    assert (int(info["sub"]), int(info["psub"]), int(info["ssub"])) == \
        (len(state.channels), len(state.patterns), len(state.shard_channels))
    assert ("P" in flags) == state.subscribed
    assert ("O" in flags) == state.monitor
    assert ("t" in flags) == state.tracking
    if version >= (7, 2) or not any(request[0] == "RESET" for request in requests):
        assert ("e" in flags) == state.no_evict  # RESET turns it off from Redis 7.2 on
    assert ("r" in flags) == state.readonly
    assert info["name"] == (state.client_name or b"").decode()
    assert info["user"] == (state.auth_username or b"default").decode()
    # The session follows the same requests from whole replies, as the client connection
    # hands them over: it must end in the same state.
    session = Session()
    for request, frames in conversation.answered:
        session.observe(Message(request.raw), Message(b"".join(frames)))
    assert snapshot(session) == snapshot(state)
    return conversation


def server_version(admin) -> Tuple[int, ...]:
    return tuple(int(part) for part in admin.info("server")["redis_version"].split(".")[:2])


def snapshot(state: model.ConnectionState) -> Dict:
    """Every field of a state; queued requests by their bytes."""
    fields = {name: getattr(state, name) for name in model.ConnectionState.__slots__}
    if state.queued is not None:
        fields["queued"] = [request.raw for request in state.queued]
    return fields


SEQUENCES = {
    "select-in-multi": [("SELECT", "2"), ("MULTI",), ("SELECT", "5"), ("SET", "k", "v"),
                        ("EXEC",)],
    "multi-still-open": [("MULTI",), ("SELECT", "5"), ("GET", "k")],
    "multi-error-execabort": [("MULTI",), ("SELECT", "3"), ("NOSUCHCMD",), ("GET", "k"),
                              ("EXEC",), ("SELECT", "1")],
    "multi-aborted-open": [("MULTI",), ("SELECT", "3"), ("SET", "k"), ("GET", "k")],
    "discard": [("SELECT", "1"), ("WATCH", "k"), ("MULTI",), ("SELECT", "4"), ("DISCARD",)],
    "multi-errors": [("EXEC",), ("DISCARD",), ("MULTI",), ("MULTI",), ("WATCH", "k"),
                     ("SELECT", "99"), ("EXEC",)],
    "select-errors": [("SELECT", "99"), ("SELECT", "x"), ("SELECT", "3"), ("SELECT",)],
    "reply-modes": [("CLIENT", "REPLY", "OFF"), ("SELECT", "3"), ("SET", "a", "1"),
                    ("CLIENT", "REPLY", "SKIP"), ("CLIENT", "REPLY", "ON"),
                    ("CLIENT", "REPLY", "SKIP"), ("GET", "a"), ("CLIENT", "REPLY", "SKIP"),
                    ("CLIENT", "REPLY", "SKIP"), ("GET", "a"), ("GET", "a"),
                    ("CLIENT", "REPLY", "MAYBE")],
    "skip-reset": [("SELECT", "4"), ("CLIENT", "REPLY", "SKIP"), ("RESET",), ("GET", "a")],
    "off-reset": [("SELECT", "2"), ("CLIENT", "REPLY", "OFF"), ("RESET",), ("GET", "a")],
    "subscribe-resp2": [("SUBSCRIBE", "a", "b", "a"), ("PSUBSCRIBE", "p*"), ("GET", "k"),
                        ("SELECT", "2"), ("UNSUBSCRIBE", "a", "zz"), ("SSUBSCRIBE", "s1"),
                        ("UNSUBSCRIBE",)],
    "unsubscribe-everything": [("SUBSCRIBE", "a"), ("PSUBSCRIBE", "p", "q"), ("UNSUBSCRIBE",),
                               ("PUNSUBSCRIBE",), ("SUNSUBSCRIBE",), ("UNSUBSCRIBE", "x", "y"),
                               ("SUBSCRIBE",), ("GET", "k")],
    "subscribe-resp3": [("HELLO", "3"), ("SUBSCRIBE", "a", "b"), ("GET", "k"),
                        ("SSUBSCRIBE", "s"), ("UNSUBSCRIBE", "x"), ("SELECT", "3")],
    "subscribe-reply-off": [("CLIENT", "REPLY", "OFF"), ("SUBSCRIBE", "a", "b"), ("GET", "k"),
                            ("SUBSCRIBE",), ("UNSUBSCRIBE",), ("PUNSUBSCRIBE",)],
    "subscribe-skip": [("CLIENT", "REPLY", "SKIP"), ("SUBSCRIBE", "a"),
                       ("CLIENT", "REPLY", "SKIP"), ("GET", "k")],
    "subscribe-in-exec": [("MULTI",), ("SUBSCRIBE", "a", "b"), ("SSUBSCRIBE", "c", "d"),
                          ("PSUBSCRIBE", "p"), ("UNSUBSCRIBE",), ("EXEC",)],
    "subscribe-in-exec-reply-off": [("CLIENT", "REPLY", "OFF"), ("MULTI",), ("SUBSCRIBE", "a"),
                                    ("SSUBSCRIBE", "s"), ("SET", "k", "v"), ("EXEC",),
                                    ("CLIENT", "REPLY", "ON")],
    "unsubscribe-in-exec-reply-off": [("CLIENT", "REPLY", "OFF"), ("MULTI",),
                                      ("PSUBSCRIBE", "p", "q"), ("UNSUBSCRIBE",), ("EXEC",),
                                      ("CLIENT", "REPLY", "SKIP"), ("PUNSUBSCRIBE",),
                                      ("CLIENT", "REPLY", "ON"), ("GET", "k")],
    "hello-in-exec": [("MULTI",), ("HELLO", "3"), ("SELECT", "2"), ("GET", "k"), ("EXEC",)],
    "monitor-in-exec": [("MULTI",), ("MONITOR",), ("EXEC",)],
    "hello": [("HELLO", "3", "SETNAME", "app"), ("HELLO", "4"), ("HELLO", "2"),
              ("HELLO", "3", "BOGUS"), ("HELLO",)],
    "client-settings": [("CLIENT", "SETNAME", "worker"), ("CLIENT", "NO-EVICT", "ON"),
                        ("CLIENT", "TRACKING", "ON"), ("CLIENT", "SETNAME", "a b"),
                        ("READONLY",)],
    "reset-everything": [("HELLO", "3", "SETNAME", "x"), ("SELECT", "3"),
                         ("CLIENT", "TRACKING", "ON"), ("SUBSCRIBE", "a"), ("WATCH", "k"),
                         ("MULTI",), ("GET", "k"), ("RESET",)],
    "monitor": [("SELECT", "1"), ("MONITOR",), ("GET", "k"), ("MONITOR",), ("ECHO", "x")],
    "blocking-and-auth": [("BLPOP", "q", "0.01"), ("AUTH", "nobody", "wrong"),
                          ("CLIENT", "NO-EVICT", "ON"), ("CLIENT", "NO-EVICT", "OFF"),
                          ("READWRITE",), ("XREAD", "BLOCK", "10", "STREAMS", "s", "$")],
    "arity-in-multi": [("MULTI",), ("WATCH",), ("SELECT", "2"), ("EXEC", "x"), ("MULTI",),
                       ("MULTI", "x"), ("DISCARD", "x"), ("SELECT", "3"), ("EXEC",)],
    "monitor-reset": [("MONITOR",), ("RESET",), ("SELECT", "2")],
    "tracking-off": [("CLIENT", "TRACKING", "ON"), ("CLIENT", "TRACKING", "OFF"),
                     ("CLIENT", "TRACKING", "MAYBE")],
}


@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_the_model_matches_redis(redis_server, name):
    drive(redis_server, SEQUENCES[name])


def test_frame_counts_match_redis(redis_server):
    """A few sequences with the counts spelt out, so that a model and a server that both went
    wrong the same way would still be caught."""
    conversation = drive(redis_server, [("CLIENT", "REPLY", "SKIP"), ("RESET",),
                                        ("CLIENT", "REPLY", "OFF"), ("SUBSCRIBE", "a", "b"),
                                        ("UNSUBSCRIBE",), ("GET", "k")])
    counts = [len(frames) for _request, frames in conversation.answered[1:]]
    assert counts == [0, 0, 0, 2, 2, 0, 0]  # ... and the sentinel PING, silenced too
    conversation = drive(redis_server, [("SUBSCRIBE", "a"), ("CLIENT", "REPLY", "OFF"),
                                        ("GET", "k")])
    counts = [len(frames) for _request, frames in conversation.answered[1:]]
    assert counts == [1, 1, 1, 1]  # RESP2 with a subscription: CLIENT REPLY is refused
    conversation = drive(redis_server, [("MULTI",), ("SUBSCRIBE", "a", "b"),
                                        ("SSUBSCRIBE", "c", "d"), ("EXEC",)])
    counts = [len(frames) for _request, frames in conversation.answered[1:]]
    assert counts == [1, 1, 1, 2, 1]


# ---- through the proxy: where the old copies of the rules differed from Redis --------------------


def single_topology(redis_port: int, **sink_options) -> Dict:
    settings = {"remote_address": f"{HOST}:{redis_port}", "connect_timeout_ms": 3000}
    settings.update(sink_options)
    return {"sources": [source_entry("redis", free_port(), [{"RedisSinkSingle": settings}])]}


def test_a_subscription_refused_by_acl_is_one_error(redis_server, proxy):
    """Redis refuses SUBSCRIBE a b as a whole (one error) when the user may not use one of the
    channels; the proxy waited for a confirmation per channel and the client hung."""
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "state-model-limited", "on", ">pw", "~*",
                          "resetchannels", "&allowed", "+@all")
    try:
        seen = []
        for port in (redis_server.port, proxy.port):
            with ByteClient(port, timeout=3) as client:
                assert client.call("AUTH", "state-model-limited", "pw") == OK
                seen.append([client.call("SUBSCRIBE", "allowed", "forbidden"),
                             client.call("GET", "k")])  # not subscribed: GET is allowed
        assert seen[0][0].startswith(b"-NOPERM") and seen[0][1] == b"$-1\r\n"
        assert seen[1] == seen[0]
    finally:
        admin.execute_command("ACL", "DELUSER", "state-model-limited")
        admin.close()


def test_ssubscribe_inside_a_transaction(redis_server, proxy):
    """EXEC refuses a queued SSUBSCRIBE with one error; the proxy counted a confirmation per
    shard channel and waited for frames that never came."""
    seen = []
    for port in (redis_server.port, proxy.port):
        with ByteClient(port, timeout=3) as client:
            seen.append([client.call("MULTI"), client.call("SSUBSCRIBE", "c", "d"),
                         client.call("EXEC"), client.call("GET", "k")])
    assert seen[0][2].startswith(b"*1\r\n-ERR SSUBSCRIBE isn't allowed")
    assert seen[1] == seen[0]


def test_select_while_replies_are_off_is_kept_for_a_new_upstream_connection(redis_factory,
                                                                            proxy_factory):
    """The session ignored a SELECT it saw no reply to (CLIENT REPLY OFF): once the proxy had
    to open a new upstream connection, the client's commands went to database 0."""
    server = redis_factory()
    proxy = proxy_factory(single_topology(server.port, request_timeout_ms=300))
    with ByteClient(proxy.port) as client:
        client.send("CLIENT", "REPLY", "OFF")
        client.send("SELECT", "2")
        assert client.call("CLIENT", "REPLY", "ON") == OK
        server.process.send_signal(signal.SIGSTOP)
        try:
            reply = client.call("GET", "k")
            assert reply.startswith(b"-ERR upstream ") and b"did not answer within" in reply
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert client.call("SET", "k", "in-db-2") == OK  # on a new upstream connection
    with server.client(db=2) as admin:
        assert admin.get("k") == b"in-db-2"


def test_confirmations_of_a_transaction_sent_while_replies_are_off(redis_server, proxy):
    """With CLIENT REPLY OFF, EXEC's array is not sent but the confirmations of the
    subscriptions it ran are; the proxy expected nothing and dropped them."""
    seen = []
    for port in (redis_server.port, proxy.port):
        with ByteClient(port, timeout=3) as client:
            for request in (("CLIENT", "REPLY", "OFF"), ("MULTI",), ("SUBSCRIBE", "a", "b"),
                            ("EXEC",)):
                client.send(*request)
            seen.append(client.read_frames(2))
    assert seen[0] == confirmation(b"subscribe", b"a", 1) + confirmation(b"subscribe", b"b", 2)
    assert seen[1] == seen[0]


def test_monitor_on_a_monitoring_connection_gets_no_reply(proxy):
    """Redis ignores a second MONITOR without a word; the proxy took the next reply for its
    answer, and the client's last request was left waiting."""
    with ByteClient(proxy.port, timeout=3) as client:
        assert client.call("MONITOR") == OK
        client.send_raw(encode("MONITOR") + encode("ECHO", "x") + encode("ECHO", "y"))
        replies = []
        while len(replies) < 2:
            frame = client.read_frame()
            if not frame.startswith(b"+"):  # MONITOR lines are status frames
                replies.append(frame)
        assert replies == [bulk(b"x"), bulk(b"y")]


def test_session_follows_commands_it_sees_no_reply_to():
    session = Session()
    for args, raw in (((b"CLIENT", b"REPLY", b"OFF"), b""), ((b"SELECT", b"3"), b""),
                      ((b"AUTH", b"bob", b"pw"), b""), ((b"GET", b"k"), b""),
                      ((b"CLIENT", b"REPLY", b"SKIP"), b""), ((b"CLIENT", b"REPLY", b"ON"), OK),
                      ((b"CLIENT", b"REPLY", b"SKIP"), b""), ((b"GET", b"k"), b"")):
        session.observe(Message.request(list(args)), Message(raw))
    assert session.selected_db == 3 and session.auth_password is None
    assert session.reply_mode == ON
    assert session.replay_commands() == [[b"SELECT", b"3"]]


def test_blocked_request_matches_redis(redis_server):
    """While the server holds a BLPOP, the model names it as the request the connection is
    blocked on, as CLIENT LIST flags it; the value pushed by another client answers it."""
    admin = redis_server.client()
    conversation = Conversation()
    with socket.create_connection((HOST, redis_server.port), timeout=5) as sock:
        requests = encode("CLIENT", "ID") + encode("BLPOP", "jobs", "0") + encode("GET", "k")
        conversation.send(requests)
        sock.sendall(requests)
        while not conversation.answered:
            conversation.receive(sock.recv(65536))
        client_id = int(conversation.answered[0][1][0][1:-2])
        wait_for(lambda: "b" in client_info(admin, client_id)["flags"], 5,
                 "the server to block the connection")
        assert conversation.blocked_on.args == [b"BLPOP", b"jobs", b"0"]
        admin.rpush("jobs", "job-1")
        deadline = time.monotonic() + 5
        while conversation.waiting:
            assert time.monotonic() < deadline, "no reply to BLPOP"
            conversation.receive(sock.recv(65536))
    assert conversation.blocked_on is None
    assert [frames for _request, frames in conversation.answered[1:]] == \
        [[b"*2\r\n$4\r\njobs\r\n$5\r\njob-1\r\n"], [b"$-1\r\n"]]
    admin.close()


#: What random sequences are made of (see test_random_sequences_match_redis).
POOL = [("SELECT", "1"), ("SELECT", "2"), ("SELECT", "x"), ("MULTI",), ("EXEC",), ("DISCARD",),
        ("WATCH", "k"), ("WATCH",), ("UNWATCH",), ("SET", "k", "v"), ("SET", "k"), ("NOSUCH",),
        ("SUBSCRIBE", "a", "b"), ("SUBSCRIBE",), ("UNSUBSCRIBE",), ("UNSUBSCRIBE", "a"),
        ("PSUBSCRIBE", "p*"), ("PUNSUBSCRIBE",), ("PUNSUBSCRIBE", "p*", "z"),
        ("SSUBSCRIBE", "s", "t"), ("SUNSUBSCRIBE",), ("HELLO", "3"), ("HELLO", "2"), ("HELLO",),
        ("HELLO", "4"), ("HELLO", "3", "SETNAME", "h"), ("RESET",), ("CLIENT", "REPLY", "OFF"),
        ("CLIENT", "REPLY", "ON"), ("CLIENT", "REPLY", "SKIP"), ("CLIENT", "REPLY", "MAYBE"),
        ("CLIENT", "TRACKING", "ON"), ("CLIENT", "TRACKING", "OFF"),
        ("CLIENT", "TRACKING", "ON", "BCAST"), ("CLIENT", "SETNAME", "n1"),
        ("CLIENT", "SETNAME", "a b"), ("CLIENT", "NO-EVICT", "ON"), ("CLIENT", "ID"),
        ("MONITOR",), ("BLPOP", "q", "0.01"), ("XREAD", "BLOCK", "10", "STREAMS", "st", "$"),
        ("ECHO", "x"), ("AUTH", "u", "p"), ("READONLY",)]
#: Refused for reasons only a command table would show (unknown command, argument count):
#: not sent while replies may be off, where the model cannot see the refusal.
UNSEEN_REFUSALS = {("SET", "k"), ("NOSUCH",)}


def random_sequence(rng: random.Random) -> List[tuple]:
    sequence: List[tuple] = []
    in_multi = silent = False
    for _ in range(rng.randint(3, 20)):
        request = rng.choice(POOL)
        if in_multi and request[:2] == ("CLIENT", "REPLY"):
            continue  # Redis truncates EXEC's array then; the proxy refuses it
        if silent and (request in UNSEEN_REFUSALS or request == ("RESET",)):
            # RESET unanswered ends MONITOR and subscriptions at once, while lines the server
            # wrote before it may still be on their way: not something to count on.
            continue
        if request[0] == "MULTI":
            in_multi = True
        elif request[0] in ("EXEC", "DISCARD", "RESET"):
            in_multi = False
        if request[:3] in (("CLIENT", "REPLY", "OFF"), ("CLIENT", "REPLY", "SKIP")):
            silent = True
        elif request[:3] == ("CLIENT", "REPLY", "ON") or request == ("RESET",):
            silent = False
        sequence.append(request)
    return sequence


def test_random_sequences_match_redis(redis_server):
    rng = random.Random(20261202)
    for _ in range(60):
        sequence = random_sequence(rng)
        try:
            drive(redis_server, sequence)
        except AssertionError as error:
            raise AssertionError(f"{sequence}: {error}") from None
