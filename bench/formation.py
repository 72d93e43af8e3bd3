"""Formation benchmark: N simulated nodes (processes x threads) rendezvous on one local etcd.

    python bench/formation.py                       # the table in docs/benchmarks.md
    python bench/formation.py --sizes 64,256 --torch-sizes 64 --repeats 1

For each backend and N it reports the median time from a common start instant to the last
node leaving next_rendezvous(), the handler-creation time, and etcd writes per node (raft
proposals committed, read from etcd's /metrics before handler creation and after formation,
so lease grants count; for our c10d, which has no etcd, the TCPStore operations its nodes
issued, counted by the backend, writes with reads in parentheses). torch's own handlers run
side by side in the same run; a run that fails or does not form within the timeout is recorded
as a failure with its error. Each pool process collects its garbage after creating its handlers,
before the start instant (the processes serve run after run, so what earlier runs left must not
fall into a later run's window), and reports the CPU time it spent from the start instant to its
last node's return.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as mp
import os
import re
import statistics
import sys
import threading
import time
import traceback
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BACKENDS = {
    # label: (backend name for create_handler, creator module, needs)
    "rdzv etcd (v3)": "rdzv:etcd",
    "rdzv etcd-v2": "rdzv:etcd-v2",
    "rdzv c10d": "rdzv:c10d",
    "torch etcd-v2": "torch:etcd-v2",
    "torch c10d": "torch:c10d",
}


@dataclass
class Job:
    kind: str  # "rdzv:etcd", "torch:c10d", ...
    endpoint: str
    run_id: str
    n_total: int
    n_local: int
    conf: dict[str, str]


def _make_handler(job: Job):  # noqa: ANN202 - returns torch's RendezvousHandler
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    source, name = job.kind.split(":", 1)
    # `_bench_*` keys are the benchmark's own; handlers refuse keys they do not know.
    conf = {k: v for k, v in job.conf.items() if not k.startswith("_bench")}
    params = RendezvousParameters(name, job.endpoint, job.run_id, job.n_total, job.n_total, **conf)
    if source == "rdzv":
        from rdzv import create_handler

        handler = create_handler(params)
        metrics = job.conf.get("_bench_metrics")  # bench/metrics_overhead.py: off | on
        return handler if metrics is None else _launcher_path(handler, job.run_id, metrics == "on")
    from torch.distributed.elastic.rendezvous import registry

    return registry.handler_registry.create_handler(params)


def _launcher_path(handler, run_id: str, metrics: bool):  # noqa: ANN001, ANN202
    """The handler as rdzv-launch wraps it (launcher.progress), with its metrics recorder or none."""
    from launcher.metrics import PrometheusRecorder
    from launcher.progress import ReportingHandler
    from launcher.recorder import NULL_RECORDER
    from launcher.report import Reporter

    recorder = PrometheusRecorder(run_id, "etcd") if metrics else NULL_RECORDER
    if metrics:
        handler.observe_backend(recorder)
    reporter = Reporter("bench", "text", True)
    return ReportingHandler(handler, reporter, 5.0, 1, 1, "bench", recorder)


def _worker(jobs: mp.Queue, results: mp.Queue, go: mp.Event, done: mp.Event) -> None:
    """One process hosting many simulated nodes; runs jobs until it gets None."""
    while True:
        job = jobs.get()
        if job is None:
            return
        _run_job(job, results, go, done)


def _run_job(job: Job, results: mp.Queue, go: mp.Event, done: mp.Event) -> None:
    if True:  # one job: create this process's share of nodes, join on "go", close on "done"
        handlers: list = []
        errors: list[str] = []
        t0 = time.monotonic()
        lock = threading.Lock()

        def create() -> None:
            try:
                h = _make_handler(job)
                with lock:
                    handlers.append(h)
            except Exception as exc:  # noqa: BLE001 - recorded as the run's failure
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=create) for _ in range(job.n_local)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        created = time.monotonic() - t0
        # Garbage of earlier runs in this process (its handlers, their threads' frames): a full
        # collection of it landing inside the next window would be charged to that run.
        gc.collect()
        results.put(("created", created, errors[:1]))
        go.wait()
        start = time.time()
        cpu_start = time.process_time()
        finish: list[float] = []
        join_errors: list[str] = []

        def join(h) -> None:  # noqa: ANN001
            try:
                h.next_rendezvous()
                with lock:
                    finish.append(time.time())
            except Exception as exc:  # noqa: BLE001
                text = str(exc)[:200] or "(no message)"
                with lock:
                    join_errors.append(f"{type(exc).__name__}: {text}")

        threads = [threading.Thread(target=join, args=(h,), daemon=True) for h in handlers]
        for t in threads:
            t.start()
        deadline = time.monotonic() + float(job.conf.get("_bench_timeout", "120"))
        for t in threads:
            t.join(max(deadline - time.monotonic(), 0.1))
        alive = sum(t.is_alive() for t in threads)
        if alive:
            join_errors.append(f"{alive} node(s) still waiting at the timeout")
        ops = [0, 0]  # store writes, reads (backends that count them: our c10d)
        for h in handlers:
            counts = getattr(getattr(h, "backend", None), "counts", None)
            if counts is not None:
                ops[0] += counts.writes
                ops[1] += counts.reads
        cpu = time.process_time() - cpu_start  # every thread of this process, background ones too
        results.put(("formed", start, max(finish) if finish else None, len(finish), join_errors[:1], ops, cpu))
        done.wait()
        closers = [threading.Thread(target=_shutdown, args=(h,), daemon=True) for h in handlers]
        for t in closers:
            t.start()
        for t in closers:
            t.join(10)
        results.put(("closed",))


def _shutdown(handler) -> None:  # noqa: ANN001
    with contextlib.suppress(Exception):
        handler.shutdown()


def proposals(metrics_url: str) -> int:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    match = re.search(r"^etcd_server_proposals_committed_total (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else -1


@dataclass
class Result:
    label: str
    n: int
    create_s: float | None
    form_s: float | None
    writes_per_node: float | None
    error: str | None
    reads_per_node: float | None = None
    cpu_s: float | None = None  # CPU seconds of the pool processes in the window, summed


def run_one(pool, label: str, kind: str, n: int, endpoint: str, metrics_url: str, conf: dict) -> Result:
    jobs, results, procs = pool
    nprocs = len(procs)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    shares = [n // nprocs + (1 if i < n % nprocs else 0) for i in range(nprocs)]
    go, done = pool_events
    go.clear()
    done.clear()
    before = proposals(metrics_url)
    active = [s for s in shares if s]
    for share in active:
        jobs.put(Job(kind, endpoint, run_id, n, share, conf))
    created = [results.get() for _ in active]
    errors = [e for c in created for e in c[2]]
    create_s = max(c[1] for c in created)
    go.set()
    formed = [results.get() for _ in active]
    after = proposals(metrics_url)
    done.set()
    for _ in active:
        results.get()
    errors += [e for f in formed for e in f[4]]
    count = sum(f[3] for f in formed)
    if errors or count < n:
        return Result(label, n, create_s, None, None, errors[0] if errors else f"{count}/{n} formed")
    start = min(f[1] for f in formed)
    end = max(f[2] for f in formed)
    writes = (after - before) / n if before >= 0 and "etcd" in kind else None
    reads = None
    if kind == "rdzv:c10d":
        writes = sum(f[5][0] for f in formed) / n
        reads = sum(f[5][1] for f in formed) / n
    cpu = sum(f[6] for f in formed)
    return Result(label, n, create_s, end - start, writes, None, reads, cpu)


pool_events: tuple = ()


def main() -> None:
    global pool_events
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,256,1024,4096", help="N for our etcd v3 handler")
    ap.add_argument("--torch-sizes", default="64,256", help="N for the side-by-side comparison")
    ap.add_argument("--compare", default="torch:c10d,torch:etcd-v2", help="other kinds to run at --torch-sizes")
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--etcd", default="3.4", choices=["3.4", "3.5"])
    args = ap.parse_args()

    from etcd_harness import EtcdServer, free_port

    server = EtcdServer(args.etcd, enable_v2=True).start()
    store_server = None
    try:
        endpoint = server.endpoint
        metrics_url = server.client_urls[0] + "/metrics"
        # torch's TCPStore clients warn once per connection about reverse lookups on loopback.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        ctx = mp.get_context("spawn")
        jobs, results = ctx.Queue(), ctx.Queue()
        go, done = ctx.Event(), ctx.Event()
        pool_events = (go, done)
        procs = [ctx.Process(target=_worker, args=(jobs, results, go, done), daemon=True) for _ in range(args.procs)]
        for p in procs:
            p.start()
        pool = (jobs, results, procs)
        rows: list[Result] = []
        plan: list[tuple[str, str, int]] = [("rdzv etcd (v3)", "rdzv:etcd", n) for n in _ints(args.sizes)]
        for kind in filter(None, args.compare.split(",")):
            label = kind.replace(":", " ")
            plan += [(label, kind, n) for n in _ints(args.torch_sizes)]
        for label, kind, n in plan:
            conf = {"last_call_timeout": "1", "join_timeout": str(int(args.timeout)), "_bench_timeout": str(args.timeout)}
            ep = endpoint
            if kind.endswith("c10d"):
                import torch.distributed as dist

                port = free_port()
                # The store's server lives here, outside the simulated nodes, for the runs below.
                store_server = dist.TCPStore(  # noqa: F841
                    "127.0.0.1", port, is_master=True, multi_tenant=True, wait_for_workers=False
                )
                ep = f"127.0.0.1:{port}"
                conf["is_host"] = "false"
            results_n = []
            for _ in range(args.repeats):
                try:
                    res = run_one(pool, label, kind, n, ep, metrics_url, conf)
                except Exception as exc:  # noqa: BLE001
                    res = Result(label, n, None, None, None, f"{type(exc).__name__}: {exc}")
                    traceback.print_exc()
                results_n.append(res)
                print(f"  {label:18s} N={n:5d} form={_fmt(res.form_s)} writes/node={_fmt(res.writes_per_node, 2)} {res.error or ''}", flush=True)
                if res.error:
                    break  # a failure is the result; don't spend minutes repeating it
            rows.append(_median(results_n))
            store_server = None  # noqa: F841 - stop that store's server
        for _ in procs:
            jobs.put(None)
        for p in procs:
            p.join(30)
        print()
        print(table(rows, args))
    finally:
        server.stop()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _median(results: list[Result]) -> Result:
    ok = [r for r in results if r.error is None]
    if not ok:
        return results[-1]
    return Result(
        ok[0].label,
        ok[0].n,
        statistics.median(r.create_s for r in ok if r.create_s is not None),
        statistics.median(r.form_s for r in ok if r.form_s is not None),
        statistics.median(r.writes_per_node for r in ok if r.writes_per_node is not None)
        if any(r.writes_per_node is not None for r in ok) else None,
        None,
        statistics.median(r.reads_per_node for r in ok if r.reads_per_node is not None)
        if any(r.reads_per_node is not None for r in ok) else None,
    )


def table(rows: list[Result], args: argparse.Namespace) -> str:
    lines = [
        f"Formation, min = max = N, {args.procs} processes x N/{args.procs} threads, one local etcd {args.etcd}, "
        f"medians of {args.repeats} (a failure is shown once), {os.cpu_count()} CPUs.",
        "",
        "| backend | N | handler creation (s) | time to form (s) | writes per node | result |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.n} | {_fmt(r.create_s)} | {_fmt(r.form_s)} | {_fmt(r.writes_per_node)}"
            f"{'' if r.reads_per_node is None else f' ({_fmt(r.reads_per_node)} reads)'} | "
            f"{'formed' if r.error is None else 'FAILED: ' + r.error.replace('|', '/')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
