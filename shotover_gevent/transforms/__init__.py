"""The registry that maps topology names (both spellings, e.g. RedisSinkSingle and
ValkeySinkSingle) to each transform's config parser and builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

from ..chain import TransformBuilder


@dataclass(frozen=True)
class TransformType:
    names: Tuple[str, ...]
    terminating: bool
    #: parse(settings, where, problems) -> parsed settings (problems collected, never raised)
    parse: Callable[[Any, str, Any], Any]
    #: make_builder(parsed settings, display name, chain name) -> TransformBuilder
    make_builder: Callable[[Any, str, str], TransformBuilder]
    #: False where `name` is one of the transform's own settings (QueryCounter)
    takes_display_name: bool = True


REGISTRY: Dict[str, TransformType] = {}


def register(kind: TransformType) -> TransformType:
    for name in kind.names:
        REGISTRY[name] = kind
    return kind


def canonical_names() -> List[str]:
    return sorted({kind.names[0] for kind in REGISTRY.values()})


def build_builders(chain_config, chain_name: str) -> List[TransformBuilder]:
    """Make the builders of a validated chain (a list of config.TransformConfig)."""
    builders = []
    for element in chain_config:
        kind = REGISTRY[element.type_name]
        builders.append(kind.make_builder(element.settings, element.name, chain_name))
    return builders


# Importing each module registers its transform.
from . import debug, null_sink, query_counter, query_type_filter, redis_sink_single  # noqa: E402,F401
