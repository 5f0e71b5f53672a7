"""Tee: every batch goes down the chain and also through a sub-chain (`chain`); `behavior` says
what happens to the sub-chain's replies, and an optional HTTP switch picks whose replies win."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional

import gevent
from gevent.event import AsyncResult
from gevent.queue import Full, Queue

from .. import observability
from ..chain import CallNext, Chain, ConnectionContext, Transform, TransformBuilder
from ..config import Problems, TransformConfig, parse_chain, take_mapping
from ..message import Message
from . import TransformType, build_builders, register

log = logging.getLogger(__name__)

BEHAVIORS = ("Ignore", "LogWarningOnMismatch", "FailOnMismatch", "SubchainOnMismatch")
REGULAR, TEE = "regular-chain", "tee-chain"
SWITCH_PATH = "/transform/tee/result-source"

_DROPPED = observability.counter(
    "shotover_tee_dropped_messages_count",
    "Requests a Tee did not send through its sub-chain because its buffer was full.",
    ("chain",),
)
_MISMATCH_TEXT = ("ERR The responses from the Tee subchain and down-chain did not match and "
                  "behavior is set to fail on mismatch")


@dataclass
class TeeConfig:
    behavior: str
    chain: List[TransformConfig]
    mismatch_chain: Optional[List[TransformConfig]] = None
    buffer_size: int = 5
    timeout_micros: Optional[int] = None
    switch_port: Optional[int] = None


def parse(settings: Any, where: str, problems: Problems) -> Optional[TeeConfig]:
    values = take_mapping(settings, where, problems, required={"chain": list}, optional={
        "behavior": ((str, dict), "Ignore"), "buffer_size": (int, 5),
        "timeout_micros": (int, None), "switch_port": (int, None),
        "http_api_port": (int, None)})
    if values is None:
        if isinstance(settings, dict) and isinstance(settings.get("chain"), list):
            parse_chain(settings["chain"], f"{where}.chain", problems)
        return None
    behavior = values["behavior"]
    mismatch_chain = None
    if isinstance(behavior, dict):
        if list(behavior) != ["SubchainOnMismatch"]:
            problems.add(f"{where}.behavior", f"expected one of {', '.join(BEHAVIORS[:3])} or "
                                              f"`SubchainOnMismatch: [chain]`, got {behavior!r}")
            behavior = "Ignore"
        else:
            mismatch_chain = parse_chain(behavior["SubchainOnMismatch"],
                                         f"{where}.behavior.SubchainOnMismatch", problems)
            behavior = "SubchainOnMismatch"
    elif behavior not in BEHAVIORS[:3]:
        hint = " (it takes a chain: `SubchainOnMismatch: [...]`)" \
            if behavior == "SubchainOnMismatch" else ""
        problems.add(f"{where}.behavior", f"expected one of {', '.join(BEHAVIORS[:3])} or "
                                          f"`SubchainOnMismatch: [chain]`, got {behavior!r}{hint}")
    if values["buffer_size"] < 1:
        problems.add(f"{where}.buffer_size", "must be at least 1")
    if values["timeout_micros"] is not None and values["timeout_micros"] <= 0:
        problems.add(f"{where}.timeout_micros", "must be a positive number of microseconds")
    if values["switch_port"] is not None and values["http_api_port"] is not None:
        problems.add(f"{where}.http_api_port", "give switch_port or http_api_port, not both")
    port = values["switch_port"] if values["switch_port"] is not None else values["http_api_port"]
    if port is not None and not 0 < port <= 65535:
        problems.add(f"{where}.switch_port", "must be a port number from 1 to 65535")
    chain = parse_chain(values["chain"], f"{where}.chain", problems)
    return TeeConfig(behavior, chain, mismatch_chain, values["buffer_size"],
                     values["timeout_micros"], port)


class TeeContext(ConnectionContext):
    """The sub-chain's view of the connection. `replies_ignored` is true while it runs a batch
    whose replies nobody waits for (Ignore behaviour), which lets Coalesce hold requests."""

    __slots__ = ("replies_ignored",)

    def __init__(self, parent: ConnectionContext, chain_name: str) -> None:
        super().__init__(parent.source_name, chain_name, parent.peer, parent.session,
                         _drop_push)
        self.replies_ignored = False


def _drop_push(frame: bytes) -> None:
    """The client hears pushes from the regular chain only."""


class TeeBuilder(TransformBuilder):
    terminating = False

    def __init__(self, config: TeeConfig, name: str, chain_name: str) -> None:
        self.config = config
        self.name = name
        self.tee_builders = build_builders(config.chain, "tee_chain")
        self.mismatch_builders = (build_builders(config.mismatch_chain, "mismatch_chain")
                                  if config.mismatch_chain is not None else None)
        self.result_source = REGULAR
        self.dropped = _DROPPED.labels("Tee")
        self.server = None
        if config.switch_port is not None:
            self._start_switch(config.switch_port)

    def _start_switch(self, port: int) -> None:
        from gevent.pywsgi import LoggingLogAdapter, WSGIServer

        http_log = logging.getLogger(__name__ + ".http")
        self.server = WSGIServer(("127.0.0.1", port), self._application,
                                 log=LoggingLogAdapter(http_log, logging.DEBUG),
                                 error_log=LoggingLogAdapter(http_log, logging.ERROR))
        try:
            self.server.start()
        except OSError as error:
            self.server = None
            self.close()
            raise OSError(error.errno, f"Tee: cannot listen on 127.0.0.1:{port} for its "
                                       f"result-source switch: {error.strerror}") from None
        log.info("Tee result-source switch listening on http://127.0.0.1:%d%s", port,
                 SWITCH_PATH)

    def _application(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        if environ.get("PATH_INFO", "") != SWITCH_PATH:
            return _respond(start_response, "404 Not Found", f"try {SWITCH_PATH}\n")
        if method == "GET":
            return _respond(start_response, "200 OK", self.result_source)
        if method != "PUT":
            return _respond(start_response, "405 Method Not Allowed", "use GET or PUT\n")
        try:
            length = min(int(environ.get("CONTENT_LENGTH") or 0), 1024)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        text = body.decode("utf-8", "replace").strip()
        if text not in (REGULAR, TEE):
            return _respond(start_response, "400 Bad Request",
                            f"setting result source failed: invalid value {text!r}, should be "
                            f"'{TEE}' or '{REGULAR}'\n")
        if text != self.result_source:
            log.info("Tee result source set to %s", text)
        self.result_source = text
        return _respond(start_response, "200 OK", "")

    def build(self, context: ConnectionContext) -> Transform:
        return Tee(self, context)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=1)
            self.server = None
        for builder in self.tee_builders + (self.mismatch_builders or []):
            try:
                builder.close()
            except Exception:
                log.exception("closing %s failed", builder.name)


def _respond(start_response, status: str, text: str):
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class Tee(Transform):
    """The behaviours:

    * Ignore (default): the sub-chain runs in the background; at most `buffer_size` batches
      wait for it per client connection, beyond that batches are dropped (and counted in
      shotover_tee_dropped_messages_count). With `timeout_micros`, a full buffer is waited on that
      long before dropping.
    * LogWarningOnMismatch / FailOnMismatch / SubchainOnMismatch: both chains run at once and their
      raw replies are compared one by one; a mismatch is logged, turned into an error, or its
      request sent down the SubchainOnMismatch chain. `timeout_micros` bounds the wait for the
      sub-chain (a late sub-chain counts as a mismatch).
    * `switch_port`: GET/PUT http://127.0.0.1:PORT/transform/tee/result-source with body
      `regular-chain` or `tee-chain`; shared by every connection of the source.

    Each client connection gets its own instance of the sub-chains; they see the client's session.
    """

    def __init__(self, builder: TeeBuilder, context: ConnectionContext) -> None:
        self.builder = builder
        config = builder.config
        self.behavior = config.behavior
        self.timeout = config.timeout_micros / 1e6 if config.timeout_micros else None
        self.tee_context = TeeContext(context, "tee_chain")
        self.tee_chain = Chain("tee_chain", builder.tee_builders, self.tee_context)
        self.mismatch_chain = None
        if builder.mismatch_builders is not None:
            self.mismatch_chain = Chain("mismatch_chain", builder.mismatch_builders,
                                        TeeContext(context, "mismatch_chain"))
        # Batches for the sub-chain, run in order by one worker: (requests, result or None).
        self._queue: Queue = Queue(maxsize=config.buffer_size)
        self._worker: Optional[gevent.Greenlet] = None

    # ---- the sub-chain's worker ---------------------------------------------------------------

    def _work(self) -> None:
        while True:
            requests, result = self._queue.get()
            self.tee_context.replies_ignored = result is None
            try:
                replies = self.tee_chain.process(requests)
            except gevent.GreenletExit:
                raise
            except Exception as error:
                log.exception("Tee sub-chain failed")
                if result is not None:
                    result.set_exception(error)
                continue
            if result is not None:
                result.set(replies)

    def _submit(self, requests: List[Message], wait: bool) -> Optional[AsyncResult]:
        """Queue a batch for the sub-chain; None when it was dropped (background only)."""
        if self._worker is None or self._worker.dead:
            self._worker = gevent.spawn(self._work)
        result = AsyncResult() if wait else None
        try:
            if wait:
                self._queue.put((requests, result))
            elif self.timeout is None:
                self._queue.put_nowait((requests, None))
            else:
                self._queue.put((requests, None), timeout=self.timeout)
        except Full:
            self.builder.dropped.value += len(requests)
            return None
        return result

    def _tee_replies(self, result: AsyncResult, count: int) -> List[Message]:
        try:
            return result.get(timeout=self.timeout)
        except gevent.Timeout:
            return [Message.error("ERR Tee sub-chain did not answer in time")] * count
        except Exception as error:
            return [Message.error(f"ERR Tee sub-chain failed: {error}")] * count

    # ---- a batch ------------------------------------------------------------------------------

    def transform(self, requests: List[Message], call_next: CallNext) -> List[Message]:
        source = self.builder.result_source
        if self.behavior == "Ignore":
            if source == REGULAR:
                self._submit(list(requests), wait=False)
                return call_next(requests)
            result = self._submit(list(requests), wait=True)
            try:
                call_next(requests)
            except Exception:
                log.exception("Tee: the regular chain failed (its replies are ignored)")
            return self._tee_replies(result, len(requests))
        result = self._submit(list(requests), wait=True)
        regular = call_next(requests)
        tee = self._tee_replies(result, len(requests))
        keep, other = (list(regular), tee) if source == REGULAR else (list(tee), regular)
        mismatched: List[Message] = []
        for index, (kept, compared) in enumerate(zip(keep, other)):
            if kept.raw == compared.raw:
                continue
            if self.behavior == "FailOnMismatch":
                keep[index] = Message.error(_MISMATCH_TEXT)
            elif self.behavior == "LogWarningOnMismatch":
                log.warning("Tee mismatch for %s: result-source (%s) reply %r, other reply %r",
                            requests[index].command, source, kept.raw[:200], compared.raw[:200])
            else:
                mismatched.append(requests[index])
        if mismatched and self.mismatch_chain is not None:
            try:
                self.mismatch_chain.process(mismatched)
            except Exception:
                log.exception("Tee: the SubchainOnMismatch chain failed")
        return keep

    def close(self) -> None:
        if self._worker is not None:
            # Wait (briefly) for a batch in flight so the sub-chain is idle when it closes.
            self._worker.kill(block=True, timeout=1.0)
            self._worker = None
        self.tee_chain.close()
        if self.mismatch_chain is not None:
            self.mismatch_chain.close()


KIND = register(TransformType(("Tee",), False, parse, TeeBuilder))
