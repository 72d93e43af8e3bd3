"""Real rdzv-launch nodes with --nnodes 2:3: a node whose health check fails (or hangs) never
joins while the others train; the check runs at the first join and after the node's own
failure (or at every join with --health-check-when=every-join); a node whose workers fail K=2
rounds in a row is quarantined, a spare takes its rank, `rdzv status` names it, and `rdzv
quarantine release` brings it back.

Workers report through files: <out>/<tag>-<round>.json holds what the worker of node <tag> saw.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from etcd_harness import free_port
from launcher_helpers import ROOT, clean_env, launchers, write_script
from waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# One worker per node: records what it saw as <tag>-<round>.json, then fails if its node's
# tag is listed in <out>/failing, else stays up until <out>/stop exists.
RECORD_ROUND = """
import json, os, sys, time
out, tag = sys.argv[1], sys.argv[2]
record = {k: os.environ.get(k) for k in ("GROUP_RANK", "GROUP_WORLD_SIZE", "RDZV_ROUND", "TORCHELASTIC_RESTART_COUNT")}
path = os.path.join(out, f"{tag}-{os.environ['RDZV_ROUND']}.json")
with open(path + ".tmp", "w") as f:
    json.dump(record, f)
os.replace(path + ".tmp", path)
"""
WORKER = RECORD_ROUND + """
failing = os.path.join(out, "failing")
if os.path.exists(failing) and tag in open(failing).read().split():
    sys.exit(5)
while not os.path.exists(os.path.join(out, "stop")):
    time.sleep(0.05)
"""

# A health check that hangs on its first run (its pid in <out>/hung.pid) and fails after; a
# shell script, so that starting it is quick even on a loaded machine.
CHECK = """#!/bin/sh
if [ ! -e "$1/hung.pid" ]; then
    echo $$ > "$1/hung.pid"
    exec sleep 600
fi
echo "GPU 3: uncorrectable ECC errors"
exit 3
"""


def _seen(out: Path) -> dict[str, dict[int, dict]]:
    """Worker records: tag -> round -> record."""
    found: dict[str, dict[int, dict]] = {}
    for path in out.glob("*-*.json"):
        tag, _, round_no = path.stem.rpartition("-")
        found.setdefault(tag, {})[int(round_no)] = json.loads(path.read_text())
    return found


def _in_round_of(out: Path, tags: set[str], size: int, after: int = 0) -> int | None:
    """The latest round after `after` in which exactly the nodes `tags` ran, in a group of `size`."""
    seen = _seen(out)
    rounds = {r for t in tags for r in seen.get(t, {}) if r > after}
    for r in sorted(rounds, reverse=True):
        there = {t for t, recs in seen.items() if r in recs}
        if there == tags and all(seen[t][r]["GROUP_WORLD_SIZE"] == str(size) for t in tags):
            return r
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.parametrize("backend", ["etcd", "c10d"])
def test_a_node_failing_its_health_check_never_joins(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "etcd":
        endpoint, conf = request.getfixturevalue("etcd35").endpoint, "lease_ttl=3,last_call_timeout=1,join_timeout=60"
    else:
        endpoint, conf = f"127.0.0.1:{free_port()}", "last_call_timeout=1,join_timeout=60"
    worker = write_script(tmp_path, "worker.py", WORKER)
    check = write_script(tmp_path, "check.sh", CHECK)
    check.chmod(0o755)
    run_id = f"health-{uuid.uuid4().hex[:8]}"
    common = ["--nnodes=2:3", f"--rdzv-backend={backend}", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}",
              f"--rdzv-conf={conf}", "--local-addr=127.0.0.1", "--max-restarts=2"]
    with launchers(tmp_path) as start:
        good = [start([*common, str(worker), str(tmp_path), f"good{i}"]) for i in range(3)]
        sick = start([*common, "--health-check", f"{check} {tmp_path}", "--health-check-timeout=3",
                      str(worker), str(tmp_path), "sick"])
        nodes = [*good, sick]

        def logs() -> str:
            return "\n".join(n.describe() for n in nodes)

        wait_until(lambda: _in_round_of(tmp_path, {"good0", "good1", "good2"}, 3), 90, "the healthy three to run", logs)
        wait_until(lambda: "uncorrectable ECC" in sick.stderr, 60, "the check's second run to fail", logs)
        assert re.search(r"health check .* failed \(no answer within 3 s \(killed\)\): this node stays out", sick.stderr), logs()
        assert re.search(r"failed \(exit code 3: GPU 3: uncorrectable ECC errors\)", sick.stderr), logs()
        assert not _alive(int((tmp_path / "hung.pid").read_text())), "the hung check was killed"
        (tmp_path / "stop").touch()
        for node in good:
            assert node.wait(60) == 0, logs()
        assert sick.wait(60) == 1, logs()
        # c10d: the store may leave with the node hosting it before the close is seen.
        ended = "the run was closed while this node's health check kept failing" in sick.stderr
        assert ended or (backend == "c10d" and "lives in the process of the node" in sick.stderr), logs()
    assert "sick" not in _seen(tmp_path), "the sick node never ran a worker"


def _rdzv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher.ops", *args], capture_output=True, text=True,
                          env=clean_env(), cwd=ROOT, timeout=60)


def test_quarantine_spare_takes_the_rank_and_release_brings_it_back(etcd35, tmp_path: Path) -> None:
    worker = write_script(tmp_path, "worker.py", WORKER)
    (tmp_path / "failing").write_text("bad")
    run_id = f"quar-{uuid.uuid4().hex[:8]}"
    conf = "lease_ttl=3,last_call_timeout=1,join_timeout=60,quarantine_after=2,quarantine_ttl=300"

    def args(tag: str, octet: int) -> list[str]:
        return ["--nnodes=2:3", "--rdzv-backend=etcd", f"--rdzv-endpoint={etcd35.endpoint}", f"--rdzv-id={run_id}",
                f"--rdzv-conf={conf}", f"--local-addr=127.0.0.{octet}", "--max-restarts=5",
                str(worker), str(tmp_path), tag]

    with launchers(tmp_path) as start:
        nodes = {"a": start(args("a", 1)), "b": start(args("b", 2)), "bad": start(args("bad", 3))}

        def logs() -> str:
            return "\n".join(f"=== {tag}\n{n.describe()}" for tag, n in nodes.items())

        wait_until(lambda: 1 in _seen(tmp_path).get("bad", {}), 90, "round 1 with the bad node", logs)
        bad_rank = _seen(tmp_path)["bad"][1]["GROUP_RANK"]
        nodes["spare"] = start(args("spare", 4))
        # Its workers fail twice (rounds 1 and 2): quarantined; the spare runs in its place.
        third = wait_until(lambda: _in_round_of(tmp_path, {"a", "b", "spare"}, 3), 120, "the spare to step in", logs)
        assert _seen(tmp_path)["spare"][third]["GROUP_RANK"] == bad_rank, "the spare takes the bad node's rank"
        wait_until(lambda: "is quarantined until" in nodes["bad"].stderr, 30, "the bad node to say it waits", logs)
        assert "2 counted restarts in a row" in nodes["bad"].stderr, logs()

        status = _rdzv("status", f"--rdzv-endpoint={etcd35.endpoint}", f"--rdzv-id={run_id}")
        assert status.returncode == 0 and "quarantined:" in status.stdout and "127.0.0.3" in status.stdout, status
        listed = _rdzv("quarantine", "list", f"--rdzv-endpoint={etcd35.endpoint}", run_id)
        assert "127.0.0.3" in listed.stdout and "counted restarts in a row" in listed.stdout, listed
        events = _rdzv("events", f"--rdzv-endpoint={etcd35.endpoint}", f"--rdzv-id={run_id}")
        assert "node 127.0.0.3 quarantined until" in events.stdout, events

        (tmp_path / "failing").write_text("")  # repaired
        released = _rdzv("quarantine", "release", f"--rdzv-endpoint={etcd35.endpoint}", run_id, "127.0.0.3")
        assert released.returncode == 0 and "127.0.0.3" in released.stdout, released
        wait_until(lambda: "out of quarantine" in nodes["bad"].stderr, 30, "the bad node to see its release", logs)
        # Released, it waits as a spare of the full group; the spare's node leaving makes room.
        nodes["spare"].signal(15)
        wait_until(lambda: _in_round_of(tmp_path, {"a", "b", "bad"}, 3, after=third), 90, "the released node back", logs)
        (tmp_path / "stop").touch()
        for tag in ("a", "b", "bad"):
            assert nodes[tag].wait(60) == 0, logs()


# A passing health check that appends one line per run to <out>/checks-<tag>.
COUNTING_CHECK = """#!/bin/sh
echo run >> "$1/checks-$2"
"""

# One worker per node: records <tag>-<round>.json as WORKER does, then runs until <out>/stop
# exists; if <out>/fail-once-<tag> appears it removes it and fails (its node's own failure).
FAIL_ON_DEMAND = RECORD_ROUND + """
once = os.path.join(out, f"fail-once-{tag}")
while not os.path.exists(os.path.join(out, "stop")):
    if os.path.exists(once):
        os.remove(once)
        sys.exit(5)
    time.sleep(0.05)
"""


def _checks(out: Path, tag: str) -> int:
    try:
        return len((out / f"checks-{tag}").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("when", ["first-and-failure", "every-join"])
def test_when_the_health_check_runs(when: str, etcd35, tmp_path: Path) -> None:
    """Rounds: {a, b}; c joins (a newcomer); c is SIGKILLed (a departure); a's worker fails (a's
    own failure). first-and-failure: a checks twice (first join, after its failure), b and c
    once; every-join: a and b at each of their four joins."""
    worker = write_script(tmp_path, "worker.py", FAIL_ON_DEMAND)
    check = write_script(tmp_path, "check.sh", COUNTING_CHECK)
    check.chmod(0o755)
    run_id = f"when-{uuid.uuid4().hex[:8]}"

    def args(tag: str) -> list[str]:
        return ["--nnodes=2:3", "--rdzv-backend=etcd", f"--rdzv-endpoint={etcd35.endpoint}", f"--rdzv-id={run_id}",
                "--rdzv-conf=lease_ttl=3,last_call_timeout=1,join_timeout=60", "--local-addr=127.0.0.1",
                "--max-restarts=3", "--health-check", f"{check} {tmp_path} {tag}", f"--health-check-when={when}",
                str(worker), str(tmp_path), tag]

    with launchers(tmp_path) as start:
        nodes = {"a": start(args("a")), "b": start(args("b"))}

        def logs() -> str:
            return "\n".join(f"=== {tag}\n{n.describe()}" for tag, n in nodes.items())

        first = wait_until(lambda: _in_round_of(tmp_path, {"a", "b"}, 2), 90, "a and b in a round", logs)
        nodes["c"] = start(args("c"))
        joined = wait_until(lambda: _in_round_of(tmp_path, {"a", "b", "c"}, 3, after=first), 90, "c to join", logs)
        nodes["c"].kill()
        left = wait_until(lambda: _in_round_of(tmp_path, {"a", "b"}, 2, after=joined), 90, "a and b without c", logs)
        (tmp_path / "fail-once-a").touch()
        wait_until(lambda: _in_round_of(tmp_path, {"a", "b"}, 2, after=left), 90, "a and b after a's failure", logs)
        assert "counted restart" in nodes["a"].stderr, logs()
        counts = {tag: _checks(tmp_path, tag) for tag in ("a", "b", "c")}
        expected = {"a": 2, "b": 1, "c": 1} if when == "first-and-failure" else {"a": 4, "b": 4, "c": 1}
        assert counts == expected, logs()
        (tmp_path / "stop").touch()
        for tag in ("a", "b"):
            assert nodes[tag].wait(60) == 0, logs()
