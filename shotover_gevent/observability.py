"""Metrics, logging setup and the HTTP observability interface of the proxy.

Metric names and labels follow shotover-proxy so existing dashboards keep working.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import sys
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence


# prometheus_client and gevent.pywsgi are imported where they are used: an upgraded image must
# serve its clients before it spends time loading what only a scrape needs.


def _metric(name: str, documentation: str, kind: str):
    from prometheus_client.metrics_core import Metric

    return Metric(name, documentation, kind)


def floatToGoString(value: float) -> str:  # noqa: N802 (prometheus_client's name)
    from prometheus_client.utils import floatToGoString as render

    return render(value)


class CollectorRegistry:
    """The collectors to render; anything with a `collect()` of prometheus Metric objects."""

    def __init__(self, auto_describe: bool = True) -> None:
        self._collectors: list = []

    def register(self, collector) -> None:
        self._collectors.append(collector)

    def unregister(self, collector) -> None:
        self._collectors.remove(collector)

    def collect(self):
        for collector in list(self._collectors):
            yield from collector.collect()

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "LATENCY_BUCKETS",
    "REGISTRY",
    "ChainMetrics",
    "GaugeCell",
    "ObservabilityServer",
    "TransformMetrics",
    "available_connections",
    "chain_metrics",
    "connections_open",
    "failed_requests",
    "parse_log_filter",
    "query_counter",
    "record_upgrade",
    "render_metrics",
    "set_generation",
    "set_log_filter",
    "setup_logging",
    "start_observability_server",
    "transform_metrics",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Metric primitives
#
# The hot path touches these once per request batch.  Each labelled series is
# a tiny object holding plain floats; callers keep a reference to it so an
# update is an attribute increment, with no lock and no label lookup.  All
# updates are expected to come from greenlets of the hub thread, which never
# interleave inside a single increment.
# ---------------------------------------------------------------------------

#: Latency buckets in seconds: 100 microseconds up to 10 seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

#: Buckets for the number of messages in one batch.
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

#: Registry holding every metric of the proxy (not prometheus_client's global one).
REGISTRY = CollectorRegistry(auto_describe=True)


class CounterCell:
    """One series of a counter."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only increase")
        self.value += amount


class GaugeCell:
    """One series of a gauge: `set`, `inc` and `dec` are all available."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def get(self) -> float:
        return self.value


class HistogramCell:
    """One series of a histogram with fixed upper bounds (the last one is +Inf).

    An observation is only appended to a list; the buckets take in a few hundred at a time
    (one sort instead of a search per value), and whatever is left whenever they are read.
    """

    __slots__ = ("_count", "_counts", "_sum", "bounds", "pending")

    #: Observations kept before they are folded into the buckets.
    FOLD_AT = 256

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * len(bounds)
        self._sum = 0.0
        self._count = 0
        self.pending: list[float] = []

    def observe(self, value: float) -> None:
        pending = self.pending
        pending.append(value)
        if len(pending) >= self.FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Take the pending observations into the buckets (the list stays the same object:
        recorders append to it directly)."""
        if not self.pending:
            return
        pending = sorted(self.pending)
        self.pending.clear()
        counts = self._counts
        # Bucket i counts values v with bounds[i-1] < v <= bounds[i].
        start = 0
        for index, bound in enumerate(self.bounds):
            end = bisect_right(pending, bound, start)
            counts[index] += end - start
            start = end
        self._sum += sum(pending)
        self._count += len(pending)

    @property
    def counts(self) -> list[int]:
        self.fold()
        return self._counts

    @property
    def sum(self) -> float:
        self.fold()
        return self._sum

    @property
    def count(self) -> int:
        self.fold()
        return self._count


class _Family:
    """A named metric with a fixed label set, registered on REGISTRY."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._series: dict[tuple[str, ...], object] = {}
        self._lock = threading.Lock()
        REGISTRY.register(self)

    def _new_cell(self) -> object:
        raise NotImplementedError

    def labels(self, *values: str):
        """Return the series for these label values, creating it at zero if needed."""
        key = tuple(str(v) for v in values)
        cell = self._series.get(key)
        if cell is None:
            if len(key) != len(self.labelnames):
                raise ValueError(
                    f"{self.name} takes labels {self.labelnames}, got {len(key)} values"
                )
            with self._lock:
                cell = self._series.setdefault(key, self._new_cell())
        return cell

    def describe(self) -> Iterable:
        return [_metric(self.name, self.documentation, self.kind)]

    def _snapshot(self) -> list[tuple[dict[str, str], object]]:
        drain_batches()
        with self._lock:
            items = list(self._series.items())
        return [(dict(zip(self.labelnames, key)), cell) for key, cell in items]


class _CounterFamily(_Family):
    kind = "counter"

    def _new_cell(self) -> CounterCell:
        return CounterCell()

    def collect(self) -> Iterator:
        family = _metric(self.name, self.documentation, self.kind)
        for labels, cell in self._snapshot():
            family.add_sample(self.name, labels, cell.value)
        yield family


class _GaugeFamily(_Family):
    kind = "gauge"

    def _new_cell(self) -> GaugeCell:
        return GaugeCell()

    def collect(self) -> Iterator:
        family = _metric(self.name, self.documentation, self.kind)
        for labels, cell in self._snapshot():
            family.add_sample(self.name, labels, cell.value)
        yield family


class _HistogramFamily(_Family):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
    ) -> None:
        bounds = tuple(sorted(float(b) for b in buckets))
        if not bounds or bounds[-1] != float("inf"):
            bounds += (float("inf"),)
        self.bounds = bounds
        super().__init__(name, documentation, labelnames)

    def _new_cell(self) -> HistogramCell:
        return HistogramCell(self.bounds)

    def collect(self) -> Iterator:
        family = _metric(self.name, self.documentation, self.kind)
        for labels, cell in self._snapshot():
            cell.fold()
            running = 0
            for bound, n in zip(cell.bounds, cell.counts):
                running += n
                family.add_sample(
                    self.name + "_bucket", {**labels, "le": floatToGoString(bound)}, running
                )
            family.add_sample(self.name + "_count", labels, cell.count)
            family.add_sample(self.name + "_sum", labels, cell.sum)
        yield family


# ---------------------------------------------------------------------------
# The metrics themselves
# ---------------------------------------------------------------------------

_CHAIN_TOTAL = _CounterFamily(
    "shotover_chain_total_count", "Number of times the chain processed a batch.", ("chain",)
)
_CHAIN_FAILURES = _CounterFamily(
    "shotover_chain_failures_count", "Number of batches for which the chain failed.", ("chain",)
)
_CHAIN_LATENCY = _HistogramFamily(
    "shotover_chain_latency_seconds",
    "Time taken to run one batch through the chain.",
    ("chain",),
    LATENCY_BUCKETS,
)
_CHAIN_REQUESTS_BATCH = _HistogramFamily(
    "shotover_chain_requests_batch_size",
    "Number of requests in each request batch entering the chain.",
    ("chain",),
    BATCH_SIZE_BUCKETS,
)
_CHAIN_RESPONSES_BATCH = _HistogramFamily(
    "shotover_chain_responses_batch_size",
    "Number of responses in each response batch leaving the chain.",
    ("chain",),
    BATCH_SIZE_BUCKETS,
)
_TRANSFORM_TOTAL = _CounterFamily(
    "shotover_transform_total_count", "Number of times the transform was used.", ("transform",)
)
_TRANSFORM_FAILURES = _CounterFamily(
    "shotover_transform_failures_count", "Number of times the transform failed.", ("transform",)
)
_TRANSFORM_LATENCY = _HistogramFamily(
    "shotover_transform_latency_seconds",
    "Time taken for a batch to pass through the transform and everything after it.",
    ("transform",),
    LATENCY_BUCKETS,
)
_AVAILABLE_CONNECTIONS = _GaugeFamily(
    "shotover_available_connections_count",
    "Client connections currently connected to the source.",
    ("source",),
)
_QUERY_COUNT = _CounterFamily(
    "shotover_query_count",
    "Requests seen by a QueryCounter transform, by command.",
    ("name", "query", "type"),
)
_FAILED_REQUESTS = _CounterFamily(
    "shotover_failed_requests_count",
    "Requests that a sink transform could not complete.",
    ("chain", "transform"),
)

# Metrics specific to this proxy.
_CONNECTIONS_OPEN = _GaugeFamily(
    "shotover_g_connections_open",
    "Client connections currently held open by the source, including ones handed over.",
    ("source",),
)
_CONNECTIONS_CLOSED = _CounterFamily(
    "shotover_g_connections_closed_total",
    "Client connections closed, by source and why (the client left, QUIT, idle timeout, "
    "protocol error, output buffer limit...).",
    ("source", "reason"),
)
_UPGRADES = _CounterFamily(
    "shotover_g_upgrades_total", "In-place upgrades completed by this lineage of processes."
)
_UPGRADE_CLOSED = _CounterFamily(
    "shotover_g_upgrade_closed_connections_total",
    "Client connections an upgrade closed instead of handing them over, by reason.",
    ("reason",),
)
_UPGRADE_BLACKOUT = _GaugeFamily(
    "shotover_g_upgrade_blackout_seconds",
    "How long client traffic was paused during the most recent upgrade.",
)
_GENERATION = _GaugeFamily(
    "shotover_g_generation", "Generation number of the running process (0 for a fresh start)."
)


class ChainMetrics:
    """Pre-resolved series for one chain; obtain through `chain_metrics`."""

    __slots__ = ("_failures", "_latency", "_pending", "_requests", "_responses", "_total",
                 "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._total = _CHAIN_TOTAL.labels(name)
        self._failures = _CHAIN_FAILURES.labels(name)
        self._latency = _CHAIN_LATENCY.labels(name)
        self._pending = self._latency.pending
        self._requests = _CHAIN_REQUESTS_BATCH.labels(name)
        self._responses = _CHAIN_RESPONSES_BATCH.labels(name)

    def record_batch(
        self,
        seconds: float,
        failed: bool,
        requests: int | None = None,
        responses: int | None = None,
    ) -> None:
        """Account for one batch: its latency, whether it failed and optionally its sizes."""
        self._total.value += 1
        if failed:
            self._failures.value += 1
        pending = self._pending
        pending.append(seconds)  # HistogramCell.observe, without a call
        if len(pending) >= HistogramCell.FOLD_AT:
            self._latency.fold()
        if requests is not None:
            self._requests.observe(requests)
        if responses is not None:
            self._responses.observe(responses)


class TransformMetrics:
    """Pre-resolved series for one transform; obtain through `transform_metrics`."""

    __slots__ = ("_failures", "_latency", "_pending", "_total", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._total = _TRANSFORM_TOTAL.labels(name)
        self._failures = _TRANSFORM_FAILURES.labels(name)
        self._latency = _TRANSFORM_LATENCY.labels(name)
        self._pending = self._latency.pending

    def record(self, seconds: float, failed: bool) -> None:
        """Account for one batch passing through the transform."""
        self._total.value += 1
        if failed:
            self._failures.value += 1
        pending = self._pending
        pending.append(seconds)  # HistogramCell.observe, without a call
        if len(pending) >= HistogramCell.FOLD_AT:
            self._latency.fold()


class BatchSeries:
    """The successful batches of one chain that entered the same transforms, recorded in every
    series they count in (each transform's and the chain's total and latency) with one append:
    the latencies wait in one list and go into each series a few hundred at a time, and before
    any series is read (see drain_batches)."""

    __slots__ = ("pending", "_targets")

    def __init__(self, targets: tuple) -> None:
        #: The latencies of batches not yet in the series.
        self.pending: list[float] = []
        self._targets = targets  # (CounterCell, HistogramCell) pairs

    def drain(self) -> None:
        pending = self.pending
        if not pending:
            return
        for total, latency in self._targets:
            total.value += len(pending)
            latency.pending += pending
            if len(latency.pending) >= HistogramCell.FOLD_AT:
                latency.fold()
        pending.clear()


_batch_series: dict[tuple, BatchSeries] = {}


def batch_series(chain: ChainMetrics, transforms: Sequence[TransformMetrics]) -> BatchSeries:
    """The (shared) BatchSeries of a chain's batches that entered `transforms` themselves."""
    key = (chain.name, tuple(m.name for m in transforms))
    found = _batch_series.get(key)
    if found is None:
        targets = tuple((m._total, m._latency) for m in transforms) + \
            ((chain._total, chain._latency),)
        found = _batch_series.setdefault(key, BatchSeries(targets))
    return found


def drain_batches() -> None:
    """Bring every series up to date with the batches recorded through a BatchSeries."""
    for series in list(_batch_series.values()):
        series.drain()


_chain_cache: dict[str, ChainMetrics] = {}
_transform_cache: dict[str, TransformMetrics] = {}


def counter(name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> _CounterFamily:
    """A further counter family on REGISTRY (for transforms with metrics of their own)."""
    return _CounterFamily(name, documentation, labelnames)


def chain_metrics(chain_name: str) -> ChainMetrics:
    """Return the (cached) metrics of a chain; its series appear at zero right away."""
    found = _chain_cache.get(chain_name)
    if found is None:
        found = _chain_cache.setdefault(chain_name, ChainMetrics(chain_name))
    return found


def transform_metrics(transform_name: str) -> TransformMetrics:
    """Return the (cached) metrics of a transform, labelled by its type name."""
    found = _transform_cache.get(transform_name)
    if found is None:
        found = _transform_cache.setdefault(transform_name, TransformMetrics(transform_name))
    return found


#: Distinct command names tracked per query counter before new ones count as "unknown".
MAX_QUERY_LABELS = 512
#: Longer names (Redis's longest command name has 20 characters) count as "unknown", as do
#: names with other than printable ASCII: a client's junk does not become a label.
MAX_QUERY_NAME = 64


def _labelled(query: str) -> bool:
    return len(query) <= MAX_QUERY_NAME and query.isascii() and query.isprintable()


def query_counter(counter_name: str, query_type: str = "redis") -> Callable[..., None]:
    """Return a function counting requests (one unless told) of the given command name.

    The command is upper-cased (`get` and `GET` share a series).  To keep the number of
    series bounded against clients sending arbitrary names, once MAX_QUERY_LABELS
    distinct names have been seen further new ones are counted under `unknown`, and so is
    a name no command has (longer than MAX_QUERY_NAME, or not printable ASCII) from the start.
    """
    cache: dict[str, CounterCell] = {}
    unknown = _QUERY_COUNT.labels(counter_name, "unknown", query_type)

    def count(query: str, times: int = 1) -> None:
        cell = cache.get(query)
        if cell is None:
            if len(cache) >= MAX_QUERY_LABELS or not _labelled(query):
                unknown.value += times
                return
            cell = cache[query] = _QUERY_COUNT.labels(counter_name, query.upper(), query_type)
        cell.value += times

    def cell(query: str) -> CounterCell:
        """The series `count(query)` adds to (for callers that add to it themselves)."""
        found = cache.get(query)
        if found is None:
            if len(cache) >= MAX_QUERY_LABELS or not _labelled(query):
                return unknown
            found = cache[query] = _QUERY_COUNT.labels(counter_name, query.upper(), query_type)
        return found

    count.cell = cell  # type: ignore[attr-defined]
    return count


def failed_requests(
    chain_name: str, transform_name: str = "RedisSinkSingle"
) -> Callable[..., None]:
    """Return a function adding `n` (default 1) to the failed requests of a sink."""
    cell = _FAILED_REQUESTS.labels(chain_name, transform_name)

    def add(n: int = 1) -> None:
        cell.value += n

    return add


def available_connections(source_name: str) -> GaugeCell:
    """Gauge of the client connections connected to a source."""
    return _AVAILABLE_CONNECTIONS.labels(source_name)


def connection_closed(source_name: str, reason: str) -> None:
    """Count a client connection closed for `reason` (its first words: no addresses)."""
    _CONNECTIONS_CLOSED.labels(source_name, reason.split(":", 1)[0]).value += 1


def connections_open(source_name: str) -> GaugeCell:
    """Gauge of the client connections a source holds, including inherited ones."""
    return _CONNECTIONS_OPEN.labels(source_name)


def record_upgrade(blackout_seconds: float, upgrades_so_far: int | None = None) -> None:
    """Count a completed upgrade and remember how long traffic was paused.

    The counter lives in the process image that an upgrade replaces, so the restoring image
    passes the lineage's total (carried in the checkpoint) instead of adding one to zero.
    """
    cell = _UPGRADES.labels()
    if upgrades_so_far is None:
        cell.value += 1
    else:
        cell.value = float(upgrades_so_far)
    _UPGRADE_BLACKOUT.labels().set(blackout_seconds)


def record_upgrade_closed(reason: str, count: int) -> None:
    """Count client connections an upgrade closed (the restoring image reports them)."""
    _UPGRADE_CLOSED.labels(reason).value += count


def upgrade_closed_totals() -> dict:
    """The closed-by-upgrade counters, for the next image to go on from (a counter never goes
    back across an upgrade)."""
    return {labels["reason"]: cell.value for labels, cell in _UPGRADE_CLOSED._snapshot()}


#: Counters with a carry-over of their own (see record_upgrade and upgrade_closed_totals).
_CARRIED_ELSEWHERE = ("shotover_g_upgrades_total", "shotover_g_upgrade_closed_connections_total")


def export_counters() -> list:
    """Every counter and histogram series as plain data, for the next image of this process
    to go on from (a counter never goes back across an upgrade)."""
    exported = []
    drain_batches()
    for family in list(REGISTRY._collectors):
        if not isinstance(family, (_CounterFamily, _HistogramFamily)) or \
                family.name in _CARRIED_ELSEWHERE:
            continue
        for key, cell in list(family._series.items()):
            if isinstance(cell, HistogramCell):
                state = [list(cell.counts), cell.sum, cell.count]
            else:
                state = cell.value
            if state:
                exported.append([family.name, list(key), state])
    return exported


def import_counters(exported) -> int:
    """Add what export_counters() gave (in the previous image) to this image's series; data
    that does not fit (a family gone or changed by the new version) is skipped. Returns how
    many series were taken."""
    families = {f.name: f for f in REGISTRY._collectors
                if isinstance(f, (_CounterFamily, _HistogramFamily))}
    taken = 0
    for item in exported if isinstance(exported, list) else ():
        try:
            name, key, state = item
            family = families.get(name)
            if family is None or family.name in _CARRIED_ELSEWHERE or \
                    len(key) != len(family.labelnames):
                continue
            cell = family.labels(*key)
            if isinstance(cell, HistogramCell):
                counts, total, count = state
                if len(counts) != len(cell.bounds):
                    continue
                cell.fold()
                cell._counts = [a + int(b) for a, b in zip(cell._counts, counts)]
                cell._sum += float(total)
                cell._count += int(count)
            else:
                cell.value += float(state)
            taken += 1
        except (TypeError, ValueError):
            continue
    return taken


def set_generation(generation: int) -> None:
    """Publish the generation number of this process."""
    _GENERATION.labels().set(generation)


# Unlabelled series exist from the start so they are scraped as 0.
_UPGRADES.labels()
_UPGRADE_BLACKOUT.labels()
_GENERATION.labels()


def _escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


_TEXT_TYPES = {"unknown": "untyped", "info": "gauge", "stateset": "gauge",
               "gaugehistogram": "histogram"}


def render_metrics(registry: CollectorRegistry = REGISTRY) -> bytes:
    """Render a registry in the Prometheus text format (version 0.0.4).

    Unlike prometheus_client's own renderer this keeps counter names as they are
    (shotover's counters do not end in `_total`); counters created with
    prometheus_client's Counter class keep their `_total` samples.  OpenMetrics-only
    `_created` samples are left out.
    """
    out: list[str] = []
    for family in registry.collect():
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        exposed = family.name
        if family.type == "counter":
            if samples and all(s.name == family.name + "_total" for s in samples):
                exposed = family.name + "_total"
        elif family.type == "info":
            exposed = family.name + "_info"
        out.append(f"# HELP {exposed} {_escape_help(family.documentation)}\n")
        out.append(f"# TYPE {exposed} {_TEXT_TYPES.get(family.type, family.type)}\n")
        for s in samples:
            if s.labels:
                body = ",".join(
                    f'{k}="{_escape_label_value(str(v))}"' for k, v in s.labels.items()
                )
                out.append(f"{s.name}{{{body}}} {floatToGoString(s.value)}\n")
            else:
                out.append(f"{s.name} {floatToGoString(s.value)}\n")
    return "".join(out).encode("utf-8")


#: Content type of `render_metrics` output.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------

#: Level used for "off": above every level the standard library emits.
OFF = logging.CRITICAL + 10

_LEVEL_NAMES = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "off": OFF,
}

# Targets naming the proxy itself, whatever the spelling used in the filter.
_SELF_TARGETS = {"shotover", "shotover_proxy", "shotover_gevent"}
_SELF_LOGGER = "shotover_gevent"

# target, optional [span{fields}] part (accepted and ignored), optional =level
_DIRECTIVE = re.compile(r"^(?P<target>[^\[\]=\s]*)(?:\[(?P<span>.*)\])?(?:=(?P<level>[^=\s]*))?$")

_filter_lock = threading.Lock()
_filtered_loggers: set[str] = set()


def _parse_level(text: str, directive: str) -> int:
    level = _LEVEL_NAMES.get(text.strip().lower())
    if level is None:
        choices = ", ".join(sorted(_LEVEL_NAMES))
        raise ValueError(
            f"unknown log level {text.strip()!r} in {directive!r}; expected one of {choices}"
        )
    return level


def _logger_for_target(target: str) -> str:
    parts = [p for p in re.split(r"::|\.", target) if p]
    if not parts:
        raise ValueError(f"empty target in log filter directive {target!r}")
    if parts[0] in _SELF_TARGETS:
        parts[0] = _SELF_LOGGER
    return ".".join(parts)


def _looks_like_target(word: str) -> bool:
    # A bare word that is not a level is read as a target (enabling all its records)
    # only when it is clearly one; otherwise it is most likely a mistyped level.
    return "::" in word or "." in word or word in _SELF_TARGETS


def parse_log_filter(text: str) -> tuple[int | None, dict[str, int]]:
    """Parse a filter into (root level or None, {logger name: level}) without applying it.

    Accepted: comma separated directives, each either a bare level (`info`) or
    `target=level` where target may use `::` or `.` separators (`shotover::codec=debug`).
    A target without a level (`shotover::codec`) enables all of its records.  A span
    part in square brackets is accepted and ignored.  Raises ValueError.
    """
    if not isinstance(text, str):
        raise TypeError("log filter must be a string")
    root: int | None = None
    targets: dict[str, int] = {}
    directives = [d.strip() for d in text.split(",")]
    directives = [d for d in directives if d]
    if not directives:
        raise ValueError("log filter is empty; give a level such as 'info'")
    for directive in directives:
        match = _DIRECTIVE.match(directive)
        if match is None:
            raise ValueError(f"cannot parse log filter directive {directive!r}")
        target, span, level_text = match.group("target", "span", "level")
        if level_text is None:
            if span is None:
                if target.lower() in _LEVEL_NAMES:
                    root = _LEVEL_NAMES[target.lower()]
                    continue
                if not _looks_like_target(target):
                    raise ValueError(
                        f"unknown log level {target!r}; use a level such as 'info' or "
                        f"'{target}=debug' to set the level of a target"
                    )
            level = logging.DEBUG  # a target without level enables everything
        else:
            level = _parse_level(level_text, directive)
        if not target:
            if span is not None:
                continue  # span-only filters have no logging equivalent
            root = level
            continue
        targets[_logger_for_target(target)] = level
    return root, targets


def set_log_filter(text: str) -> None:
    """Apply a log filter such as `info`, `warn,shotover=debug` or `shotover=debug,info`.

    A bare level sets the root logger; `target=level` sets that logger, with the
    targets `shotover`, `shotover_proxy` and `shotover_gevent` meaning this package.
    The new filter replaces the previous one: loggers named by an earlier filter but
    not by this one go back to inheriting from the root.  Nothing changes when the
    text is invalid (ValueError).
    """
    root, targets = parse_log_filter(text)
    with _filter_lock:
        for name in _filtered_loggers - targets.keys():
            logging.getLogger(name).setLevel(logging.NOTSET)
        for name, level in targets.items():
            logging.getLogger(name).setLevel(level)
        _filtered_loggers.clear()
        _filtered_loggers.update(targets)
        if root is not None:
            logging.getLogger().setLevel(root)


_DISPLAY_LEVEL = {"WARNING": "WARN"}


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class HumanFormatter(logging.Formatter):
    """`2026-11-28T09:00:00.123Z INFO shotover_gevent.source: message`"""

    def format(self, record: logging.LogRecord) -> str:
        level = _DISPLAY_LEVEL.get(record.levelname, record.levelname)
        text = f"{_timestamp(record)} {level} {record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record with the keys ts, level, logger, message (and exc_info)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _timestamp(record),
            "level": _DISPLAY_LEVEL.get(record.levelname, record.levelname),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


_FORMATTERS = {"human": HumanFormatter, "json": JsonFormatter}


def setup_logging(level: str, log_format: str = "human") -> None:
    """Send all logging to stderr in the given format and apply `level` as a log filter.

    `level` takes the syntax of `set_log_filter` (and of `main_log_level` in
    config.yaml).  Calling again replaces the handler installed by an earlier call.
    """
    formatter_class = _FORMATTERS.get(log_format)
    if formatter_class is None:
        raise ValueError(f"unknown log format {log_format!r}; expected 'human' or 'json'")
    parse_log_filter(level)  # validate before touching any handler
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StderrHandler):
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(formatter_class())
    root.addHandler(handler)
    set_log_filter(level)


# ---------------------------------------------------------------------------
# HTTP interface
# ---------------------------------------------------------------------------

_MAX_FILTER_BYTES = 64 * 1024
#: Seconds one request may take, from the moment the server waits for it (on a kept-alive
#: connection too) until its response is sent: a slow or stalled client is closed then.
REQUEST_DEADLINE_SECONDS = 5.0
#: Connections served at once; further ones wait in the listen backlog, not in this process.
MAX_HTTP_CONNECTIONS = 128
#: Refused `PUT /filter` requests are logged at most this often (any local user can send them).
REFUSAL_LOG_INTERVAL_SECONDS = 60.0

_http_log = logging.getLogger(__name__ + ".http")


def _respond(start_response, status: str, body: bytes, content_type: str = "text/plain",
             extra: Iterable[tuple[str, str]] = ()) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    headers.extend(extra)
    start_response(status, headers)
    return [body]


def _read_body(environ) -> bytes:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ValueError("invalid Content-Length") from None
    if length > _MAX_FILTER_BYTES:
        raise OverflowError
    return environ["wsgi.input"].read(length) if length > 0 else b""


def _bearer_token_matches(environ, token: str) -> bool:
    scheme, _, credentials = environ.get("HTTP_AUTHORIZATION", "").strip().partition(" ")
    # Both sides as bytes: compare_digest refuses non-ASCII text, and a header may hold some.
    given = credentials.strip().encode("latin-1", "replace")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, token.encode())


class _RefusalLog:
    """Logs refused filter changes, at most once per REFUSAL_LOG_INTERVAL_SECONDS."""

    def __init__(self) -> None:
        self.unlogged = 0
        self.logged_at = float("-inf")

    def refused(self, environ) -> None:
        self.unlogged += 1
        now = time.monotonic()
        if now - self.logged_at < REFUSAL_LOG_INTERVAL_SECONDS:
            return
        log.warning("PUT /filter refused %d time(s) since the last report (latest from %s): no "
                    "valid bearer token", self.unlogged, environ.get("REMOTE_ADDR") or "a local socket")
        self.unlogged = 0
        self.logged_at = now


def _make_application(filter_token: str | None, render: Callable[[], bytes] | None = None,
                      apply_filter: Callable[[str], None] | None = None):
    """The WSGI application; with `filter_token`, PUT /filter needs it as a bearer token.
    `render` makes the metrics page and `apply_filter` sets a log filter (by default: this
    process's own)."""
    render = render or render_metrics
    apply_filter = apply_filter or set_log_filter
    refusals = _RefusalLog()

    def application(environ, start_response):
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            if method not in ("GET", "HEAD"):
                return _respond(start_response, "405 Method Not Allowed", b"use GET\n",
                                extra=[("Allow", "GET, HEAD")])
            body = render()
            if method == "HEAD":
                start_response("200 OK", [("Content-Type", METRICS_CONTENT_TYPE),
                                          ("Content-Length", str(len(body)))])
                return [b""]
            return _respond(start_response, "200 OK", body, METRICS_CONTENT_TYPE)
        if path == "/filter":
            if method != "PUT":
                return _respond(start_response, "405 Method Not Allowed", b"use PUT\n",
                                extra=[("Allow", "PUT")])
            if filter_token is not None and not _bearer_token_matches(environ, filter_token):
                refusals.refused(environ)
                return _respond(start_response, "401 Unauthorized",
                                b"PUT /filter needs the header "
                                b"'Authorization: Bearer <observability_token>'\n",
                                extra=[("WWW-Authenticate", 'Bearer realm="shotover-g"')])
            try:
                text = _read_body(environ).decode("utf-8")
                apply_filter(text)
            except OverflowError:
                return _respond(start_response, "413 Payload Too Large", b"filter too long\n")
            except UnicodeDecodeError:
                return _respond(start_response, "400 Bad Request",
                                b"filter is not valid UTF-8\n")
            except ValueError as exc:
                return _respond(start_response, "400 Bad Request", f"{exc}\n".encode())
            log.info("log filter set to %r", text.strip())
            return _respond(start_response, "200 OK", b"ok")
        return _respond(start_response, "404 Not Found", b"not found; try /metrics or /filter\n")

    return application


_handler_class = None


def _deadline_handler_class():
    """pywsgi's handler with REQUEST_DEADLINE_SECONDS per request (made on first use: pywsgi
    is imported late, see the top of this module)."""
    global _handler_class
    if _handler_class is not None:
        return _handler_class
    import socket as stdlib_socket

    import gevent
    from gevent.pywsgi import WSGIHandler

    class DeadlineHandler(WSGIHandler):
        # gevent.Timeout is a BaseException: it passes pywsgi's `except Exception` around the
        # parsing of the head, and reaches handle_error from its catch-all around the body and
        # the response.
        _deadline = None

        def handle_one_request(self):
            self._deadline = gevent.Timeout.start_new(REQUEST_DEADLINE_SECONDS)
            try:
                return super().handle_one_request()
            except gevent.Timeout as passed:
                if passed is not self._deadline:
                    raise
                self._log_deadline("sent no whole request")
                return None  # closes the connection
            finally:
                self._deadline.close()

        def run_application(self):
            try:
                super().run_application()
            except gevent.Timeout as passed:
                if passed is self._deadline:
                    # pywsgi reads what is left of the body next: let it meet the end at once.
                    try:
                        self.socket.shutdown(stdlib_socket.SHUT_RD)
                    except OSError:
                        pass
                raise

        def handle_error(self, kind, value, tb):
            if value is not None and value is self._deadline:
                self.close_connection = True
                self._log_deadline("was too slow with its request body or our response")
                return
            super().handle_error(kind, value, tb)

        def _log_deadline(self, what: str) -> None:
            _http_log.debug("closed a connection from %s that %s within %g s",
                            self.client_address or "a local socket", what,
                            REQUEST_DEADLINE_SECONDS)

    _handler_class = DeadlineHandler
    return _handler_class


def _bind_unix_listener(path: str):
    """A listening Unix socket at `path`, mode 0600 from birth. A socket file left by a
    process that is gone is replaced; one that something still listens on is not."""
    import stat

    from gevent import socket

    def cannot(why: str) -> OSError:
        return OSError(f"cannot listen on unix:{path} (observability_interface): {why}")

    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISSOCK(existing.st_mode):
            raise cannot("the path exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            try:
                os.unlink(path)  # left behind by a process that is gone
            except FileNotFoundError:
                pass
            except OSError as error:
                raise cannot(f"removing the stale socket file: {error.strerror}") from None
        except OSError as error:
            raise cannot(error.strerror or str(error)) from None
        else:
            raise cannot("a running process listens there")
        finally:
            probe.close()
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    except OSError as error:
        raise cannot(f"creating its directory: {error.strerror or error}") from None
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window in which others could connect
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(MAX_HTTP_CONNECTIONS)
    except OSError as error:
        listener.close()
        raise cannot(error.strerror or str(error)) from None
    finally:
        os.umask(old_umask)
    return listener


class ObservabilityServer:
    """A running observability HTTP server; see `start_observability_server`."""

    def __init__(self, server) -> None:
        self.server = server
        bound = server.socket.getsockname()
        #: (host, port), or the path of the Unix socket.
        self.address: tuple[str, int] | str = bound if isinstance(bound, str) else bound[:2]

    @property
    def metrics_location(self) -> str:
        """Where to scrape, for people: a URL, or a socket path and the URL to ask it."""
        from .config import format_address

        if isinstance(self.address, str):
            return f"unix:{self.address} (http://localhost/metrics)"
        return f"http://{format_address(self.address)}/metrics"

    def stop(self, timeout: float | None = 1.0) -> None:
        """Stop accepting, give in-flight requests `timeout` seconds, close the socket (and
        remove a Unix socket's file)."""
        self.server.stop(timeout=timeout)
        if isinstance(self.address, str):
            try:
                os.unlink(self.address)
            except OSError:
                pass


def start_observability_server(address: tuple[str, int] | str, listener=None,
                               token: str | None = None,
                               render: Callable[[], bytes] | None = None,
                               apply_filter: Callable[[str], None] | None = None
                               ) -> ObservabilityServer:
    """Serve /metrics and /filter on `address` from the gevent hub and return at once.

    `address` is (host, port), port 0 picking a free port (see `.address`), or the absolute
    path of a Unix socket (created mode 0600). `listener` may be an already bound, listening
    socket to serve from instead (one inherited across an upgrade); a Unix one bound
    elsewhere than `address` is closed and `address` bound instead. With `token`, PUT /filter
    needs `Authorization: Bearer <token>`; GET /metrics stays open.
    """
    from gevent.pool import Pool
    from gevent.pywsgi import LoggingLogAdapter, WSGIServer

    if isinstance(address, str):
        if listener is not None and listener.getsockname() != address:
            listener.close()
            listener = None
        if listener is None:
            listener = _bind_unix_listener(address)
    server = WSGIServer(
        listener if listener is not None else tuple(address),
        _make_application(token, render, apply_filter),
        spawn=Pool(MAX_HTTP_CONNECTIONS),
        handler_class=_deadline_handler_class(),
        log=LoggingLogAdapter(_http_log, logging.DEBUG),
        error_log=LoggingLogAdapter(_http_log, logging.ERROR),
    )
    server.start()
    result = ObservabilityServer(server)
    log.info("observability interface listening on %s%s", result.metrics_location,
             "; PUT /filter needs the observability_token" if token is not None else "")
    return result
