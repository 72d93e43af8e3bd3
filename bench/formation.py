"""Formation benchmark: N simulated nodes (processes x threads) rendezvous on one local etcd.

    python bench/formation.py                       # the table in docs/benchmarks.md
    python bench/formation.py --sizes 64,256 --torch-sizes 64 --repeats 1
    python bench/formation.py --sizes 1024 --compare '' --no-reform    # formation alone, min = max = N

For each backend and N: the time from a common start instant to the last node leaving
next_rendezvous() (handler creation happens before that instant), then, with --reform (the
default), the time to re-form after one node is SIGKILLed: the nodes run as threads in a pool
of processes (bench/node_pool.py) plus one process holding a single node, killed after
formation; survivors notice the loss (num_nodes_waiting() > 0, polled every
--monitor-interval as torch's agent does; torch's handlers never count a lost member there, so
their survivors are told at the kill, as failing collectives would tell them) and call
next_rendezvous() again. With --reform the job is min_nodes = N - 1, max_nodes = N, so the
re-formed round of N - 1 can seal; the first formation still seals at once, as all N come
(max_nodes reached: no last call). With --no-reform it is min = max = N, as before.

etcd's own /metrics are read before handler creation, after formation, just before the kill
and after re-formation (bench/etcd_metrics.py): raft commits, gRPC calls and messages, bytes
sent to and received from clients, per node; database size, keys and revisions per phase.
After each round every node writes probe/<rank> to the round's store once (outside the timed
windows), and the failures are counted. Errors and warnings the nodes saw are counted by kind
(bench/error_kinds.py). torch's own handlers run side by side in the same run (--compare); a
run that fails or does not form within the timeout is recorded as a failure with its error.
Each pool process collects its garbage after creating its handlers, before the start instant,
and reports the CPU time it spent from the start instant to its last node's return.

The rdzv package measured is the one in RDZV_BENCH_PACKAGE_ROOT when set (a worktree of
another commit, for A/B runs), else this checkout's; its commit is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_ROOT = Path(os.environ.get("RDZV_BENCH_PACKAGE_ROOT") or ROOT).resolve()
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(PACKAGE_ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from error_kinds import counted, typical  # noqa: E402 - bench/, found through the path above
from etcd_metrics import Cost, scrape  # noqa: E402
from formation_report import LEGEND, Result, fmt, median, table  # noqa: E402
from node_pool import STAGES, Job, NodePool, Report  # noqa: E402

__all__ = ["NodePool", "Result", "run_one"]  # bench/metrics_overhead.py uses these

BACKENDS = {
    # label: backend kind
    "rdzv etcd (v3)": "rdzv:etcd",
    "rdzv etcd-v2": "rdzv:etcd-v2",
    "rdzv c10d": "rdzv:c10d",
    "torch etcd-v2": "torch:etcd-v2",
    "torch c10d": "torch:c10d",
}


def run_one(
    pool: NodePool, label: str, kind: str, n: int, endpoint: str, metrics_url: str, conf: dict,
    *, reform: bool = False, notice: str = "auto", monitor_interval: float = 0.1,
) -> Result:
    """One formation of N nodes (and, with `reform`, one re-formation after a SIGKILL)."""
    timeout = float(conf.get("_bench_timeout", "120"))
    reform = reform and n >= 2
    how = notice if notice != "auto" else ("poll" if kind.startswith("rdzv:") else "told")
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    pooled = n - 1 if reform else n
    nprocs = len(pool.procs)
    shares = [s for s in (pooled // nprocs + (1 if i < pooled % nprocs else 0) for i in range(nprocs)) if s]

    def job(share: int, victim: bool = False) -> Job:
        return Job(kind, endpoint, run_id, n - 1 if reform else n, n, share, conf, reform, how, monitor_interval, victim)

    stages = pool.stages
    stages.reset()
    etcd = "etcd" in kind
    before = scrape(metrics_url)
    for share in shares:
        pool.jobs.put(job(share))
    victim = pool.single_node_process(job(1, victim=True)) if reform else None
    everyone = len(shares) + (victim is not None)
    slack = timeout + 120
    try:
        created = pool.collect("created", everyone, 3 * timeout + 300)
        stages.open("go")
        formed = pool.collect("formed", everyone, slack)
        after_form = scrape(metrics_url)
        stages.open("probe")
        probed = pool.collect("probed", everyone, slack)
        before_kill = scrape(metrics_url)
        count = sum(len(f.finishes) for f in formed)
        errors = [e for r in created + formed for e in r.errors]
        killed_at = time.time()
        if victim is not None:
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(30)
        if errors or count < n:
            stages.open("skip")
        stages.open("killed")
        reformed = pool.collect("reformed", len(shares), slack)
        after_reform = scrape(metrics_url)
        stages.open("probe_again")
        probed_again = pool.collect("probed", len(shares), slack)
        stages.open("done")
        closed = pool.collect("closed", len(shares), 120)
    except BaseException:
        _abandon(pool, victim, len(shares))
        raise
    modules = {c.module for c in created if c.module}
    strays = {m for m in modules if not Path(m).resolve().is_relative_to(PACKAGE_ROOT)}
    if strays:
        raise RuntimeError(f"the nodes ran rdzv from {sorted(strays)}, not from {PACKAGE_ROOT}")

    seen: Counter[str] = Counter()
    for phase, reports in (("create", created), ("form", formed), ("probe", probed),
                           ("re-form", reformed), ("probe again", probed_again)):
        seen += counted([e for r in reports for e in r.errors], f"{phase}: ")
    for r in created + formed + probed + reformed + probed_again + closed:
        seen += Counter({f"warning: {k}": v for k, v in r.warnings.items()})
    form_cost = Cost.between(before, after_form)
    reform_cost = Cost.between(before_kill, after_reform)
    if etcd:
        seen += Counter({f"etcd: {k}": v for k, v in (form_cost.failed_calls + reform_cost.failed_calls).items()})

    result = Result(label, n, max(c.seconds for c in created), None, None, None, errors=seen, notice=how)
    result.form_cost = form_cost.per_node(n) if etcd else None
    result.writes_per_node = result.form_cost.commits if result.form_cost else None
    if kind == "rdzv:c10d":
        result.writes_per_node = sum(f.ops[0] for f in formed) / n
        result.reads_per_node = sum(f.ops[1] for f in formed) / n
    result.cpu_s = sum(f.cpu for f in formed)
    result.probes = (sum(p.ok for p in probed), n)
    sizes = {s for f in formed for s in f.world_sizes}
    if errors or count < n:
        result.error = typical(errors) if errors else f"{count}/{n} formed"
        return result
    if sizes != {n}:
        result.error = f"formed with world sizes {sorted(sizes)}"
        return result
    result.form_s = max(t for f in formed for t in f.finishes) - min(f.start for f in formed)
    if reform:
        _reformation(result, reformed, probed_again, reform_cost if etcd else None, killed_at)
    return result


def _reformation(result: Result, reformed: list[Report], probed_again: list[Report], cost: Cost | None, killed_at: float) -> None:
    n = result.n
    result.reform_tried = True
    result.probes_again = (sum(p.ok for p in probed_again), n - 1)
    result.reform_cost = cost.per_node(n - 1) if cost else None
    finishes = [t for r in reformed for t in r.finishes]
    noticed = [t for r in reformed for t in r.noticed]
    errors = [e for r in reformed for e in r.errors]
    sizes = {s for r in reformed for s in r.world_sizes}
    if errors or len(finishes) < n - 1:
        result.reform_error = typical(errors) if errors else f"{len(finishes)}/{n - 1} re-formed"
    elif sizes != {n - 1}:
        result.reform_error = f"re-formed with world sizes {sorted(sizes)}"
    else:
        result.reform_s = max(finishes) - killed_at
        if result.notice == "poll" and noticed:
            result.notice_s = max(noticed) - killed_at


def _abandon(pool: NodePool, victim, processes: int) -> None:  # noqa: ANN001
    """A run gone wrong: let every process finish it, and drop what they report."""
    for name in ("skip", *STAGES):
        pool.stages.open(name)
    if victim is not None and victim.is_alive():
        victim.kill()
    wait_closed(pool, processes)


def wait_closed(pool: NodePool, processes: int) -> None:
    """Wait (at most 300 s) until `processes` pool processes reported their run closed."""
    closed, deadline = 0, time.monotonic() + 300
    while closed < processes and time.monotonic() < deadline:
        try:
            closed += pool.results.get(timeout=max(deadline - time.monotonic(), 0.1)).stage == "closed"
        except Exception:  # noqa: BLE001 - queue.Empty: give up on the pool
            break


def package_description(root: Path) -> str:
    """`<path> at <commit>`, saying when rdzv/ there has changes not committed."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "rdzv")
    return f"rdzv from {root} at {commit}" + (" with uncommitted changes in rdzv/" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,256,1024,4096", help="N for our etcd v3 handler (up to 16,384 and beyond)")
    ap.add_argument("--torch-sizes", default="64,256", help="N for the side-by-side comparison")
    ap.add_argument("--compare", default="torch:c10d,torch:etcd-v2", help="other kinds to run at --torch-sizes")
    ap.add_argument("--procs", type=int, default=8, help="pool processes hosting the nodes as threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-at", default="", help="N:R,... other repeat counts for some N (e.g. 1024:2)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds each round may take")
    ap.add_argument("--etcd", default="3.4", choices=["3.4", "3.5"])
    ap.add_argument("--reform", action=argparse.BooleanOptionalAction, default=True,
                    help="SIGKILL one node after formation and time the re-formation (min_nodes = N - 1)")
    ap.add_argument("--notice", default="auto", choices=["auto", "poll", "told"],
                    help="how survivors learn of the loss: poll num_nodes_waiting() (auto: rdzv's handlers) or told at the kill (auto: torch's)")
    ap.add_argument("--monitor-interval", type=float, default=0.1, help="seconds between num_nodes_waiting() polls")
    ap.add_argument("--lease-ttl", type=float, default=None, help="lease_ttl for rdzv's handlers (default: theirs)")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = ap.parse_args()

    from etcd_harness import EtcdServer, free_port

    package = package_description(PACKAGE_ROOT)
    print(package, flush=True)
    server = EtcdServer(args.etcd, enable_v2=True).start()
    store_server = None
    runs: list[dict] = []
    try:
        endpoint = server.endpoint
        metrics_url = server.client_urls[0] + "/metrics"
        # torch's TCPStore clients warn once per connection about reverse lookups on loopback.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        pool = NodePool.start(args.procs)
        rows: list[Result] = []
        plan: list[tuple[str, str, int]] = [("rdzv etcd (v3)", "rdzv:etcd", n) for n in _ints(args.sizes)]
        for kind in filter(None, args.compare.split(",")):
            label = kind.replace(":", " ")
            plan += [(label, kind, n) for n in _ints(args.torch_sizes)]
        repeats_at = {int(k): int(v) for k, v in (p.split(":") for p in filter(None, args.repeats_at.split(",")))}
        for label, kind, n in plan:
            conf = {"last_call_timeout": "1", "join_timeout": str(int(args.timeout)), "_bench_timeout": str(args.timeout)}
            if args.lease_ttl is not None and kind.startswith("rdzv:"):
                conf["lease_ttl"] = str(args.lease_ttl)
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
            for _ in range(repeats_at.get(n, args.repeats)):
                try:
                    res = run_one(pool, label, kind, n, ep, metrics_url, conf, reform=args.reform,
                                  notice=args.notice, monitor_interval=args.monitor_interval)
                except Exception as exc:  # noqa: BLE001
                    res = Result(label, n, None, None, None, f"{type(exc).__name__}: {exc}")
                    traceback.print_exc()
                results_n.append(res)
                runs.append({"kind": kind, **asdict(res), "errors": dict(res.errors)})
                sent = res.form_cost.sent_kb if res.form_cost else None
                print(f"  {label:18s} N={n:5d} form={fmt(res.form_s)} re-form={fmt(res.reform_s)} "
                      f"commits/node={fmt(res.writes_per_node)} KB sent/node={fmt(sent, 1)} "
                      f"{res.error or res.reform_error or ''}", flush=True)
                if res.error:
                    break  # a failure is the result; don't spend minutes repeating it
            rows.append(median(results_n))
            store_server = None  # noqa: F841 - stop that store's server
        pool.stop()
        print()
        print(table(rows, _header(args, package)))
        print()
        print(LEGEND)
        if args.json:
            args.json.write_text(json.dumps({"header": _header(args, package), "runs": runs}, indent=1, default=str))
    finally:
        server.stop()


def _header(args: argparse.Namespace, package: str) -> str:
    shape = "min_nodes = N - 1, max_nodes = N" if args.reform else "min = max = N"
    ttl = f"lease_ttl {args.lease_ttl:g} s" if args.lease_ttl is not None else "rdzv's default lease_ttl"
    repeats = f"medians of {args.repeats}" + (f" ({args.repeats_at})" if args.repeats_at else "")
    return (
        f"Formation, {shape}, {args.procs} processes x N/{args.procs} threads"
        f"{' + 1 single-node process' if args.reform else ''}, one local etcd {args.etcd}, "
        f"last_call_timeout 1 s, {ttl}, {repeats} (a failure is shown once), "
        f"{os.cpu_count()} CPUs; {package}."
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


if __name__ == "__main__":
    main()
