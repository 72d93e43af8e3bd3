"""What `rdzv-launch --metrics-port` costs: formation at N nodes and DDP step time, metrics on vs off.

    python bench/metrics_overhead.py                     # the table in docs/benchmarks.md
    python bench/metrics_overhead.py --n 64 --repeats 2 --train-repeats 1 --steps 200

1. Formation: bench/formation.py's harness (N simulated nodes, 8 processes x N/8 threads, one
   local etcd), every node on the launcher's path (launcher.progress.ReportingHandler) with the
   no-op recorder (off) or a Prometheus recorder timing every etcd request (on). Recorders are
   made with the handlers, before the start instant, as a launcher makes its recorder before its
   first rendezvous. One warm-up pair is not counted; then off/on pairs in ABBA order (off first,
   on first, ...), so drift from other jobs on the box hits both. Reported: wall time to form and
   the CPU time the 8 processes spent in that window (less sensitive to other jobs' load).
2. Training: `rdzv-launch --standalone --nproc-per-node=2` running a small DDP loop (gloo, CPU);
   rank 0 reports the median step time after a warm-up. "on" adds --metrics-port=0 and a
   scraper hitting /metrics every --scrape-every seconds (0.1 s: 150x a usual 15 s scrape
   interval; the scraper runs in this process, on the same CPUs as the job). One uncounted
   warm-up run, then ABBA pairs.
3. The recorder's own cost per call, in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import formation  # noqa: E402 - bench/formation.py, found through the path above

DDP_LOOP = r"""
import json, os, statistics, sys, time
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

steps, warmup, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")
torch.manual_seed(0)
model = DistributedDataParallel(nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.randn(64, 256), torch.randn(64, 256)
times = []
for step in range(steps + warmup):
    t0 = time.perf_counter()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    if step >= warmup:
        times.append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    with open(out, "w") as f:
        json.dump({"median_ms": 1000 * statistics.median(times), "mean_ms": 1000 * statistics.mean(times)}, f)
dist.barrier()
sys.stdout.flush()
os._exit(0)
"""
PORT_LINE = re.compile(r"metrics at http://[^:]+:(\d+)/metrics")


# ------------------------------------------------------------------------------ formation


def abba(pairs: int) -> list[tuple[str, str]]:
    """off/on pairs, which one goes first alternating."""
    return [("off", "on") if i % 2 == 0 else ("on", "off") for i in range(pairs)]


def formation_times(n: int, repeats: int, timeout: float) -> dict[str, list[tuple[float, float]]]:
    """Per mode, (seconds to form, CPU seconds of the pool in the window) of each counted run."""
    from etcd_harness import EtcdServer

    server = EtcdServer("3.4").start()
    times: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    try:
        pool = formation.NodePool.start(8)
        metrics_url = server.client_urls[0] + "/metrics"
        for i, pair in enumerate(abba(repeats + 1)):
            for mode in pair:
                conf = {"last_call_timeout": "1", "join_timeout": str(int(timeout)), "_bench_timeout": str(timeout),
                        "_bench_metrics": mode}
                res = formation.run_one(pool, mode, "rdzv:etcd", n, server.endpoint, metrics_url, conf)
                if res.error or res.form_s is None or res.cpu_s is None:
                    raise SystemExit(f"formation with metrics {mode} failed: {res.error}")
                warmup = i == 0
                if not warmup:
                    times[mode].append((res.form_s, res.cpu_s))
                print(f"  formation N={n} metrics {mode}: {res.form_s:.3f} s, CPU {res.cpu_s:.3f} s"
                      + (" (warm-up, not counted)" if warmup else ""), flush=True)
        pool.stop()
    finally:
        server.stop()
    return times


# ------------------------------------------------------------------------------ training


def _scrape_until(port_of: Callable[[], int | None], stop: threading.Event, count: list[int], every: float) -> None:
    port = None
    while not stop.wait(every):
        port = port or port_of()
        if port is None:
            continue
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            count[0] += 1
        except OSError:
            pass


def own_cpu_seconds(pid: int) -> float:
    """CPU time of process `pid` itself (user + system, its children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def step_time(metrics: bool, steps: int, warmup: int, work: Path, every: float = 0.1) -> tuple[float, int, float]:
    """Median step time (ms) of rank 0, how many scrapes happened during the run, and the
    launcher's own CPU seconds over the whole run (start-up, rendezvous, monitoring, scrapes)."""
    script = work / "ddp_loop.py"
    script.write_text(DDP_LOOP)
    out = work / f"steps-{time.monotonic_ns()}.json"
    err = work / "launcher.err"
    cmd = [sys.executable, "-m", "launcher.cli", "--standalone", "--nproc-per-node=2", "--monitor-interval=0.1"]
    if metrics:
        cmd.append("--metrics-port=0")
    cmd += [str(script), str(steps), str(warmup), str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stop, count = threading.Event(), [0]
    with open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=work)

        def port_of() -> int | None:
            match = PORT_LINE.search(err.read_text())
            return int(match.group(1)) if match else None

        scraper = threading.Thread(target=_scrape_until, args=(port_of, stop, count, every), daemon=True)
        if metrics:
            scraper.start()
        try:
            # Wait for the exit without reaping, so the finished launcher's CPU time can be read.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            cpu = own_cpu_seconds(proc.pid)
            rc = proc.wait(300)
        finally:
            stop.set()
            proc.kill()
    if rc != 0:
        raise SystemExit(f"training run failed ({rc}): {err.read_text()[-2000:]}")
    return json.loads(out.read_text())["median_ms"], count[0], cpu


# ------------------------------------------------------------------------------ the recorder alone


def recorder_cost(calls: int = 100_000) -> dict[str, float]:
    """Microseconds per call of the recorder's hot calls."""
    from prometheus_client import generate_latest

    from launcher.metrics.prometheus import PrometheusRecorder
    from rdzv.rendezvous.membership import GroupCounts

    rec = PrometheusRecorder("bench", "etcd")
    counts = GroupCounts()
    out = {}
    rec.watch_worker_group(lambda: "HEALTHY")
    for name, call, times in (
        ("store_request (every etcd request)", lambda: rec.store_request("announce", 0.001, None), calls),
        ("nodes_waiting (every monitor tick)", lambda: rec.nodes_waiting(0, counts), calls),
        ("/metrics text of one launcher (every scrape)", lambda: generate_latest(rec.registry), calls // 500),
    ):
        t0 = time.perf_counter()
        for _ in range(times):
            call()
        out[name] = (time.perf_counter() - t0) / times * 1e6
    return out


def spread(values: list[float], fmt: str) -> str:
    """Median [first quartile-third quartile] (min-max)."""
    if len(values) < 2:
        return f"{values[0]:{fmt}}" if values else "-"
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (f"{statistics.median(values):{fmt}} [{q1:{fmt}}–{q3:{fmt}}] "
            f"({min(values):{fmt}}–{max(values):{fmt}})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="simulated nodes for the formation part")
    ap.add_argument("--repeats", type=int, default=10, help="counted off/on pairs of formation runs")
    ap.add_argument("--train-repeats", type=int, default=5, help="counted off/on pairs of training runs")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--scrape-every", type=float, default=0.1, help="seconds between scrapes of the training runs")
    ap.add_argument("--parts", default="formation,training", help="which parts to run")
    args = ap.parse_args()
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

    parts = set(args.parts.split(","))
    form = formation_times(args.n, args.repeats, args.timeout) if "formation" in parts else {"off": [], "on": []}
    train: dict[str, list[float]] = {"off": [], "on": []}
    launcher_cpu: dict[str, list[float]] = {"off": [], "on": []}
    scrapes = []
    with tempfile.TemporaryDirectory() as tmp:
        if "training" in parts:
            step_time(False, args.steps, args.warmup, Path(tmp))  # warm-up: file caches, first imports
        for pair in abba(args.train_repeats if "training" in parts else 0):
            for mode in pair:
                ms, count, cpu = step_time(mode == "on", args.steps, args.warmup, Path(tmp), args.scrape_every)
                train[mode].append(ms)
                launcher_cpu[mode].append(cpu)
                if mode == "on":
                    scrapes.append(count)
                print(f"  DDP step, metrics {mode}: {ms:.2f} ms" + f", launcher CPU {cpu:.2f} s"
                      + (f" ({count} scrapes)" if mode == "on" else ""), flush=True)
    cost = recorder_cost()

    print()
    print(f"Parts: {args.parts}. Formation: {args.repeats} off/on pairs; training: {args.train_repeats} pairs; ABBA order, "
          f"{os.cpu_count()} CPUs, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end.")
    print("Cells: median [quartiles] (min-max); on / off: median of the ratios within each pair [quartiles].")
    print()
    print("| measure | metrics off | metrics on | on / off |")
    print("|---|---:|---:|---:|")
    rows = (
        (f"formation, N = {args.n}, wall (s)", [f for f, _ in form["off"]], [f for f, _ in form["on"]], ".3f"),
        (f"formation, N = {args.n}, CPU of 8 processes (s)", [c for _, c in form["off"]], [c for _, c in form["on"]], ".3f"),
        (f"DDP step, 2 workers, scraped every {args.scrape_every:g} s (ms)", train["off"], train["on"], ".2f"),
        ("launcher's own CPU per training run (s)", launcher_cpu["off"], launcher_cpu["on"], ".2f"),
    )
    for name, off, on, fmt in rows:
        if not off:
            continue
        ratios = [b / a for a, b in zip(off, on, strict=True)]  # the i-th off and on ran as one pair
        print(f"| {name} | {spread(off, fmt)} | {spread(on, fmt)} | {spread(ratios, '.2f')} |")
    print()
    print(f"Scrapes during the 'on' training runs: {', '.join(map(str, scrapes))}.")
    for name, us in cost.items():
        print(f"Recorder, {name}: {us:.1f} µs per call.")


if __name__ == "__main__":
    main()
