"""Differential testing: the same command scripts sent to Redis directly and through the proxy,
with random command sequences per data type and the rules for comparing their replies."""
