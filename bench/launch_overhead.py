"""Launch overhead: `rdzv-launch --standalone` against `torchrun --standalone`.

Time from spawning the launcher to the moment the last worker runs: every worker of a trivial
script writes time.time() to a file as its first action; the measure is max(file) - spawn time.
Runs of the two launchers are interleaved (alternating which goes first) so drift in machine
load hits both alike. Prints a markdown table of medians and the ratio rdzv-launch / torchrun.

    python bench/launch_overhead.py [--repeats 5] [--workers 1 2 4] [--omp-preset]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = """import os, sys, time
t = time.time()
with open(os.path.join(sys.argv[1], os.environ["RANK"]), "w") as f:
    f.write(repr(t))
"""

ROOT = Path(__file__).resolve().parents[1]


def launchers() -> dict[str, list[str]]:
    torchrun = shutil.which("torchrun")
    return {
        "rdzv-launch": [sys.executable, "-m", "launcher.cli", "--quiet"],
        "torchrun": [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"],
    }


def one_launch(name: str, cmd: list[str], workers: int, script: Path, out: Path, env: dict[str, str]) -> tuple[float, int]:
    """(seconds to the last worker running, the launcher's exit code)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    argv = [*cmd, "--standalone", f"--nproc-per-node={workers}", str(script), str(out)]
    spawned = time.time()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
    stamps = [float(p.read_text()) for p in out.iterdir()]
    if len(stamps) != workers:
        raise SystemExit(f"{' '.join(argv)}: {len(stamps)} of {workers} workers ran ({proc.returncode}):\n{proc.stderr[-2000:]}")
    if proc.returncode != 0:
        # Every worker ran, so the time counts; the failure (e.g. a crash at exit) is reported.
        print(f"{name} exited {proc.returncode}: {proc.stderr.strip()[:200]!r}", file=sys.stderr)
    return max(stamps) - spawned, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--omp-preset",
        action="store_true",
        help="run with OMP_NUM_THREADS=1 already set (neither launcher then prints its notice)",
    )
    args = parser.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("OMP_NUM_THREADS", None)
    if args.omp_preset:
        env["OMP_NUM_THREADS"] = "1"
    tools = launchers()
    times: dict[tuple[str, int], list[float]] = {(t, n): [] for t in tools for n in args.workers}
    failed = dict.fromkeys(tools, 0)
    with tempfile.TemporaryDirectory(prefix="launch_overhead_") as tmp:
        script = Path(tmp) / "touch.py"
        script.write_text(WORKER)
        out = Path(tmp) / "out"
        for tool in tools:
            one_launch(tool, tools[tool], 1, script, out, env)  # warm the page cache for both
        for r in range(args.repeats):
            for n in args.workers:
                order = list(tools) if r % 2 == 0 else list(reversed(tools))
                for tool in order:
                    seconds, rc = one_launch(tool, tools[tool], n, script, out, env)
                    times[(tool, n)].append(seconds)
                    failed[tool] += rc != 0
            print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)

    print(f"Median of {args.repeats} runs, seconds from spawning the launcher to the last worker running"
          f"{' (OMP_NUM_THREADS=1 preset)' if args.omp_preset else ''}; {os.cpu_count()} CPUs.\n")
    print("| workers | rdzv-launch --standalone | torchrun --standalone | ratio |")
    print("|---|---|---|---|")
    for n in args.workers:
        ours, theirs = statistics.median(times[("rdzv-launch", n)]), statistics.median(times[("torchrun", n)])
        print(f"| {n} | {ours:.3f} s | {theirs:.3f} s | {ours / theirs:.2f} |")
    runs = args.repeats * len(args.workers)
    print("\nNon-zero exits after every worker ran: " + ", ".join(f"{t} {failed[t]}/{runs}" for t in tools))


if __name__ == "__main__":
    main()
