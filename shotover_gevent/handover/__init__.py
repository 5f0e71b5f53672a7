"""Handing a running proxy's sockets over to its successor across exec."""
