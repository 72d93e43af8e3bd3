"""Helpers for the rdzv-launch tests: run launchers as subprocesses and never leave one behind.

torch starts every worker in its own session, so killing a launcher's process group does not
reach its workers; every process started here carries a tag in its environment (inherited by
the workers) and cleanup kills whatever still carries it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from etcd_harness import free_port as free_port  # re-exported for the launcher tests

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "launcher.cli"]
LEGACY = [sys.executable, "-m", "launcher.legacy"]
TAG_VAR = "RDZV_LAUNCHER_TEST_TAG"

# Writes what a worker sees to <out>/<restart>_<rank>.json: env, argv, cwd.
ENV_DUMP = """
import json, os, sys
out = sys.argv[1]
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
        "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES"]
record = {k: os.environ.get(k) for k in keys}
record["argv"] = sys.argv[2:]
record["pid"] = os.getpid()
name = f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', 'x')}_{os.environ.get('RANK', 'x')}.json"
with open(os.path.join(out, name + ".tmp"), "w") as f:
    json.dump(record, f)
os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
print(f"worker {record['RANK']} ok", flush=True)
"""

# ENV_DUMP, then fails on the first attempt if asked: `fail_once.py OUT [RANK_THAT_FAILS]`.
FAIL_ONCE = ENV_DUMP + """
if len(sys.argv) > 2 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == sys.argv[2]:
    raise SystemExit(3)
"""

# ENV_DUMP, then stays up until <out>/stop exists (for scale-up, node loss and signals).
WAIT_FOR_STOP = ENV_DUMP + """
import time
while not os.path.exists(os.path.join(out, "stop")):
    time.sleep(0.05)
"""


def write_script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(body)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This interpreter's environment without PET_/TORCHELASTIC_ leftovers, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))}
    env.pop("OMP_NUM_THREADS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _tagged_pids(tag: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if f"{TAG_VAR}={tag}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


def kill_tagged(tag: str) -> None:
    for pid in _tagged_pids(tag):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class Launcher:
    """One launcher subprocess (a 'node'), its output collected in files."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.cmd = list(cmd)
        self.tag = uuid.uuid4().hex
        self.log = log
        self._out = open(log.with_suffix(".out"), "w")  # noqa: SIM115 - closed in wait()/kill()
        self._err = open(log.with_suffix(".err"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmd,
            env={**env, TAG_VAR: self.tag},
            cwd=cwd,
            stdout=self._out,
            stderr=self._err,
            start_new_session=True,
        )

    @property
    def stdout(self) -> str:
        return self.log.with_suffix(".out").read_text()

    @property
    def stderr(self) -> str:
        return self.log.with_suffix(".err").read_text()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def signal_node(self, sig: int) -> None:
        """`sig` to the launcher and every worker it started (e.g. SIGSTOP: a frozen machine)."""
        for pid in {self.proc.pid, *_tagged_pids(self.tag)}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._out.flush()
            self._err.flush()

    def kill(self) -> None:
        """SIGKILL the launcher and everything it started (a lost node)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        kill_tagged(self.tag)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._out.close()
        self._err.close()

    def describe(self) -> str:
        return f"$ {' '.join(self.cmd)}\n--- rc={self.proc.poll()} stdout:\n{self.stdout[-3000:]}\n--- stderr:\n{self.stderr[-5000:]}"


@contextlib.contextmanager
def launchers(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[Callable[..., Launcher]]:
    """`start(args)` starts a launcher; all of them (and their workers) are killed on exit."""
    started: list[Launcher] = []

    def start(args: Sequence[str], cmd: Sequence[str] = LAUNCH, cwd: Path | None = None) -> Launcher:
        launcher = Launcher([*cmd, *args], env or clean_env(), cwd or tmp_path, tmp_path / f"node{len(started)}")
        started.append(launcher)
        return launcher

    try:
        yield start
    finally:
        for launcher in started:
            launcher.kill()


def run_launcher(
    args: Sequence[str],
    tmp_path: Path,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cmd: Sequence[str] = LAUNCH,
    cwd: Path | None = None,
) -> tuple[int, str, str]:
    """Run one launcher to the end: (exit code, stdout, stderr)."""
    with launchers(tmp_path, env) as start:
        node = start(args, cmd, cwd)
        try:
            rc = node.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launcher did not finish in {timeout} s\n{node.describe()}") from None
        return rc, node.stdout, node.stderr


def records(out: Path, restart: int | None = None) -> dict[int, dict]:
    """Worker records by global rank (of one restart attempt, or of the latest one)."""
    found: dict[int, dict[int, dict]] = {}
    for path in out.glob("*_*.json"):
        attempt, rank = path.stem.split("_")
        found.setdefault(int(attempt), {})[int(rank)] = json.loads(path.read_text())
    if not found:
        return {}
    return found.get(max(found) if restart is None else restart, {})




# A training loop in miniature: gloo all_reduce steps until <out>/stop exists (all ranks agree
# through the all_reduce, so they stop at the same step). Every worker start is appended to
# <out>/starts (a restart of the group shows as more lines); <out>/progress-<rank> holds the
# latest step as "<pid> <step>".
ALLREDUCE_LOOP = """
import os, sys, time
import torch
import torch.distributed as dist
out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
with open(os.path.join(out, "starts"), "a") as f:
    f.write(f"{rank} {os.getpid()} {time.time()}\\n")
step = 0
while True:
    flag = torch.tensor([1.0 if os.path.exists(os.path.join(out, "stop")) else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        break
    step += 1
    tmp = os.path.join(out, f"progress-{rank}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()} {step}")
    os.replace(tmp, os.path.join(out, f"progress-{rank}"))
    time.sleep(0.05)
dist.destroy_process_group()
"""


def progress(out: Path, ranks: int) -> list[tuple[int, int]] | None:
    """(pid, step) of each rank of an ALLREDUCE_LOOP job, None until every rank reported."""
    found = []
    for rank in range(ranks):
        try:
            pid, step = (out / f"progress-{rank}").read_text().split()
        except (OSError, ValueError):
            return None
        found.append((int(pid), int(step)))
    return found


def starts(out: Path) -> list[str]:
    """One line per worker start of an ALLREDUCE_LOOP job."""
    try:
        return (out / "starts").read_text().splitlines()
    except OSError:
        return []
