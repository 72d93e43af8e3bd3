"""What `rdzv-launch --metrics-port` costs: formation at N nodes and DDP step time, metrics on vs off.

    python bench/metrics_overhead.py                     # the table in docs/benchmarks.md
    python bench/metrics_overhead.py --n 64 --repeats 1 --steps 200

1. Formation: bench/formation.py's harness (N simulated nodes, 8 processes x N/8 threads, one
   local etcd), every node on the launcher's path (launcher.progress.ReportingHandler) with the
   no-op recorder (off) or a Prometheus recorder timing every etcd request (on). Off and on
   alternate, so drift from other jobs on the box hits both.
2. Training: `rdzv-launch --standalone --nproc-per-node=2` running a small DDP loop (gloo, CPU);
   rank 0 reports the median step time after a warm-up. "on" adds --metrics-port=0 and a
   scraper hitting /metrics every 0.1 s (150x a usual 15 s scrape interval).
3. The recorder's own cost per call, in-process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
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


def formation_times(n: int, repeats: int, timeout: float) -> dict[str, list[float]]:
    from etcd_harness import EtcdServer

    server = EtcdServer("3.4").start()
    times: dict[str, list[float]] = {"off": [], "on": []}
    try:
        ctx = mp.get_context("spawn")
        jobs, results = ctx.Queue(), ctx.Queue()
        go, done = ctx.Event(), ctx.Event()
        formation.pool_events = (go, done)
        procs = [ctx.Process(target=formation._worker, args=(jobs, results, go, done), daemon=True) for _ in range(8)]
        for p in procs:
            p.start()
        pool = (jobs, results, procs)
        metrics_url = server.client_urls[0] + "/metrics"
        for i in range(repeats):
            for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                conf = {"last_call_timeout": "1", "join_timeout": str(int(timeout)), "_bench_timeout": str(timeout),
                        "_bench_metrics": mode}
                res = formation.run_one(pool, mode, "rdzv:etcd", n, server.endpoint, metrics_url, conf)
                if res.error or res.form_s is None:
                    raise SystemExit(f"formation with metrics {mode} failed: {res.error}")
                times[mode].append(res.form_s)
                print(f"  formation N={n} metrics {mode}: {res.form_s:.3f} s", flush=True)
        for _ in procs:
            jobs.put(None)
        for p in procs:
            p.join(30)
    finally:
        server.stop()
    return times


# ------------------------------------------------------------------------------ training


def _scrape_until(port_of: Callable[[], int | None], stop: threading.Event, count: list[int]) -> None:
    port = None
    while not stop.wait(0.1):
        port = port or port_of()
        if port is None:
            continue
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            count[0] += 1
        except OSError:
            pass


def step_time(metrics: bool, steps: int, warmup: int, work: Path) -> tuple[float, int]:
    """Median step time (ms) of rank 0, and how many scrapes happened during the run."""
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

        scraper = threading.Thread(target=_scrape_until, args=(port_of, stop, count), daemon=True)
        if metrics:
            scraper.start()
        try:
            rc = proc.wait(300)
        finally:
            stop.set()
            proc.kill()
    if rc != 0:
        raise SystemExit(f"training run failed ({rc}): {err.read_text()[-2000:]}")
    return json.loads(out.read_text())["median_ms"], count[0]


# ------------------------------------------------------------------------------ the recorder alone


def recorder_cost(calls: int = 100_000) -> dict[str, float]:
    """Microseconds per call of the recorder's hot calls."""
    from launcher.metrics import PrometheusRecorder
    from rdzv.rendezvous.membership import GroupCounts

    rec = PrometheusRecorder("bench", "etcd")
    counts = GroupCounts()
    out = {}
    for name, call in (
        ("store_request (every etcd request)", lambda: rec.store_request("announce", 0.001, None)),
        ("nodes_waiting (every monitor tick)", lambda: rec.nodes_waiting(0, counts)),
    ):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        out[name] = (time.perf_counter() - t0) / calls * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="simulated nodes for the formation part")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

    form = formation_times(args.n, args.repeats, args.timeout)
    train: dict[str, list[float]] = {"off": [], "on": []}
    scrapes = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                ms, count = step_time(mode == "on", args.steps, args.warmup, Path(tmp))
                train[mode].append(ms)
                if mode == "on":
                    scrapes.append(count)
                print(f"  DDP step, metrics {mode}: {ms:.2f} ms" + (f" ({count} scrapes)" if mode == "on" else ""), flush=True)
    cost = recorder_cost()

    def cell(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} ({', '.join(f'{v:{fmt}}' for v in values)})"

    print()
    print(f"Medians of {args.repeats} (each run in brackets), off and on alternating, {os.cpu_count()} CPUs.")
    print()
    print("| measure | metrics off | metrics on | on / off |")
    print("|---|---:|---:|---:|")
    f_off, f_on = statistics.median(form["off"]), statistics.median(form["on"])
    print(f"| formation, N = {args.n} (s) | {cell(form['off'], '.3f')} | {cell(form['on'], '.3f')} | {f_on / f_off:.2f} |")
    t_off, t_on = statistics.median(train["off"]), statistics.median(train["on"])
    print(f"| DDP step, 2 workers (ms) | {cell(train['off'], '.2f')} | {cell(train['on'], '.2f')} | {t_on / t_off:.2f} |")
    print()
    print(f"Scrapes during the 'on' training runs: {', '.join(map(str, scrapes))}.")
    for name, us in cost.items():
        print(f"Recorder, {name}: {us:.1f} µs per call.")


if __name__ == "__main__":
    main()
