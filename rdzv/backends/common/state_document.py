"""The state document: the sealed round and the closed flag kept in ONE value.

Stores without multi-key transactions (etcd v2, torch's TCPStore) keep both together, so that a
single compare-and-set seals a round only if the run is still open, and closing cannot slip in
between a check and a seal.
"""

from __future__ import annotations

import json

from rdzv.rendezvous.control import Control, guard
from rdzv.rendezvous.decoding import RecordError
from rdzv.rendezvous.records import RoundRecord


def encode_state(sealed: RoundRecord | None, closed: bool) -> str:
    """`sealed.cursor` is kept in the document (as "rev"): it is where members start watching."""
    doc = {
        "closed": closed,
        "rev": sealed.cursor if sealed is not None else 0,
        "sealed": json.loads(sealed.encode()) if sealed is not None else None,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


def apply_state(control: Control, raw: str | bytes | None, key: str) -> None:
    """Set `control` from the state document stored at `key` (None/empty: no round sealed, run
    open). One that does not decode leaves `control` as it was, noted in `control.corrupt`."""
    with guard(control, key):
        if not raw:
            control.sealed, control.closed, control.token = None, False, None
            return
        sealed, closed = _decode_state(raw)
        control.sealed, control.closed, control.token = sealed, closed, raw


def _decode_state(raw: str | bytes) -> tuple[RoundRecord | None, bool]:
    try:
        doc = json.loads(raw)
    except ValueError:
        raise RecordError(f"not JSON: {raw[:60]!r}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("closed"), bool):
        raise RecordError("not a state document (no 'closed' flag)")
    rev, record = doc.get("rev", 0), doc.get("sealed")
    if not isinstance(rev, int) or isinstance(rev, bool) or rev < 0:
        raise RecordError(f"'rev' must be an integer >= 0, not {rev!r}"[:120])
    if record is not None and not isinstance(record, dict):
        raise RecordError("'sealed' must be a round record or null")
    # Re-encoded as compactly as the seal measured it (sealing.oversize): never past the limit.
    sealed = RoundRecord.decode(json.dumps(record, separators=(",", ":")), rev) if record is not None else None
    return sealed, doc["closed"]
