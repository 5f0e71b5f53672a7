"""The `shotover-g` command: start, check, upgrade, status."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Optional

import click

from . import __version__

DEFAULT_CONFIG = "conf/config.yaml"
DEFAULT_TOPOLOGY = "conf/topology.yaml"
DEFAULT_CONTROL_SOCKET = "shotover-g.sock"

log = logging.getLogger("shotover_gevent")


def _control_path(option: Optional[str], config=None) -> str:
    from .lifecycle import control_address

    if option:
        return control_address(option)
    if config is not None and config.control_socket:
        return os.path.abspath(config.control_socket)
    return os.path.abspath(DEFAULT_CONTROL_SOCKET)


def _workers(value: str) -> int:
    if value == "auto":
        from .supervisor import usable_cores

        return usable_cores()
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= 1024:
        raise click.BadParameter(f"expected a number of workers from 1 to 1024, or auto; got "
                                 f"{value!r}", param_hint="'--workers'")
    return count


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="shotover-g",
                      message="%(prog)s %(version)s")
def main() -> None:
    """A Redis-protocol proxy with shotover-style transform chains whose upgrades keep every
    client connection."""


@main.command()
@click.option("-c", "--config", "config_path", default=DEFAULT_CONFIG, show_default=True,
              help="config.yaml (log level, observability_interface, control_socket)")
@click.option("-t", "--topology", "topology_path", default=DEFAULT_TOPOLOGY, show_default=True,
              help="topology.yaml (sources and their transform chains)")
@click.option("--log-format", type=click.Choice(["human", "json"]), default="human",
              show_default=True)
@click.option("--control-socket", default=None,
              help="unix socket for `upgrade` and `status` [default: control_socket from "
                   "config.yaml, else ./shotover-g.sock]")
@click.option("--workers", "workers", default="1", show_default=True,
              help="worker processes serving clients (auto: one per usable core); the process "
                   "started stays as their supervisor")
@click.option("--restore", "restore_path", default=None, hidden=True)
@click.option("--bridge-fd", type=int, default=None, hidden=True)
@click.option("--bridge-pid", type=int, default=None, hidden=True)
@click.option("--rollback", is_flag=True, hidden=True)
def start(config_path: str, topology_path: str, log_format: str, control_socket: Optional[str],
          workers: str, restore_path: Optional[str], bridge_fd: Optional[int],
          bridge_pid: Optional[int], rollback: bool) -> None:
    """Run the proxy in the foreground: a supervisor and its workers."""
    from . import lifecycle, observability

    observability.setup_logging("info", log_format)
    count = _workers(workers)
    if not restore_path and lifecycle.WORKER_ENV not in os.environ:
        _run_supervisor(config_path, topology_path, log_format, control_socket, count)
        return
    if restore_path:
        from .handover.restore import RestoreOptions, restore_or_fall_back

        options = RestoreOptions(os.path.abspath(config_path), os.path.abspath(topology_path),
                                 _control_path(control_socket), log_format, restore_path,
                                 bridge_fd, bridge_pid, rollback)
        proxy = restore_or_fall_back(options)
    else:
        from .app import Proxy
        from .config import ConfigError, load, load_data

        identity = lifecycle.worker_identity()
        try:
            if identity is not None and identity.config_fd is not None:
                # What the supervisor runs on (validated), not the files as they may be now.
                config, topology = load_data(*lifecycle.read_configuration(identity.config_fd),
                                             os.path.abspath(config_path),
                                             os.path.abspath(topology_path))
            else:
                config, topology = load(config_path, topology_path)
        except ConfigError as error:
            for problem in error.problems:
                click.echo(f"error: {problem}", err=True)
            click.echo(f"shotover-g: {len(error.problems)} configuration problem(s); not "
                       "starting", err=True)
            sys.exit(1)
        observability.set_log_filter(config.main_log_level)
        proxy = Proxy(config, topology, _control_path(control_socket, config), log_format)
        try:
            proxy.start_fresh()
        except OSError as error:
            log.critical("cannot start: %s", error.strerror if error.strerror else error)
            sys.exit(1)
    proxy.serve_forever()
    sys.exit(0)


def _run_supervisor(config_path: str, topology_path: str, log_format: str,
                    control_socket: Optional[str], count: int) -> None:
    from . import lifecycle
    from .supervisor import Supervisor, parsed_config, restore_or_roll_back

    state = os.environ.get(lifecycle.SUPERVISOR_ENV)
    control = _control_path(control_socket, parsed_config(None, config_path))
    if state:
        supervisor = restore_or_roll_back(state, config_path, topology_path, control, log_format)
    else:
        supervisor = Supervisor(config_path, topology_path, control, log_format, count)
        try:
            supervisor.start_fresh()
        except OSError as error:
            log.critical("cannot start: %s", error.strerror if error.strerror else error)
            supervisor.request_stop("not starting")
            supervisor.serve_forever()
            sys.exit(1)
        except SystemExit as error:
            if supervisor.children is not None:
                supervisor.request_stop("not starting")
                supervisor.serve_forever()
            click.echo(str(error.code), err=True)
            sys.exit(1)
    supervisor.serve_forever()
    sys.exit(0)


@main.command()
@click.option("-c", "--config", "config_path", default=DEFAULT_CONFIG, show_default=True)
@click.option("-t", "--topology", "topology_path", default=DEFAULT_TOPOLOGY, show_default=True)
@click.option("--checkpoint-format", type=int, default=None,
              help="also check that this version reads checkpoints of this format")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def check(config_path: str, topology_path: str, checkpoint_format: Optional[int],
          as_json: bool) -> None:
    """Validate config.yaml and topology.yaml; print every problem. Exit 0 if valid, else 1."""
    from .config import ConfigError, load
    from .handover import checkpoint

    problems = []
    loaded = None
    try:
        loaded = load(config_path, topology_path)
    except ConfigError as error:
        problems = list(error.problems)
    if checkpoint_format is not None and checkpoint_format > checkpoint.FORMAT:
        problems.append(f"this version ({__version__}) reads checkpoint formats up to "
                        f"{checkpoint.FORMAT}, not {checkpoint_format}")
    if checkpoint_format is not None and not problems:
        _precompile_package()
    if as_json:
        answer = {"ok": not problems, "version": __version__,
                  "checkpoint_format": checkpoint.FORMAT, "problems": problems,
                  "sys_path": [p for p in sys.path if p],
                  "package_root": os.path.dirname(os.path.dirname(
                      os.path.abspath(__file__)))}
        if loaded is not None:
            # The validated data, so that an upgrade's new image need not parse YAML again.
            answer["config_data"], answer["topology_data"] = loaded[0].raw, loaded[1].raw
        try:
            click.echo(json.dumps(answer))
        except (TypeError, ValueError):
            answer.pop("config_data", None)
            answer.pop("topology_data", None)
            click.echo(json.dumps(answer))
    else:
        for problem in problems:
            click.echo(f"error: {problem}")
        if problems:
            click.echo(f"{len(problems)} problem(s) found")
        else:
            click.echo(f"{config_path} and {topology_path} are valid")
    sys.exit(1 if problems else 0)


def _precompile_package() -> None:
    """Byte-compile this package before an upgrade execs it: without .pyc files (an editable
    install run with PYTHONDONTWRITEBYTECODE, say) every module would be compiled from source
    inside the client-visible pause. Up-to-date files are skipped; failures only cost time."""
    import compileall

    package_dir = os.path.dirname(os.path.abspath(__file__))
    try:
        compileall.compile_dir(package_dir, quiet=2, workers=1)
    except OSError:
        pass


@main.command()
@click.option("--control-socket", default=DEFAULT_CONTROL_SOCKET, show_default=True)
@click.option("--python", "python", default=None,
              help="interpreter whose installed shotover_gevent is the new version "
                   "[default: the one the proxy runs on]")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="seconds to wait for the rare connection that cannot be handed over at once "
                   "(a batch inside a Tee, Coalesce or cluster chain); the rest never waits")
@click.option("--tls-drain-timeout", type=click.FloatRange(min=0), default=3600.0,
              show_default=True,
              help="seconds the previous version keeps serving TLS clients (whose encryption "
                   "state cannot move) before closing those still connected")
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="seconds the new version gets to take over the connections; past that the "
                   "previous version is restored")
@click.option("--keep-checkpoint", type=click.Path(dir_okay=False), default=None,
              help="keep a copy of the checkpoint at this path (with several workers, one per "
                   "worker: PATH.w1, PATH.w2...)")
@click.option("--parallel", type=click.IntRange(min=1, max=1024), default=1, show_default=True,
              help="workers upgraded at once")
def upgrade(control_socket: str, python: Optional[str], drain_timeout: float,
            tls_drain_timeout: float, timeout: float, keep_checkpoint: Optional[str],
            parallel: int) -> None:
    """Replace the running proxy with a new version in place, keeping every connection."""
    from .handover.control import ControlError, request

    if python is not None:
        python = os.path.abspath(python) if os.sep in python else python
    if keep_checkpoint:
        directory = os.path.dirname(os.path.abspath(keep_checkpoint))
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            click.echo(f"shotover-g upgrade: cannot keep the checkpoint at "
                       f"{os.path.abspath(keep_checkpoint)}: {directory} is not a writable "
                       "directory; nothing was done", err=True)
            sys.exit(2)
    message = {"command": "upgrade", "python": python, "drain_timeout": drain_timeout,
               "tls_drain_timeout": tls_drain_timeout,
               "keep_checkpoint": os.path.abspath(keep_checkpoint) if keep_checkpoint else None,
               "restore_timeout": timeout}
    if parallel != 1:
        message["parallel"] = parallel

    began = time.monotonic()

    def show(event: dict) -> None:
        # Timed here: the stages come from the old version and then from the new one.
        if event.get("event") == "stage":
            elapsed_ms = (time.monotonic() - began) * 1000
            click.echo(f"[{elapsed_ms:>8.1f} ms] {event['stage']}: {event['detail']}")

    try:
        # The bridge gives the new image `timeout` seconds to adopt the connections, and a
        # roll-back after that still reports here: wait a little longer than that.
        result = request(os.path.abspath(control_socket), message, show, timeout + 30)
    except ControlError as error:
        click.echo(f"shotover-g upgrade: {error}", err=True)
        if "cannot reach" in str(error):
            sys.exit(2)
        click.echo("shotover-g upgrade: the outcome is unknown; `shotover-g status` shows "
                   "which version serves and the last upgrade's result", err=True)
        sys.exit(1)
    if result.get("event") == "error":
        click.echo(f"shotover-g upgrade: {result.get('error')}", err=True)
        sys.exit(1)
    click.echo(result.get("summary", json.dumps(result)))
    sys.exit(0 if result.get("ok") else 1)


@main.command()
@click.option("--control-socket", default=DEFAULT_CONTROL_SOCKET, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def status(control_socket: str, as_json: bool) -> None:
    """Version, pid, generation, uptime and connections of the running proxy."""
    from .handover.control import ControlError, request

    try:
        result = request(os.path.abspath(control_socket), {"command": "status"}, lambda e: None,
                         10.0)
    except ControlError as error:
        click.echo(f"shotover-g status: {error}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"version     {result['version']}")
    click.echo(f"pid         {result['pid']}")
    click.echo(f"generation  {result['generation']}")
    click.echo(f"uptime      {result['uptime_seconds']:.0f} s")
    for name, source in result["sources"].items():
        click.echo(f"source      {name} on {source['address']}: {source['connections']} "
                   "connections")
    for worker in result.get("workers") or ():
        if "error" in worker:
            click.echo(f"worker {worker['index']}    pid {worker['pid']} ({worker['state']}): "
                       f"{worker['error']}")
            continue
        per_source = ", ".join(f"{n} {c}" for n, c in (worker.get("sources") or {}).items())
        click.echo(f"worker {worker['index']}    pid {worker['pid']}, version "
                   f"{worker.get('version')}, generation {worker.get('generation')}, "
                   f"connections: {per_source or 'none'}, restarts {worker.get('restarts', 0)}")
    for duck in result.get("lame_ducks") or ():
        click.echo(f"previous    pid {duck['pid']} (version {duck.get('version', '?')}) still "
                   f"serves {duck.get('tls_connections', '?')} TLS connections, at most "
                   f"{max(0, duck.get('until', 0) - time.time()):.0f} s more")
    if result.get("last_upgrade"):
        click.echo(f"last upgrade {result['last_upgrade'].get('summary')}")
