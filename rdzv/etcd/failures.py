"""How a call that failed on every member is reported: which members said what, and whether
etcd was reached but not serving (`EtcdBusyError`, worth waiting for) or not reached at all."""

from __future__ import annotations

from collections.abc import Sequence

from rdzv.etcd.endpoints import Endpoint
from rdzv.etcd.errors import EtcdBusyError, EtcdConnectionError, busy_cause, is_silent_endpoint
from rdzv.etcd.probe import PROBE_TIMEOUT, accepts_connections


def is_busy(address: str, cause: str, connect_timeout: float) -> bool:
    """Whether a member's failure means it is there but not serving: it said so, or it
    accepts connections and stays silent (a connect that timed out is checked with one TCP
    probe: a dropped route or a wrong address is no etcd in trouble)."""
    if busy_cause(cause) is not None or cause.startswith("no answer within"):
        return True
    return is_silent_endpoint(cause) and accepts_connections(address, min(connect_timeout, PROBE_TIMEOUT))


def describe(endpoints: Sequence[Endpoint], failures: dict[str, str], state: str = "unreachable") -> str:
    if len(endpoints) == 1:
        addr = endpoints[0].address
        return f"etcd at {addr} {state}: {failures.get(addr, 'no answer')}"
    parts = [f"{e.address} ({failures.get(e.address, 'not tried')})" for e in endpoints]
    return f"etcd {state}: " + ", ".join(parts)


def gave_up(
    endpoints: Sequence[Endpoint],
    current: str,
    failures: dict[str, str],
    connect_timeout: float,
    default: str | None = None,
) -> EtcdConnectionError:
    """The error for a call that ran out of time: `EtcdBusyError` when some member was reached
    and silent or busy, else refused or unresolvable everywhere. `default`: the cause named
    for the `current` endpoint when no member was tried."""
    if not failures and default:
        failures = {current: default}
    if any(is_busy(address, cause, connect_timeout) for address, cause in failures.items()):
        return EtcdBusyError(describe(endpoints, failures, "not answering"), code="UNAVAILABLE")
    return EtcdConnectionError(describe(endpoints, failures), code="UNAVAILABLE")
