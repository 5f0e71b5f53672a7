"""What a client changed on its server-side connection, tracked from successful replies.

A fresh upstream connection (after an upgrade or a reconnect) is brought back to this state.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

from .message import Message
from .protocol import resp

SUBSCRIBE_KINDS = {
    "SUBSCRIBE": "channels",
    "UNSUBSCRIBE": "channels",
    "PSUBSCRIBE": "patterns",
    "PUNSUBSCRIBE": "patterns",
    "SSUBSCRIBE": "shard_channels",
    "SUNSUBSCRIBE": "shard_channels",
}

#: Commands whose successful reply changes the session; every other reply is not looked at.
TRACKED_COMMANDS = frozenset(
    {"SELECT", "HELLO", "AUTH", "CLIENT", "READONLY", "READWRITE", "RESET", "MULTI", "EXEC",
     "DISCARD", "WATCH", "UNWATCH", "MONITOR"}
) | frozenset(SUBSCRIBE_KINDS)


# Commands run at once inside MULTI; every other one is queued until EXEC.
_RUN_IN_MULTI = frozenset({"EXEC", "DISCARD", "MULTI", "WATCH", "RESET", "QUIT"})
_QUEUED = b"+QUEUED\r\n"
_OK = Message(b"+OK\r\n")


def apply_subscription_command(members: set, request: Message) -> None:
    """What a (P|S)(UN)SUBSCRIBE request does to the set of channels or patterns it names."""
    targets = request.args[1:]
    if request.command.startswith(("SUB", "PSUB", "SSUB")):
        members.update(targets)
    elif targets:
        members.difference_update(targets)
    else:
        members.clear()


class Session:
    __slots__ = ("selected_db", "resp_version", "client_name", "auth_username", "auth_password",
                 "readonly", "no_evict", "channels", "patterns", "shard_channels", "in_multi",
                 "watching", "monitor", "tracking", "reply_mode", "_queued", "_exec_results")

    def __init__(self) -> None:
        self.selected_db = 0
        self.resp_version = 2
        self.client_name: Optional[bytes] = None
        self.auth_username: Optional[bytes] = None
        self.auth_password: Optional[bytes] = None
        self.readonly = False
        self.no_evict = False
        self.channels: set = set()
        self.patterns: set = set()
        self.shard_channels: set = set()
        self.in_multi = False
        self.watching = False
        self.monitor = False
        self.tracking = False
        # CLIENT REPLY: "ON", "OFF" or "SKIP" (the next reply is skipped). Only the sink that
        # counts replies knows when a SKIP has been used up, so it keeps this current.
        self.reply_mode = "ON"
        # Inside MULTI: the tracked commands the server queued, applied when EXEC succeeds.
        self._queued: List[Message] = []
        # What each successful EXEC answered for the tracked commands it ran, as reported by
        # the sink that read the reply: one entry per EXEC, in order (None: not known), so that
        # a pipeline of several transactions matches each EXEC with its own results.
        self._exec_results: Deque[Optional[List[Tuple[Message, Optional[bytes]]]]] = \
            deque(maxlen=1024)

    # ---- tracking -------------------------------------------------------------------------

    def observe(self, request: Message, reply: Message) -> None:
        """Update from one request and its reply; only a reply that is not an error counts."""
        command = request.command
        if command not in TRACKED_COMMANDS:
            return
        if self.in_multi and command not in _RUN_IN_MULTI:
            if reply.raw == _QUEUED:
                self._queued.append(request)
            return
        if not reply.raw:
            # CLIENT REPLY OFF/SKIP: nothing to judge by. Modes that keep a connection from
            # being handed over are assumed to be on, which is the safe side; RESET cannot
            # fail on a client's connection (Redis skips its +RESET after CLIENT REPLY SKIP).
            if command in ("MONITOR", "RESET") or (
                    command == "CLIENT" and request.subcommand() == "TRACKING"
                    and len(request.args) > 2):
                self._apply(request, _OK)
            return
        if command in SUBSCRIBE_KINDS:
            self._observe_subscriptions(reply.raw)
            return
        if reply.is_error:
            if command in ("EXEC", "DISCARD") and self.in_multi:
                # EXECABORT (and the like) ends the transaction and its WATCHes.
                self.in_multi = False
                self.watching = False
                self._queued = []
            return
        self._apply(request, reply)

    def _apply(self, request: Message, reply: Message) -> None:
        command = request.command
        args = request.args
        if command == "SELECT" and len(args) == 2:
            self.selected_db = int(args[1])
        elif command == "HELLO":
            self._observe_hello(args)
        elif command == "AUTH":
            if len(args) == 2:
                self.auth_username, self.auth_password = None, args[1]
            elif len(args) == 3:
                self.auth_username, self.auth_password = args[1], args[2]
        elif command == "CLIENT":
            sub = request.subcommand()
            if sub == "SETNAME" and len(args) == 3:
                self.client_name = args[2] or None
            elif sub == "TRACKING" and len(args) >= 3:
                self.tracking = args[2].upper() == b"ON"
            elif sub == "NO-EVICT" and len(args) == 3:
                self.no_evict = args[2].upper() == b"ON"
        elif command == "READONLY":
            self.readonly = True
        elif command == "READWRITE":
            self.readonly = False
        elif command == "MULTI":
            self.in_multi = True
            self._queued = []
        elif command == "EXEC":
            queued, self._queued = self._queued, []
            self.in_multi = False
            self.watching = False
            if reply.raw[:1] == b"*" and not reply.raw.startswith(b"*-1\r\n"):
                self._observe_exec(queued)
        elif command == "DISCARD":
            self.in_multi = False
            self.watching = False
            self._queued = []
        elif command == "WATCH":
            self.watching = True
        elif command == "UNWATCH":
            self.watching = False
        elif command == "MONITOR":
            self.monitor = True
        elif command == "RESET":
            self.__init__()

    def exec_results(self, results: Optional[List[Tuple[Message, Optional[bytes]]]]) -> None:
        """From the sink, once per successful EXEC: what it answered for each tracked command
        it ran (None: not known)."""
        self._exec_results.append(results)

    def _observe_exec(self, queued: List[Message]) -> None:
        results = self._exec_results.popleft() if self._exec_results else None
        if results is not None and [r.raw for r, _ in results] == [r.raw for r in queued]:
            for request, result in results:
                if result is not None and result[:1] not in (b"-", b"!"):
                    self._apply(request, Message(result))
            return
        # Without the individual results: assume success, except for credentials, which a
        # reconnect would replay and fail on.
        for request in queued:
            command = request.command
            if command in SUBSCRIBE_KINDS:
                self._observe_queued_subscription(request)
            elif command == "AUTH" or (command == "HELLO" and any(
                    a.upper() == b"AUTH" for a in request.args[2:])):
                continue
            elif command != "SELECT" or request.args[-1].isdigit():
                self._apply(request, _OK)

    def _observe_queued_subscription(self, request: Message) -> None:
        apply_subscription_command(getattr(self, SUBSCRIBE_KINDS[request.command]), request)

    def _observe_hello(self, args: List[bytes]) -> None:
        if len(args) >= 2 and args[1] in (b"2", b"3"):
            self.resp_version = int(args[1])
        i = 2
        while i < len(args):
            option = args[i].upper()
            if option == b"AUTH" and i + 2 < len(args):
                self.auth_username, self.auth_password = args[i + 1], args[i + 2]
                i += 3
            elif option == b"SETNAME" and i + 1 < len(args):
                self.client_name = args[i + 1] or None
                i += 2
            else:
                i += 1

    def _observe_subscriptions(self, raw: bytes) -> None:
        framer = resp.ReplyFramer()
        framer.feed(raw)
        while True:
            frame = framer.next_frame()
            if frame is None:
                return
            self.observe_subscription_frame(frame)

    def observe_subscription_frame(self, frame: bytes) -> None:
        """A (un)subscribe confirmation: [kind, channel, count], RESP2 array or RESP3 push."""
        if frame[:1] not in (b"*", b">"):
            return
        value = resp.parse_frame(frame)
        if not isinstance(value, list) or len(value) != 3:
            return
        kind = value[0].decode("latin-1").upper() if isinstance(value[0], bytes) else ""
        target = SUBSCRIBE_KINDS.get(kind)
        if target is None or value[1] is None:
            return
        members = getattr(self, target)
        if kind.startswith(("UNSUB", "PUNSUB", "SUNSUB")):
            members.discard(value[1])
        else:
            members.add(value[1])

    # ---- handover -------------------------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        return bool(self.channels or self.patterns or self.shard_channels)

    def handover_blocker(self) -> Optional[str]:
        """Why this session cannot move to a new upstream connection now, or None if it can."""
        return self.drain_blocker() or self.permanent_blocker()

    def drain_blocker(self) -> Optional[str]:
        """A reason that goes away once the client finishes what it started (worth waiting for
        during a drain), or None."""
        if self.in_multi:
            return "transaction"
        if self.watching:
            return "watch"
        return None

    def permanent_blocker(self) -> Optional[str]:
        """A reason that lasts as long as the client wants (not worth waiting for), or None."""
        if self.monitor:
            return "monitor"
        if self.tracking:
            return "client-tracking"
        return None

    def replay_commands(self) -> List[List[bytes]]:
        """Commands that bring a fresh upstream connection to this session's state, in order."""
        commands: List[List[bytes]] = []
        if self.auth_password is not None:
            if self.auth_username is None:
                commands.append([b"AUTH", self.auth_password])
            else:
                commands.append([b"AUTH", self.auth_username, self.auth_password])
        if self.resp_version != 2:
            commands.append([b"HELLO", str(self.resp_version).encode()])
        if self.selected_db:
            commands.append([b"SELECT", str(self.selected_db).encode()])
        if self.client_name:
            commands.append([b"CLIENT", b"SETNAME", self.client_name])
        if self.readonly:
            commands.append([b"READONLY"])
        if self.no_evict:
            commands.append([b"CLIENT", b"NO-EVICT", b"ON"])
        for command, members in ((b"SUBSCRIBE", self.channels), (b"PSUBSCRIBE", self.patterns),
                                 (b"SSUBSCRIBE", self.shard_channels)):
            if members:
                commands.append([command, *sorted(members)])
        if self.reply_mode != "ON":  # last: it silences what follows
            commands.append([b"CLIENT", b"REPLY", self.reply_mode.encode()])
        return commands

    def to_dict(self) -> Dict[str, Any]:
        auth = None
        if self.auth_password is not None:
            auth = {"username": self.auth_username, "password": self.auth_password}
        data: Dict[str, Any] = {"db": self.selected_db, "resp": self.resp_version}
        # Defaults are left out: a thousand plain sessions make a checkpoint that is quick to
        # write and to read inside the pause. from_dict() fills them back in.
        if self.client_name is not None:
            data["client_name"] = self.client_name
        if auth is not None:
            data["auth"] = auth
        if self.readonly:
            data["readonly"] = True
        if self.no_evict:
            data["no_evict"] = True
        if self.reply_mode != "ON":
            data["reply_mode"] = self.reply_mode
        if self.subscribed:
            data["subscriptions"] = {
                "channels": sorted(self.channels),
                "patterns": sorted(self.patterns),
                "shard_channels": sorted(self.shard_channels),
            }
        # State the server keeps for the connection, carried so that the client's view goes on
        # matching it when the upstream connection is handed over with the client.
        if self.in_multi:
            data["in_multi"] = True
            data["queued"] = [request.raw for request in self._queued]
        if self.watching:
            data["watching"] = True
        if self.monitor:
            data["monitor"] = True
        if self.tracking:
            data["tracking"] = True
        if self._exec_results:
            data["exec_results"] = [
                None if results is None else [[request.raw, result] for request, result in results]
                for results in self._exec_results]
        return data

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Session":
        session = cls()
        session.selected_db = int(data.get("db", 0))
        session.resp_version = int(data.get("resp", 2))
        session.client_name = data.get("client_name")
        auth = data.get("auth")
        if auth:
            session.auth_username = auth.get("username")
            session.auth_password = auth.get("password")
        session.readonly = bool(data.get("readonly", False))
        session.no_evict = bool(data.get("no_evict", False))
        if data.get("reply_mode") in ("OFF", "SKIP"):
            session.reply_mode = data["reply_mode"]
        subscriptions = data.get("subscriptions") or {}
        session.channels = set(subscriptions.get("channels", ()))
        session.patterns = set(subscriptions.get("patterns", ()))
        session.shard_channels = set(subscriptions.get("shard_channels", ()))
        session.in_multi = bool(data.get("in_multi", False))
        session._queued = [Message(raw) for raw in data.get("queued") or () if isinstance(raw, bytes)]
        session.watching = bool(data.get("watching", False))
        session.monitor = bool(data.get("monitor", False))
        session.tracking = bool(data.get("tracking", False))
        for results in data.get("exec_results") or ():
            if results is None:
                session._exec_results.append(None)
            else:
                session._exec_results.append([(Message(raw), result) for raw, result in results])
        return session
