"""Read-only views of the runs on an etcd (for `rdzv status`), and removal of a run (`rdzv clean`).

Works on the etcd v3 key layout of `rdzv.backends.etcd_v3` and needs no torch.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from rdzv.etcd import EtcdClient, EtcdError
from rdzv.rendezvous.model import NodeInfo, RoundRecord
from rdzv.rendezvous.settings import password_from

DEFAULT_PREFIX = "/rdzv"


def _password(conn: dict[str, Any]) -> str | None:
    # Ops commands also take `password=` (e.g. from PET_RDZV_CONF, never argv); else as the handler.
    return str(conn["password"]) if conn.get("password") else password_from(conn)


def _client(endpoint: str, conn: dict[str, Any]) -> EtcdClient:
    user = conn.get("user")
    return EtcdClient(
        endpoint,
        timeout=float(conn.get("timeout") or 5.0),
        connect_timeout=min(float(conn.get("timeout") or 5.0), 3.0),
        ca_cert=conn.get("cacert") or conn.get("ca_cert"),
        cert=conn.get("cert"),
        key=conn.get("key"),
        tls=conn.get("tls"),
        user=user,
        password=_password(conn) if user else None,
    )


def _norm(prefix: str) -> str:
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    return prefix


def list_runs(endpoint: str, prefix: str = DEFAULT_PREFIX, **conn: Any) -> list[dict[str, Any]]:
    """Every run under `prefix`, each described as by `describe_run`."""
    root = _norm(prefix) + "/"
    with _client(endpoint, conn) as client:
        keys = client.range(root, prefix=True, keys_only=True).kvs
        run_ids = sorted({kv.key.decode()[len(root) :].split("/", 1)[0] for kv in keys})
        return [_describe(client, prefix, run_id) for run_id in run_ids if run_id]


def describe_run(endpoint: str, run_id: str, prefix: str = DEFAULT_PREFIX, **conn: Any) -> dict[str, Any]:
    """Round, members (host, pid, node rank, lease time left), waiting nodes, spares, closed."""
    with _client(endpoint, conn) as client:
        return _describe(client, prefix, run_id)


def _describe(client: EtcdClient, prefix: str, run_id: str) -> dict[str, Any]:
    run = f"{_norm(prefix)}/{run_id}/"
    kvs = client.range(run, prefix=True).kvs
    sealed: RoundRecord | None = None
    closed = False
    coordinators: dict[int, str] = {}
    nodes: list[tuple[NodeInfo, int]] = []
    store_keys = 0
    for kv in kvs:
        rel = kv.key.decode()[len(run) :]
        if rel == "ctl/current":
            sealed = RoundRecord.decode(kv.value, kv.mod_revision)
        elif rel == "ctl/closed":
            closed = True
        elif rel.startswith("ctl/coord/"):
            coordinators[int(rel.rsplit("/", 1)[1])] = kv.value.decode()
        elif rel.startswith("node/"):
            with contextlib.suppress(ValueError, TypeError, json.JSONDecodeError):
                nodes.append((NodeInfo.decode(kv.value), kv.lease))
        elif rel.startswith("store/"):
            store_keys += 1
    ranks = {nid: r for r, nid in enumerate(sealed.ids)} if sealed else {}
    members, waiting, spares = [], [], []
    for info, lease in sorted(nodes, key=lambda n: ranks.get(n[0].node_id, 1 << 30)):
        ttl: int | None = None
        if lease:
            with contextlib.suppress(EtcdError):
                ttl = client.lease_time_to_live(lease)
        row = {
            "node_id": info.node_id,
            "host": info.host,
            "addr": info.addr,
            "pid": info.pid,
            "node_rank": ranks.get(info.node_id),
            "local_world_size": info.local_world_size,
            "wants_round": info.want,
            "lease_ttl_left": ttl,
        }
        if info.node_id in ranks:
            members.append(row)
        elif sealed is not None and sealed.full:
            spares.append(row)
        else:
            waiting.append(row)
    live = {m["node_id"] for m in members}
    return {
        "run_id": run_id,
        "round": sealed.round if sealed else 0,
        "world_size": sealed.world_size if sealed else 0,
        "min_nodes": sealed.min_nodes if sealed else None,
        "max_nodes": sealed.max_nodes if sealed else None,
        "master": f"{sealed.master_addr}:{sealed.master_port}" if sealed else None,
        "closed": closed,
        "members": members,
        "lost_members": [nid for nid in (sealed.ids if sealed else ()) if nid not in live],
        "waiting": waiting,
        "spares": spares,
        "coordinators": {str(r): nid for r, nid in sorted(coordinators.items())},
        "store_keys": store_keys,
        "keys": len(kvs),
    }


def clean_run(
    endpoint: str, run_id: str, prefix: str = DEFAULT_PREFIX, *, force: bool = False, **conn: Any
) -> int:
    """Delete a run's keys; returns how many. Refuses while nodes are alive unless `force`."""
    if not run_id or "/" in run_id:
        raise ValueError(f"invalid run id {run_id!r}")
    run = f"{_norm(prefix)}/{run_id}/"
    with _client(endpoint, conn) as client:
        live = client.range(run + "node/", prefix=True, count_only=True).count
        if live and not force:
            raise RuntimeError(
                f"run '{run_id}' still has {live} live node(s); stop them first or use --force"
            )
        lease = client.get(run + "ctl/lease")
        deleted = client.delete(run, prefix=True, idempotent=True)
        if lease is not None:
            with contextlib.suppress(EtcdError, ValueError):
                client.lease_revoke(int(lease.value), idempotent=True)
        return deleted
