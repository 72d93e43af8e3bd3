"""A job's whole life, phase by phase: N simulated nodes on one local etcd, each phase released
to every node at one instant, etcd's /metrics read between phases.

    python bench/lifecycle.py --sizes 16,64 --procs 2 --backends rdzv:etcd,rdzv:etcd-v2,rdzv:c10d --compare torch:c10d
    python bench/lifecycle.py --sizes 1024,4096,16384 --compare '' --json lifecycle.json

Per backend and N (the nodes: threads in node_pool.py's processes; what they do:
bench/lifecycle_nodes.py), min_nodes = max_nodes = N:
  1. create handler   torch's registry: torch.distributed.elastic.rendezvous.registry
                      .get_rendezvous_handler, with rdzv's handlers registered by torch from
                      their `torchrun.handlers` entry points as stock torchrun does (etcd-v3,
                      rdzv-etcd-v2, rdzv-c10d; torch's own c10d, etcd-v2)
  2. next_rendezvous  every node
  3. assign ranks     torch's own SimpleElasticAgent._assign_worker_ranks, called unbound (its body
                      never reads self) with a spec of role and local_world_size = 1, on the
                      round's store: every node sets torchelastic/role_info/<group rank>, group
                      rank 0 multi_gets them and multi_sets torchelastic/assigned_ranks/*, every
                      node gets its own (the general path: TORCH_ELASTIC_WORKER_IDENTICAL unset)
  4. exit barrier     keys torchelastic/agent/terminal_state/{num_members,last_member}: rdzv's
                      handlers through launcher.exit_barrier.wait_for_peers (rdzv-launch's agent:
                      add, then poll check() from 20 ms doubling to 1 s), torch's through
                      torch.distributed.elastic.utils.store.barrier (torch's agent: add, then
                      a blocking wait); --exit-barrier picks one for all
  5. shutdown         handler.shutdown() on every node
Separately, as bench/formation.py does: re-formation after one node (alone in its process) is
SIGKILLed (formation.run_one: min_nodes = N - 1, handlers made by rdzv.create_handler / torch's
registry directly), and a scale-up (min_nodes = N, max_nodes = N + 1): N form, one new node
starts (makes its handler, joins), the N notice it through num_nodes_waiting() and re-join.

A phase that fails (an error, a node not done by --timeout) is recorded as that phase's failure;
the later phases of that run are skipped (the handlers are still shut down). Every wait, the
nodes' and this process's, ends by a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import formation  # noqa: E402 - bench/; sets up the rest of the path (tests/, the rdzv package)
from error_kinds import counted, typical  # noqa: E402
from etcd_metrics import Cost, Snapshot, scrape  # noqa: E402
from lifecycle_nodes import LIFECYCLE_STAGES  # noqa: E402
from lifecycle_report import LEGEND, Phase, table  # noqa: E402
from node_pool import Job, NodePool, Report  # noqa: E402

# (stage opened, stage reported, phase)
LIFE = (("create", "created", "create handler"), ("go", "formed", "next_rendezvous"),
        ("ranks", "ranked", "assign ranks"), ("barrier", "barriered", "exit barrier"),
        ("close", "closed", "shutdown"))


def _shares(total: int, procs: int) -> list[int]:
    return [s for s in (total // procs + (1 if i < total % procs else 0) for i in range(procs)) if s]


def _scrape(url: str, etcd: bool) -> Snapshot | None:
    return scrape(url) if etcd else None


def _judge(p: Phase, reports: list[Report], released: float, cost: Cost | None, sizes_expected: int | None) -> None:
    """Fill a phase from its reports; p.error when it failed."""
    finishes = [t for r in reports for t in r.finishes]
    errors = [e for r in reports for e in r.errors]
    p.done = len(finishes)
    p.wall_s = max(finishes) - released if finishes else None
    p.errors += counted(errors)
    for r in reports:
        p.errors += Counter({f"warning: {k}": v for k, v in r.warnings.items()})
    if cost is not None:
        p.cost = cost.per_node(p.expected)
        p.errors += Counter({f"etcd: {k}": v for k, v in cost.failed_calls.items()})
    sizes = {s for r in reports for s in r.world_sizes}
    if errors or p.done < p.expected:
        p.error = typical(errors) if errors else f"{p.done}/{p.expected} done"
        if sizes:
            p.error += f" (the others returned with world sizes {sorted(sizes)})"
    elif sizes_expected is not None and sizes != {sizes_expected}:
        p.error = f"world sizes {sorted(sizes)}, not {sizes_expected}"


def _drain(pool: NodePool, closing: int, stages: tuple[str, ...]) -> None:
    """A run gone wrong: open every stage and wait (bounded) for every process to close."""
    for name in ("skip", *stages):
        pool.stages.open(name)
    formation.wait_closed(pool, closing)


def run_lifecycle(pool: NodePool, label: str, kind: str, n: int, endpoint: str, metrics_url: str,
                  conf: dict[str, str]) -> list[Phase]:
    timeout = float(conf["_bench_timeout"])
    etcd = "etcd" in kind
    shares = _shares(n, len(pool.procs))
    run_id = f"life-{uuid.uuid4().hex[:8]}"
    pool.stages.reset()
    for share in shares:
        pool.jobs.put(Job(kind, endpoint, run_id, n, n, share, conf, script="lifecycle"))
    phases = [Phase(label, n, name, n) for _, _, name in LIFE]
    failed = False
    ops = (0, 0)
    current = 0
    try:
        pool.collect("ready", len(shares), 3 * timeout + 300)
        for current, ((stage, reported, _), p) in enumerate(zip(LIFE, phases, strict=True)):  # noqa: B007 - read on failure
            before = _scrape(metrics_url, etcd)
            released = time.time()
            pool.stages.open(stage)
            reports = pool.collect(reported, len(shares), timeout + 120)
            after = _scrape(metrics_url, etcd)
            if failed:
                p.skipped = True
                continue
            cost = Cost.between(before, after) if before and after else None
            _judge(p, reports, released, cost, n if reported == "formed" else None)
            now = (sum(r.ops[0] for r in reports), sum(r.ops[1] for r in reports))
            if kind == "rdzv:c10d" and reports and any(now):
                p.store_ops = ((now[0] - ops[0]) / n, (now[1] - ops[1]) / n)
                ops = now
            if reported == "closed":
                refused = sum(r.nodes - r.ok for r in reports if r.nodes)
                p.note = f"{refused} shutdown() returned False" if refused else ""
            if p.error is not None:
                failed = True
                pool.stages.open("skip")
            _check_package(reports)
    except Exception as exc:  # noqa: BLE001 - a process that does not report: the phase's failure
        traceback.print_exc()
        _drain(pool, len(shares), tuple(s for s, _, _ in LIFE))
        if not phases[current].skipped:
            phases[current].error = f"{type(exc).__name__}: {exc}"
        for p in phases[current + 1:]:
            p.skipped = True
    return phases


def run_scaleup(pool: NodePool, label: str, kind: str, n: int, endpoint: str, metrics_url: str,
                conf: dict[str, str], monitor_interval: float) -> list[Phase]:
    timeout = float(conf["_bench_timeout"])
    etcd = "etcd" in kind
    shares = _shares(n, len(pool.procs))
    run_id = f"grow-{uuid.uuid4().hex[:8]}"
    pool.stages.reset()

    def job(share: int, script: str) -> Job:
        return Job(kind, endpoint, run_id, n, n + 1, share, conf, notice="poll", monitor_interval=monitor_interval,
                   script=script)

    for share in shares:
        pool.jobs.put(job(share, "scaleup"))
    newcomer = pool.single_node_process(job(1, "joiner"))
    form, grow = Phase(label, n, "scale-up: form N", n), Phase(label, n, "scale-up: +1 joins", n + 1)
    try:
        created = pool.collect("created", len(shares), 3 * timeout + 300)
        before = _scrape(metrics_url, etcd)
        released = time.time()
        pool.stages.open("go")
        formed = pool.collect("formed", len(shares), timeout + 120)
        after = _scrape(metrics_url, etcd)
        # Handler creation's errors count with the formation (the handlers are made before it).
        _judge(form, created + formed, released, Cost.between(before, after) if before and after else None, n)
        if form.error is not None:
            grow.skipped = True
            pool.stages.open("skip")
        before = after
        released = time.time()
        pool.stages.open("grow")
        grown = pool.collect("grown", len(shares) + 1, timeout + 120)
        after = _scrape(metrics_url, etcd)
        if not grow.skipped:
            _judge(grow, grown, released, Cost.between(before, after) if before and after else None, n + 1)
            noticed = [t for r in grown for t in r.noticed]
            grow.notice_s = max(noticed) - released if len(noticed) == n else None
            rounds = max((r.ok for r in grown), default=1)  # the pool reports its rounds, the newcomer 0
            grow.note = f"{rounds} re-formations: a round sealed without the newcomer" if rounds > 1 else ""
        pool.stages.open("done")
        pool.collect("closed", len(shares) + 1, 120)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        _drain(pool, len(shares) + 1, ("go", "grow", "done"))
        (form if form.wall_s is None and form.error is None else grow).error = f"{type(exc).__name__}: {exc}"
    finally:
        newcomer.join(30)
        if newcomer.is_alive():
            newcomer.kill()
    return [form, grow]


def run_reform(pool: NodePool, label: str, kind: str, n: int, endpoint: str, metrics_url: str,
               conf: dict[str, str], monitor_interval: float) -> Phase:
    """bench/formation.py's re-formation after a SIGKILL, as one phase row."""
    p = Phase(label, n, "re-form after SIGKILL", n - 1)
    try:
        r = formation.run_one(pool, label, kind, n, endpoint, metrics_url, conf, reform=True,
                              monitor_interval=monitor_interval)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        p.error = f"{type(exc).__name__}: {exc}"
        return p
    p.errors = r.errors
    p.cost = r.reform_cost
    p.wall_s, p.notice_s = r.reform_s, r.notice_s
    p.done = n - 1 if r.reform_s is not None else 0
    p.note = "told at the kill" if r.notice == "told" else ""
    if r.error is not None:
        p.error = "the formation before it failed: " + r.error
    elif r.reform_error is not None:
        p.error = r.reform_error
    return p


def _check_package(reports: list[Report]) -> None:
    strays = {r.module for r in reports if r.module and not Path(r.module).resolve().is_relative_to(formation.PACKAGE_ROOT)}
    if strays:
        raise RuntimeError(f"the nodes ran rdzv from {sorted(strays)}, not from {formation.PACKAGE_ROOT}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,256,1024", help="N, up to 16,384")
    ap.add_argument("--backends", default="rdzv:etcd,rdzv:etcd-v2,rdzv:c10d")
    ap.add_argument("--compare", default="torch:c10d", help="torch's kinds, at --torch-sizes (default: --sizes)")
    ap.add_argument("--torch-sizes", default="", help="N for --compare (default: --sizes)")
    ap.add_argument("--procs", type=int, default=8, help="pool processes hosting the nodes as threads")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds each phase may take")
    ap.add_argument("--etcd", default="3.4", choices=["3.4", "3.5"])
    ap.add_argument("--exit-barrier", default="auto", choices=["auto", "launcher", "torch"],
                    help="auto: launcher.exit_barrier for rdzv's handlers, torch's barrier for torch's")
    ap.add_argument("--monitor-interval", type=float, default=0.1, help="seconds between num_nodes_waiting() polls")
    ap.add_argument("--reform", action=argparse.BooleanOptionalAction, default=True, help="the SIGKILL re-formation")
    ap.add_argument("--scale-up", action=argparse.BooleanOptionalAction, default=True, help="the +1 scale-up")
    ap.add_argument("--json", type=Path, default=None, help="also write every phase's figures here")
    args = ap.parse_args()

    from etcd_harness import EtcdServer, free_port

    package = formation.package_description(formation.PACKAGE_ROOT)
    print(package, flush=True)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    plan = [(k, n) for k in filter(None, args.backends.split(",")) for n in formation._ints(args.sizes)]
    plan += [(k, n) for k in filter(None, args.compare.split(","))
             for n in formation._ints(args.torch_sizes or args.sizes)]
    rows: list[Phase] = []
    server = EtcdServer(args.etcd, enable_v2=True).start()
    pool = None
    try:
        metrics_url = server.client_urls[0] + "/metrics"
        pool = NodePool.start(args.procs, LIFECYCLE_STAGES + ("ready",))
        for kind, n in plan:
            label = kind.replace(":", " ")
            how = args.exit_barrier if args.exit_barrier != "auto" else ("launcher" if kind.startswith("rdzv:") else "torch")
            conf = {"last_call_timeout": "1", "join_timeout": str(int(args.timeout)),
                    "_bench_timeout": str(args.timeout), "_bench_barrier": how}
            endpoint, store_server = server.endpoint, None
            if kind.endswith("c10d"):
                import torch.distributed as dist

                port = free_port()
                # The store's server lives here, outside the simulated nodes, for the runs below.
                store_server = dist.TCPStore("127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False)
                endpoint, conf["is_host"] = f"127.0.0.1:{port}", "false"
            found = run_lifecycle(pool, label, kind, n, endpoint, server.client_urls[0] + "/metrics", conf)
            found[2].note = found[2].note or "torch's _assign_worker_ranks"
            found[3].note = found[3].note or ("launcher.exit_barrier" if how == "launcher" else "torch's store barrier")
            if args.reform and n >= 2:
                found.append(run_reform(pool, label, kind, n, endpoint, metrics_url, conf, args.monitor_interval))
            if args.scale_up:
                found += run_scaleup(pool, label, kind, n, endpoint, metrics_url, conf, args.monitor_interval)
            for p in found:
                print(f"  {label:14s} N={n:5d} {p.phase:22s} wall={p.wall_s if p.wall_s is None else round(p.wall_s, 3)} "
                      f"{'skipped' if p.skipped else p.error or 'ok'}", flush=True)
            rows += found
            del store_server  # stop that store's server
        pool.stop()
        pool = None
        header = (f"A job's life, min = max = N (scale-up: max N + 1; re-form: min N - 1), {args.procs} processes "
                  f"x N/{args.procs} threads, one local etcd {args.etcd}, last_call_timeout 1 s, phase timeout "
                  f"{args.timeout:g} s, one run each, {os.cpu_count()} CPUs; {package}.")
        print()
        print(table(rows, header))
        print()
        print(LEGEND)
        if args.json:
            args.json.write_text(json.dumps({"header": header, "phases": [_plain(p) for p in rows]}, indent=1, default=str))
    finally:
        if pool is not None:
            for proc in pool.procs:
                proc.kill()
        server.stop()


def _plain(p: Phase) -> dict[str, Any]:
    out = asdict(p)
    out["errors"] = dict(p.errors)
    return out


if __name__ == "__main__":
    main()
