"""A thin etcd v3 client over our own gRPC stubs (see docs/etcd-client.md).

from rdzv.etcd import EtcdClient, Compare, Op, Session

with EtcdClient("127.0.0.1:2379") as c:
    c.put("/k", "v")
    c.txn([Compare.create_revision("/k") == 0], [Op.put("/k", "v")], [Op.get("/k")])
"""

import os

# gRPC's C core writes its own log lines to stderr (e.g. "E1128 ... Decryption error:
# TSI_DATA_CORRUPTED" around a rejected TLS session, or "I1128 ... Handshake failed"), next to
# the one-line error we give. It reads GRPC_VERBOSITY once, when grpc is first imported: quiet
# it for that import, unless the user chose a level, and put the environment back, so that
# workers started later see the user's own setting. Our messages go through Python logging.
if "GRPC_VERBOSITY" not in os.environ:
    os.environ["GRPC_VERBOSITY"] = "NONE"
    try:
        import grpc  # noqa: F401 - imported here for the side effect above
    finally:
        del os.environ["GRPC_VERBOSITY"]

from rdzv.etcd.client import EtcdClient  # noqa: E402 - after the gRPC set-up above
from rdzv.etcd.errors import (  # noqa: E402
    EtcdAuthError,
    EtcdBusyError,
    EtcdCompactedError,
    EtcdConnectionError,
    EtcdError,
    EtcdLeaseNotFoundError,
    EtcdTLSError,
    EtcdTLSMismatchError,
)
from rdzv.etcd.lease import Lease, LeaseKeeper  # noqa: E402
from rdzv.etcd.ops import Compare, CompareTarget, Op, prefix_end  # noqa: E402
from rdzv.etcd.results import KeyValue, RangeResult, StatusResult, TxnResult  # noqa: E402
from rdzv.etcd.session import Session  # noqa: E402
from rdzv.etcd.watch import Event, Watch, WatchHub  # noqa: E402

__all__ = [
    "Compare",
    "CompareTarget",
    "EtcdAuthError",
    "EtcdBusyError",
    "EtcdClient",
    "EtcdCompactedError",
    "EtcdConnectionError",
    "EtcdError",
    "EtcdLeaseNotFoundError",
    "EtcdTLSError",
    "EtcdTLSMismatchError",
    "Event",
    "KeyValue",
    "Lease",
    "LeaseKeeper",
    "Op",
    "RangeResult",
    "Session",
    "StatusResult",
    "TxnResult",
    "Watch",
    "WatchHub",
    "prefix_end",
]
