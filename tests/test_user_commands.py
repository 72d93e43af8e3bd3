"""The commands of the torch.distributed.launch and torchrun tutorials, end to end.

Each case runs one command line as a user types it (one launcher process per node, two workers
per node, on loopback) with a worker script written the way users write them (tests/workers/,
copied to ``main.py`` in the case's directory, which is the launchers' working directory), and
checks every rank's result: each rank writes ``$RESULTS_DIR/rank<R>.json`` (files, not stdout:
a worker's output through a pipe can lose a line on this machine) and the test wants all ranks
``0..W-1``, each with the all_reduce sum ``W*(W-1)/2``.

Worker styles:

    a  argparse ``--local_rank`` (underscore only) defaulting to $LOCAL_RANK, ``env://``
    b  argparse ``--local-rank``/``--local_rank``, required (what torch 2.x's launch passes)
    c  ``LOCAL_RANK`` from the environment, ``init_process_group("gloo")``
    d  ``init_method=tcp://$MASTER_ADDR:$MASTER_PORT`` with rank and world size given
    e  a tiny DDP model; the parameter checksum must be the same on every rank

``python -m launcher.legacy`` passes ``--local-rank=N`` unless ``--use-env`` (as torch 2.x's
``torch.distributed.launch``), so the legacy commands without ``--use-env`` run style (b);
style (a) runs under ``--use-env`` (its default from the environment is what makes that work)
and, without it, fails the way torch's own launcher fails (``unrecognized arguments``).
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from launcher_helpers import LAUNCH, Launcher, clean_env, free_port, launchers
from waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WORKERS = Path(__file__).resolve().parent / "workers"
STYLES = {
    "a": "local_rank_underscore.py",
    "b": "local_rank_dash.py",
    "c": "env_local_rank.py",
    "d": "tcp_init_method.py",
    "e": "ddp_linear.py",
}
PROGRAMS = {
    "python": [sys.executable],
    "rdzv-launch": LAUNCH,  # the console script is `launcher.cli:main`
    "torchrun": [sys.executable, "-m", "torch.distributed.run"],  # stock torchrun, this venv's torch
}
NPROC = 2
# A healthy case ends in seconds; this only bounds a hang (the node's rendezvous waits far longer).
JOB_TIMEOUT = 150

LEGACY = "python -m launcher.legacy"
LEGACY_2_NODES = f"{LEGACY} --nnodes=2 --node_rank={{node}} --nproc_per_node 2 --master_addr 127.0.0.1 --master_port {{port}} main.py"
STATIC_2_NODES = "rdzv-launch --nnodes=2 --node-rank={node} --nproc-per-node=2 --master-addr=127.0.0.1 --master-port={port} main.py"
# Two "nodes" on one host: --local-addr makes rank 0 publish 127.0.0.1 (on a cluster, its host name).
DYNAMIC_2_NODES = "{prog} --nnodes=2 --nproc-per-node=2 --rdzv-backend={backend} --rdzv-endpoint={endpoint} --rdzv-id={run_id} --local-addr=127.0.0.1 main.py"


@dataclass(frozen=True)
class Case:
    command: str  # one node's command line; {node}, {port}, {endpoint}, {run_id} filled in per run
    nodes: int = 1
    server: str | None = None  # the etcd fixture the endpoint comes from; else a free loopback port

    @property
    def passes_local_rank(self) -> bool:
        return self.command.startswith(LEGACY) and "--use-env" not in self.command


def _dynamic(prog: str, backend: str, server: str | None = None) -> Case:
    return Case(DYNAMIC_2_NODES.replace("{prog}", prog).replace("{backend}", backend), nodes=2, server=server)


COMMANDS = {
    "1-legacy": Case(f"{LEGACY} --nproc_per_node 2 main.py"),
    "2-legacy-port": Case(f"{LEGACY} --nproc_per_node 2 --master_port {{port}} main.py"),
    "3-legacy-2nodes": Case(LEGACY_2_NODES, nodes=2),
    "4-legacy-use-env": Case(f"{LEGACY} --use-env --nproc_per_node 2 --master_port {{port}} main.py"),
    "5-static-2nodes": Case(STATIC_2_NODES, nodes=2),
    "6-port": Case("rdzv-launch --nproc-per-node=2 --master-port={port} main.py"),
    "7-standalone": Case("rdzv-launch --standalone --nproc_per_node=2 main.py"),
    "8-etcd": _dynamic("rdzv-launch", "etcd", "etcd35"),
    "8-etcd-v2": _dynamic("rdzv-launch", "etcd-v2", "etcd_v2"),
    "8-c10d": _dynamic("rdzv-launch", "c10d"),
    "9-torchrun-etcd-v3": _dynamic("torchrun", "etcd-v3", "etcd35"),
    "9-torchrun-rdzv-etcd-v2": _dynamic("torchrun", "rdzv-etcd-v2", "etcd_v2"),
    "9-torchrun-rdzv-c10d": _dynamic("torchrun", "rdzv-c10d"),
    # torchrun gives --node-rank only to its own `static`; ours takes the rank in --rdzv-conf.
    "9-torchrun-rdzv-static": Case(
        "torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=rdzv-static "
        "--rdzv-endpoint=127.0.0.1:{port} --rdzv-conf=rank={node} main.py",
        nodes=2,
    ),
}

# (command, worker style): every style runs under at least one command and every command runs
# at least one style.
MATRIX = [
    ("1-legacy", "b"),
    ("2-legacy-port", "b"),
    ("3-legacy-2nodes", "b"),
    ("4-legacy-use-env", "a"),
    ("4-legacy-use-env", "c"),
    ("5-static-2nodes", "d"),
    ("6-port", "d"),
    ("7-standalone", "e"),
    ("8-etcd", "c"),
    ("8-etcd-v2", "e"),
    ("8-c10d", "d"),
    ("9-torchrun-etcd-v3", "c"),
    ("9-torchrun-rdzv-etcd-v2", "d"),
    ("9-torchrun-rdzv-c10d", "e"),
    ("9-torchrun-rdzv-static", "d"),
    # torchrun's canonical worker (LOCAL_RANK, env://) through every other backend as well.
    ("5-static-2nodes", "c"),
    ("8-etcd-v2", "c"),
    ("8-c10d", "c"),
    ("9-torchrun-rdzv-etcd-v2", "c"),
    ("9-torchrun-rdzv-c10d", "c"),
    ("9-torchrun-rdzv-static", "c"),
]


def _argv(command: str) -> list[str]:
    """A command line as typed, with `python`, `rdzv-launch` and `torchrun` resolved to this venv."""
    prog, *args = shlex.split(command)
    return [*PROGRAMS[prog], *args]


def _endpoint(case: Case, request: pytest.FixtureRequest) -> str:
    if case.server:
        return request.getfixturevalue(case.server).endpoint
    return f"127.0.0.1:{free_port()}"


def _describe(nodes: list[Launcher]) -> str:
    return "\n".join(node.describe() for node in nodes)


def _run(tmp_path: Path, style: str, commands: list[str]) -> tuple[list[Launcher], dict[int, dict]]:
    """Start one launcher per command (all at once, as nodes are), wait until all have exited.

    Returns the launchers (exited; their logs remain readable) and the rank records by rank.
    Every launcher and worker is killed on the way out, also on failure.
    """
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(WORKERS / STYLES[style], tmp_path / "main.py")
    with launchers(tmp_path, clean_env(RESULTS_DIR=str(results))) as start:
        nodes = [start(_argv(command), cmd=[]) for command in commands]

        def done() -> bool:
            codes = [node.proc.poll() for node in nodes]
            # Every node exited, or one failed (the others may then wait for it for minutes).
            return None not in codes or any(code not in (None, 0) for code in codes)

        wait_until(done, JOB_TIMEOUT, "every node to exit", lambda: _describe(nodes))
        if any(node.proc.poll() != 0 for node in nodes):
            raise AssertionError(f"a node failed\n{_describe(nodes)}")
    ranks = {int(p.stem.removeprefix("rank")): json.loads(p.read_text()) for p in results.glob("rank*.json")}
    return nodes, ranks


def _check(ranks: dict[int, dict], style: str, nodes: int, passes_local_rank: bool, logs: str) -> None:
    world = NPROC * nodes
    assert sorted(ranks) == list(range(world)), f"rank results: {sorted(ranks)}\n{logs}"
    for rank, rec in ranks.items():
        where = f"rank {rank}: {rec}"
        assert rec["style"] == style, where
        assert (rec["rank"], rec["world_size"]) == (rank, world), where
        assert rec["sum"] == world * (world - 1) / 2, where
        assert (rec["env"]["RANK"], rec["env"]["WORLD_SIZE"]) == (str(rank), str(world)), where
        # The local rank as the script read it (argument or environment) is the launcher's.
        assert rec["local_rank"] == int(rec["env"]["LOCAL_RANK"]), where
        assert rec["argv"] == ([f"--local-rank={rec['local_rank']}"] if passes_local_rank else []), where
    # Each node ran local ranks 0 and 1, and the nodes are numbered 0..nodes-1.
    per_node: dict[str, list[int]] = {}
    for rec in ranks.values():
        per_node.setdefault(rec["env"]["GROUP_RANK"], []).append(rec["local_rank"])
    assert {node: sorted(locals_) for node, locals_ in per_node.items()} == {
        str(n): list(range(NPROC)) for n in range(nodes)
    }, ranks
    if style == "e":
        assert len({rec["checksum"] for rec in ranks.values()}) == 1, {r: rec["checksum"] for r, rec in ranks.items()}


@pytest.mark.parametrize(("name", "style"), MATRIX, ids=[f"{name}-{style}" for name, style in MATRIX])
def test_user_command(name: str, style: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    case = COMMANDS[name]
    fields = {"port": free_port(), "endpoint": _endpoint(case, request), "run_id": f"user-{uuid.uuid4().hex[:8]}"}
    commands = [case.command.format(node=node, **fields) for node in range(case.nodes)]
    nodes, ranks = _run(tmp_path, style, commands)
    _check(ranks, style, case.nodes, case.passes_local_rank, _describe(nodes))


def test_underscore_only_script_under_legacy_launch_fails_as_with_torch(tmp_path: Path) -> None:
    """A script that knows only ``--local_rank`` gets ``--local-rank=N`` and argparse rejects it.

    That is torch 2.x's ``torch.distributed.launch`` too (its docs: "If only "--local_rank" is
    provided, the launcher will trigger an error"); ``--use-env`` runs the same script (above).
    """
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(WORKERS / STYLES["a"], tmp_path / "main.py")
    with launchers(tmp_path, clean_env(RESULTS_DIR=str(results))) as start:
        node = start(_argv(f"{LEGACY} --nproc_per_node 2 main.py"), cmd=[])
        assert node.wait(JOB_TIMEOUT) == 1, node.describe()
        assert "error: unrecognized arguments: --local-rank=" in node.stderr, node.describe()
    assert not list(results.iterdir())
