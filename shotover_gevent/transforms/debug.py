"""DebugReturner (answers every request with a fixed reply, or fails) and DebugPrinter (logs
each request and reply, then passes them on): for trying out a topology, not for production."""

from __future__ import annotations

import logging
from typing import Any, List, Optional

from ..chain import CallNext, ConnectionContext, Transform, TransformBuilder
from ..config import Problems
from ..message import Message
from ..protocol import resp
from . import TransformType, register

log = logging.getLogger("shotover_gevent.transforms.debug")


# ---- DebugReturner ---------------------------------------------------------------------------

def parse_returner(settings: Any, where: str, problems: Problems) -> Optional[Message]:
    """`Fail`, or `Redis: "42"` (a bulk string reply), as in shotover's docs."""
    if settings == "Fail":
        return None
    if isinstance(settings, dict) and set(settings) == {"Redis"}:
        value = settings["Redis"]
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return Message(resp.bulk_reply(str(value).encode()))
        problems.add(f"{where}.Redis", f"expected a string reply, got {value!r}")
        return None
    problems.add(where, 'expected `Redis: "<reply>"` or `Fail`')
    return None


class DebugReturnerBuilder(TransformBuilder):
    terminating = True

    def __init__(self, reply: Optional[Message], name: str, chain_name: str) -> None:
        self.reply = reply
        self.name = name

    def build(self, context: ConnectionContext) -> Transform:
        return DebugReturner(self.reply)


class DebugReturner(Transform):
    inflight_handover = True
    _FAIL = Message.error("ERR DebugReturner is configured to fail every request")

    def __init__(self, reply: Optional[Message]) -> None:
        self.reply = reply or self._FAIL

    def transform(self, requests: List[Message], call_next: CallNext) -> List[Message]:
        return [self.reply] * len(requests)


# ---- DebugPrinter ----------------------------------------------------------------------------

def parse_printer(settings: Any, where: str, problems: Problems) -> None:
    if settings not in (None, {}):
        problems.add(where, "DebugPrinter takes no settings")


class DebugPrinterBuilder(TransformBuilder):
    terminating = False

    def __init__(self, config: None, name: str, chain_name: str) -> None:
        self.name = name

    def build(self, context: ConnectionContext) -> Transform:
        return DebugPrinter(context.peer)


class DebugPrinter(Transform):
    inflight_handover = True
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.counter = 0

    def transform(self, requests: List[Message], call_next: CallNext) -> List[Message]:
        for request in requests:
            self.counter += 1
            log.info("request from %s: %r", self.peer, request.raw[:200])
        replies = call_next(requests)
        for reply in replies:
            log.info("reply to %s: %r", self.peer, reply.raw[:200])
        return replies


RETURNER = register(TransformType(("DebugReturner",), True, parse_returner, DebugReturnerBuilder))
PRINTER = register(TransformType(("DebugPrinter",), False, parse_printer, DebugPrinterBuilder))
