"""A request or reply as it travels through a chain: its exact raw bytes, parsed only on demand.

An unchanged message is forwarded as the very bytes it arrived as; nothing is re-encoded.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any, List, Optional

from .protocol import resp


# The upper-cased name of each command name as clients spell it (b"get" -> "GET"), up to a
# bound against clients sending arbitrary names.
_COMMAND_NAMES: dict = {}
_MAX_COMMAND_NAMES = 4096


def command_name(name: bytes) -> str:
    """The upper-cased command name a client spelled `name`."""
    command = _COMMAND_NAMES.get(name)
    if command is None:
        command = name.decode("latin-1").upper()
        if len(_COMMAND_NAMES) < _MAX_COMMAND_NAMES:
            _COMMAND_NAMES[name] = command
    return command


#: A framed request's (bytes, name as sent) pair: its name.
framed_name = itemgetter(1)


def one_name_py(framed: list) -> Optional[bytes]:
    """The name every framed request has, spelled the same each time (None: they differ,
    there are none, or one has no name): `one_name`, in C when the extension is built."""
    if not framed:
        return None
    name = framed[0][1]
    if name is None or list(map(framed_name, framed)).count(name) != len(framed):
        return None
    return name


try:
    from .protocol._scan import one_name
except ImportError:  # the C extension is not built
    one_name = one_name_py


class NameTable:
    """Whether each command name, as clients spell it, passes a test on its upper-cased form,
    remembered per spelling (`passes`, bounded like _COMMAND_NAMES): a batch's names are
    looked up with `all(map(table.passes.get, names))`, and `check` judges a new one."""

    __slots__ = ("passes", "_test")

    def __init__(self, test) -> None:
        self.passes: dict = {}
        self._test = test

    def check(self, name: Optional[bytes]) -> bool:
        if name is None:
            return False  # not a plain array of bulk strings: judged the usual way
        passes = self._test(command_name(name))
        if len(self.passes) < _MAX_COMMAND_NAMES:
            self.passes[name] = passes
        return passes

    def all_pass(self, framed) -> bool:
        """Whether every request of a batch, (bytes, name) pairs, passes."""
        passes = self.passes
        if len(framed) > 2 and all(map(passes.get, map(framed_name, framed))):
            return True  # a pipeline of names known to pass, looked up without a Python loop
        for _raw, name in framed:
            if not passes.get(name, False) and not self.check(name):
                return False
        return True


def batch_commands(framed) -> List[str]:
    """The upper-cased command names of framed requests, (bytes, name or None) pairs."""
    names = _COMMAND_NAMES
    try:
        return [names[name] for _raw, name in framed]
    except KeyError:  # a name not seen before, or a request that is not a plain array
        return [Message(raw, name).command for raw, name in framed]


def as_messages(batch: list) -> list:
    """A batch as Message objects, converted in place (the list stays the same object, which
    is how an upgrade recognises the batch in flight): requests the event loop's callbacks
    kept as framed (bytes, name) pairs, replies they kept as bytes."""
    if batch and type(batch[0]) is not Message:
        batch[:] = [Message(*item) if type(item) is tuple else Message(item) for item in batch]
    return batch


class Message:
    """One RESP frame (or, for replies that span several frames, their concatenation)."""

    __slots__ = ("raw", "_name", "_command", "_args")

    def __init__(self, raw: bytes, name: Optional[bytes] = None) -> None:
        self.raw = raw
        self._name = name
        self._command: Optional[str] = None
        self._args: Optional[List[bytes]] = None

    @classmethod
    def request(cls, args: List[Any]) -> "Message":
        encoded = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        message = cls(resp.encode_command(encoded), encoded[0])
        message._args = encoded
        return message

    @classmethod
    def error(cls, text: str) -> "Message":
        return cls(resp.error_reply(text))

    @property
    def command(self) -> str:
        """Upper-cased command name of a request ('' when this is not a request)."""
        if self._command is None:
            name = self._name
            if name is None:
                args = self.args
                name = args[0] if args else b""
            command = _COMMAND_NAMES.get(name)
            if command is None:
                command = command_name(name)
            self._command = command
        return self._command

    @property
    def args(self) -> List[bytes]:
        """A request's arguments, command name first."""
        if self._args is None:
            self._args = resp.parse_command(self.raw) if self.raw[:1] == b"*" else []
        return self._args

    def subcommand(self) -> str:
        args = self.args
        return args[1].decode("latin-1").upper() if len(args) > 1 else ""

    def value(self) -> Any:
        """The parsed value of a reply frame."""
        return resp.parse_frame(self.raw)

    @property
    def is_error(self) -> bool:
        first = self.raw[:1]
        return first == b"-" or first == b"!"

    def __repr__(self) -> str:
        preview = self.raw[:60]
        return f"Message({preview!r}{'...' if len(self.raw) > 60 else ''})"


#: A reply the client must not see (CLIENT REPLY OFF/SKIP): it still holds its request's place.
NO_REPLY = Message(b"")

#: Commands of the replication protocol: SYNC/PSYNC would turn the connection into a replication
#: stream (the RDB file, then every write), and REPLCONF ACK/FACK/GETACK get no reply at all
#: from a client that is not a replica. The sinks refuse them rather than leave the client
#: waiting for a reply that is not one, or miscount the replies that follow.
REPLICATION_COMMANDS = frozenset({"SYNC", "PSYNC", "REPLCONF"})


def replication_refused(command: str) -> Message:
    """The error a sink answers SYNC/PSYNC with."""
    return Message.error(f"ERR {command} is not supported through the proxy; connect replicas "
                         "to the server directly")
