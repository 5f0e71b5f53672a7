"""`python -m shotover_gevent` runs the `shotover-g` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="shotover-g")
