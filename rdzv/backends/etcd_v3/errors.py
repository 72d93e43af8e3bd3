"""The one place where etcd v3 client errors become torch's rendezvous errors.

Each public method of the v3 backend (and of its feed) wraps its whole body in `etcd_errors`
once, and handles the client errors it can recover from (compaction, a lapsed lease,
best-effort cleanup) inside, before they get here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.distributed.elastic.rendezvous import RendezvousConnectionError

from rdzv.backends.api import StoreBusyError, StoreUnreachableError
from rdzv.etcd import (
    EtcdAuthError,
    EtcdBusyError,
    EtcdConnectionError,
    EtcdError,
    EtcdTLSError,
    EtcdTLSMismatchError,
)


@contextlib.contextmanager
def etcd_errors(where: str) -> Iterator[None]:
    """Client errors leave as rendezvous errors naming the etcd endpoints (`where`)."""
    try:
        yield
    except EtcdTLSMismatchError as exc:
        raise RendezvousConnectionError(f"{where}: {exc}") from exc  # says what to change
    except EtcdTLSError as exc:
        raise RendezvousConnectionError(f"{where}: TLS handshake failed: {exc}") from exc
    except EtcdAuthError as exc:
        raise RendezvousConnectionError(f"{where}: authentication/authorization failed: {exc}") from exc
    except EtcdBusyError as exc:
        # Reached but silent, overloaded or electing a leader: it passes; wait within deadlines.
        raise StoreBusyError(f"{where}: {exc}") from exc
    except EtcdConnectionError as exc:
        # No answer in time (stalled, restarting, no quorum): worth retrying within deadlines.
        raise StoreUnreachableError(f"{where}: {exc}") from exc
    except EtcdError as exc:
        raise RendezvousConnectionError(f"{where}: {exc}") from exc
