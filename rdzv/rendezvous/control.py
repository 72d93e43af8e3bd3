"""The run's control state as every node follows it (`Control`: the latest sealed round, the
closed flag, claims, last calls, progress), and `guard`, the one policy for a control record
that does not decode: noted in `Control.corrupt`, the state left as it was."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rdzv.layouts import CLAIM, LAST_CALL
from rdzv.rendezvous.decoding import (
    RecordError,
    first_warning,
    forget_warning,
    parse_node_id,
    parse_number,
    parse_round_no,
)
from rdzv.rendezvous.records import RoundProgress, RoundRecord

log = logging.getLogger("rdzv")


@dataclass
class Control:
    """The run's control state: latest sealed round, closed flag, who coordinates which round."""

    sealed: RoundRecord | None = None
    closed: bool = False
    coordinators: dict[int, str] = field(default_factory=dict)
    last_call: dict[int, float] = field(default_factory=dict)  # round -> wall-clock deadline
    progress: dict[int, RoundProgress] = field(default_factory=dict)  # forming round -> its coordinator's report
    # What a seal compares against to know control is unchanged (etcd v3: the sealed record's
    # mod revision; etcd v2 and c10d: the state document itself). Not a cursor.
    token: object = None
    # The cursor of the latest change a feed delivered (0: none, or a backend that does not
    # track it).
    cursor: int = 0
    # Control records that do not decode: key -> what is wrong. The fields above stay as they
    # were before such a write, so running members keep working; the next join refuses.
    corrupt: dict[str, str] = field(default_factory=dict)

    @property
    def round(self) -> int:
        """Number of the latest sealed round (0 before the first)."""
        return self.sealed.round if self.sealed else 0

    def set_coordinator(self, round_no: int, holder: str | None) -> None:
        """Round `round_no` is claimed by `holder`, or no longer claimed (None)."""
        if holder is None:
            self.coordinators.pop(round_no, None)
        else:
            self.coordinators[round_no] = holder

    def set_last_call(self, round_no: int, deadline: float | None) -> None:
        """Round `round_no`'s last call ends at `deadline` (wall clock), or was withdrawn (None)."""
        if deadline is None:
            self.last_call.pop(round_no, None)
        else:
            self.last_call[round_no] = deadline

    def set_progress(self, round_no: int, progress: RoundProgress | None) -> None:
        """Round `round_no`'s coordinator reported `progress`, or its report is gone (None)."""
        if progress is None:
            self.progress.pop(round_no, None)
        else:
            self.progress[round_no] = progress

    def apply_round_value(self, kind: str, round_text: str, raw: bytes | str | None) -> None:
        """One per-round control value, as every backend stores them (`kind`: a
        `rdzv.layouts.RoundControlKeys` kind; `raw` None: gone). Decoded before anything
        changes: a value that does not decode raises RecordError (see `guard`)."""
        round_no = parse_round_no(round_text)
        value = None if raw is None else decode_round_value(kind, raw)
        self.set_round_value(kind, round_no, value)

    def set_round_value(self, kind: str, round_no: int, value: object) -> None:
        """Set a decoded per-round value (`decode_round_value`; None: gone)."""
        if kind == CLAIM:
            self.set_coordinator(round_no, value)  # type: ignore[arg-type]
        elif kind == LAST_CALL:
            self.set_last_call(round_no, value)  # type: ignore[arg-type]
        else:
            self.set_progress(round_no, value)  # type: ignore[arg-type]

    def reset_to(self, fresh: Control) -> None:
        """Take every field of `fresh`: a feed that started over from a new read."""
        self.__dict__.update(fresh.__dict__)




@contextmanager
def guard(control: Control, key: str) -> Iterator[None]:
    """Apply one control record inside: if it does not decode (RecordError, raised before the
    body changed `control`), note it in `control.corrupt` and warn once; if it does, clear any
    old note."""
    try:
        yield
    except RecordError as exc:
        control.corrupt[key] = str(exc)
        if first_warning(key):
            log.warning(
                "rendezvous: %s does not hold a valid record (%s); running workers go on, but "
                "no new round can form until it is removed",
                key, exc,
            )
    else:
        if control.corrupt.pop(key, None) is not None:
            forget_warning(key)


def decode_round_value(kind: str, raw: bytes | str) -> str | float | RoundProgress:
    """A per-round control value decoded: a claim's holder, a last call's end (wall clock), a
    forming round's progress. Raises RecordError."""
    if kind == CLAIM:
        return parse_node_id(raw)
    if kind == LAST_CALL:
        return parse_number(raw, "last call deadline")
    return RoundProgress.decode(raw)
