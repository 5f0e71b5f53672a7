#!/usr/bin/env python3
"""Verify a shotover-g checkpoint file and show what it would hand over.

Usage: inspect_checkpoint.py FILE [--json] [--show-secrets]

Exit status: 0 when the file verifies, 1 when it cannot be read or is damaged,
foreign or of a newer format (with a one-line reason on stderr), 2 on a usage
error.

With --json the output is a single JSON document.  Byte strings (unread
client data, byte values inside sessions) appear as JSON strings holding one
character per byte, i.e. decoded as latin-1: printable ASCII stays readable,
and `value.encode("latin-1")` gives back the exact original bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys
import time

try:
    from shotover_gevent.handover import checkpoint as ckpt
    from shotover_gevent.protocol import resp as ckpt_resp
except ImportError:
    # Run straight from a checkout without installing the package.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from shotover_gevent.handover import checkpoint as ckpt
    from shotover_gevent.protocol import resp as ckpt_resp

import cbor2

PROG = "inspect_checkpoint"
PREVIEW_BYTES = 40


def _iso_utc(ns: int) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"(out of range: {ns} ns)"
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _age(seconds: float) -> str:
    if seconds < 0:
        return f"{_duration(-seconds)} in the future"
    return f"{_duration(seconds)} ago"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


def _preview(data: bytes) -> str:
    shown = repr(data[:PREVIEW_BYTES])
    return shown + "..." if len(data) > PREVIEW_BYTES else shown


def _upstream_state(upstream: ckpt.UpstreamRecord) -> str:
    """How a handed-over upstream connection stood: idle, subscribed, monitoring, inside a
    transaction, with requests in flight, and the bytes travelling with it."""
    parts = []
    count = sum(len(names) for names in upstream.subscriptions.values())
    if count:
        parts.append(f"subscribed to {count} channels/patterns")
    if upstream.monitor:
        parts.append("monitoring")
    if upstream.tracking:
        parts.append("tracking keys")
    if upstream.multi is not None:
        parts.append(f"in a transaction with {len(upstream.multi)} commands queued")
    if upstream.inflight is not None:
        inflight = upstream.inflight
        parts.append(f"{len(inflight.requests) - len(inflight.replies)} of "
                     f"{len(inflight.requests)} requests in flight "
                     f"({', '.join(_command_names(inflight.requests))})")
        if inflight.unsent:
            parts.append(f"{len(inflight.unsent)} request bytes not yet written")
    if upstream.buffered:
        parts.append(f"{len(upstream.buffered)} bytes of a reply or message being received")
    if upstream.held:
        parts.append(f"{len(upstream.held)} messages held for the next reply")
    return "handed over " + (", ".join(parts) if parts else "idle")


def _command_names(requests: list) -> list:
    names = []
    for raw in requests[:5]:
        try:
            names.append(ckpt_resp.parse_command(raw)[0].decode("latin-1").upper())
        except Exception:  # noqa: BLE001 - only a label
            names.append("?")
    if len(requests) > 5:
        names.append("...")
    return names


def _jsonable(value: object) -> object:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin-1")
    if isinstance(value, dict):
        return {_json_key(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        # Plain JSON has no NaN or infinity.
        return repr(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    # Whatever else a CBOR tag decoded into (datetime, Decimal, ...).
    return repr(value)


def _json_key(key: object) -> str:
    if isinstance(key, (bytes, bytearray)):
        return bytes(key).decode("latin-1")
    return key if isinstance(key, str) else repr(key)


def _session(session: dict, show_secrets: bool) -> dict:
    return session if show_secrets else ckpt.redact_session(session)


def as_json(path: str, fmt: int, cp: ckpt.Checkpoint, show_secrets: bool) -> dict:
    now = time.time_ns()
    return _jsonable(
        {
            "file": path,
            "format": fmt,
            "written_by": cp.written_by,
            "pid": cp.pid,
            "generation": cp.generation,
            "created_ns": cp.created_ns,
            "created": _iso_utc(cp.created_ns),
            "age_seconds": (now - cp.created_ns) / 1e9,
            "argv": cp.argv,
            "python": cp.python,
            "config_sha256": cp.config_sha256,
            "rollback": cp.rollback,
            "control": cp.control,
            "listeners": [rec.to_body() for rec in cp.listeners],
            "connections": [
                {
                    "fd": rec.fd,
                    "source": rec.source,
                    "peer": rec.peer,
                    "unread_bytes": len(rec.unread),
                    "unread": rec.unread,
                    "session": _session(rec.session, show_secrets),
                    "upstream": None if rec.upstream is None else rec.upstream.to_body(),
                    "output_bytes": len(rec.output) + len(rec.deferred),
                }
                for rec in cp.connections
            ],
            "drain": cp.drain,
            "guardian": cp.guardian,
        }
    )


def _drain_line(drain: dict) -> str:
    if not drain:
        return "none recorded"
    parts = []
    if "ms" in drain:
        parts.append(f"{drain['ms']} ms")
    if "closed" in drain:
        parts.append(f"{drain['closed']} connection(s) closed")
    text = ", ".join(parts) or repr(drain)
    reasons = drain.get("closed_reasons") or {}
    if reasons:
        text += " (" + ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items())) + ")"
    return text


def as_text(path: str, fmt: int, cp: ckpt.Checkpoint, show_secrets: bool) -> str:
    age = (time.time_ns() - cp.created_ns) / 1e9
    control = "none" if cp.control is None else f"fd {cp.control['fd']}"
    lines = [
        f"checkpoint   {path}",
        f"format       {fmt}",
        f"written by   {cp.written_by}",
        f"pid          {cp.pid}",
        f"generation   {cp.generation}",
        f"created      {_iso_utc(cp.created_ns)} ({_age(age)})",
        f"python       {cp.python}",
        f"argv         {shlex.join(cp.argv) if cp.argv else '(empty)'}",
        f"config       sha256 {cp.config_sha256 or '(none)'}",
        f"rollback     {'yes' if cp.rollback else 'no'}",
        f"control      {control}",
        f"drain        {_drain_line(cp.drain)}",
        f"guardian     {'none' if cp.guardian is None else repr(cp.guardian)}",
        f"listeners    {len(cp.listeners)}",
    ]
    for rec in cp.listeners:
        lines.append(f"  fd {rec.fd:<4} source={rec.source}  address={rec.address}")
    lines.append(f"connections  {len(cp.connections)}")
    for rec in cp.connections:
        lines.append(f"  fd {rec.fd:<4} source={rec.source}  peer={rec.peer}")
        unread = f"{len(rec.unread)} bytes"
        if rec.unread:
            unread += f"  {_preview(rec.unread)}"
        lines.append(f"    unread   {unread}")
        if rec.output or rec.deferred:
            lines.append(f"    output   {len(rec.output) + len(rec.deferred)} bytes owed to the "
                         "client")
        if rec.upstream is not None:
            lines.append(f"    upstream fd {rec.upstream.fd} to {rec.upstream.address}"
                         f" ({rec.upstream.sink or '?'}, {_upstream_state(rec.upstream)})")
        session = _session(rec.session, show_secrets)
        if not session:
            lines.append("    session  {}")
        for i, (key, value) in enumerate(session.items()):
            label = "session" if i == 0 else ""
            lines.append(f"    {label:<8} {key}: {value!r}")
    return "\n".join(lines)


def _fail(reason: object) -> int:
    # Keep the reason to one line whatever the underlying error text holds.
    print(f"{PROG}: {' '.join(str(reason).split())}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Verify a shotover-g checkpoint file and print its contents.",
        epilog="In --json output, bytes are strings with one character per byte (latin-1).",
    )
    parser.add_argument("file", metavar="FILE", help="checkpoint file to inspect")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--show-secrets",
        action="store_true",
        help="show session passwords instead of <redacted>",
    )
    args = parser.parse_args(argv)

    try:
        with open(args.file, "rb") as f:
            data = f.read()
    except OSError as exc:
        return _fail(f"{args.file}: {exc.strerror or exc}")
    try:
        cp = ckpt.decode(data)
    except ckpt.CheckpointError as exc:
        return _fail(f"{args.file}: {exc}")
    # decode() has verified the envelope, but reports the body in the current
    # format; the file's own format number is only in the envelope.
    fmt = cbor2.loads(data)["format"]

    if args.json:
        doc = as_json(args.file, fmt, cp, args.show_secrets)
        text = json.dumps(doc, indent=2, ensure_ascii=True)
    else:
        text = as_text(args.file, fmt, cp, args.show_secrets)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Piped into `head` or similar: the reader has seen enough.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
