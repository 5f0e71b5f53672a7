"""The registry that maps topology names (both spellings, e.g. RedisSinkSingle and
ValkeySinkSingle) to each transform's config parser and builder."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
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


#: Which module defines each topology name; a module is imported the first time a topology
#: names one of its transforms (an upgraded image loads only what its chains use).
MODULES: Dict[str, str] = {
    "RedisSinkSingle": "redis_sink_single", "ValkeySinkSingle": "redis_sink_single",
    "RedisSinkCluster": "redis_sink_cluster", "ValkeySinkCluster": "redis_sink_cluster",
    "RedisClusterPortsRewrite": "cluster_ports_rewrite",
    "ValkeyClusterPortsRewrite": "cluster_ports_rewrite",
    "NullSink": "null_sink", "DebugReturner": "debug", "DebugPrinter": "debug",
    "QueryCounter": "query_counter", "QueryTypeFilter": "query_type_filter",
    "Tee": "tee", "Coalesce": "coalesce",
}


class _Registry:
    """Topology name -> TransformType, importing the defining module on first use."""

    def __init__(self) -> None:
        self._loaded: Dict[str, TransformType] = {}

    def add(self, kind: TransformType) -> None:
        for name in kind.names:
            self._loaded[name] = kind

    def get(self, name: str, default=None):
        kind = self._loaded.get(name)
        if kind is None and name in MODULES:
            import_module(f"{__name__}.{MODULES[name]}")
            kind = self._loaded.get(name)
        return kind if kind is not None else default

    def __getitem__(self, name: str) -> TransformType:
        kind = self.get(name)
        if kind is None:
            raise KeyError(name)
        return kind

    def __contains__(self, name: object) -> bool:
        return name in MODULES or name in self._loaded


REGISTRY = _Registry()


def register(kind: TransformType) -> TransformType:
    REGISTRY.add(kind)
    return kind


def canonical_names() -> List[str]:
    """Every transform's name (Valkey spellings are aliases), without importing them."""
    return sorted(name for name in MODULES if not name.startswith("Valkey"))


def build_builders(chain_config, chain_name: str) -> List[TransformBuilder]:
    """Make the builders of a validated chain (a list of config.TransformConfig)."""
    builders = []
    for element in chain_config:
        kind = REGISTRY[element.type_name]
        builders.append(kind.make_builder(element.settings, element.name, chain_name))
    return builders
