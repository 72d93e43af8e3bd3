"""Decoding what is stored under a run's prefix, strictly: anything there may have been written
by someone else (a person with etcdctl, another tool, a future version), so every field is
checked and `RecordError` is raised instead of whatever `json` or a constructor would raise.
Also the per-process note of keys already warned about (one line per bad key)."""

from __future__ import annotations

import json
import math
import threading

FORMAT = 1  # "v" of the records; a record without it is read as version 1
MAX_NODE_RECORD = 16 * 1024  # a node record is ~200 bytes
MAX_ROUND_RECORD = 1024 * 1024  # ids and hosts: ~80 bytes per node with 64-character hosts
MAX_NODE_ID = 128


class RecordError(ValueError):
    """A stored value that does not decode: not JSON, a missing or mistyped field, an unknown
    version, too big. The message says what is wrong; the caller knows (and names) the key."""


def document(raw: bytes | str, limit: int, versions: tuple[int, ...] = (FORMAT,)) -> dict[str, object]:
    if len(raw) > limit:
        raise RecordError(f"{len(raw)} bytes, more than the {limit} a record may have")
    try:
        doc = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise RecordError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RecordError(f"not a JSON object but {type(doc).__name__}")
    version = doc.pop("v", FORMAT)
    if version not in versions or isinstance(version, bool):
        known = " and ".join(map(str, versions))
        raise RecordError(f"unknown record version {version!r} (this rdzv reads version {known})")
    doc["_version"] = version
    return doc


def int_field(doc: dict[str, object], name: str, low: int = 0, high: int | None = None) -> int:
    value = doc.get(name)
    # bool is an int to Python, never to us
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise RecordError(f"field {name!r} must be an integer {bound}, not {value!r}"[:200])
    return value


def optional_int_field(doc: dict[str, object], name: str) -> int | None:
    return None if doc.get(name) is None else int_field(doc, name)


def str_field(doc: dict[str, object], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} must be a string, not {value!r}"[:200])
    return value


def parse_node_id(raw: bytes | str) -> str:
    """A node id as stored in a coordinator claim: short, printable, no separators."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise RecordError("node id is not UTF-8") from None
    if not text or len(text) > MAX_NODE_ID or not text.isprintable() or any(c in text for c in " /\t"):
        raise RecordError(f"not a node id: {text[:60]!r}")
    return text


def parse_node_ids(listed: list[str]) -> tuple[str, ...]:
    """`parse_node_id` for every id of a round record, checked at once: every member decodes
    the sealed record, and one call per id made that O(N) Python calls per node (the rules are
    the same: a joined string is printable, without separators, exactly when every id is)."""
    joined = ",".join(listed)
    if (
        not listed
        or min(map(len, listed)) == 0
        or max(map(len, listed)) > MAX_NODE_ID
        or not joined.isprintable()
        or any(c in joined for c in " /\t")
    ):
        return tuple(parse_node_id(i) for i in listed)  # names the first bad one
    return tuple(listed)


def parse_round_no(text: str) -> int:
    """A round number from a key name (zero-padded digits)."""
    if not text.isdigit() or not text.isascii():
        raise RecordError(f"not a round number: {text[:60]!r}")
    return int(text)


def parse_number(raw: bytes | str, what: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise RecordError(f"{what} is not a number: {raw[:60]!r}") from None
    if not math.isfinite(value):
        raise RecordError(f"{what} is not finite: {value!r}")
    return value


def parse_lease_id(raw: bytes | str) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise RecordError(f"lease id is not an integer: {raw[:60]!r}") from None
    if value <= 0 or value >= 1 << 63:
        raise RecordError(f"lease id out of range: {value}")
    return value



# and one line naming it is enough. Bounded so a flood of bad keys cannot grow it forever.
_warned: set[str] = set()
_warned_lock = threading.Lock()
_WARNED_MAX = 1024


def first_warning(key: str) -> bool:
    with _warned_lock:
        if key in _warned:
            return False
        if len(_warned) >= _WARNED_MAX:
            _warned.clear()
        _warned.add(key)
        return True


def forget_warning(key: str) -> None:
    with _warned_lock:
        _warned.discard(key)  # valid again: warn anew if it breaks again

