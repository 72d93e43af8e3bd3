"""Parsers of single rdzv-launch option values: each returns the value checked, or raises a
UsageProblem that names the option."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable

from launcher.problems import UsageProblem
from rdzv.endpoints import EndpointError, split_endpoint, split_endpoint_list

_STD_RE = re.compile(r"^[0-3]$|^\d+:[0-3](,\d+:[0-3])*$")


def parse_nnodes(text: str) -> tuple[int, int]:
    parts = text.strip().split(":")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageProblem(f"--nnodes must be N or MIN:MAX with whole numbers, got {text!r}")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo < 1:
        raise UsageProblem(f"--nnodes={text}: the minimum number of nodes must be at least 1")
    if lo > hi:
        raise UsageProblem(f"--nnodes={text}: MIN ({lo}) is greater than MAX ({hi})")
    return lo, hi


def parse_rdzv_conf(text: str, check_key: Callable[[str], None] | None = None) -> dict[str, str]:
    """`k=v,k=v` as torch reads it (values stay strings), with a message naming the bad item.
    Once every item has the KEY=VALUE form, `check_key(key)` may refuse a key, before its
    value is looked at (`password=` is refused as a password even when empty)."""
    config: dict[str, str] = {}
    if not text.strip():
        return config
    pairs: list[tuple[str, str]] = []
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageProblem(f"--rdzv-conf: {item.strip()!r} is not KEY=VALUE (expected k1=v1,k2=v2,...)")
        pairs.append((key.strip(), value.strip()))
    for key, value in pairs:
        if check_key is not None:
            check_key(key)
        if not value:
            raise UsageProblem(f"--rdzv-conf: {key!r} has no value")
        if key in config:
            raise UsageProblem(f"--rdzv-conf: {key!r} is given twice")
        config[key] = value
    return config


def parse_std(text: str, option: str) -> str:
    if not _STD_RE.match(text.strip()):
        raise UsageProblem(f"{option} must be 0, 1, 2, 3 or a per-rank map like 0:1,1:2, got {text!r}")
    return text.strip()


def parse_ranks(text: str) -> set[int] | None:
    if not text.strip():
        return None
    try:
        ranks = {int(r) for r in text.split(",")}
    except ValueError:
        raise UsageProblem(f"--local-ranks-filter must be comma-separated integers like 0,1, got {text!r}") from None
    if any(r < 0 for r in ranks):
        raise UsageProblem(f"--local-ranks-filter: local ranks cannot be negative, got {text!r}")
    return ranks


def parse_filters(text: str) -> list[str]:
    """Comma-separated strings; ',,' stands for a literal comma (torchrun's convention)."""
    if not text:
        return []
    items, current, i = [], [], 0
    while i < len(text):
        if text.startswith(",,", i):
            current.append(",")
            i += 2
        elif text[i] == ",":
            items.append("".join(current))
            current, i = [], i + 1
        else:
            current.append(text[i])
            i += 1
    items.append("".join(current))
    return items


def parse_signals(text: str) -> str:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if not isinstance(getattr(signal, n, None), signal.Signals)]
    if unknown or not names:
        raise UsageProblem(
            f"--signals-to-handle: unknown signal name(s) {', '.join(unknown) or repr(text)} (expected e.g. SIGTERM,SIGUSR1)"
        )
    return ",".join(names)


def parse_endpoint(text: str, default_port: int | None, option: str = "--rdzv-endpoint") -> tuple[str, int | None]:
    """HOST[:PORT], [IPv6]:PORT, a bare IPv6 address or an http(s):// URL (the scheme is dropped)."""
    try:
        host, port, _ = split_endpoint(text, default_port)
    except EndpointError as exc:
        raise UsageProblem(f"{option}: {exc}") from None
    return host, port


def parse_endpoint_list(text: str, default_port: int | None, option: str = "--rdzv-endpoint") -> list[tuple[str, int | None]]:
    """A comma-separated list of endpoints (etcd); an empty item is an error."""
    try:
        return [(host, port) for host, port, _ in split_endpoint_list(text, default_port)]
    except EndpointError as exc:
        raise UsageProblem(f"{option}: {exc}") from None
