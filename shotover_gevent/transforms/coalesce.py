"""Coalesce: holds requests until `flush_when_buffered_message_count` are buffered or
`flush_when_millis_since_last_flush` milliseconds have passed since the last flush, then sends
them down as one batch."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, List, Optional

import gevent

from ..chain import CallNext, ConnectionContext, Transform, TransformBuilder
from ..config import Problems, take_mapping
from ..message import NO_REPLY, Message
from . import TransformType, register

log = logging.getLogger(__name__)


@dataclass
class CoalesceConfig:
    count: Optional[int]
    millis: Optional[int]


def parse(settings: Any, where: str, problems: Problems) -> Optional[CoalesceConfig]:
    values = take_mapping(settings, where, problems, required={}, optional={
        "flush_when_buffered_message_count": (int, None),
        "flush_when_millis_since_last_flush": (int, None)})
    if values is None:
        return None
    count = values["flush_when_buffered_message_count"]
    millis = values["flush_when_millis_since_last_flush"]
    if count is None and millis is None:
        problems.add(where, "needs flush_when_buffered_message_count or "
                            "flush_when_millis_since_last_flush (or both); without either it "
                            "would never flush")
        return None
    if count is not None and count < 1:
        problems.add(f"{where}.flush_when_buffered_message_count", "must be at least 1")
    if millis is not None and millis < 0:
        problems.add(f"{where}.flush_when_millis_since_last_flush", "must not be negative")
    return CoalesceConfig(count, millis)


class CoalesceBuilder(TransformBuilder):
    terminating = False

    def __init__(self, config: CoalesceConfig, name: str, chain_name: str) -> None:
        self.config = config
        self.name = name
        self.warned = False

    def build(self, context: ConnectionContext) -> Transform:
        return Coalesce(self, context)


class Coalesce(Transform):
    """A client waits for the reply to every request, and one client connection has one chain, so
    while its requests are held no further request of that connection can arrive. Hence:

    * A batch (a client's pipeline) holding at least the count threshold is sent at once.
    * Otherwise, with the time threshold set, the batch is held until that much time has passed
      since the last flush, then sent (the client waits meanwhile).
    * Otherwise (count threshold only, a batch below it) waiting could never end: shotover would
      hold the requests until more arrive, which for a client waiting for its replies is forever.
      Here the batch is passed on at once instead, and a warning says so once per transform.
    * Where nobody waits for the replies (a Tee sub-chain with behavior Ignore), requests really are
      buffered across batches exactly as shotover does: each batch gets placeholder replies, and
      the buffer goes down when a flush condition holds as a batch arrives (a time threshold counts
      only when a new batch arrives). Requests still held when the client leaves are flushed then.
    """

    def __init__(self, builder: CoalesceBuilder, context: ConnectionContext) -> None:
        self.builder = builder
        self.context = context
        self.count = builder.config.count
        self.seconds = (builder.config.millis / 1000.0
                        if builder.config.millis is not None else None)
        self.last_flush = time.monotonic()
        self.buffer: List[Message] = []
        self._call_next: Optional[CallNext] = None

    def _due(self, buffered: int) -> bool:
        if self.count is not None and buffered >= self.count:
            return True
        return self.seconds is not None and time.monotonic() - self.last_flush >= self.seconds

    def _flush(self, requests: List[Message], call_next: CallNext) -> List[Message]:
        try:
            return call_next(requests)
        finally:
            self.last_flush = time.monotonic()

    def transform(self, requests: List[Message], call_next: CallNext) -> List[Message]:
        self._call_next = call_next
        if getattr(self.context, "replies_ignored", False):
            self.buffer.extend(requests)
            if self._due(len(self.buffer)):
                held, self.buffer = self.buffer, []
                self._flush(held, call_next)
            return [NO_REPLY] * len(requests)
        if self.buffer:  # held from batches whose replies nobody needed: they go first
            held, self.buffer = self.buffer + list(requests), []
            return self._flush(held, call_next)[-len(requests):]
        if not self._due(len(requests)):
            if self.seconds is not None:
                gevent.sleep(max(0.0, self.last_flush + self.seconds - time.monotonic()))
            elif not self.builder.warned:
                self.builder.warned = True
                log.warning("Coalesce: a batch of %d request(s) cannot reach "
                            "flush_when_buffered_message_count=%d while its client waits for "
                            "replies; passing such batches on unheld", len(requests), self.count)
        return self._flush(requests, call_next)

    def close(self) -> None:
        if self.buffer and self._call_next is not None:
            held, self.buffer = self.buffer, []
            try:
                self._call_next(held)
            except Exception:
                log.exception("Coalesce: flushing %d held request(s) at close failed", len(held))


KIND = register(TransformType(("Coalesce",), False, parse, CoalesceBuilder))
