"""Where the etcd backends keep a run's keys, torch-free: the backends write by these layouts
and `rdzv status`/`rdzv clean` (rdzv.inspect) read by the v3 one without loading torch.

Round numbers in key names are zero-padded so that key order is round order.
"""

from __future__ import annotations

ROUND_DIGITS = 12
# The kinds of per-round control value (`RoundControlKeys.per_round`; c10d packs all three in one).
CLAIM, LAST_CALL, PROGRESS = "claim", "last call", "progress"


def round_key(round_no: int) -> str:
    """A round number as it appears in a key name."""
    return f"{round_no:0{ROUND_DIGITS}d}"


class RoundControlKeys:
    """The per-round control keys both etcd layouts keep (each sets the three folders): a
    forming round's claim, last call and published progress."""

    coord_dir: str
    lastcall_dir: str
    progress_dir: str

    def coord(self, round_no: int) -> str:
        return self.coord_dir + round_key(round_no)

    def lastcall(self, round_no: int) -> str:
        return self.lastcall_dir + round_key(round_no)

    def progress(self, round_no: int) -> str:
        return self.progress_dir + round_key(round_no)

    def per_round(self, key: str) -> tuple[str, str] | None:
        """(kind, the round's part of the key) when `key` is a per-round control key."""
        for kind, folder in (
            (CLAIM, self.coord_dir), (LAST_CALL, self.lastcall_dir), (PROGRESS, self.progress_dir)
        ):
            if key.startswith(folder):
                return kind, key[len(folder) :]
        return None


class EtcdV3Layout(RoundControlKeys):
    """The etcd v3 backend's keys under ``<prefix>/<run_id>/``::

        ctl/lease            id of the run lease (kept alive by every node; holds the run's keys)
        ctl/current          the latest sealed round (RoundRecord JSON)           [run lease]
        ctl/closed           present once the run is closed                       [run lease]
        ctl/coord/<round>    node id coordinating a forming round                 [node lease]
        ctl/lastcall/<round> wall-clock end of that round's last call             [node lease]
        ctl/progress/<round> how a forming round stands (RoundProgress JSON)      [node lease]
        node/<node id>       NodeInfo JSON: who the node is, which round it wants [node lease]
        round/<round>/rank/<node id>  a member's Assignment (rank, host)          [run lease]
        round/<round>/live/<node id>  the same, bound to the member's lease       [its lease]
        store/<round>/...    the round's torch Store                              [run lease]
        quarantine/<host>    a quarantined host (rdzv.rendezvous.quarantine)      [own lease]

    ctl/current holds a sealed round's header only (constant size); its members are the
    round/<round>/ keys, written before the header: a member reads its own rank key, and
    watches the live keys for departures.
    """

    # Names below the run's root (`rdzv.inspect` classifies keys by them).
    CTL = "ctl/"
    LEASE = "ctl/lease"
    CURRENT = "ctl/current"
    CLOSED = "ctl/closed"
    COORD = "ctl/coord/"
    LASTCALL = "ctl/lastcall/"
    PROGRESS = "ctl/progress/"
    NODE = "node/"
    ROUND = "round/"
    STORE = "store/"
    QUARANTINE = "quarantine/"  # outside the ctl/..node/ range the change feeds watch

    def __init__(self, run_prefix: str) -> None:
        self.root = run_prefix + "/"
        self.ctl = self.root + self.CTL
        self.lease = self.root + self.LEASE
        self.current = self.root + self.CURRENT
        self.closed = self.root + self.CLOSED
        self.coord_dir = self.root + self.COORD
        self.lastcall_dir = self.root + self.LASTCALL
        self.progress_dir = self.root + self.PROGRESS
        self.nodes = self.root + self.NODE
        self.round_root = self.root + self.ROUND
        self.store_dir = self.root + self.STORE
        self.quarantine_dir = self.root + self.QUARANTINE

    def node(self, node_id: str) -> str:
        return self.nodes + node_id

    def round_dir(self, round_no: int) -> str:
        return f"{self.round_root}{round_key(round_no)}/"

    def ranks(self, round_no: int) -> str:
        """Where round `round_no`'s members' rank keys live (a prefix)."""
        return self.round_dir(round_no) + "rank/"

    def live(self, round_no: int) -> str:
        """Where round `round_no`'s members' live keys live (a prefix)."""
        return self.round_dir(round_no) + "live/"

    def store(self, round_no: int) -> str:
        return f"{self.store_dir}{round_key(round_no)}/"


class EtcdV2Layout(RoundControlKeys):
    """The etcd v2 backend's keys under ``<prefix>/<run_id>``::

        w/ctl/state            state document: sealed round + closed flag [TTL run_ttl, refreshed
                                                                            by the round leaders]
        w/ctl/coord/<round>    node id coordinating a forming round      [TTL lease_ttl, holder]
        w/ctl/lastcall/<round> wall-clock end of that round's last call  [TTL lease_ttl, holder]
        w/ctl/progress/<round> how a forming round stands (RoundProgress) [TTL lease_ttl, holder]
        w/node/<node id>       NodeInfo JSON                             [TTL lease_ttl, owner]
        store/<round>/...      the round's torch Store                   [TTL store_ttl, fixed]
        quarantine/<host>      a quarantined host                        [TTL quarantine_ttl]
    """

    def __init__(self, run_prefix: str) -> None:
        self.root = run_prefix
        self.watched = run_prefix + "/w"  # what node feeds watch: control and node keys only
        self.ctl = self.watched + "/ctl"
        self.state = self.ctl + "/state"
        self.coord_dir = self.ctl + "/coord/"
        self.lastcall_dir = self.ctl + "/lastcall/"
        self.progress_dir = self.ctl + "/progress/"
        self.nodes = self.watched + "/node"
        self.store_dir = run_prefix + "/store/"
        self.quarantine_dir = run_prefix + "/quarantine/"  # not under /w: feeds never see it

    def node(self, node_id: str) -> str:
        return f"{self.nodes}/{node_id}"

    def store(self, round_no: int) -> str:
        return self.store_dir + round_key(round_no)
