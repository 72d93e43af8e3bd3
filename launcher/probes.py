"""Socket probes run before launching: is a host this machine, does an endpoint answer."""

from __future__ import annotations

import socket
import time

from launcher.problems import UsageProblem
from rdzv import hosts


def is_this_host(host: str) -> bool:
    """Whether `host` names this machine (so a c10d store there is ours to serve, not to reach)."""
    return hosts.is_this_host(host)


def check_reachable(endpoints: list[tuple[str, int]], timeout: float, what: str) -> None:
    """Raise UsageProblem unless one of `endpoints` accepts a TCP connection within `timeout` s."""
    if timeout <= 0:
        return
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while True:
        for host, port in endpoints:
            remaining = deadline - time.monotonic()
            try:
                with socket.create_connection((host, port), timeout=max(0.05, min(remaining, 1.0))):
                    return
            except TimeoutError:
                last_error = "timed out"
            except OSError as exc:
                last_error = exc.strerror or type(exc).__name__
        if time.monotonic() >= deadline:
            break
        # A node that starts a moment before the host is normal; keep trying until the deadline.
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    names = ",".join(f"{h}:{p}" for h, p in endpoints)
    raise UsageProblem(
        f"cannot reach the {what} endpoint {names} ({last_error.lower()} for {timeout:g} s); "
        f"is it running? (--endpoint-check-timeout sets how long to try, 0 skips the check)"
    )
