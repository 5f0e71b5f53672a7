"""Entry point of an image exec'ed by an upgrade: reads the machine-written arguments without the
CLI framework (every millisecond here is client-visible blackout) and restores."""

from __future__ import annotations

import gc
import os
import sys
from typing import Dict, List

_VALUED = {"-c", "--config", "-t", "--topology", "--log-format", "--control-socket", "--restore",
           "--bridge-fd", "--bridge-pid"}


def parse(argv: List[str]) -> Dict[str, object]:
    options: Dict[str, object] = {"--rollback": False}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--rollback":
            options["--rollback"] = True
            i += 1
        elif arg in _VALUED and i + 1 < len(argv):
            options[arg] = argv[i + 1]
            i += 2
        else:
            raise SystemExit(f"shotover-g: unexpected argument {arg!r} on the restore path")
    return options


def main(argv: List[str]) -> None:
    # No garbage collection until the catch-up after the pause is over (restore turns it back
    # on): imports and adopting thousands of connections allocate a great deal, and a full
    # collection in the middle would lengthen the clients' wait.
    gc.disable()
    from .. import observability
    from ..lifecycle import control_address
    from .restore import RestoreOptions, restore_or_fall_back

    options = parse(argv)
    log_format = str(options.get("--log-format", "human"))
    observability.setup_logging("info", log_format)

    def number(key: str):
        value = options.get(key)
        return int(value) if value is not None else None

    restore_options = RestoreOptions(
        config_path=os.path.abspath(str(options.get("-c", options.get("--config",
                                                                       "conf/config.yaml")))),
        topology_path=os.path.abspath(str(options.get("-t", options.get("--topology",
                                                                         "conf/topology.yaml")))),
        control_path=control_address(str(options.get("--control-socket", "shotover-g.sock"))),
        log_format=log_format, restore_path=str(options["--restore"]),
        bridge_fd=number("--bridge-fd"), bridge_pid=number("--bridge-pid"),
        rollback=bool(options["--rollback"]))
    restore_or_fall_back(restore_options).serve_forever()
    sys.exit(0)
