"""Load and validate shotover-style `config.yaml` and `topology.yaml`.

Every problem is collected with the file and key it concerns, then all are reported together.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

Address = Tuple[str, int]
#: Where the HTTP observability interface listens: (host, port), or a Unix socket's path.
ObservabilityAddress = Union[Address, str]

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """One or more problems in the configuration; `problems` lists each as a full sentence."""

    def __init__(self, problems: List[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Problems:
    """Collects problems; `where` strings read like `topology.yaml: sources[0].Redis.name`."""

    def __init__(self) -> None:
        self.items: List[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


_UNSET = object()


def take_mapping(value: Any, where: str, problems: Problems, required: Dict[str, Any],
                 optional: Dict[str, Tuple[Any, Any]]) -> Optional[Dict[str, Any]]:
    """Check a YAML mapping's keys and value types; return the values with defaults filled in.

    `required` maps key -> type (or tuple of types); `optional` maps key -> (type, default).
    """
    if value is None and not required:
        value = {}
    if not isinstance(value, dict):
        problems.add(where, f"expected a mapping with keys {sorted(required) + sorted(optional)}, "
                            f"got {_describe(value)}")
        return None
    out: Dict[str, Any] = {}
    ok = True
    # At a file's top level (where is just "file.yaml") the key follows a colon.
    join = ": " if ":" not in where else "."
    for key in value:
        if key not in required and key not in optional:
            valid = ", ".join(sorted(list(required) + list(optional))) or "none"
            problems.add(f"{where}{join}{key}", f"unknown key; valid keys here: {valid}")
            ok = False
    for key, kind in required.items():
        if key not in value:
            problems.add(f"{where}{join}{key}", "required key is missing")
            ok = False
        elif not _is(value[key], kind):
            problems.add(f"{where}{join}{key}",
                         f"expected {_type_name(kind)}, got {_describe(value[key])}")
            ok = False
        else:
            out[key] = value[key]
    for key, (kind, default) in optional.items():
        if key not in value or (value[key] is None and default is None):
            out[key] = default
        elif not _is(value[key], kind):
            problems.add(f"{where}{join}{key}",
                         f"expected {_type_name(kind)}, got {_describe(value[key])}")
            ok = False
        else:
            out[key] = value[key]
    return out if ok else None


def _is(value: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return False
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, kinds)


def _type_name(kind: Any) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", float: "a number",
             list: "a list", dict: "a mapping"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"


def parse_address(text: Any, where: str, problems: Problems) -> Optional[Address]:
    """"host:port" or "[v6]:port" with a numeric IP or a host name, port 0-65535."""
    if not isinstance(text, str):
        problems.add(where, f'expected an address like "127.0.0.1:6379", got {_describe(text)}')
        return None
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    valid = bool(sep) and bool(host) and port_text.isdigit() and 0 <= int(port_text) <= 65535
    if valid and ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            valid = False
    elif valid and not all(part.isalnum() or part == "" or "-" in part
                           for part in host.split(".")):
        valid = False
    if not valid:
        problems.add(where, f'expected an address like "127.0.0.1:6379" or "[::1]:6379", got {text!r}')
        return None
    return host, int(port_text)


def format_address(address: Address) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- config.yaml ------------------------------------------------------------------------------


@dataclass
class Config:
    main_log_level: str = "info"
    observability_interface: Optional[ObservabilityAddress] = None
    control_socket: Optional[str] = None
    path: str = ""
    text: str = ""
    raw: Any = None
    #: When set, `PUT /filter` needs `Authorization: Bearer <this>`.
    observability_token: Optional[str] = None


UNIX_PREFIX = "unix:"
#: The longest Unix socket path the kernel takes (sun_path, less its terminating NUL).
MAX_UNIX_PATH_BYTES = 107
#: A bearer token (RFC 6750's token68), long enough not to be guessed.
MIN_TOKEN_LENGTH = 16
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")


def parse_observability_interface(text: str, where: str,
                                  problems: Problems) -> Optional[ObservabilityAddress]:
    """"host:port", or "unix:/absolute/path" for a Unix socket (returned as the path)."""
    if not text.startswith(UNIX_PREFIX):
        return parse_address(text, where, problems)
    path = text[len(UNIX_PREFIX):]
    if not path.startswith("/") or path.endswith("/") or "\0" in path:
        problems.add(where, f'expected "unix:" followed by the absolute path of a socket file, '
                            f'such as "unix:/run/shotover-g/metrics.sock", got {text!r}')
        return None
    if len(path.encode()) > MAX_UNIX_PATH_BYTES:
        problems.add(where, f"the socket path is {len(path.encode())} bytes long; Unix sockets "
                            f"take at most {MAX_UNIX_PATH_BYTES}")
        return None
    return path


def parse_token(value: Any, where: str, problems: Problems) -> Optional[str]:
    """A bearer token; the messages never repeat it (they end up in logs)."""
    if not isinstance(value, str):
        problems.add(where, f"expected a string, got {type(value).__name__}; put the token in "
                            "quotes")
        return None
    if len(value) < MIN_TOKEN_LENGTH or not _TOKEN.fullmatch(value):
        problems.add(where, f"expected at least {MIN_TOKEN_LENGTH} characters from A-Z, a-z, "
                            "0-9 and - . _ ~ + / (optionally ending in =), such as the output "
                            f"of `openssl rand -hex 32`; the value given is {len(value)} "
                            "characters long" + ("" if _TOKEN.fullmatch(value) or not value
                                                 else " and has other characters"))
        return None
    return value


def parse_config(data: Any, name: str = "config.yaml") -> Tuple[Optional[Config], Problems]:
    problems = Problems()
    values = take_mapping(data, name, problems, required={}, optional={
        "main_log_level": (str, "info"),
        "observability_interface": (str, None),
        # Any YAML value here: parse_token reports a mistyped token without showing it.
        "observability_token": ((str, int, float, bool, list, dict), None),
        "control_socket": (str, None),
    })
    if values is None:
        return None, problems
    address = None
    if values["observability_interface"] is not None:
        address = parse_observability_interface(values["observability_interface"],
                                                f"{name}: observability_interface", problems)
    token = None
    if values["observability_token"] is not None:
        token = parse_token(values["observability_token"], f"{name}: observability_token",
                            problems)
    from .observability import parse_log_filter
    try:
        parse_log_filter(values["main_log_level"])
    except ValueError as error:
        problems.add(f"{name}: main_log_level", str(error))
    if problems.items:
        return None, problems
    return Config(values["main_log_level"], address, values["control_socket"],
                  observability_token=token), problems


def warn_if_token_readable(config: Config) -> None:
    """A token in a file every local user can read protects nothing: say so."""
    if config.observability_token is None or not config.path:
        return
    try:
        mode = os.stat(config.path).st_mode
    except OSError:
        return
    if mode & 0o004:
        log.warning("%s: observability_token: the file is readable by every user, who can then "
                    "change the log filter; make it private (chmod 600 %s)", config.path,
                    config.path)


# ---- topology.yaml ----------------------------------------------------------------------------


@dataclass
class TransformConfig:
    """One chain element: its type (canonical name), display name and parsed settings."""

    type_name: str
    name: str
    settings: Any
    terminating: bool


@dataclass
class TlsAcceptorConfig:
    certificate_path: str
    private_key_path: str
    certificate_authority_path: Optional[str] = None


@dataclass
class SourceConfig:
    kind: str
    name: str
    listen_addr: Address
    connection_limit: int = 512
    hard_connection_limit: bool = False
    timeout: Optional[float] = None
    chain: List[TransformConfig] = field(default_factory=list)
    tls: Optional[TlsAcceptorConfig] = None
    #: Bytes owed to one client (replies and messages not yet taken) beyond which it is
    #: closed, like Redis's client-output-buffer-limit; 0: no limit.
    output_buffer_limit: int = 1024 * 1024 * 1024


@dataclass
class Topology:
    sources: List[SourceConfig]
    path: str = ""
    text: str = ""
    raw: Any = None
    raw: Any = None


SOURCE_KINDS = {"Redis": "Redis", "Valkey": "Redis"}


def parse_chain(value: Any, where: str, problems: Problems) -> List[TransformConfig]:
    """A list of transforms; the last one, and only the last, must be terminating."""
    from .transforms import REGISTRY, canonical_names

    if not isinstance(value, list):
        problems.add(where, f"expected a list of transforms, got {_describe(value)}")
        return []
    if not value:
        problems.add(where, "the chain is empty; it needs at least a terminating transform "
                            "such as RedisSinkSingle")
        return []
    chain: List[TransformConfig] = []
    seen_names: Dict[str, str] = {}
    for index, element in enumerate(value):
        here = f"{where}[{index}]"
        if isinstance(element, str):
            type_name, settings = element, None
        elif isinstance(element, dict) and len(element) == 1:
            type_name, settings = next(iter(element.items()))
        else:
            problems.add(here, f"expected a transform such as `RedisSinkSingle: {{...}}`, "
                               f"got {_describe(element)}")
            continue
        kind = REGISTRY.get(type_name)
        if kind is None:
            problems.add(here, f"unknown transform {type_name!r}; known transforms: "
                               f"{', '.join(canonical_names())}")
            continue
        here = f"{here}.{type_name}"
        name = None
        if isinstance(settings, dict) and "name" in settings and kind.takes_display_name:
            settings = dict(settings)
            name = settings.pop("name")
            if not isinstance(name, str) or not name:
                problems.add(f"{here}.name", f"expected a non-empty string, got {_describe(name)}")
                name = None
        parsed = kind.parse(settings, here, problems)
        display = name or kind.names[0]
        if name is not None:
            if name in seen_names:
                problems.add(f"{here}.name", f"duplicate transform name {name!r} "
                                             f"(also used at {seen_names[name]})")
            seen_names[name] = here
        chain.append(TransformConfig(kind.names[0], display, parsed, kind.terminating))
        last = index == len(value) - 1
        if kind.terminating and not last:
            problems.add(here, f"{type_name} is a terminating transform, so it must be the last "
                               "transform of its chain")
        if last and not kind.terminating:
            problems.add(here, f"the last transform of a chain must be terminating (a sink such as "
                               f"RedisSinkSingle or NullSink), but {type_name} passes requests on")
    return chain


def parse_topology(data: Any, name: str = "topology.yaml") -> Tuple[Optional[Topology], Problems]:
    problems = Problems()
    values = take_mapping(data, name, problems, required={"sources": list}, optional={})
    if values is None:
        return None, problems
    sources: List[SourceConfig] = []
    names: Dict[str, int] = {}
    addresses: Dict[Address, int] = {}
    if not values["sources"]:
        problems.add(f"{name}: sources", "no sources are defined; add a `- Redis:` entry")
    for index, entry in enumerate(values["sources"]):
        where = f"{name}: sources[{index}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            problems.add(where, f"expected one source such as `Redis: {{name: ..., listen_addr: ..., "
                                f"chain: [...]}}`, got {_describe(entry)}")
            continue
        kind, body = next(iter(entry.items()))
        if kind not in SOURCE_KINDS:
            problems.add(where, f"unknown source type {kind!r}; valid: {', '.join(SOURCE_KINDS)}")
            continue
        where = f"{where}.{kind}"
        fields = take_mapping(body, where, problems,
                              required={"name": str, "listen_addr": str, "chain": list},
                              optional={"connection_limit": (int, 512),
                                        "hard_connection_limit": (bool, False),
                                        "timeout": (float, None),
                                        "tls": (dict, None),
                                        "output_buffer_limit": (int, 1024 * 1024 * 1024)})
        if fields is None:
            if isinstance(body, dict) and isinstance(body.get("chain"), list):
                parse_chain(body["chain"], f"{where}.chain", problems)
            continue
        address = parse_address(fields["listen_addr"], f"{where}.listen_addr", problems)
        if fields["connection_limit"] < 1:
            problems.add(f"{where}.connection_limit", "must be at least 1")
        if fields["timeout"] is not None and fields["timeout"] <= 0:
            problems.add(f"{where}.timeout", "must be a positive number of seconds")
        if fields["output_buffer_limit"] < 0:
            problems.add(f"{where}.output_buffer_limit",
                         "must be a number of bytes (0: no limit)")
        tls = None
        if fields["tls"] is not None:
            tls_values = take_mapping(fields["tls"], f"{where}.tls", problems,
                                      required={"certificate_path": str, "private_key_path": str},
                                      optional={"certificate_authority_path": (str, None)})
            if tls_values:
                tls = TlsAcceptorConfig(**tls_values)
        chain = parse_chain(fields["chain"], f"{where}.chain", problems)
        if fields["name"] in names:
            problems.add(f"{where}.name", f"duplicate source name {fields['name']!r} "
                                          f"(also sources[{names[fields['name']]}])")
        names[fields["name"]] = index
        if address is not None and address[1] != 0:
            if address in addresses:
                problems.add(f"{where}.listen_addr", f"{fields['listen_addr']} is already used by "
                                                     f"sources[{addresses[address]}]")
            addresses[address] = index
        if address is not None:
            sources.append(SourceConfig(SOURCE_KINDS[kind], fields["name"], address,
                                        fields["connection_limit"], fields["hard_connection_limit"],
                                        fields["timeout"], chain, tls,
                                        fields["output_buffer_limit"]))
    if problems.items:
        return None, problems
    return Topology(sources), problems


def _read_yaml(path: str, problems: Problems, texts: Dict[str, str]) -> Any:
    import yaml  # here, not at the top: a restoring image gets its config data pre-parsed

    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
        texts[path] = text
        return yaml.safe_load(text)
    except UnicodeDecodeError as error:
        problems.add(path, f"not UTF-8 text: {error}")
    except OSError as error:
        problems.add(path, f"cannot read: {error.strerror or error}")
    except yaml.YAMLError as error:  # type: ignore[union-attr]
        mark = getattr(error, "problem_mark", None)
        position = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problems.add(path, f"not valid YAML{position}: {getattr(error, 'problem', error)}")
    return _UNSET


def load(config_path: str, topology_path: str) -> Tuple[Config, Topology]:
    """Load both files; raise ConfigError listing every problem in either."""
    problems = Problems()
    config = topology = None
    texts: Dict[str, str] = {}
    raw_config = _read_yaml(config_path, problems, texts)
    raw_topology = _read_yaml(topology_path, problems, texts)
    if raw_config is not _UNSET:
        config, found = parse_config(raw_config, config_path)
        problems.items += found.items
    if raw_topology is not _UNSET:
        topology, found = parse_topology(raw_topology, topology_path)
        problems.items += found.items
    if problems.items or config is None or topology is None:
        raise ConfigError(problems.items)
    config.path, config.text, config.raw = config_path, texts[config_path], raw_config
    topology.path, topology.text, topology.raw = topology_path, texts[topology_path], raw_topology
    warn_if_token_readable(config)
    return config, topology


def load_data(config_data: Any, topology_data: Any, config_path: str,
              topology_path: str) -> Tuple[Config, Topology]:
    """Validate already-parsed YAML data (as `load` does for files); raise ConfigError."""
    config, found = parse_config(config_data, config_path)
    topology, found_topology = parse_topology(topology_data, topology_path)
    problems = found.items + found_topology.items
    if problems or config is None or topology is None:
        raise ConfigError(problems)
    config.path, config.raw = config_path, config_data
    topology.path, topology.raw = topology_path, topology_data
    return config, topology


def files_digest(*paths: str) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


ParseFn = Callable[[Any, str, Problems], Any]
