"""The guardian: started just before an upgrade's exec, it holds copies of every handed-over fd
and waits for the new image to say "adopted". If the new image dies (or hangs) first, the
guardian execs the previous version onto the same checkpoint, so no client is dropped."""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="shotover-g-guardian")
    parser.add_argument("--pipe-fd", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True, help="the process being upgraded")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("rollback_argv", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    rollback_argv = [a for a in options.rollback_argv if a != "--"] if \
        options.rollback_argv[:1] == ["--"] else options.rollback_argv
    # A terminal's Ctrl-C or a service manager's stop aimed at the proxy must not kill us midway.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    deadline = time.monotonic() + options.timeout
    received = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            reason = f"the new version did not adopt the connections within {options.timeout:g} s"
            try:
                os.kill(options.pid, signal.SIGKILL)
            except OSError:
                pass
            break
        ready, _, _ = select.select([options.pipe_fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(options.pipe_fd, 64)
        if chunk:
            received += chunk
            if b"adopted" in received or b"abort" in received:
                return 0
            continue
        reason = "the new version exited before adopting the connections"
        break
    os.close(options.pipe_fd)
    sys.stderr.write(f"shotover-g guardian: {reason}; restoring the previous version\n")
    sys.stderr.flush()
    os.environ["SHOTOVER_G_ROLLBACK_REASON"] = reason
    os.execv(rollback_argv[0], rollback_argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
