"""The simulated nodes of bench/lifecycle.py: node_pool.py's processes running other scripts.

A job's `script` names what its nodes do (node_pool._run_job dispatches here). Every stage is a
barrier the benchmark opens for every node at one instant; after each, the process reports:

lifecycle (the pool's processes, N nodes in all):
    (job received)  import torch and rdzv                                   -> "ready"
    create          make every handler through torch's registry             -> "created"
    go              every node calls next_rendezvous()                      -> "formed"
    ranks           torch's SimpleElasticAgent._assign_worker_ranks on the round's store -> "ranked"
    barrier         the exit barrier (torchelastic/agent/terminal_state)   -> "barriered"
    close           handler.shutdown() on every node                        -> "closed"

scaleup (the pool: N nodes, min_nodes = N, max_nodes = N + 1) and joiner (one more process):
    (job received)  pool: make the handlers; joiner: imports                -> "created" (pool)
    go              the pool's N nodes call next_rendezvous()               -> "formed" (pool)
    grow            the joiner makes its handler and calls next_rendezvous(); the N poll
                    num_nodes_waiting() every monitor_interval and re-join, again while a
                    round seals without the newcomer (as torch's agent goes on watching)
                                                                            -> "grown" (all)
    done            every handler is shut down                              -> "closed" (all)

When `skip` is open (an earlier phase failed) a stage does nothing and reports no node, except
that handlers are always shut down at the end. Every wait of a node ends by the job's timeout;
a node still busy then counts as an error of that phase ("still waiting at the timeout").
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

from error_kinds import WarningCounter, describe
from node_pool import (
    Job,
    Report,
    Stages,
    _join_all,
    _reform,
    _run_threads,
    _store_and_rank,
    _world_size,
)

LIFECYCLE_STAGES = ("create", "go", "ranks", "barrier", "close", "grow", "done")
# bench kind -> the name torch's registry knows it by (rdzv's from pyproject.toml's
# [project.entry-points."torchrun.handlers"], loaded by torch itself as stock torchrun does).
REGISTERED = {
    "rdzv:etcd": "etcd-v3",
    "rdzv:etcd-v2": "rdzv-etcd-v2",
    "rdzv:c10d": "rdzv-c10d",
    "torch:c10d": "c10d",
    "torch:etcd-v2": "etcd-v2",
}
TERMINAL_STATE = "torchelastic/agent/terminal_state"  # torch's _TERMINAL_STATE_SYNC_ID


def make_handler(job: Job) -> Any:  # noqa: ANN401 - torch's RendezvousHandler
    """torch's registry, as torchrun's agent gets its handler (`get_rendezvous_handler`)."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    conf = {k: v for k, v in job.conf.items() if not k.startswith("_bench")}
    params = RendezvousParameters(REGISTERED[job.kind], job.endpoint, job.run_id, job.min_nodes, job.max_nodes, **conf)
    return get_rendezvous_handler(params)


def each(items: list, fn: Callable[[Any], Any], timeout: float) -> tuple[list, list[bool], list[float], list[str]]:
    """fn(item) for every item, each in a thread, all at once: (results, done, finish times, errors)."""
    out: list = [None] * len(items)
    done = [False] * len(items)
    finishes: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            value = fn(items[i])
            with lock:
                out[i], done[i] = value, True
                finishes.append(time.time())
        except Exception as exc:  # noqa: BLE001 - counted as the phase's error
            with lock:
                errors.append(describe(exc))

    alive = _run_threads([lambda i=i: one(i) for i in range(len(items))], time.monotonic() + timeout)
    with lock:
        if alive:
            errors.append(f"{alive} node(s) still waiting at the timeout")
        return list(out), list(done), list(finishes), list(errors)


def assign_ranks(info: Any, timeout: float) -> int:  # noqa: ANN401
    """torch's own SimpleElasticAgent._assign_worker_ranks, general path (TORCH_ELASTIC_WORKER_IDENTICAL
    unset): set role_info/<group rank>; rank 0 multi_get + multi_set; get assigned_ranks/<group rank>.
    Its body never reads `self`, so a stand-in is passed; the spec has only what it reads (role,
    local_world_size = 1). Returns the node's global rank of its one worker."""
    from torch.distributed.elastic.agent.server.api import SimpleElasticAgent

    store, rank = _store_and_rank(info)
    size = _world_size(info)
    _store_timeout(store, timeout)
    assign = SimpleElasticAgent._assign_worker_ranks
    wanted = {"store": store, "group_rank": rank, "group_world_size": size,
              "spec": SimpleNamespace(role="default", local_world_size=1)}
    names = [p for p in inspect.signature(assign).parameters if p != "self"]
    if set(names) != set(wanted):
        raise RuntimeError(f"this torch's _assign_worker_ranks takes {names}; the benchmark knows {sorted(wanted)}")
    workers = assign(SimpleNamespace(), **wanted)
    if len(workers) != 1 or workers[0].world_size != size or workers[0].global_rank != rank:
        raise RuntimeError(f"group rank {rank} of {size} was given {workers}")
    return workers[0].global_rank


def exit_barrier(info: Any, handler: Any, how: str, timeout: float) -> None:  # noqa: ANN401
    """launcher.exit_barrier.wait_for_peers (rdzv-launch's agent) or torch.distributed.elastic
    .utils.store.barrier (torch's agent), with torch's keys under torchelastic/agent/terminal_state."""
    store, _ = _store_and_rank(info)
    size = _world_size(info)
    if how == "launcher":
        from launcher.exit_barrier import wait_for_peers
        from launcher.report import Reporter

        if not wait_for_peers(store, size, handler, timeout, Reporter("bench", "text", True), 3600.0):
            raise RuntimeError("the exit barrier ended without every node (closed or timed out)")
        return
    from torch.distributed.elastic.utils.store import barrier

    barrier(store, size, key_prefix=TERMINAL_STATE, barrier_timeout=timeout)


def shutdown(handler: Any) -> bool:  # noqa: ANN401
    return bool(handler.shutdown())


def _store_timeout(store: Any, seconds: float) -> None:  # noqa: ANN401
    with contextlib.suppress(Exception):  # stores without one: the thread's deadline still holds
        store.set_timeout(timedelta(seconds=seconds))


def _ops(handlers: list) -> tuple[int, int]:
    """Store writes and reads so far (backends that count them: our c10d)."""
    writes = reads = 0
    for h in handlers:
        counts = getattr(getattr(h, "backend", None), "counts", None)
        if counts is not None:
            writes, reads = writes + counts.writes, reads + counts.reads
    return writes, reads


def _imports(job: Job) -> None:
    # A fresh process spends a second importing torch and the backend's modules (rdzv loads
    # them on the first handler's creation): not part of any phase.
    import torch.distributed.elastic.agent.server.api  # noqa: F401
    import torch.distributed.elastic.rendezvous.registry  # noqa: F401
    import torch.distributed.elastic.utils.store  # noqa: F401

    import launcher.exit_barrier  # noqa: F401
    import rdzv.registry

    if job.kind.startswith("rdzv:"):
        importlib.import_module(rdzv.registry.BACKENDS[REGISTERED[job.kind]].module)
    os.environ.pop("TORCH_ELASTIC_WORKER_IDENTICAL", None)  # torch's general path, not the fast one


def lifecycle(job: Job, results: Any, stages: Stages, warnings: WarningCounter) -> None:  # noqa: ANN401
    _imports(job)
    results.put(Report("ready", job.n_local))
    how = job.conf.get("_bench_barrier", "launcher")
    handlers: list = []
    infos: list = []

    def phase(stage: str, reported: str, items: list, fn: Callable[[Any], Any]) -> list:
        stages.wait(stage)
        if stages.is_open("skip") or not items:
            results.put(Report(reported, 0, warnings=warnings.take()))
            return []
        out, done, finishes, errors = each(items, fn, job.timeout)
        kept = [o for o, d in zip(out, done, strict=True) if d]
        sizes = [_world_size(i) for i in kept] if reported == "formed" else []
        results.put(Report(reported, len(items), finishes=finishes, errors=errors, warnings=warnings.take(),
                           ok=len(kept), world_sizes=sizes, ops=_ops(handlers),
                           module=str(getattr(sys.modules.get("rdzv"), "__file__", "") or "")))
        return [(o, items[i]) for i, o in enumerate(out) if done[i]]

    try:
        handlers = [h for h, _ in phase("create", "created", [job] * job.n_local, make_handler)]
        gc.collect()  # garbage of earlier runs in this process, outside every window
        formed = phase("go", "formed", handlers, lambda h: h.next_rendezvous())
        infos = [(info, h) for info, h in formed]
        ranked = phase("ranks", "ranked", infos, lambda ih: assign_ranks(ih[0], job.timeout))
        phase("barrier", "barriered", [ih for _, ih in ranked],
              lambda ih: exit_barrier(ih[0], ih[1], how, job.timeout))
    finally:
        stages.wait("close")
        if stages.is_open("skip"):  # not measured, but nothing may be left running
            each(handlers, shutdown, 30.0)
            results.put(Report("closed", 0, warnings=warnings.take()))
        else:
            out, done, finishes, errors = each(handlers, shutdown, job.timeout)
            results.put(Report("closed", len(handlers), finishes=finishes, errors=errors, warnings=warnings.take(),
                               ok=sum(bool(o) for o, d in zip(out, done, strict=True) if d), ops=_ops(handlers)))


def scaleup(job: Job, results: Any, stages: Stages, warnings: WarningCounter) -> None:  # noqa: ANN401
    """The pool's side of a scale-up: form N, then notice the newcomer and re-join."""
    _imports(job)
    out, done, _, errors = each([job] * job.n_local, make_handler, job.timeout)
    handlers = [h for h, d in zip(out, done, strict=True) if d]
    results.put(Report("created", len(handlers), errors=errors, warnings=warnings.take()))
    try:
        stages.wait("go")
        infos, finishes, errors = _join_all(handlers, time.monotonic() + job.timeout)
        results.put(Report("formed", len(handlers), finishes=finishes, errors=errors, warnings=warnings.take(),
                           world_sizes=[_world_size(i) for i in infos if i is not None]))
        stages.wait("grow")
        survivors = [h for h, info in zip(handlers, infos, strict=True) if info is not None]
        if stages.is_open("skip") or not survivors:
            results.put(Report("grown", 0, warnings=warnings.take()))
        else:
            # As torch's agent: keep watching num_nodes_waiting() after a re-join; a round sealed
            # without the newcomer (it came after the last call) is followed by another.
            polling, deadline, rounds = replace(job, notice="poll"), time.monotonic() + job.timeout, 0
            first_noticed: list[float] = []
            while True:
                new, finishes, noticed, errors = _reform(polling, survivors, deadline)
                rounds += 1
                first_noticed = first_noticed or noticed
                sizes = [_world_size(i) for i in new if i is not None]
                if errors or set(sizes) == {job.max_nodes} or time.monotonic() >= deadline:
                    break
            results.put(Report("grown", len(survivors), finishes=finishes, noticed=first_noticed, errors=errors,
                               warnings=warnings.take(), world_sizes=sizes, ok=rounds))
    finally:
        stages.wait("done")
        each(handlers, shutdown, 30.0)
        results.put(Report("closed", len(handlers), warnings=warnings.take()))


def joiner(job: Job, results: Any, stages: Stages, warnings: WarningCounter) -> None:  # noqa: ANN401
    """The newcomer of a scale-up: at `grow`, a new node makes its handler and joins."""
    _imports(job)
    handlers: list = []
    try:
        stages.wait("grow")
        if stages.is_open("skip"):
            results.put(Report("grown", 0, warnings=warnings.take()))
        else:
            def arrive(_: object) -> Any:  # noqa: ANN401
                handlers.append(make_handler(job))
                return handlers[-1].next_rendezvous()

            out, done, finishes, errors = each([None], arrive, job.timeout)
            results.put(Report("grown", 1, finishes=finishes, errors=errors, warnings=warnings.take(),
                               world_sizes=[_world_size(o) for o, d in zip(out, done, strict=True) if d]))
    finally:
        stages.wait("done")
        each(handlers, shutdown, 30.0)
        results.put(Report("closed", 1, warnings=warnings.take()))


SCRIPTS: dict[str, Callable[[Job, Any, Stages, WarningCounter], None]] = {
    "lifecycle": lifecycle, "scaleup": scaleup, "joiner": joiner,
}
