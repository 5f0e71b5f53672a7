"""What a client changed on its server-side connection, tracked from successful replies.

A fresh upstream connection (after an upgrade or a reconnect) is brought back to this state.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from .message import Message
from .protocol.state import DECIDED_BY_FIRST_FRAME, QUEUED, ConnectionState, reply_frames


class Session(ConnectionState):
    """The connection's state as the client has seen it change (see protocol/state.py for what
    each command does), kept where a new upstream connection or program image finds it."""

    __slots__ = ()

    # ---- tracking -------------------------------------------------------------------------

    def observe(self, request: Message, reply: Message) -> None:
        """Update from one request and the reply the client got (b"": none). Called for every
        request of TRACKED_COMMANDS, and for every request while the state is not plain."""
        count, effect = self.expect(request)
        if effect is None:
            return
        raw = reply.raw
        frames = [QUEUED] if raw == QUEUED else reply_frames(raw)  # the common case at once
        if count and not frames:
            return  # owed a reply that never came (the connection was lost): nothing known
        if frames and effect in DECIDED_BY_FIRST_FRAME:
            count, effect = self.first_frame(effect, request, frames[0], count)
            if effect is None:
                return
        self.apply(effect, request, frames)

    # ---- handover -------------------------------------------------------------------------

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
            data["queued"] = [request.raw for request in self.queued]
        if self.watching:
            data["watching"] = True
        if self.monitor:
            data["monitor"] = True
        if self.tracking:
            data["tracking"] = True
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
        if data.get("in_multi"):
            session.queued = [Message(raw) for raw in data.get("queued") or ()
                              if isinstance(raw, bytes)]
        session.watching = bool(data.get("watching", False))
        session.monitor = bool(data.get("monitor", False))
        session.tracking = bool(data.get("tracking", False))
        return session
