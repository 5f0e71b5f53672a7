"""QueryCounter: counts requests by command name in `shotover_query_count{name=...}`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, List, Optional

from .. import observability
from ..chain import CallNext, ConnectionContext, Transform, TransformBuilder
from ..config import Problems, take_mapping
from ..message import Message
from . import TransformType, register


@dataclass
class QueryCounterConfig:
    counter_name: str


def parse(settings: Any, where: str, problems: Problems) -> Optional[QueryCounterConfig]:
    # shotover names the counter with `name`; `counter_name` is accepted as a synonym.
    values = take_mapping(settings, where, problems, required={},
                          optional={"name": (str, None), "counter_name": (str, None)})
    if values is None:
        return None
    name = values["name"] or values["counter_name"]
    if values["name"] and values["counter_name"]:
        problems.add(where, "give the counter name once: `name` or `counter_name`, not both")
    if not name:
        problems.add(f"{where}.name", "required key is missing (the counter's name)")
        return None
    return QueryCounterConfig(name)


class QueryCounterBuilder(TransformBuilder):
    terminating = False

    def __init__(self, config: QueryCounterConfig, name: str, chain_name: str) -> None:
        self.name = name
        self.count = observability.query_counter(config.counter_name)

    def build(self, context: ConnectionContext) -> Transform:
        return QueryCounter(self.count)


class QueryCounter(Transform):
    __slots__ = ("count",)
    inflight_handover = True

    def __init__(self, count) -> None:
        self.count = count

    def screen(self, commands: List[str]) -> bool:
        first = commands[0]
        size = len(commands)
        if size == 1 or commands.count(first) == size:
            # One command, or a pipeline of one command: one count.
            self.count(first, size)
            return True
        count = self.count
        for command, times in Counter(commands).items():
            count(command, times)
        return True

    def screen_counts(self, command: str) -> tuple:
        return (self.count.cell(command),)

    def transform(self, requests: List[Message], call_next: CallNext) -> List[Message]:
        self.screen([request.command for request in requests])
        return call_next(requests)


KIND = register(TransformType(("QueryCounter",), False, parse, QueryCounterBuilder,
                              takes_display_name=False))
