"""The sealed record's account of the members' workers (rdzv.rendezvous.sealing), without a store."""

from __future__ import annotations

import pytest

from rdzv.rendezvous.records import NodeInfo, RoundRecord
from rdzv.rendezvous.sealing import identical_workers


def node(i: int, workers: int | None = 2, role: str | None = "default") -> NodeInfo:
    return NodeInfo(f"n{i}", f"host{i}", "127.0.0.1", 100 + i, 29500, 1, local_world_size=workers, role=role)


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        ([node(0), node(1), node(2)], 2),
        ([node(0), node(1, workers=1)], 0),  # --nproc-per-node differs
        ([node(0), node(1, role="trainer")], 0),  # --role differs
        ([node(0), node(1, workers=None)], 0),  # a launcher that does not say (torchrun)
        ([node(0, role=None), node(1, role=None)], 0),
    ],
)
def test_identical_only_when_every_member_says_the_same(members: list[NodeInfo], expected: int) -> None:
    assert identical_workers(members) == expected


def test_records_carry_it_and_older_ones_read_as_unknown() -> None:
    header = dict(round=3, master_addr="h", master_port=1, min_nodes=1, max_nodes=2)
    record = RoundRecord.listing(["a", "b"], ["h0", "h1"], identical=4, **header)
    assert RoundRecord.decode(record.encode()).identical == 4
    assert RoundRecord.decode(record.encode_header()).identical == 4
    older = RoundRecord.listing(["a", "b"], ["h0", "h1"], **header)
    assert b"identical" not in older.encode() and RoundRecord.decode(older.encode()).identical == 0


def test_a_node_record_names_its_role_only_when_known() -> None:
    assert b"role" not in node(0, role=None).encode()
    assert NodeInfo.decode(node(0, role="trainer").encode()).role == "trainer"
