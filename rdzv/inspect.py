"""Read-only views of the runs on an etcd (for `rdzv status`), and removal of a run (`rdzv clean`).

Works on the etcd v3 key layout (`rdzv.layouts.EtcdV3Layout`) and needs no torch. Keys that do not
decode (written by hand, by another tool) never make a command fail: the run is shown with them
listed under `corrupt`, and a node record among them is not counted as a node.

The decoding of one key (`decode_key`) and the summary of a run's decoded keys (`summarize`)
are shared with the watch-driven views of `rdzv.view`, so a snapshot and a watch read alike.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rdzv.backends.etcd_v3.quarantine import EtcdV3QuarantineBoard
from rdzv.etcd import EtcdClient, EtcdError, KeyValue
from rdzv.layouts import EtcdV3Layout
from rdzv.rendezvous.decoding import (
    RecordError,
    parse_lease_id,
    parse_node_id,
    parse_number,
    parse_round_no,
)
from rdzv.rendezvous.quarantine import QuarantineRecord, active
from rdzv.rendezvous.records import Assignment, NodeInfo, RoundProgress, RoundRecord
from rdzv.rendezvous.roster import DetachedRoster, InlineRoster
from rdzv.rendezvous.settings import DEFAULT_PREFIX, password_from

# What a key of a run is, by its name under `<prefix>/<run_id>/`.
CURRENT, CLOSED, LEASE, COORD, LASTCALL, PROGRESS, NODE, MEMBER, LIVE, STORE, QUARANTINE, OTHER = (
    "current", "closed", "lease", "coord", "lastcall", "progress", "node", "member", "live", "store", "quarantine",
    "other",
)


def _password(conn: dict[str, Any]) -> str | None:
    # Ops commands also take `password=` (e.g. from PET_RDZV_CONF, never argv); else as the handler.
    return str(conn["password"]) if conn.get("password") else password_from(conn)


def connect(endpoint: str, **conn: Any) -> EtcdClient:
    """A client for the ops commands, from --rdzv-conf style settings (TLS files, user, timeout)."""
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


def norm_prefix(prefix: str) -> str:
    """`/rdzv/` and `rdzv` are `/rdzv`; the root prefix is ``""``."""
    return "/" + prefix.strip("/") if prefix.strip("/") else ""


def layout(prefix: str, run_id: str) -> EtcdV3Layout:
    """The keys of run `run_id` under `prefix`."""
    return EtcdV3Layout(f"{norm_prefix(prefix)}/{run_id}")


def run_root(prefix: str, run_id: str) -> str:
    """Where a run's keys live: `<prefix>/<run_id>/`."""
    return layout(prefix, run_id).root


class RunNotFound(LookupError):
    """No key of the run exists under the prefix."""


@dataclass(frozen=True)
class RunKey:
    """One key of a run, decoded. `error` says what is wrong when it does not hold what the
    handler writes there; the decoded fields are then left unset."""

    key: str  # the full key
    rel: str  # the key below the run's root
    kind: str  # CURRENT, CLOSED, LEASE, COORD, LASTCALL, PROGRESS, NODE, MEMBER, LIVE, STORE or OTHER
    kv: KeyValue
    round_no: int | None = None  # COORD, LASTCALL, PROGRESS, MEMBER, LIVE: the round named by the key
    sealed: RoundRecord | None = None  # CURRENT
    node: NodeInfo | None = None  # NODE
    coordinator: str | None = None  # COORD: the claiming node's id
    deadline: float | None = None  # LASTCALL: wall-clock end of the last call
    quarantine: QuarantineRecord | None = None  # QUARANTINE
    member: str | None = None  # MEMBER, LIVE: the member's node id
    assignment: Assignment | None = None  # MEMBER, LIVE: its rank and host
    error: str | None = None


_EXACT = {EtcdV3Layout.CURRENT: CURRENT, EtcdV3Layout.CLOSED: CLOSED, EtcdV3Layout.LEASE: LEASE}
_PREFIXES = (
    (EtcdV3Layout.COORD, COORD),
    (EtcdV3Layout.LASTCALL, LASTCALL),
    (EtcdV3Layout.PROGRESS, PROGRESS),
    (EtcdV3Layout.NODE, NODE),
    (EtcdV3Layout.ROUND, MEMBER),  # or LIVE: told apart by `_kind`
    (EtcdV3Layout.STORE, STORE),
    (EtcdV3Layout.QUARANTINE, QUARANTINE),
)


def _kind(rel: str) -> str:
    if rel in _EXACT:
        return _EXACT[rel]
    kind = next((kind for start, kind in _PREFIXES if rel.startswith(start)), OTHER)
    if kind == MEMBER:  # round/<round>/rank/<id> or round/<round>/live/<id>
        parts = rel.split("/")
        kind = {"rank": MEMBER, "live": LIVE}.get(parts[2], OTHER) if len(parts) == 4 else OTHER
    return kind


def decode_key(key: str, rel: str, kv: KeyValue) -> RunKey:
    """Decode the key `key` (`rel` below its run's root); never raises for a bad value."""
    kind = _kind(rel)
    try:
        if kind == CURRENT:
            return RunKey(key, rel, kind, kv, sealed=RoundRecord.decode(kv.value, kv.mod_revision))
        if kind == CLOSED and kv.value != b"1":
            raise RecordError(f"a closed marker holds 1, not {kv.value[:60]!r}")
        if kind == LEASE:
            parse_lease_id(kv.value)
        if kind == COORD:
            round_no = parse_round_no(rel[len(EtcdV3Layout.COORD) :])
            return RunKey(key, rel, kind, kv, round_no=round_no, coordinator=parse_node_id(kv.value))
        if kind == LASTCALL:
            round_no = parse_round_no(rel[len(EtcdV3Layout.LASTCALL) :])
            deadline = parse_number(kv.value, "last call deadline")
            return RunKey(key, rel, kind, kv, round_no=round_no, deadline=deadline)
        if kind == PROGRESS:
            round_no = parse_round_no(rel[len(EtcdV3Layout.PROGRESS) :])
            RoundProgress.decode(kv.value)
            return RunKey(key, rel, kind, kv, round_no=round_no)
        if kind == NODE:
            return RunKey(key, rel, kind, kv, node=_node(rel, kv))
        if kind == QUARANTINE:
            return RunKey(key, rel, kind, kv, quarantine=QuarantineRecord.decode(kv.value))
        if kind in (MEMBER, LIVE):
            _, round_part, _, node_id = rel.split("/")
            return RunKey(
                key, rel, kind, kv, round_no=parse_round_no(round_part), member=parse_node_id(node_id),
                assignment=Assignment.decode(kv.value),
            )
    except RecordError as exc:
        return RunKey(key, rel, kind, kv, error=str(exc))
    return RunKey(key, rel, kind, kv)


def _node(rel: str, kv: KeyValue) -> NodeInfo:
    info = NodeInfo.decode(kv.value)
    if info.node_id != rel[len(EtcdV3Layout.NODE) :]:
        raise RecordError(f"it names node {info.node_id!r}")
    return info


def with_members(sealed: RoundRecord | None, keys: Iterable[RunKey]) -> RoundRecord | None:
    """`sealed` with its roster from its round's member keys among `keys`, when it is a header
    (a record that lists its members is returned as it is)."""
    if sealed is None or not isinstance(sealed.roster, DetachedRoster):
        return sealed
    members = {
        rk.member: rk.assignment
        for rk in keys
        if rk.kind == MEMBER and rk.round_no == sealed.round and rk.member and rk.assignment
    }
    return sealed.with_roster(InlineRoster.of(members))


def summarize(
    run_id: str, keys: Iterable[RunKey], ttl_of: Callable[[int], int | None] | None = None
) -> dict[str, Any]:
    """What `rdzv status --rdzv-id` shows of a run, from its decoded keys. `ttl_of(lease)` gives
    a node's lease time left (None: not asked)."""
    keys = list(keys)
    sealed: RoundRecord | None = None
    closed = False
    coordinators: dict[int, str] = {}
    nodes: list[tuple[NodeInfo, int]] = []
    for rk in keys:
        if rk.error is not None:
            continue
        if rk.sealed is not None:
            sealed = rk.sealed
        elif rk.kind == CLOSED:
            closed = True
        elif rk.coordinator is not None and rk.round_no is not None:
            coordinators[rk.round_no] = rk.coordinator
        elif rk.node is not None:
            nodes.append((rk.node, rk.kv.lease))
    sealed = with_members(sealed, keys)
    ranks = {nid: r for r, nid in enumerate(sealed.ids)} if sealed else {}
    members, waiting, spares = [], [], []
    for info, lease in sorted(nodes, key=lambda n: ranks.get(n[0].node_id, 1 << 30)):
        row = {
            "node_id": info.node_id,
            "host": info.host,
            "addr": info.addr,
            "pid": info.pid,
            "node_rank": ranks.get(info.node_id),
            "local_world_size": info.local_world_size,
            "wants_round": info.want,
            "lease_ttl_left": ttl_of(lease) if ttl_of is not None and lease else None,
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
        "quarantined": quarantined_rows(rk.quarantine for rk in keys if rk.quarantine is not None),
        "store_keys": sum(rk.kind == STORE for rk in keys),
        "keys": len(keys),
        "corrupt": [f"{rk.key} ({rk.error})" for rk in keys if rk.error is not None],
    }


def quarantined_rows(records: Iterable[QuarantineRecord], now: float | None = None) -> list[dict[str, Any]]:
    """The quarantine records still in force, as `rdzv status` and `rdzv quarantine list` show them."""
    now = time.time() if now is None else now
    return [
        {"host": r.host, "until": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.until)),
         "seconds_left": round(r.until - now), "since_round": r.round, "reason": r.reason}
        for r in sorted(records, key=lambda r: r.host)
        if r.until > now
    ]


def _board(client: EtcdClient, prefix: str, run_id: str) -> EtcdV3QuarantineBoard:
    return EtcdV3QuarantineBoard(client, layout(prefix, run_id))


def list_quarantined(endpoint: str, run_id: str, prefix: str = DEFAULT_PREFIX, **conn: Any) -> list[dict[str, Any]]:
    """`rdzv quarantine list`: the run's quarantined hosts, why and until when."""
    with connect(endpoint, **conn) as client:
        return quarantined_rows(active(_board(client, prefix, run_id)).values())


def release_quarantined(
    endpoint: str, run_id: str, host: str | None = None, prefix: str = DEFAULT_PREFIX, **conn: Any
) -> list[str]:
    """`rdzv quarantine release`: end the quarantine of `host` (None: every host); the hosts
    released. Their nodes see it within seconds and join again."""
    with connect(endpoint, **conn) as client:
        board = _board(client, prefix, run_id)
        hosts = [host] if host is not None else sorted(board.read())
        return [h for h in hosts if board.remove(h)]


def list_runs(endpoint: str, prefix: str = DEFAULT_PREFIX, **conn: Any) -> list[dict[str, Any]]:
    """Every run under `prefix`, each described as by `describe_run`."""
    root = norm_prefix(prefix) + "/"
    with connect(endpoint, **conn) as client:
        keys = client.range(root, prefix=True, keys_only=True).kvs
        # A run is a directory: a stray key right under the prefix is not one.
        rels = (kv.key.decode(errors="replace")[len(root) :] for kv in keys)
        run_ids = sorted({rel.split("/", 1)[0] for rel in rels if "/" in rel})
        return [_describe_or_flag(client, prefix, run_id) for run_id in run_ids if run_id]


def describe_run(endpoint: str, run_id: str, prefix: str = DEFAULT_PREFIX, **conn: Any) -> dict[str, Any]:
    """Round, members (host, pid, node rank, lease time left), waiting nodes, spares, closed.
    Raises RunNotFound when the run has no keys."""
    with connect(endpoint, **conn) as client:
        run = _describe(client, prefix, run_id)
    if not run["keys"]:
        raise RunNotFound(f"no run {run_id!r} under {norm_prefix(prefix) or '/'} at {endpoint}")
    return run


def _describe_or_flag(client: EtcdClient, prefix: str, run_id: str) -> dict[str, Any]:
    # One run that cannot be described must not hide the others.
    try:
        return _describe(client, prefix, run_id)
    except (ValueError, KeyError, TypeError) as exc:
        return {"run_id": run_id, "corrupt": [f"cannot describe the run: {exc}"]}


def _describe(client: EtcdClient, prefix: str, run_id: str) -> dict[str, Any]:
    run = run_root(prefix, run_id)
    keys = []
    for kv in client.range(run, prefix=True).kvs:
        key = kv.key.decode(errors="replace")
        keys.append(decode_key(key, key[len(run) :], kv))

    def ttl_of(lease: int) -> int | None:
        with contextlib.suppress(EtcdError):
            return client.lease_time_to_live(lease)
        return None

    return summarize(run_id, keys, ttl_of)


def _live_nodes(client: EtcdClient, keys: EtcdV3Layout) -> int:
    """Node records of a run that belong to running nodes: records that decode and whose lease
    is alive. A record that does not decode is no node, one without a lease none that runs."""
    live = 0
    for kv in client.range(keys.nodes, prefix=True).kvs:
        try:
            _node(kv.key.decode(errors="replace")[len(keys.root) :], kv)
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
    keys = layout(prefix, run_id)
    with connect(endpoint, **conn) as client:
        # A closed run forms no more rounds: its nodes are leaving, or dead with records that
        # only wait for their leases to expire; removing its keys harms none of them.
        marker = client.get(keys.closed)
        closed = marker is not None and marker.value == b"1"
        live = 0 if force or closed else _live_nodes(client, keys)
        if live:
            raise RuntimeError(
                f"run '{run_id}' still has {live} live node(s); stop them first or use --force"
            )
        lease = client.get(keys.lease)
        deleted = client.delete(keys.root, prefix=True, idempotent=True)
        if lease is not None:
            with contextlib.suppress(EtcdError, ValueError):
                client.lease_revoke(int(lease.value), idempotent=True)
        return deleted
