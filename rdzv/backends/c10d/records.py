"""How c10d's store values decode: a node record ("<arrival> <NodeInfo JSON>") and a round's
claim ("<holder>[\t<last call deadline>[\t<progress>]]"), by the policies every backend
follows (`node_entry`, `guard`)."""

from __future__ import annotations

from rdzv.backends.api import NodeChange
from rdzv.layouts import CLAIM, LAST_CALL, PROGRESS
from rdzv.rendezvous.control import Control, decode_round_value, guard
from rdzv.rendezvous.decoding import parse_round_no
from rdzv.rendezvous.records import node_entry, not_a_node


def node_change(key: str, node_id: str, raw: bytes) -> NodeChange:
    """The change of node `node_id` whose record at `key` now holds `raw` (empty: removed).
    A record without its arrival number is not a node (warned once)."""
    if not raw:
        return NodeChange(node_id, None)
    arrival, _, info = raw.partition(b" ")
    if not arrival.isdigit():
        not_a_node(key, "no arrival number before the record")
        return NodeChange(node_id, None)
    return NodeChange(node_id, node_entry(key, node_id, info, int(arrival)))


def holder_of(raw: bytes) -> str:
    """Who holds a claim ("" when released); a claim that is not text names nobody we know."""
    return raw.decode(errors="replace").partition("\t")[0]


def apply_claim(control: Control, key: str, raw: bytes) -> None:
    """A claim value "<holder>[\\t<last call deadline>[\\t<progress>]]" at `key`
    (".../claim/<round>"); an empty deadline is none."""
    with guard(control, key):
        round_no = parse_round_no(key.rpartition("/")[2])
        holder, deadline, progress = (raw.decode(errors="replace").split("\t", 2) + ["", ""])[:3]
        if not holder:
            control.set_coordinator(round_no, None)
            control.set_last_call(round_no, None)
            control.set_progress(round_no, None)
            return
        # Every part decoded before any is set: a bad one leaves `control` as it was (`guard`).
        parts = [(kind, decode_round_value(kind, part)) for kind, part in
                 ((CLAIM, holder), (LAST_CALL, deadline), (PROGRESS, progress)) if part]
        for kind, value in parts:
            control.set_round_value(kind, round_no, value)
