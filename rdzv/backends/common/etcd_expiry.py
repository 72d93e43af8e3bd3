"""When a node that stopped without leaving is seen gone on etcd (v3 leases and v2 TTL keys
alike): etcd expires keys on a 500 ms tick, and the delete then reaches every watch."""

from __future__ import annotations

EXPIRY_SLACK = 1.0  # seconds beyond the TTL: etcd's expiry tick and the watch event


def seen_gone_within(ttl: float) -> float:
    """Seconds within which a key on a lease (or TTL) of `ttl` seconds is seen gone."""
    return ttl + EXPIRY_SLACK
