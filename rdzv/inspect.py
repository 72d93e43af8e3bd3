"""Read-only views of the runs on an etcd (for `rdzv status`), and removal of a run (`rdzv clean`).

Works on the etcd v3 key layout of `rdzv.backends.etcd_v3` and needs no torch. Keys that do not
decode (written by hand, by another tool) never make a command fail: the run is shown with them
listed under `corrupt`, and a node record among them is not counted as a node.
"""

from __future__ import annotations

import contextlib
from typing import Any

from rdzv.etcd import EtcdClient, EtcdError, KeyValue
from rdzv.rendezvous.model import (
    NodeInfo,
    RecordError,
    RoundRecord,
    parse_lease_id,
    parse_node_id,
    parse_number,
    parse_round_no,
)
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


class RunNotFound(LookupError):
    """No key of the run exists under the prefix."""


def list_runs(endpoint: str, prefix: str = DEFAULT_PREFIX, **conn: Any) -> list[dict[str, Any]]:
    """Every run under `prefix`, each described as by `describe_run`."""
    root = _norm(prefix) + "/"
    with _client(endpoint, conn) as client:
        keys = client.range(root, prefix=True, keys_only=True).kvs
        # A run is a directory: a stray key right under the prefix is not one.
        rels = (kv.key.decode(errors="replace")[len(root) :] for kv in keys)
        run_ids = sorted({rel.split("/", 1)[0] for rel in rels if "/" in rel})
        return [_describe_or_flag(client, prefix, run_id) for run_id in run_ids if run_id]


def describe_run(endpoint: str, run_id: str, prefix: str = DEFAULT_PREFIX, **conn: Any) -> dict[str, Any]:
    """Round, members (host, pid, node rank, lease time left), waiting nodes, spares, closed.
    Raises RunNotFound when the run has no keys."""
    with _client(endpoint, conn) as client:
        run = _describe(client, prefix, run_id)
    if not run["keys"]:
        raise RunNotFound(f"no run {run_id!r} under {_norm(prefix) or '/'} at {endpoint}")
    return run


def _describe_or_flag(client: EtcdClient, prefix: str, run_id: str) -> dict[str, Any]:
    # One run that cannot be described must not hide the others.
    try:
        return _describe(client, prefix, run_id)
    except (ValueError, KeyError, TypeError) as exc:
        return {"run_id": run_id, "corrupt": [f"cannot describe the run: {exc}"]}


def _check(rel: str, kv: KeyValue) -> None:
    """Raise RecordError if a control key the description does not use is not what the handler
    writes there (the ones it uses are decoded where they are used)."""
    if rel == "ctl/closed" and kv.value != b"1":
        raise RecordError(f"a closed marker holds 1, not {kv.value[:60]!r}")
    if rel.startswith("ctl/lastcall/"):
        parse_round_no(rel[len("ctl/lastcall/") :])
        parse_number(kv.value, "last call deadline")
    elif rel == "ctl/lease":
        parse_lease_id(kv.value)


def _describe(client: EtcdClient, prefix: str, run_id: str) -> dict[str, Any]:
    run = f"{_norm(prefix)}/{run_id}/"
    kvs = client.range(run, prefix=True).kvs
    sealed: RoundRecord | None = None
    closed = False
    coordinators: dict[int, str] = {}
    nodes: list[tuple[NodeInfo, int]] = []
    store_keys = 0
    corrupt: list[str] = []
    for kv in kvs:
        key = kv.key.decode(errors="replace")
        rel = key[len(run) :]
        try:
            _check(rel, kv)
            if rel == "ctl/current":
                sealed = RoundRecord.decode(kv.value, kv.mod_revision)
            elif rel == "ctl/closed":
                closed = True
            elif rel.startswith("ctl/coord/"):
                coordinators[parse_round_no(rel[len("ctl/coord/") :])] = parse_node_id(kv.value)
            elif rel.startswith("node/"):
                nodes.append((_node(rel, kv), kv.lease))
            elif rel.startswith("store/"):
                store_keys += 1
        except RecordError as exc:
            corrupt.append(f"{key} ({exc})")
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
        "corrupt": corrupt,
    }


def _node(rel: str, kv: KeyValue) -> NodeInfo:
    info = NodeInfo.decode(kv.value)
    if info.node_id != rel[len("node/") :]:
        raise RecordError(f"it names node {info.node_id!r}")
    return info


def _live_nodes(client: EtcdClient, run: str) -> int:
    """Node records of a run that belong to running nodes: records that decode and whose lease
    is alive. A record that does not decode is no node, one without a lease none that runs."""
    live = 0
    for kv in client.range(run + "node/", prefix=True).kvs:
        try:
            _node(kv.key.decode(errors="replace")[len(run) :], kv)
        except RecordError:
            continue
        if kv.lease and client.lease_time_to_live(kv.lease) > 0:
            live += 1
    return live


def clean_run(
    endpoint: str, run_id: str, prefix: str = DEFAULT_PREFIX, *, force: bool = False, **conn: Any
) -> int:
    """Delete a run's keys; returns how many. Refuses while nodes are alive unless `force`."""
    if not run_id or "/" in run_id:
        raise ValueError(f"invalid run id {run_id!r}")
    run = f"{_norm(prefix)}/{run_id}/"
    with _client(endpoint, conn) as client:
        # A closed run forms no more rounds: its nodes are leaving, or dead with records that
        # only wait for their leases to expire; removing its keys harms none of them.
        marker = client.get(run + "ctl/closed")
        closed = marker is not None and marker.value == b"1"
        live = 0 if force or closed else _live_nodes(client, run)
        if live:
            raise RuntimeError(
                f"run '{run_id}' still has {live} live node(s); stop them first or use --force"
            )
        lease = client.get(run + "ctl/lease")
        deleted = client.delete(run, prefix=True, idempotent=True)
        if lease is not None:
            with contextlib.suppress(EtcdError, ValueError):
                client.lease_revoke(int(lease.value), idempotent=True)
        return deleted
