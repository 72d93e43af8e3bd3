"""A thin etcd v3 client over our own gRPC stubs (see docs/etcd-client.md).

from rdzv.etcd import EtcdClient, Compare, Op, Session

with EtcdClient("127.0.0.1:2379") as c:
    c.put("/k", "v")
    c.txn([Compare.create_revision("/k") == 0], [Op.put("/k", "v")], [Op.get("/k")])
"""

from rdzv.etcd.client import (
    Compare,
    CompareTarget,
    EtcdClient,
    Op,
    RangeResult,
    StatusResult,
    TxnResult,
    prefix_end,
)
from rdzv.etcd.errors import (
    EtcdAuthError,
    EtcdCompactedError,
    EtcdConnectionError,
    EtcdError,
    EtcdLeaseNotFoundError,
    EtcdTLSError,
)
from rdzv.etcd.lease import Lease, LeaseKeeper
from rdzv.etcd.session import Session
from rdzv.etcd.watch import Event, KeyValue, Watch, WatchHub

__all__ = [
    "Compare",
    "CompareTarget",
    "EtcdAuthError",
    "EtcdClient",
    "EtcdCompactedError",
    "EtcdConnectionError",
    "EtcdError",
    "EtcdLeaseNotFoundError",
    "EtcdTLSError",
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
