"""The static backend: a fixed group of N nodes with fixed node ranks, no elasticity.

Each node is started with its node rank (`--node-rank`, ``rank`` in --rdzv-conf); node rank 0
serves a TCPStore at ``master_addr:master_port`` (default port 29500) and the others connect to
it. A round forms when all N = min_nodes = max_nodes nodes are there, through the same
algorithm and store layout as the c10d backend, so timeouts, closing and errors read the same.
What it does not do (its `capabilities` are empty):

* no elasticity: min_nodes must equal max_nodes and `num_nodes_waiting()` is always 0, so a
  running group is never asked to restart for a node; a restart happens when every node
  re-rendezvouses (as torch's agent does after its workers fail);
* no spares: a node whose rank is already in the running group is refused;
* no liveness: nodes send no heartbeats and a dead node is not noticed by the rendezvous (the
  job fails through its workers), which also means no heartbeat traffic at all;
* not durable: the store lives in node rank 0's process; if it dies, the others fail with a
  connection error naming the endpoint.

In the first round workers share that store, as with torch's static handler: they get
MASTER_ADDR:MASTER_PORT = the store's endpoint and TORCHELASTIC_USE_AGENT_STORE=True, so
`init_process_group("env://")` connects to node rank 0's server instead of serving a second one
on the same port. After a restart the old workers' keys are still in that store (a new worker
would read a dead peer's address), so later rounds get a fresh store: worker rank 0 serves it on
the port node rank 0 published for the round, as with the elastic backends.
"""

from __future__ import annotations

from torch.distributed.elastic.rendezvous import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousInfo,
    RendezvousStoreInfo,
)

from rdzv.backends.api import Backend
from rdzv.backends.c10d.backend import C10dBackend
from rdzv.backends.c10d.heartbeat import NoHeartbeats
from rdzv.backends.c10d.host import single_endpoint
from rdzv.backends.c10d.store import OpCounts, StoreConnection, connect_store, serve_store
from rdzv.rendezvous.handler import RdzvHandler
from rdzv.rendezvous.settings import ConfigError, RendezvousSettings

HINT = ". The static rendezvous store lives in node rank 0's process; the job cannot go on without it."


class StaticHandler(RdzvHandler):
    """Checks that the group gave this node the rank it was started with; workers share the store."""

    def __init__(self, settings: RendezvousSettings, backend: Backend) -> None:
        super().__init__(settings, backend)
        self.store_endpoint = single_endpoint(settings, "static")
        self._share_store = True

    @property
    def use_agent_store(self) -> bool:
        # Read by the agent after next_rendezvous(), for the round just joined.
        return self._share_store

    def next_rendezvous(self) -> RendezvousInfo:
        info = super().next_rendezvous()
        wanted = self.settings.rank_hint
        if info.rank != wanted:
            raise RendezvousError(
                f"static rendezvous '{self.settings.run_id}': node rank {wanted} was given to "
                f"more than one node (this one got rank {info.rank}); start each node with its "
                "own --node-rank"
            )
        # Every node agrees on the round number, so every node agrees on which store it is.
        self._share_store = self.round == 1
        if not self._share_store:
            return info
        host, port = self.store_endpoint
        return RendezvousInfo(info.store, info.rank, info.world_size, RendezvousStoreInfo(host, port))


def check_settings(settings: RendezvousSettings) -> int:
    """The node rank, after checking that the settings describe a fixed group."""
    if settings.min_nodes != settings.max_nodes:
        raise ConfigError(
            f"the static backend needs a fixed number of nodes (--nnodes=N), got "
            f"{settings.min_nodes}:{settings.max_nodes}; use the etcd or c10d backend for an "
            "elastic job"
        )
    rank = settings.rank_hint
    if rank is None:
        raise ConfigError("the static backend needs this node's rank: --node-rank=N (rank=N in --rdzv-conf)")
    if not 0 <= rank < settings.max_nodes:
        raise ConfigError(
            f"node rank {rank} is outside 0..{settings.max_nodes - 1} for a static group of "
            f"{settings.max_nodes} node(s)"
        )
    return rank


def create_backend(settings: RendezvousSettings) -> C10dBackend:
    """The backend for `--rdzv-backend=static` (rdzv-launch) and `rdzv-static` (torchrun): the
    c10d backend's algorithm and layout for a fixed group, without heartbeats."""
    rank = check_settings(settings)
    host, port = single_endpoint(settings, "static")
    where = f"static rendezvous store {host}:{port} (node rank 0)"
    if rank == 0:
        # Node rank 0 serves the store from the start, so the others can connect at once.
        try:
            store = serve_store(port, settings.read_timeout)
        except RuntimeError as exc:
            raise RendezvousConnectionError(
                f"{where}: node rank 0 cannot serve the store on port {port}: "
                f"{str(exc).strip().splitlines()[0]}"
            ) from exc

        def opener(counts: OpCounts) -> StoreConnection:
            return StoreConnection(store, where, counts, hint=HINT)

    else:

        def opener(counts: OpCounts) -> StoreConnection:
            # Connecting is part of the rendezvous: wait for node rank 0 as long as a join may.
            store = connect_store(
                host, port, settings.join_timeout, where=where,
                advice=f"Node rank {rank} waited join_timeout for node rank 0: is it running "
                "there (--master-addr/--master-port)?",
            )
            return StoreConnection(store, where, counts, hint=HINT)

    backend = C10dBackend(
        settings, opener, where=where, liveness=NoHeartbeats(), name="static", capabilities=frozenset()
    )
    if rank == 0:
        _ = backend.conn  # set the run's keys up before anyone joins
    return backend
