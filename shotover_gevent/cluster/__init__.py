"""Redis Cluster support for the cluster sink: slot hashing, the slot map, node connections
and the table that says where each command goes."""
