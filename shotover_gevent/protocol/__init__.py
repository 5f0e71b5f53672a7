"""The Redis wire protocol, without I/O: framing, parsing and encoding of RESP2/RESP3."""
