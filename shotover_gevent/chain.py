"""Transform chains: builders made once from the topology, one chain instance per connection.

A chain takes a batch of requests and returns exactly one reply per request, in order.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import Callable, List, Optional, Sequence

from . import observability
from .message import Message, batch_commands, command_name, one_name
from .session import Session

FOLD_AT = observability.HistogramCell.FOLD_AT

log = logging.getLogger(__name__)

CallNext = Callable[[List[Message]], List[Message]]


class ConnectionContext:
    """What a transform may know about the client connection it serves."""

    __slots__ = ("source_name", "chain_name", "peer", "session", "push", "hang_up")

    def __init__(self, source_name: str, chain_name: str, peer: str, session: Session,
                 push: Callable[[bytes], None],
                 hang_up: Optional[Callable[[str], None]] = None) -> None:
        self.source_name = source_name
        self.chain_name = chain_name
        self.peer = peer
        self.session = session
        # Writes bytes that are not a reply to a request (pub/sub messages, RESP3 pushes).
        self.push = push
        # Ends the client's connection (with the reason to log) as the server ended the one
        # made for it: at once if it waits for requests, else once the replies of the batch
        # under way are written. None: this chain cannot (a sub-chain's view), and the sink
        # answers with errors instead.
        self.hang_up = hang_up


class Transform:
    """Per-connection transform. `transform` must return one reply per request, in order."""

    #: True when the transform never waits on its own and, whenever it passes a batch on
    #: whole, returns the next transform's replies as they are. A chain made only of such
    #: transforms can be handed over while its sink waits for replies: the next image reads
    #: them and answers the client without running the transforms again.
    inflight_handover = False

    #: Optional `screen(commands) -> bool`, for a transform that mostly looks at the command
    #: names of a batch and passes it on whole: given the upper-cased command name of each
    #: request, True when it has done its part (counted them, found nothing to refuse) and the
    #: next transform's replies are to come back unchanged; False when `transform` must run as
    #: usual. A chain runs the screens of its leading transforms one after the other instead of
    #: nesting a call (and its clock readings) per transform, and a batch it serves from the
    #: event loop needs no Message objects for them.
    screen: Optional[Callable[[List[str]], bool]] = None

    #: Optional `screen_counts(command) -> Optional[tuple]`, for a transform with a screen
    #: whose outcome for a batch made only of `command` never changes and whose only effect is
    #: adding the batch's size to counters: those counters (cells with a `value`), or None
    #: when the screen would not pass such a batch on. The chain then screens such batches
    #: with one lookup (Chain.screen).
    screen_counts: Optional[Callable[[str], Optional[tuple]]] = None

    def transform(self, requests: List[Message], call_next: CallNext) -> List[Message]:
        raise NotImplementedError

    def lane_ready(self) -> bool:
        """Whether this sink's `submit` may take the client's next batches (see submit)."""
        return False

    def submit(self, framed: List[tuple], waiter):
        """A sink that can send a batch without waiting for its replies does so and returns
        what the client's connection records as the batch in flight; `waiter.switch(result)`
        is then called from the event loop with what `lane_payload` needs, or
        `waiter.trouble()` when the client's greenlet is to finish the batch
        (`resume_submitted`). None: the batch goes through `transform`."""
        return None

    def submit_first(self, framed: List[tuple], waiter):
        """submit() for the first batch of a client's connection, called from the client's
        greenlet (so it may wait): a sink that connects on the first request may connect now
        and send the batch the way submit does, rather than have it go through `transform`."""
        return self.submit(framed, waiter)

    def lane_payload(self, count: int, result) -> bytes:
        raise NotImplementedError

    def resume_submitted(self, requests: List[Message]) -> List[Message]:
        raise NotImplementedError

    def close(self) -> None:
        """Release upstream resources (called when the client leaves or is handed over)."""

    def abandon(self) -> None:
        """Let go of upstream resources that another process now owns (an upgrade's old side
        after the new image adopted them): nothing may be said to the server. By default
        only the sink's connection is handed over, so the rest is closed as usual."""
        self.close()

    def prepare(self) -> None:
        """Called once before the first request of a connection adopted in an upgrade: a sink
        whose session expects unsolicited messages (subscriptions) connects right away."""

    def export_upstream(self, batch: Optional[List[Message]] = None):
        """(record, status) for the next program image: a sink's upstream connection as a
        checkpoint UpstreamRecord (its fd is then inherited), or None (the next image connects
        afresh); and where `batch`, the requests the client's connection is serving (None:
        none), stands: "ok" (no batch), "inflight" (the record carries it), "unsent" (nothing
        of it reached the server), "busy" (cannot be handed over this moment)."""
        return None, ("ok" if batch is None else "busy")

    def adopt_upstream(self, record) -> bool:
        """Take over an upstream connection that the previous image handed down, if it is one
        this transform would use. False: not ours (the caller closes it)."""
        return False

    def resume_inflight(self, requests: List[Message]) -> Optional[List[Message]]:
        """The replies to `requests`, the batch that was in flight on the adopted upstream
        connection (None: no such batch here)."""
        return None


class TransformBuilder:
    """Made once per transform in the topology; builds one Transform per client connection."""

    #: The name the topology gave this transform, or its type name.
    name: str = ""
    terminating: bool = False

    def build(self, context: ConnectionContext) -> Transform:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources shared by every connection (pools, HTTP endpoints)."""


def _sink_end(requests: List[Message]) -> List[Message]:
    # Validation guarantees the last transform terminates; reaching this is a bug, not input.
    raise RuntimeError("chain ended without a terminating transform")


class ChainShared:
    """What every connection's instance of one chain shares: the metric series its batches are
    recorded in, and what its screens do to a batch of one command, worked out once for all of
    them (Transform.screen_counts depends on the configuration only). With hundreds of
    connections, one copy stays in the CPU's caches where one per connection would not."""

    __slots__ = ("metrics", "transform_metrics", "recorders", "plans")

    def __init__(self, name: str, builders: Sequence[TransformBuilder]) -> None:
        self.metrics = observability.chain_metrics(name)
        self.transform_metrics = [observability.transform_metrics(builder.name)
                                  for builder in builders]
        #: Per number of screens passed, where a successful batch is recorded (a BatchSeries:
        #: the series of the transforms it entered itself, then the chain's); set by the first
        #: chain built, which knows its screens.
        self.recorders: Optional[list] = None
        #: Chain._plans: per command name (as sent, or upper-cased), its plan (bounded).
        self.plans: dict = {}

    def record(self, started: float, entered: int, failed: bool) -> None:
        """Account for a batch of one of the chain's connections done now: the chain's
        latency, and the transforms it entered itself (the first, and one more per screen that
        passed the batch on)."""
        seconds = perf_counter() - started
        if not failed:
            # TransformMetrics.record for each transform the batch entered and
            # ChainMetrics.record_batch, in one append.
            series = self.recorders[entered]
            pending = series.pending
            pending.append(seconds)
            if len(pending) >= FOLD_AT:
                series.drain()
            return
        metrics = self.transform_metrics
        if entered:
            for index in range(entered + 1):
                metrics[index].record(seconds, failed)
        elif metrics:
            metrics[0].record(seconds, failed)
        self.metrics.record_batch(seconds, failed)


class Chain:
    """One connection's instance of a topology chain."""

    __slots__ = ("name", "transforms", "shared", "_screens", "_runs", "_inflight_handover",
                 "screens", "_plans", "_plain_screens")

    def __init__(self, name: str, builders: Sequence[TransformBuilder],
                 context: ConnectionContext, shared: Optional[ChainShared] = None) -> None:
        self.name = name
        self.transforms = [builder.build(context) for builder in builders]
        if shared is None:
            shared = ChainShared(name, builders)
        self.shared = shared
        metrics = shared.transform_metrics
        # The leading transforms that can screen a batch. process() runs their screens, then
        # the transform after the last one that passed, whose next transforms are nested from
        # the sink upwards, each timed by its own wrapper. The transforms process() entered
        # are timed by its two clock readings, as the chain is.
        screens = []
        for transform in self.transforms[:-1]:
            if transform.screen is None:
                break
            screens.append(transform.screen)
        self._screens = tuple(screens)
        #: Whether the chain starts with transforms that screen batches.
        self.screens = bool(screens)
        #: Whether every screen can say, once per command, what it does to a batch made only
        #: of that command (Transform.screen_counts); then `_plans` remembers it.
        self._plain_screens = bool(screens) and all(
            transform.screen_counts is not None for transform in self.transforms[:len(screens)])
        self._plans = shared.plans
        nested: List[CallNext] = [_sink_end] * (len(self.transforms) + 1)
        for index in range(len(self.transforms) - 1, 0, -1):
            nested[index] = _bind(self.transforms[index], nested[index + 1], metrics[index])
        # runs[i]: transform i's `transform` and its (timed) next.
        self._runs = [(transform.transform, nested[index + 1])
                      for index, transform in enumerate(self.transforms[:len(screens) + 1])]
        if not self._runs:
            self._runs = [(_no_transform, _sink_end)]
        self._inflight_handover = all(t.inflight_handover for t in self.transforms)
        if shared.recorders is None:
            shared.recorders = [observability.batch_series(shared.metrics, metrics[:entered + 1])
                                for entered in range(len(screens) + 1)]

    def process(self, requests: List[Message]) -> List[Message]:
        started = perf_counter()
        entered = self.screen([request.command for request in requests], started) \
            if self._screens else 0
        return self.run_rest(requests, started, entered)

    def screen(self, commands: List[str], started: float) -> int:
        """Run the screens on a batch (its requests' command names) that entered the chain at
        `started`: how many passed it on, for run_rest or, when all did and the sink took it
        without waiting (submit), for record. The transforms a batch enters this way share
        the chain's start: a screen takes well under a microsecond, and one clock reading per
        batch serves them all."""
        if self._plain_screens:
            first = commands[0]
            size = len(commands)
            if size == 1 or commands.count(first) == size:
                # A batch of one command: what the screens do to it is known (screen_counts).
                return self._planned(first, size)
        entered = 0
        try:
            for screen in self._screens:
                if not screen(commands):
                    break
                entered += 1
        except BaseException:
            self.shared.record(started, entered, True)
            raise
        return entered

    def screen_framed(self, framed: List[tuple], started: float) -> int:
        """screen() for a batch as the request framer gives it, (bytes, name as sent) pairs: one
        command, spelled the same each time, goes by its plan with no list of names made."""
        if self._plain_screens:
            name = framed[0][1] if len(framed) == 1 else one_name(framed)
            if name is not None:
                return self._planned(name, len(framed))
        return self.screen(batch_commands(framed), started)

    def _planned(self, key, size: int) -> int:
        """What the screens do to a batch of `size` requests of one command, `key` (its name as
        sent, bytes, or upper-cased, str): done, and how many of them passed it on."""
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plan(key)
        entered, counters = plan
        for counter in counters:
            counter.value += size
        return entered

    def _plan(self, key) -> tuple:
        """(how many screens pass a batch made only of the command `key` (see _planned), the
        counters those that do add its size to); remembered for every connection of the chain
        (bounded)."""
        command = command_name(key) if type(key) is bytes else key
        entered = 0
        counters: list = []
        for transform in self.transforms[:len(self._screens)]:
            found = transform.screen_counts(command)
            if found is None:
                break
            counters.extend(found)
            entered += 1
        plan = (entered, tuple(counters))
        plans = self._plans
        if len(plans) < 64:
            plans[key] = plan
        return plan

    @property
    def sink_after_screens(self) -> Optional[Transform]:
        """The sink, when every transform before it screens batches."""
        if len(self._screens) == len(self.transforms) - 1:
            return self.transforms[-1]
        return None

    def run_rest(self, requests: List[Message], started: float, entered: int) -> List[Message]:
        """The replies to a batch whose screens have run: through the transform where they
        stopped (`entered`, the number that passed it on) and the ones after it."""
        failed = True
        try:
            run, after = self._runs[entered]
            replies = run(requests, after)
            failed = False
        finally:
            self.shared.record(started, entered, failed)
        return self._one_each(requests, replies)

    def finish_submitted(self, requests: List[Message], started: float,
                         entered: int) -> List[Message]:
        """The replies to a batch the sink took without waiting (submit) and then handed to
        the client's greenlet to finish (resume_submitted)."""
        failed = True
        try:
            replies = self.transforms[-1].resume_submitted(requests)
            failed = False
        finally:
            self.shared.record(started, entered, failed)
        return self._one_each(requests, replies)

    def _one_each(self, requests: List[Message], replies: List[Message]) -> List[Message]:
        if len(replies) != len(requests):
            log.error("chain %s returned %d replies for %d requests", self.name,
                      len(replies), len(requests))
            replies = (list(replies) + [Message.error("ERR proxy lost a reply")] * len(requests))
            replies = replies[: len(requests)]
        return replies

    def prepare(self) -> None:
        for transform in self.transforms:
            transform.prepare()

    def export_upstream(self, batch: Optional[List[Message]] = None):
        """The sink's (record, status): see Transform.export_upstream."""
        if batch is not None and not self._inflight_handover:
            return None, "busy"  # a transform holds part of the batch's story
        return self.transforms[-1].export_upstream(batch)

    def adopt_upstream(self, record) -> bool:
        return self.transforms[-1].adopt_upstream(record)

    def resume_inflight(self, requests: List[Message]) -> Optional[List[Message]]:
        return self.transforms[-1].resume_inflight(requests)

    def close(self) -> None:
        for transform in self.transforms:
            try:
                transform.close()
            except Exception:
                log.exception("closing transform %r failed", transform)

    def abandon(self) -> None:
        """The client and the sink's upstream connection belong to another process now."""
        for transform in self.transforms[:-1]:
            try:
                transform.close()
            except Exception:
                log.exception("closing transform %r failed", transform)
        try:
            self.transforms[-1].abandon()
        except Exception:
            log.exception("letting go of transform %r failed", self.transforms[-1])


def _no_transform(requests: List[Message], call_next: CallNext) -> List[Message]:
    return _sink_end(requests)


def _bind(transform: Transform, call_next: CallNext, metrics) -> CallNext:
    run = transform.transform
    record = metrics.record

    def call(requests: List[Message]) -> List[Message]:
        started = perf_counter()
        failed = True
        try:
            replies = run(requests, call_next)
            failed = False
            return replies
        finally:
            record(perf_counter() - started, failed)

    return call

