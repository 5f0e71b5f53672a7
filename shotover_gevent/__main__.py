"""`python -m shotover_gevent` runs the `shotover-g` command.

An upgrade execs `start --restore ...`; that path skips the CLI framework to shorten the blackout.
"""

import sys


def _run() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "start" and "--restore" in sys.argv:
        from .handover.fastboot import main as restore_main

        restore_main(sys.argv[2:])
        return
    from .cli import main

    main(prog_name="shotover-g")


if __name__ == "__main__":
    _run()
