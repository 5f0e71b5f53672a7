"""NullSink: drops every request and answers each with an empty reply, as shotover does."""

from __future__ import annotations

from typing import Any, List

from ..chain import CallNext, ConnectionContext, Transform, TransformBuilder
from ..config import Problems
from ..message import Message
from . import TransformType, register

_NULL = Message(b"$-1\r\n")


def parse(settings: Any, where: str, problems: Problems) -> None:
    if settings not in (None, {}):
        problems.add(where, "NullSink takes no settings")


class NullSinkBuilder(TransformBuilder):
    terminating = True

    def __init__(self, config: None, name: str, chain_name: str) -> None:
        self.name = name

    def build(self, context: ConnectionContext) -> Transform:
        return NullSink()


class NullSink(Transform):
    inflight_handover = True
    def transform(self, requests: List[Message], call_next: CallNext) -> List[Message]:
        return [_NULL] * len(requests)


KIND = register(TransformType(("NullSink",), True, parse, NullSinkBuilder))
