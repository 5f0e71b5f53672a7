"""The package's one compiled part: request framing in C (shotover_gevent/protocol/_scan.c).

It is optional: where it cannot be built, the same framing runs in Python (resp.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("shotover_gevent.protocol._scan",
                             ["shotover_gevent/protocol/_scan.c"], optional=True)])
