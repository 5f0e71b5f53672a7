"""shotover-gevent: a Redis-protocol proxy whose upgrades keep every client connection.

The package version below is the one `shotover-g --version` prints and checkpoints record.
"""

__version__ = "0.1.0"
