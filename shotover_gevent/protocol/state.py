"""A Redis connection's state as the server keeps it, and what every command does to it.

Protocol, database, reply mode, MULTI/WATCH, subscriptions, MONITOR, tracking, credentials;
for each request: how many reply frames it gets and when its change applies. Sans-IO.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Any, Deque, Dict, List, NamedTuple, Optional, Sequence, Tuple

from . import resp

# ---- the rules ----------------------------------------------------------------------------------

#: CLIENT REPLY modes. SKIP: the reply to the next request is not sent.
ON, OFF, SKIP = "ON", "OFF", "SKIP"

#: What the server answers a command queued inside MULTI.
QUEUED = b"+QUEUED\r\n"

#: The set of names each pub/sub command changes.
SUBSCRIBE_KINDS: Dict[str, str] = {
    "SUBSCRIBE": "channels",
    "UNSUBSCRIBE": "channels",
    "PSUBSCRIBE": "patterns",
    "PUNSUBSCRIBE": "patterns",
    "SSUBSCRIBE": "shard_channels",
    "SUNSUBSCRIBE": "shard_channels",
}
_ADDING = frozenset({"SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE"})

# How many frames answer a request (see ConnectionState.expect).
ONE = "one"              # one frame; none while replies are off or skipped
PER_NAME = "per-name"    # (un)subscribe: a confirmation per name, whatever the reply mode
ALWAYS = "always"        # CLIENT REPLY ON: its +OK is sent even after OFF or SKIP
NOTHING = "nothing"      # CLIENT REPLY OFF/SKIP: never answered
RESET_REPLY = "reset"    # +RESET: sent after OFF (RESET turns it off first), not after SKIP
EXEC_REPLY = "exec"      # the array, then what queued subscriptions confirm beyond one frame
FIRST_TIME = "first-time"  # MONITOR: one frame; none on a connection monitoring already


class Rule(NamedTuple):
    """What one command does to the connection."""

    #: The transition applied (a ConnectionState method "_<effect>"), None: changes nothing.
    effect: Optional[str] = None
    #: Arguments it takes, its name included, as Redis counts them: n exactly, -n at least n.
    #: Any other count is refused before anything else (inside MULTI that aborts the
    #: transaction, and an EXEC refused so ends it).
    arity: int = -1
    #: How many frames answer it (one of the names above).
    frames: str = ONE
    #: Run at once inside MULTI; every other command is queued until EXEC.
    runs_in_multi: bool = False
    #: Allowed on a RESP2 connection with subscriptions; every other one gets an error.
    allowed_subscribed: bool = False
    #: Applies when the request is sent rather than when its reply is read (QUIT: the server
    #: reads nothing after it).
    on_request: bool = False
    #: Refused when EXEC runs it (one error frame, no change): a transaction's commands run as
    #: a client that may not block, and this one would turn the connection into a stream.
    refused_in_exec: bool = False


_SUBSCRIBE = Rule("subscription_changed", -2, PER_NAME, allowed_subscribed=True)
_UNSUBSCRIBE = _SUBSCRIBE._replace(arity=-1)

#: Every command that changes the connection or is counted otherwise, by upper-cased name.
#: A command not listed is answered by one frame (none while replies are off or skipped), is
#: queued inside MULTI, and is refused on a RESP2 connection with subscriptions.
RULES: Dict[str, Rule] = {
    "SELECT": Rule("select", 2),
    "AUTH": Rule("auth", -2),
    "HELLO": Rule("hello", -1),
    "READONLY": Rule("readonly", 1),
    "READWRITE": Rule("readwrite", 1),
    "MULTI": Rule("multi", 1, runs_in_multi=True),
    "EXEC": Rule("exec", 1, EXEC_REPLY, runs_in_multi=True),
    "DISCARD": Rule("discard", 1, runs_in_multi=True),
    "WATCH": Rule("watch", -2, runs_in_multi=True),
    "UNWATCH": Rule("unwatch", 1),
    "MONITOR": Rule("monitor", 1, FIRST_TIME, refused_in_exec=True),
    "RESET": Rule("reset", 1, RESET_REPLY, runs_in_multi=True, allowed_subscribed=True),
    "QUIT": Rule("quit", -1, runs_in_multi=True, allowed_subscribed=True, on_request=True),
    "PING": Rule(None, -1, allowed_subscribed=True),
    "SUBSCRIBE": _SUBSCRIBE,
    "UNSUBSCRIBE": _UNSUBSCRIBE,
    "PSUBSCRIBE": _SUBSCRIBE,
    "PUNSUBSCRIBE": _UNSUBSCRIBE,
    "SSUBSCRIBE": _SUBSCRIBE._replace(refused_in_exec=True),
    "SUNSUBSCRIBE": _UNSUBSCRIBE,
}

#: CLIENT subcommands that change the connection.
CLIENT_RULES: Dict[str, Rule] = {
    "SETNAME": Rule("client_setname", 3),
    "NO-EVICT": Rule("client_no_evict", 3),
    "TRACKING": Rule("client_tracking", -3),
}

#: CLIENT REPLY by its mode (any other mode is a syntax error: one frame, no change).
CLIENT_REPLY_RULES: Dict[bytes, Rule] = {
    b"ON": Rule("client_reply", 3, ALWAYS),
    b"OFF": Rule("client_reply", 3, NOTHING),
    b"SKIP": Rule("client_reply", 3, NOTHING),
}

#: The effects a reply read after an upgrade may still have to apply, because they decide how
#: the replies after it are counted (the others are the session's, applied from its own
#: record). A checkpoint names them "_" + effect ("queue": a command queued inside MULTI;
#: "hello_queued": HELLO queued inside MULTI, applied by EXEC).
CARRIED_EFFECTS = frozenset({"queue", "subscription_changed", "client_reply", "client_tracking",
                             "reset", "exec", "hello", "multi", "discard", "monitor",
                             "hello_queued"})

#: Commands that change the connection: a request of any other command, on a connection in
#: the plain state (see ConnectionState.plain), is one frame and changes nothing.
TRACKED_COMMANDS = frozenset(name for name, rule in RULES.items() if rule.effect) | {"CLIENT"}

#: Commands of a transaction: they need every command of the client on one connection.
TRANSACTION_COMMANDS = frozenset(name for name, rule in RULES.items()
                                 if rule.effect in ("multi", "exec", "discard", "watch", "unwatch"))

#: Commands that open a transaction, and those that end one (whatever their reply).
STARTS_TRANSACTION = frozenset(name for name, rule in RULES.items() if rule.effect == "multi")
ENDS_TRANSACTION = frozenset(name for name, rule in RULES.items()
                             if rule.effect in ("exec", "discard", "reset"))

#: Effects whose reply length is only known once its first frame is read.
DECIDED_BY_FIRST_FRAME = frozenset({"exec", "subscription_changed"})

#: Commands that may wait for another client's write (XREAD/XREADGROUP only with BLOCK).
BLOCKING_COMMANDS = frozenset({"BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN",
                               "BZPOPMAX", "BZMPOP", "WAIT", "WAITAOF", "XREAD", "XREADGROUP"})


def rule_for(command: str, args: Sequence[bytes]) -> Optional[Rule]:
    """The rule of a request (command upper-cased, args with the name first); None: plain."""
    rule = RULES.get(command)
    if rule is not None or command != "CLIENT":
        return rule
    if len(args) < 2:
        return None
    sub = args[1].upper()
    if sub == b"REPLY":
        return CLIENT_REPLY_RULES.get(args[2].upper()) if len(args) == 3 else None
    return CLIENT_RULES.get(sub.decode("latin-1"))


def may_block(command: str, args: Sequence[bytes]) -> bool:
    """Whether the server may hold the request until another client writes."""
    if command not in BLOCKING_COMMANDS:
        return False
    if command in ("XREAD", "XREADGROUP"):
        for arg in args[1:]:  # options come before STREAMS; keys and IDs after it
            option = arg.upper()
            if option == b"STREAMS":
                return False
            if option == b"BLOCK":
                return True
        return False
    return True


def own_wait(command: str, args: Sequence[bytes]) -> Optional[float]:
    """How long the server may take on a request by its own terms, in seconds: 0 for most
    commands, a blocking command's timeout, None when it may wait forever (timeout 0)."""
    if not may_block(command, args):
        return 0.0
    try:
        if command in ("XREAD", "XREADGROUP"):
            value = -1.0
            for index, arg in enumerate(args):
                option = arg.upper()
                if option == b"STREAMS":
                    break
                if option == b"BLOCK":
                    value = float(args[index + 1]) / 1000
            if value < 0:
                return 0.0  # no BLOCK option (a key or ID spelt "block")
        elif command == "WAIT":
            value = float(args[2]) / 1000
        elif command == "WAITAOF":
            value = float(args[3]) / 1000
        elif command in ("BLMPOP", "BZMPOP"):
            value = float(args[1])
        else:
            value = float(args[-1])
    except (IndexError, ValueError):
        return 0.0  # refused by the server at once
    return None if value <= 0 else value


Credentials = Optional[Tuple[Optional[bytes], bytes]]


def auth_credentials(args: Sequence[bytes]) -> Credentials:
    """(username or None, password) an AUTH request names; None when its arguments are wrong."""
    if len(args) == 2:
        return None, args[1]
    if len(args) == 3:
        return args[1], args[2]
    return None


class HelloOptions(NamedTuple):
    version: Optional[int]          # None: not given (the protocol stays)
    credentials: Credentials        # AUTH username password
    name: Optional[bytes]           # SETNAME name
    problem: Optional[bytes]        # the error reply Redis gives the request, if it refuses it


def hello_options(args: Sequence[bytes]) -> HelloOptions:
    """What HELLO [protover [AUTH username password] [SETNAME clientname]] asks for."""
    version: Optional[int] = None
    if len(args) > 1:
        try:
            version = int(args[1])
        except ValueError:
            return HelloOptions(None, None, None, resp.error_reply(
                "ERR Protocol version is not an integer or out of range"))
        if version not in (2, 3):
            return HelloOptions(None, None, None, resp.error_reply(
                "NOPROTO sorry, this protocol version is not supported."))
    credentials: Credentials = None
    name: Optional[bytes] = None
    position = 2
    while position < len(args):
        option = args[position].upper()
        if option == b"AUTH" and position + 2 < len(args):
            credentials = (args[position + 1], args[position + 2])
            position += 3
        elif option == b"SETNAME" and position + 1 < len(args):
            name = args[position + 1]
            position += 2
        else:
            return HelloOptions(version, credentials, name, resp.error_reply(
                f"ERR Syntax error in HELLO option '{args[position].decode('latin-1')}'"))
    return HelloOptions(version, credentials, name, None)


def valid_client_name(name: bytes) -> bool:
    """Whether Redis takes a client name (CLIENT SETNAME, HELLO SETNAME): printable ASCII
    without spaces."""
    return all(33 <= byte <= 126 for byte in name)


def is_error(frame: Optional[bytes]) -> bool:
    return frame is not None and frame[:1] in (b"-", b"!")


# What tells a message apart from a reply (see ConnectionState.is_push).
_CONFIRMATION_KINDS = frozenset(kind.lower().encode() for kind in SUBSCRIBE_KINDS)
_RESP2_DELIVERY_PREFIXES = (b"*3\r\n$7\r\nmessage\r\n", b"*4\r\n$8\r\npmessage\r\n",
                            b"*3\r\n$8\r\nsmessage\r\n")
_MONITOR_LINE = re.compile(rb"\+\d+\.\d+ \[")


class Command:
    """A request as the model needs it: the upper-cased name and the arguments."""

    __slots__ = ("command", "args", "raw")

    def __init__(self, args: Sequence[Any], raw: bytes = b"") -> None:
        self.args = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        self.command = self.args[0].decode("latin-1").upper() if self.args else ""
        self.raw = raw or resp.encode_command(self.args)

    def __repr__(self) -> str:
        return f"Command({self.args!r})"


# ---- the state ----------------------------------------------------------------------------------


class ConnectionState:
    """One connection as the server has it.

    expect() is called with each request once every earlier reply has been read (the server
    works through requests in order, so the state then is the server's). It says how many
    frames answer the request and which effect applies once they are read; apply() applies it.
    An effect applies on success only; one whose reply is not sent (CLIENT REPLY OFF/SKIP) is
    assumed to have succeeded unless the request shows it may be refused (an invalid client
    name, a database index that is not a number), and never for credentials or READONLY.
    """

    __slots__ = ("resp_version", "selected_db", "reply_mode", "queued", "aborted", "watching",
                 "channels", "patterns", "shard_channels", "monitor", "tracking", "quitting",
                 "client_name", "auth_username", "auth_password", "readonly", "no_evict")

    def __init__(self) -> None:
        self.resp_version = 2
        self.selected_db = 0
        self.reply_mode = ON
        #: Inside MULTI: the requests the server queued (None: not in a transaction).
        self.queued: Optional[List[Any]] = None
        #: A request was refused while queueing: EXEC will answer EXECABORT.
        self.aborted = False
        self.watching = False
        self.channels: set = set()
        self.patterns: set = set()
        self.shard_channels: set = set()
        self.monitor = False
        self.tracking = False
        #: QUIT was sent: the server reads nothing more.
        self.quitting = False
        self.client_name: Optional[bytes] = None
        self.auth_username: Optional[bytes] = None
        self.auth_password: Optional[bytes] = None
        self.readonly = False
        self.no_evict = False

    # ---- what the state says ---------------------------------------------------------------------

    @property
    def in_multi(self) -> bool:
        return self.queued is not None

    @property
    def subscribed(self) -> bool:
        return bool(self.channels or self.patterns or self.shard_channels)

    @property
    def plain(self) -> bool:
        """Every request not in TRACKED_COMMANDS is answered by one frame and changes nothing."""
        return not (self.reply_mode != ON or self.queued is not None or self.quitting
                    or (self.resp_version == 2 and self.subscribed))

    @property
    def is_default(self) -> bool:
        """Nothing has changed since the connection was opened (what a connection shared by
        several clients stays in)."""
        return (self.resp_version == 2 and not self.selected_db and self.reply_mode == ON
                and self.queued is None and not self.watching and not self.subscribed
                and not self.monitor and not self.tracking and not self.quitting
                and self.client_name is None and self.auth_password is None
                and self.auth_username is None and not self.readonly and not self.no_evict)

    @property
    def pushes_expected(self) -> bool:
        """Frames may arrive that answer no request (messages, MONITOR, invalidations)."""
        return self.monitor or self.tracking or self.subscribed

    def members(self, command: str) -> set:
        return getattr(self, SUBSCRIBE_KINDS[command])

    def is_push(self, frame: bytes) -> bool:
        """Whether a frame the server sent answers no request (a message, a MONITOR line, a
        RESP3 push other than a subscription confirmation)."""
        first = frame[:1]
        if first == b">":
            value = resp.parse_frame(frame)
            kind = value[0] if isinstance(value, list) and value else b""
            return not (isinstance(kind, bytes) and kind.lower() in _CONFIRMATION_KINDS)
        if first == b"*":
            return self.resp_version == 2 and self.subscribed and \
                frame.startswith(_RESP2_DELIVERY_PREFIXES)
        if first == b"+":
            return self.monitor and _MONITOR_LINE.match(frame) is not None
        return False

    # ---- transitions ------------------------------------------------------------------------------

    def expect(self, request: Any) -> Tuple[int, Optional[str]]:
        """(frames that answer `request`, effect to apply once they are read) for a request with
        `command` and `args`, called when every earlier reply has been read. What applies when
        the request is sent (a SKIP used up, QUIT) is applied here."""
        if self.quitting:
            return 0, None  # the server reads nothing after QUIT
        mode = self.reply_mode
        if mode == SKIP:  # used up by this request
            self.reply_mode = ON
        one = 1 if mode == ON else 0
        command = request.command
        args = request.args
        rule = rule_for(command, args)
        if rule is not None and not _arity_fits(rule.arity, len(args)):
            if self.queued is not None:
                self.aborted = True  # EXEC will answer EXECABORT
                if rule.effect == "exec":
                    self._discard(request, [])  # ... and this one does, ending it
            return one, None
        if self.queued is not None and (rule is None or not rule.runs_in_multi):
            return one, "queue"
        if self.resp_version == 2 and self.subscribed and \
                (rule is None or not rule.allowed_subscribed):
            return one, None  # refused with an error
        if rule is None or rule.effect is None:
            return one, None
        if rule.on_request:
            self.apply(rule.effect, request, [])
            return one, None
        frames = rule.frames
        if frames == ONE:
            return one, rule.effect
        if frames == PER_NAME:
            return self._confirmations(command, args), rule.effect
        if frames == ALWAYS:
            return 1, rule.effect
        if frames == NOTHING:
            return 0, rule.effect
        if frames == RESET_REPLY:
            return (0 if mode == SKIP else 1), rule.effect
        if frames == FIRST_TIME:
            return (0, None) if self.monitor else (one, rule.effect)
        # EXEC
        if self.queued is None:
            return one, None  # EXEC without MULTI
        if not one:
            # Its array is not sent, the confirmations of queued (un)subscriptions are.
            return self._exec(request, []), None
        return one, rule.effect

    def _confirmations(self, command: str, args: Sequence[bytes]) -> int:
        names = len(args) - 1
        if names:
            return names
        return max(1, len(self.members(command)))  # one with a null name when there were none

    def first_frame(self, effect: str, request: Any, frame: bytes,
                    count: int) -> Tuple[int, Optional[str]]:
        """For an effect in DECIDED_BY_FIRST_FRAME, once the reply's first frame is read: the
        frames that answer the request in all, and the effect still to apply at the end."""
        if effect == "exec":
            return count + self._exec(request, [frame]), None
        if is_error(frame):
            return 1, None  # refused as a whole (arguments, ACL): one error, no change
        return count, effect

    def apply(self, effect: str, request: Any, frames: List[bytes]) -> None:
        """Apply `effect` of `request` answered by `frames` (none: the reply is not sent)."""
        getattr(self, "_" + effect)(request, frames)

    # Each transition receives the request and the frames that answered it. The reply a
    # transition judges by is the last frame (pushes delivered in front of it come first).

    def _queue(self, request: Any, frames: List[bytes]) -> None:
        if self.queued is None:
            return
        if not frames or frames[-1] == QUEUED:
            if not self.aborted:  # the server keeps nothing once EXEC is bound to fail
                self.queued.append(request)
        elif is_error(frames[-1]):
            self.aborted = True  # refused while queueing: EXEC answers EXECABORT

    def _select(self, request: Any, frames: List[bytes]) -> None:
        args = request.args
        if len(args) != 2 or _failed(frames):
            return
        if frames or args[1].isdigit():  # not answered: a valid index is assumed to be in range
            try:
                self.selected_db = int(args[1])
            except ValueError:
                pass

    def _auth(self, request: Any, frames: List[bytes]) -> None:
        credentials = auth_credentials(request.args)
        if credentials is not None and frames and not _failed(frames):  # never assumed
            self.auth_username, self.auth_password = credentials

    def _hello(self, request: Any, frames: List[bytes]) -> None:
        if _failed(frames):
            return
        options = hello_options(request.args)
        if options.problem is not None:
            return
        if not frames and (options.credentials is not None or (
                options.name is not None and not valid_client_name(options.name))):
            return  # not answered, and it may well have been refused as a whole
        first = frames[-1][:1] if frames else b""
        if first == b"%":
            self.resp_version = 3
        elif first == b"*":
            self.resp_version = 2
        elif options.version is not None:
            self.resp_version = options.version
        if options.credentials is not None:
            self.auth_username, self.auth_password = options.credentials
        if options.name is not None:
            self.client_name = options.name or None

    def _readonly(self, request: Any, frames: List[bytes]) -> None:
        if frames and not _failed(frames):  # never assumed: refused outside cluster mode
            self.readonly = True

    def _readwrite(self, request: Any, frames: List[bytes]) -> None:
        if not _failed(frames):
            self.readonly = False

    def _multi(self, request: Any, frames: List[bytes]) -> None:
        if not _failed(frames) and self.queued is None:
            self.queued = []
            self.aborted = False

    def _exec(self, request: Any, frames: List[bytes]) -> int:
        """The transaction ends, whatever EXEC answers; when it ran, each queued request's
        effect applies with its own result. Returns the frames EXEC sends after its array (not
        answered: the confirmations it sends all the same)."""
        queued = self.queued or []
        self.queued = None
        self.aborted = False
        self.watching = False
        array = frames[0] if frames else None
        if array is None:  # not answered: the queued requests are assumed to have succeeded
            confirmations = 0
            for item in queued:
                count = self._run_queued(item, None)
                rule = rule_for(item.command, item.args)
                if rule is not None and rule.frames == PER_NAME and not rule.refused_in_exec:
                    confirmations += count
            return confirmations
        if array[:1] != b"*" or array.startswith(b"*-1\r\n"):
            return 0  # EXECABORT, or a WATCHed key changed: nothing ran
        results = _elements(array)
        if len(results) != len(queued):
            results = []  # not the requests this EXEC ran: judged as if unanswered
        position = 0
        extra = 0
        for item in queued:
            result = results[position] if position < len(results) else None
            count = self._run_queued(item, result)
            position += count
            extra += count - 1
        return extra

    def _run_queued(self, request: Any, result: Optional[bytes]) -> int:
        """Apply a request EXEC ran, answered by `result` (None: not seen); returns how many
        frames answered it."""
        command = request.command
        rule = rule_for(command, request.args)
        if rule is None or rule.effect is None or rule.on_request or rule.refused_in_exec:
            return 1
        count = 1
        if rule.frames == PER_NAME and not is_error(result):
            count = self._confirmations(command, request.args)
        self.apply(rule.effect, request, [] if result is None else [result])
        return count

    def _discard(self, request: Any, frames: List[bytes]) -> None:
        if not _failed(frames):
            self.queued = None
            self.aborted = False
            self.watching = False

    def _watch(self, request: Any, frames: List[bytes]) -> None:
        if not _failed(frames) and self.queued is None and len(request.args) > 1:
            self.watching = True

    def _unwatch(self, request: Any, frames: List[bytes]) -> None:
        if not _failed(frames):
            self.watching = False

    def _monitor(self, request: Any, frames: List[bytes]) -> None:
        if not _failed(frames):
            self.monitor = True

    def _reset(self, request: Any, frames: List[bytes]) -> None:
        if not _failed(frames):  # it cannot fail on a client's connection
            ConnectionState.__init__(self)

    def _quit(self, request: Any, frames: List[bytes]) -> None:
        self.quitting = True

    def _subscription_changed(self, request: Any, frames: List[bytes]) -> None:
        if frames and is_error(frames[0]):
            return
        members = self.members(request.command)
        names = request.args[1:]
        if request.command in _ADDING:
            members.update(names)
        elif names:
            members.difference_update(names)
        else:
            members.clear()

    def _client_reply(self, request: Any, frames: List[bytes]) -> None:
        if _failed(frames):
            return
        mode = request.args[2].upper()
        if mode == b"ON":
            self.reply_mode = ON
        elif mode == b"OFF":
            self.reply_mode = OFF
        elif self.reply_mode != OFF:
            self.reply_mode = SKIP

    def _client_tracking(self, request: Any, frames: List[bytes]) -> None:
        args = request.args
        if len(args) > 2 and not _failed(frames):
            self.tracking = args[2].upper() == b"ON"

    def _client_setname(self, request: Any, frames: List[bytes]) -> None:
        args = request.args
        if len(args) == 3 and not _failed(frames) and (frames or valid_client_name(args[2])):
            self.client_name = args[2] or None

    def _client_no_evict(self, request: Any, frames: List[bytes]) -> None:
        args = request.args
        if len(args) == 3 and not _failed(frames):
            self.no_evict = args[2].upper() == b"ON"


def _arity_fits(arity: int, count: int) -> bool:
    return count == arity if arity > 0 else count >= -arity


def _failed(frames: List[bytes]) -> bool:
    return bool(frames) and is_error(frames[-1])


def _elements(array: bytes) -> List[bytes]:
    """The element frames of an aggregate frame."""
    return reply_frames(array[array.index(b"\r\n") + 2:])


def reply_frames(raw: bytes) -> List[bytes]:
    """The frames a reply (one or several frames) is made of."""
    if not raw:
        return []
    framer = resp.ReplyFramer()
    framer.feed(raw)
    frames = []
    while True:
        frame = framer.next_frame()
        if frame is None:
            return frames
        frames.append(frame)


# ---- a connection followed from its bytes ---------------------------------------------------------


class Conversation:
    """Follows one connection from the bytes each side sends: which frames answer which
    request, which are pushes, and the state after each reply. For tests and tools; the
    upstream connection does the same with its socket."""

    def __init__(self, state: Optional[ConnectionState] = None) -> None:
        self.state = state or ConnectionState()
        self._requests = resp.RequestFramer()
        self._replies = resp.ReplyFramer()
        #: Requests sent and not completely answered: [request, count or -1, effect, frames].
        self._waiting: Deque[list] = deque()
        #: (request, frames) for every request answered, in order.
        self.answered: List[Tuple[Command, List[bytes]]] = []
        self.pushes: List[bytes] = []

    def send(self, data: bytes) -> List[Command]:
        """Requests the client sent (bytes may end inside a request)."""
        self._requests.feed(data)
        framed, error = self._requests.pop_requests()
        if error is not None:
            raise resp.ProtocolError(error)
        requests = [Command(resp.parse_command(raw) if raw[:1] == b"*"
                            else resp.split_inline(raw.rstrip(b"\r\n")), raw)
                    for raw, _name in framed]
        self._waiting.extend([request, -1, None, []] for request in requests)
        self._settle()
        return requests

    def receive(self, data: bytes) -> List[Tuple[Command, List[bytes]]]:
        """Bytes the server sent: the requests answered by them in full."""
        done_before = len(self.answered)
        self._replies.feed(data)
        while True:
            frame = self._replies.next_frame()
            if frame is None:
                break
            entry = self._waiting[0] if self._waiting else None
            if self.state.is_push(frame):
                self.pushes.append(frame)
                continue
            if entry is None:
                raise AssertionError(f"a reply nobody asked for: {frame[:80]!r}")
            entry[3].append(frame)
            if len(entry[3]) == 1 and entry[2] in DECIDED_BY_FIRST_FRAME:
                entry[1], entry[2] = self.state.first_frame(entry[2], entry[0], frame, entry[1])
            self._settle()
        return self.answered[done_before:]

    @property
    def waiting(self) -> int:
        """Requests whose replies are not all read."""
        return len(self._waiting)

    @property
    def blocked_on(self) -> Optional[Command]:
        """The request the server is answering next when it may hold it until another client
        writes (BLPOP, XREAD BLOCK, WAIT...); None otherwise."""
        if not self._waiting:
            return None
        request = self._waiting[0][0]
        return request if may_block(request.command, request.args) else None

    def _settle(self) -> None:
        """Count the reply of the first waiting request; complete those fully answered."""
        waiting = self._waiting
        while waiting:
            entry = waiting[0]
            if entry[1] < 0:
                entry[1], entry[2] = self.state.expect(entry[0])
            if len(entry[3]) < entry[1]:
                return
            waiting.popleft()
            if entry[2] is not None:
                self.state.apply(entry[2], entry[0], entry[3])
            self.answered.append((entry[0], entry[3]))
