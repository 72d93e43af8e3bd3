"""Sealing a round on etcd v3: the members' keys under round/<round>/ (rank keys on the run
lease, live keys each on its member's lease), written in batches that hold only while the
coordinator's claim does, then the constant-size header in ctl/current.

Members watch their live keys from before the first batch, so one that goes after its key was
written is seen as lost; one that went before fails its batch (its lease is gone) and the
coordinator looks again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rdzv.backends.etcd_v3.errors import etcd_errors
from rdzv.backends.etcd_v3.roster import EtcdRoster
from rdzv.backends.etcd_v3.run_lease import RunLease
from rdzv.etcd import Compare, EtcdClient, EtcdLeaseNotFoundError, Op, TxnResult, prefix_end
from rdzv.layouts import EtcdV3Layout
from rdzv.rendezvous.control import Control
from rdzv.rendezvous.records import NodeEntry, RoundRecord

TXN_OPS = 128  # etcd's default --max-txn-ops: the most keys one seal batch writes


@dataclass
class RoundSealer:
    """One seal attempt's view of the run: its client, keys and run lease."""

    client: EtcdClient
    keys: EtcdV3Layout
    run_lease: RunLease
    where: str  # the endpoints, as errors name them

    def seal(
        self,
        control: Control,
        record: RoundRecord,
        entries: Mapping[str, NodeEntry],
        coordinator: str,
        roster: EtcdRoster,
    ) -> RoundRecord | None:
        """The sealed round (its `roster` taught the assignments), or None when the claim,
        control or a member's lease changed under the seal (the coordinator looks again).
        Raises client errors, converted."""
        keys = self.keys
        round_no = record.round
        claimed = Compare.value(keys.coord(round_no)) == coordinator.encode()
        assignments = record.assignments()
        encoded = {node_id: assignment.encode() for node_id, assignment in assignments.items()}  # rank and live keys alike
        with etcd_errors(self.where):
            # What an earlier attempt at this round left is removed first.
            cleared = self.client.txn(
                [claimed], [Op.delete(keys.round_dir(round_no), range_end=prefix_end(keys.round_dir(round_no)))], [],
                idempotent=True,
            )
            if not cleared.succeeded:
                return None
            ranks = [
                (keys.ranks(round_no) + node_id, value, 0) for node_id, value in encoded.items()
            ]
            if not self.run_lease.write_on(lambda lease: self._write_batches(claimed, ranks, lease)):
                return None
            live = [
                (keys.live(round_no) + node_id, value, entries[node_id].session)
                for node_id, value in encoded.items()
            ]
            try:
                if not self._write_batches(claimed, live, None):
                    return None
            except EtcdLeaseNotFoundError:
                return None  # a member is gone: the coordinator's feed shows it, and it looks again
            # Members watch from the clearing: nothing after it can be missed.
            header = dataclasses.replace(record, view_cursor=cleared.revision)
            result = self.run_lease.write_on(lambda lease: self._seal_txn(control, header, coordinator, lease))
        if not result.succeeded:
            return None
        roster.learn(assignments)
        return RoundRecord.decode(header.encode_header(), result.revision).with_roster(roster)

    def _write_batches(self, claimed: Compare, puts: Sequence[tuple[str, bytes, int]], lease: int | None) -> bool:
        """Put `puts` (key, value, lease; `lease` instead when given) in txns of TXN_OPS, each
        only while `claimed` holds. False once one does not."""
        for start in range(0, len(puts), TXN_OPS):
            ops = [Op.put(key, value, lease=lease if lease is not None else own) for key, value, own in puts[start : start + TXN_OPS]]
            if not self.client.txn([claimed], ops, [], idempotent=True).succeeded:
                return False
        return True

    def _seal_txn(self, control: Control, record: RoundRecord, coordinator: str, run_lease: int) -> TxnResult:
        keys = self.keys
        return self.client.txn(
            [
                Compare.mod_revision(keys.current) == int(control.token or 0),
                Compare.value(keys.coord(record.round)) == coordinator.encode(),
                Compare.create_revision(keys.closed) == 0,
            ],
            [
                Op.put(keys.current, record.encode_header(), lease=run_lease),
                Op.delete(keys.coord(record.round)),
                Op.delete(keys.lastcall(record.round)),
                Op.delete(keys.progress(record.round)),
                # Older rounds' members and stores are unused once every live member asked
                # for this one.
                Op.delete(keys.round_root, range_end=keys.round_dir(record.round)),
                Op.delete(keys.store_dir, range_end=keys.store(record.round)),
            ],
            [],
            # Safe to repeat: a second attempt of an applied seal fails its compare.
            idempotent=True,
        )

