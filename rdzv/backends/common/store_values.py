"""Values as torch's `Store` API hands them over, turned into the bytes our stores keep."""

from __future__ import annotations


def to_bytes(value: str | bytes | list[int]) -> bytes:
    """torch passes Store values as str, bytes or a list of ints."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return bytes(value)
