"""rdzv-launch across real network hosts, with real faults.

Every host is a network namespace on a private bridge (tests/netns.py); a 3-member etcd 3.5
cluster runs on three more, one member each. Each scenario starts `rdzv-launch` in several hosts
(`ip netns exec`) on examples/train_ddp.py over gloo and breaks something: a launcher is
SIGKILLed, a link is cut, etcd members die, jobs share the cluster, credentials are wrong.

Each test reports the figure it measures as a `[figure] ...` line on the terminal (also with
output capture on) and appends it as JSON to `$RDZV_FIGURES` (default: multihost-figures.jsonl
in pytest's base temp dir). docs/failure-model.md tabulates them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from etcd_harness import CertPaths, EtcdHarnessError
from netns import (
    Host,
    HostProcess,
    NetnsEtcdCluster,
    NetnsEtcdMember,
    Network,
    ip,
    ns_pids,
    sweep_stale,
)
from rdzv_testlib import ROOT, new_run_id
from waiting import wait_until

# A scenario takes 20-50 s on an idle 2-core machine; the limit is for a heavily shared one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LAUNCH = [sys.executable, "-m", "launcher"]
EXAMPLE = str(ROOT / "examples" / "train_ddp.py")
GEN_CERTS = ROOT / "deploy" / "gen-certs.sh"
ETCD_VERSION = "3.5"

# Short timings keep the scenarios lean; docs/failure-model.md explains how they scale. A lease
# shorter than 5 s lapses spuriously when the machine is shared and overloaded (a starved
# launcher misses its keep-alives), so the scenarios tolerate such extra rounds but keep 5 s.
LEASE_TTL = 5.0
BASE_CONF = {"lease_ttl": "5", "last_call_timeout": "10", "join_timeout": "120", "read_timeout": "10"}
# How long any single wait may take on a slow, shared machine (never reached when healthy).
WAIT = 180.0
# Long enough that a fault injected after epoch 2 lands mid-training even on an idle machine
# (about 0.3 s an epoch there), short enough to keep each scenario to tens of seconds.
LONG_RUN = ["--epochs", "30", "--samples", "8192"]

_FINAL_RE = re.compile(r"final_loss=([0-9.eE+-]+|nan)")
_EPOCH_RE = re.compile(r"epoch (\d+)/(\d+) loss=")
_RESUMED_RE = re.compile(r"resumed from \S+ after epoch (\d+)")
_TRAINED_RE = re.compile(r"trained epochs (\d+)\.\.(\d+) on (\d+) worker")


# ------------------------------------------------------------------------------------ helpers


def conf_text(conf: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in conf.items())


def host_env(*, iface: str = "eth0", omp: bool = True, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launcher: ours minus launcher/rendezvous settings, gloo on eth0."""
    drop = ("PET_", "TORCHELASTIC_", "RDZV_ETCD_", "MASTER_", "GLOO_", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(GLOO_SOCKET_IFNAME=iface, PYTHONUNBUFFERED="1")
    if omp:
        env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def launch(
    host: Host,
    *,
    name: str,
    run_id: str,
    endpoints: str,
    nnodes: str,
    conf: dict[str, str],
    args: Sequence[str],
    nproc: int = 1,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> HostProcess:
    argv = [
        *LAUNCH,
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=etcd",
        f"--rdzv-endpoint={endpoints}",
        f"--rdzv-id={run_id}",
        f"--rdzv-conf={conf_text(conf)}",
        f"--local-addr={host.ip}",
        "--log-format=json",
        *extra,
        EXAMPLE,
        *args,
    ]
    return host.spawn(argv, name=name, env=env or host_env(), cwd=ROOT)


def final_loss(proc: HostProcess) -> float | None:
    found = _FINAL_RE.findall(proc.text())
    return float(found[-1]) if found else None


def epochs_done(proc: HostProcess) -> int:
    found = _EPOCH_RE.findall(proc.text())
    return int(found[-1][0]) if found else 0


def formations(proc: HostProcess, after: float = 0.0) -> list[dict[str, Any]]:
    """The rounds ``proc`` joined (rendezvous_complete records), those after ``after`` only."""
    return [e for e in proc.events("rendezvous_complete") if e["ts"] > after]


def wait_all(procs: Sequence[HostProcess], timeout: float = WAIT) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(1.0, deadline - time.monotonic())))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_others(procs, p)}") from None
    return codes


def _others(procs: Sequence[HostProcess], but: HostProcess) -> str:
    # A node that hangs usually waits for a peer: show the peers too.
    return "\n".join(f"--- {q.name} on {q.host.name} (rc={q.poll()}):\n{q.tail(30)}" for q in procs if q is not but)


def assert_ok(procs: Sequence[HostProcess], timeout: float = WAIT) -> None:
    codes = wait_all(procs, timeout)
    for p, rc in zip(procs, codes, strict=True):
        assert rc == 0, f"{p.name} on {p.host.name} exited {rc}; log tail:\n{p.tail()}\n{_others(procs, p)}"




def gen_certs(out: Path, *sans: str, ca_cn: str = "rdzv-etcd-ca") -> Path:
    """deploy/gen-certs.sh into ``out`` (the same script the compose stack uses)."""
    subprocess.run(
        ["bash", str(GEN_CERTS), str(out), *sans],
        check=True,
        capture_output=True,
        env={**os.environ, "CA_CN": ca_cn},
        timeout=60,
    )
    return out


def rdzv_ops(host: Host, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`rdzv ARGS` (status/clean) run on ``host``."""
    argv = host.exec_args([sys.executable, "-m", "launcher.ops", *args])
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env or host_env(), cwd=ROOT)


def cmdlines(pids: Sequence[int]) -> dict[int, str]:
    out = {}
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        out[pid] = raw.replace(b"\0", b" ").decode(errors="replace")
    return out


def environs(pids: Sequence[int]) -> dict[int, bytes]:
    out = {}
    for pid in pids:
        try:
            out[pid] = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
    return out


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., None]:
    """``figures(scenario, **values)``: one `[figure]` line on the terminal and in the JSONL file."""
    path = Path(os.environ.get("RDZV_FIGURES") or tmp_path_factory.getbasetemp() / "multihost-figures.jsonl")
    plugins = request.config.pluginmanager
    reporter = plugins.getplugin("terminalreporter")
    capture = plugins.getplugin("capturemanager")

    def record(scenario: str, **values: Any) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        line = f"[figure] {scenario}: {shown}"
        # Shown with or without -s: suspend output capture around the write.
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            if reporter is not None:
                reporter.write_line(line)
            else:
                print(line, flush=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"scenario": scenario, "ts": round(time.time(), 3), **values}) + "\n")

    return record


@pytest.fixture(scope="module")
def hosts(netns_net: Network) -> list[Host]:
    """Three training hosts, h0..h2 = 10.77.0.1..3."""
    return [netns_net.add_host(f"h{i}", 1 + i) for i in range(3)]


@pytest.fixture(scope="module")
def etcd_hosts(netns_net: Network) -> list[Host]:
    """Three etcd hosts, e0..e2 = 10.77.0.11..13."""
    return [netns_net.add_host(f"e{i}", 11 + i) for i in range(3)]


@pytest.fixture(scope="module")
def etcd3_module(request: pytest.FixtureRequest, netns_net: Network, etcd_hosts: list[Host]) -> NetnsEtcdCluster:
    cluster = NetnsEtcdCluster(ETCD_VERSION, etcd_hosts, netns_net.control)
    request.addfinalizer(cluster.stop)
    try:
        cluster.start()
    except EtcdHarnessError as e:
        pytest.fail(str(e), pytrace=False)
    return cluster


@pytest.fixture
def etcd3(etcd3_module: NetnsEtcdCluster) -> NetnsEtcdCluster:
    """The module's 3-member cluster, every member running and a leader agreed (tests kill members)."""
    for m in etcd3_module.members:
        if not m.running:
            m.restart()
    etcd3_module.wait_leader()
    return etcd3_module


# ------------------------------------------------------------------------------------ 0. harness


def test_netns_teardown_and_stale_sweep(netns_net: Network, tmp_path: Path) -> None:
    """Closing a network kills what runs in it; namespaces of a dead test process are swept."""
    net = Network(tmp_path / "logs", tag="selftest")
    host = net.add_host("x0", 50)
    sleeper = host.spawn(["sleep", "600"], name="sleeper")
    orphan = subprocess.Popen(host.exec_args(["sleep", "600"]), start_new_session=True)
    # Inside before the close: one that enters after the close's look would outlive it.
    wait_until(lambda: orphan.pid in ns_pids(host.ns), 10, "the orphan to enter the namespace")
    net.close()
    assert sleeper.poll() is not None
    assert orphan.wait(timeout=10) is not None
    assert host.ns not in ip("netns", "list")

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = f"rdzvt-{gone.pid}-stale-x0"  # named for a test process that no longer exists
    ip("netns", "add", stale)
    left = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "600"], start_new_session=True)
    try:
        wait_until(lambda: ns_pids(stale), 10, "the process in the stale namespace")
        assert stale in sweep_stale()
        assert left.wait(timeout=10) is not None
        assert stale not in ip("netns", "list")
    finally:
        ip("netns", "delete", stale, check=False)
        if left.poll() is None:
            left.kill()


# ------------------------------------------------------------------------------------ 1. training


def test_three_hosts_train_like_one_host(etcd3: NetnsEtcdCluster, hosts: list[Host], figures: Callable[..., None]) -> None:
    """3 hosts x 2 workers over gloo end with the loss of a 1 host x 6 workers run."""
    run_id = new_run_id("s1")
    args = ["--epochs", "5", "--seed", "7"]
    started = time.time()
    procs = [
        launch(h, name=f"s1-{h.name}", run_id=run_id, endpoints=etcd3.endpoint, nnodes="3",
               nproc=2, conf=BASE_CONF, args=args)
        for h in hosts
    ]
    # The single-host reference, alongside: embedded rendezvous, 6 workers, same seed.
    reference = hosts[0].spawn(
        [*LAUNCH, "--standalone", "--nproc-per-node=6", "--log-format=json", EXAMPLE, *args],
        name="s1-reference",
        env=host_env(iface="lo"),
        cwd=ROOT,
    )
    assert_ok([*procs, reference])
    took = time.time() - started
    ranks = sorted(formations(p)[0]["node_rank"] for p in procs)
    assert ranks == [0, 1, 2]
    assert all(formations(p)[0]["nodes"] == 3 for p in procs)
    multi = final_loss(procs[[formations(p)[0]["node_rank"] for p in procs].index(0)])
    single = final_loss(reference)
    assert multi is not None and single is not None
    assert "on 6 worker(s)" in procs[0].text() + procs[1].text() + procs[2].text()
    assert multi == pytest.approx(single, rel=0, abs=1e-6), (multi, single)
    assert etcd3.count_keys(f"/rdzv/{run_id}/") == 0
    figures("1-train-3x2", final_loss_3x2=multi, final_loss_1x6=single, job_s=round(took, 1))



def elastic_trio_past_epoch_2(
    tag: str, etcd3: NetnsEtcdCluster, hosts: list[Host], tmp_path: Path
) -> tuple[str, list[HostProcess]]:
    """Scenarios 2 and 3 start alike: one launcher per host, --nnodes=2:3, checkpoints, training
    past epoch 2, and h2 not node rank 0 (the node the scenario takes away)."""
    run_id = new_run_id(tag)
    args = [*LONG_RUN, "--checkpoint-dir", str(tmp_path / "ckpt")]
    procs = [
        launch(h, name=f"{tag}-{h.name}", run_id=run_id, endpoints=etcd3.endpoint, nnodes="2:3",
               conf=BASE_CONF, args=args, extra=["--max-restarts=3"])
        for h in hosts
    ]
    procs[0].wait_until(lambda p: epochs_done(p) >= 2, WAIT, "epoch 2")
    assert formations(procs[2])[-1]["node_rank"] != 0
    return run_id, procs

# ------------------------------------------------------------------------------------ 2. node loss


def test_launcher_sigkill_survivors_reform(etcd3: NetnsEtcdCluster, hosts: list[Host], figures: Callable[..., None], tmp_path: Path) -> None:
    """--nnodes=2:3: SIGKILL one launcher mid-training; the other two re-form and finish from the checkpoint."""
    run_id, (h0, h1, h2) = elastic_trio_past_epoch_2("s2", etcd3, hosts, tmp_path)
    assert formations(h0)[-1]["nodes"] == 3
    killed_at = time.time()
    h2.signal()  # SIGKILL: no shutdown, no lease revoke; its workers are orphaned
    epoch_at_kill = epochs_done(h0)
    h2.popen.wait(timeout=10)
    # Its node record goes with its lease: etcd expires it within the TTL.
    wait_until(lambda: etcd3.count_keys(f"/rdzv/{run_id}/node/") <= 2, WAIT, "h2's lease to expire", step=0.1)
    expired_s = time.time() - killed_at

    second = h0.wait_until(lambda p: formations(p, after=killed_at), WAIT, "the survivors' new round")[0]
    reform_s = second["ts"] - killed_at
    assert second["nodes"] == 2
    assert_ok([h0, h1])
    assert epoch_at_kill < 30, "training ended before the kill landed"
    text = h0.text()
    resumed = [int(e) for e in _RESUMED_RE.findall(text)]
    assert resumed and resumed[-1] >= 2, text[-2000:]
    first, last, world = _TRAINED_RE.findall(text)[-1]
    assert (int(first), int(last), int(world)) == (resumed[-1] + 1, 30, 2)
    assert final_loss(h0) is not None
    # The orphaned workers of the dead launcher fail once their peers are gone.
    orphans_gone = wait_until(lambda: not ns_pids(hosts[2].ns), 60, "h2's orphaned workers to exit")
    assert expired_s < LEASE_TTL + 2
    assert reform_s < LEASE_TTL + 15
    figures(
        "2-launcher-sigkill",
        kill_to_lease_expired_s=round(expired_s, 2),
        kill_to_new_round_s=round(reform_s, 2),
        lease_ttl_s=LEASE_TTL,
        killed_after_epoch=epoch_at_kill,
        resumed_after_epoch=resumed[-1],
        orphans_exited=bool(orphans_gone),
    )


# ------------------------------------------------------------------------------------ 3. partition


def test_link_cut_excluded_then_rejoins(etcd3: NetnsEtcdCluster, hosts: list[Host], figures: Callable[..., None], tmp_path: Path) -> None:
    """Cut h2's link mid-training: it drops out within the lease TTL; back up, it rejoins the next round."""
    run_id, procs = elastic_trio_past_epoch_2("s3", etcd3, hosts, tmp_path)
    h0, h1, h2 = procs
    hosts[2].link_down()
    cut_at = time.time()
    try:
        wait_until(lambda: etcd3.count_keys(f"/rdzv/{run_id}/node/") <= 2, WAIT, "h2's lease to expire", step=0.1)
        expired_s = time.time() - cut_at
        second = h0.wait_until(lambda p: formations(p, after=cut_at), WAIT, "the survivors' round without h2")[0]
        excluded_s = second["ts"] - cut_at
        assert second["nodes"] == 2
        assert not formations(h2, after=cut_at)
    finally:
        hosts[2].link_up()
    up_at = time.time()
    rejoined = h2.wait_until(lambda p: formations(p, after=up_at), WAIT, "h2 to rejoin")[0]
    rejoin_s = rejoined["ts"] - up_at
    assert rejoined["nodes"] == 3
    assert_ok(procs)
    assert [f["nodes"] for f in formations(h0)][-1] == 3
    assert _TRAINED_RE.findall(h0.text())[-1][2] == "3"
    assert expired_s < LEASE_TTL + 2, "excluded within the lease TTL (plus etcd's expiry tick and polling)"
    assert excluded_s < LEASE_TTL + 15
    figures(
        "3-link-cut",
        cut_to_lease_expired_s=round(expired_s, 2),
        cut_to_round_without_it_s=round(excluded_s, 2),
        link_up_to_rejoined_s=round(rejoin_s, 2),
        lease_ttl_s=LEASE_TTL,
        rounds_seen_by_h0=len(formations(h0)),
    )


# ------------------------------------------------------------------------------------ 4. etcd loss


def _kill(cluster: NetnsEtcdCluster, member: NetnsEtcdMember) -> float:
    """SIGKILL ``member``; returns how long the rest took to agree on a leader."""
    t = time.monotonic()
    member.kill()
    cluster.wait_leader(timeout=30)
    return time.monotonic() - t


def test_etcd_member_loss_during_formation_and_training(
    etcd3: NetnsEtcdCluster, hosts: list[Host], figures: Callable[..., None], tmp_path: Path
) -> None:
    """Kill the leader, then the member the first node talks to, while it waits; same in training."""
    run_id = new_run_id("s4")
    # The default lease: member loss must not cost a restart (only lost *nodes* should).
    conf = {**BASE_CONF, "lease_ttl": "10"}
    leader = etcd3.wait_leader()
    followers = [m for m in etcd3.members if m is not leader]
    # h0 talks to a follower first, so "the leader" and "h0's member" are different processes.
    h0_endpoints = ",".join(m.endpoint for m in [*followers, leader])
    args = [*LONG_RUN, "--checkpoint-dir", str(tmp_path / "ckpt")]
    h0 = launch(hosts[0], name="s4-h0", run_id=run_id, endpoints=h0_endpoints, nnodes="2",
                conf=conf, args=args)
    wait_until(lambda: etcd3.count_keys(f"/rdzv/{run_id}/node/") >= 1 or h0.poll() is not None,
               WAIT, "h0 to announce itself", step=0.2)
    assert h0.poll() is None, h0.tail()

    # During formation: h0 is waiting for a second node.
    peers = hosts[0].tcp_peers(h0.pid, 2379)
    connected = etcd3.member_on(followers[0].host.ip)
    assert connected.host.ip in peers, peers
    elect_formation = _kill(etcd3, leader)
    leader.restart()
    etcd3.wait_leader()
    peers = hosts[0].tcp_peers(h0.pid, 2379)
    assert connected.host.ip in peers, peers
    killed_connected_at = time.time()
    connected.kill()
    h1 = launch(hosts[1], name="s4-h1", run_id=run_id, endpoints=etcd3.endpoint, nnodes="2",
                conf=conf, args=args)
    first = h0.wait_until(lambda p: formations(p)[:1], WAIT, "formation")[0]
    formation_s = first["ts"] - killed_connected_at
    assert first["nodes"] == 2
    connected.restart()
    etcd3.wait_leader()

    # During training.
    h0.wait_until(lambda p: epochs_done(p) >= 1, WAIT, "epoch 1")
    leader = etcd3.wait_leader()
    elect_training = _kill(etcd3, leader)
    leader.restart()
    etcd3.wait_leader()
    live = {etcd3.member_on(ip) for ip in hosts[0].tcp_peers(h0.pid, 2379) if ip}
    assert live, "h0 holds no etcd connection"
    victim = sorted(live, key=lambda m: m.name)[0]
    epoch_at_second_kill = epochs_done(h0)
    victim.kill()
    assert_ok([h0, h1])
    assert epoch_at_second_kill < 30, "training ended before the second kill landed"
    # Nothing failed: one formation, no restart of the workers.
    assert [len(formations(p)) for p in (h0, h1)] == [1, 1]
    assert "resumed from" not in h0.text() + h1.text()
    figures(
        "4-etcd-member-loss",
        new_leader_after_kill_formation_s=round(elect_formation, 2),
        new_leader_after_kill_training_s=round(elect_training, 2),
        formation_after_connected_member_killed_s=round(formation_s, 2),
        h1_join_took_s=formations(h1)[0]["took_s"],
        killed_in_training_at_epoch=epoch_at_second_kill,
        worker_restarts=0,
    )


# ------------------------------------------------------------------------------------ 5. sharing


def test_concurrent_jobs_and_run_id_reuse(etcd3: NetnsEtcdCluster, hosts: list[Host], figures: Callable[..., None]) -> None:
    """Two jobs at once on one etcd stay apart; a finished job's run id works again at once."""
    job_a, job_b = new_run_id("s5a"), new_run_id("s5b")
    args = ["--epochs", "3", "--samples", "8192", "--seed", "5"]
    h0, h1, h2 = hosts

    def job(run_id: str, pair: Sequence[Host], tag: str) -> list[HostProcess]:
        return [
            launch(h, name=f"s5-{tag}-{h.name}", run_id=run_id, endpoints=etcd3.endpoint, nnodes="2",
                   conf=BASE_CONF, args=args)
            for h in pair
        ]

    a = job(job_a, (h0, h1), "a")
    b = job(job_b, (h1, h2), "b")
    for p in (a[0], b[0]):
        p.wait_until(formations, WAIT, "formation")
    # What an operator sees meanwhile: both runs, two members each.
    status = rdzv_ops(h2, "status", f"--rdzv-endpoint={etcd3.endpoint}", "--json")
    assert status.returncode == 0, status.stderr
    runs = {r["run_id"]: r for r in json.loads(status.stdout)}
    assert {job_a, job_b} <= runs.keys(), runs.keys()
    assert all(len(runs[r]["members"]) == 2 for r in (job_a, job_b))
    assert_ok(a)
    a_done = time.time()
    assert etcd3.count_keys(f"/rdzv/{job_a}/") == 0, "a cleanly finished run leaves no keys"
    # A new job under the finished job's id, while job b may still be running.
    c = job(job_a, (h2, h0), "c")
    assert_ok(b)
    assert_ok(c)
    reuse_s = formations(c[0])[0]["ts"] - a_done
    losses = set()
    for procs in (a, b, c):
        assert all(f["nodes"] == 2 for p in procs for f in formations(p))
        text = "".join(p.text() for p in procs)
        assert _TRAINED_RE.findall(text)[-1][2] == "2"
        losses.update(final_loss(p) for p in procs if final_loss(p) is not None)
    # Same seed and world size: the same loss, so no job saw another's workers.
    assert len(losses) == 1, losses
    assert etcd3.count_keys(f"/rdzv/{job_a}/") == 0 and etcd3.count_keys(f"/rdzv/{job_b}/") == 0
    cleaned = rdzv_ops(h2, "clean", f"--rdzv-endpoint={etcd3.endpoint}", f"--rdzv-id={job_a}", "-y", "--json")
    assert cleaned.returncode == 0 and json.loads(cleaned.stdout)["removed"] == 0, cleaned
    figures(
        "5-shared-etcd",
        concurrent_jobs=2,
        status_listed_both=True,
        reused_run_id_formed_after_s=round(reuse_s, 2),
        keys_left=0,
    )


# ------------------------------------------------------------------------------------ 6. security


@pytest.fixture(scope="module")
def tls_etcd(request: pytest.FixtureRequest, netns_net: Network, tmp_path_factory: pytest.TempPathFactory) -> tuple[NetnsEtcdCluster, CertPaths]:
    """A mutual-TLS etcd on host "tls" (10.77.0.21) with certs from deploy/gen-certs.sh."""
    host = netns_net.add_host("tls", 21)
    base = tmp_path_factory.mktemp("tls")
    good = gen_certs(base / "good", host.ip)
    other = gen_certs(base / "other", host.ip, ca_cn="someone-else-ca")
    certs = CertPaths(
        dir=good,
        ca_cert=good / "ca.crt",
        ca_key=good / "ca.key",
        server_cert=good / "server.crt",
        server_key=good / "server.key",
        client_cert=good / "client.crt",
        client_key=good / "client.key",
        other_ca_cert=other / "ca.crt",
        other_ca_key=other / "ca.key",
        other_client_cert=other / "client.crt",
        other_client_key=other / "client.key",
    )
    cluster = NetnsEtcdCluster(ETCD_VERSION, [host], netns_net.control, certs=certs)
    request.addfinalizer(cluster.stop)
    try:
        cluster.start()
    except EtcdHarnessError as e:
        pytest.fail(str(e), pytrace=False)
    return cluster, certs


@pytest.fixture(scope="module")
def auth_etcd(request: pytest.FixtureRequest, netns_net: Network) -> NetnsEtcdCluster:
    """etcd with auth on host "auth" (10.77.0.22): users team-a and team-b, a role per prefix."""
    host = netns_net.add_host("auth", 22)
    cluster = NetnsEtcdCluster(ETCD_VERSION, [host], netns_net.control)
    request.addfinalizer(cluster.stop)
    try:
        cluster.start()
        cluster.etcdctl("role", "add", "team-b")
        cluster.etcdctl("role", "grant-permission", "team-b", "readwrite", "/team-b/", "--prefix=true")
        cluster.etcdctl("user", "add", f"team-b:{TEAM_B_PASSWORD}", "--interactive=false")
        cluster.etcdctl("user", "grant-role", "team-b", "team-b")
        cluster.enable_auth(root_password="root-S3cret", user="team-a", password=TEAM_A_PASSWORD, prefix="/team-a/")
    except EtcdHarnessError as e:
        pytest.fail(str(e), pytrace=False)
    return cluster


TEAM_A_PASSWORD = "pw-team-a-7f3e9c1d"
TEAM_B_PASSWORD = "pw-team-b-0b6a4e2f"
ERROR_LIMIT_S = 10.0
# A refused node's whole run also pays Python + torch imports (about 2 s idle); allow for a
# loaded machine on top of the 10 s the error itself may take.
STARTUP_ALLOWANCE_S = 20.0


def _expect_refused(host: Host, *, name: str, endpoint: str, conf: dict[str, str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Start a node that must fail to reach etcd: (seconds spawn->exit, seconds connect->exit, message)."""
    proc = launch(host, name=name, run_id=new_run_id("s6bad"), endpoints=endpoint, nnodes="2",
                  nproc=2, conf={**BASE_CONF, **conf}, args=["--epochs", "1"],
                  env=env or host_env(omp=False))
    rc = proc.wait(60)
    ended = time.time()
    assert rc != 0, proc.tail()
    errors = proc.events("rendezvous_failed") or [e for e in proc.events() if e.get("level") == "error"]
    assert errors, f"no error record from {name}:\n{proc.tail()}"
    # The OMP notice is the launcher's last word before it creates the handler (connects).
    ready = proc.events("omp_num_threads")
    connect_at = ready[0]["ts"] if ready else proc.started
    assert not proc.events("rendezvous_complete")
    return ended - proc.started, errors[-1]["ts"] - connect_at, errors[-1]["message"]


def test_tls_client_certificates(tls_etcd: tuple[NetnsEtcdCluster, CertPaths], hosts: list[Host], figures: Callable[..., None]) -> None:
    cluster, certs = tls_etcd
    url = f"https://{cluster.members[0].endpoint}"
    good = {"cacert": str(certs.ca_cert), "cert": str(certs.client_cert), "key": str(certs.client_key)}
    run_id = new_run_id("s6tls")
    procs = [
        launch(h, name=f"s6-tls-{h.name}", run_id=run_id, endpoints=url, nnodes="2",
               conf={**BASE_CONF, **good}, args=["--epochs", "2"])
        for h in hosts[:2]
    ]
    assert_ok(procs)
    assert final_loss(procs[0]) is not None or final_loss(procs[1]) is not None

    cases = {
        "no_client_cert": ({"cacert": str(certs.ca_cert)}, r"TLS handshake.*client certificate"),
        "client_cert_from_untrusted_ca": (
            {"cacert": str(certs.ca_cert), "cert": str(certs.other_client_cert), "key": str(certs.other_client_key)},
            r"TLS handshake.*client certificate",
        ),
        "server_not_trusted": (
            {"cacert": str(certs.other_ca_cert), "cert": str(certs.client_cert), "key": str(certs.client_key)},
            r"TLS handshake.*not trusted",
        ),
    }
    results = {}
    for case, (conf, expected) in cases.items():
        total, after_connect, message = _expect_refused(hosts[2], name=f"s6-tls-{case}", endpoint=url, conf=conf)
        assert re.search(expected, message, re.I), (case, message)
        assert url.removeprefix("https://") in message, (case, message)
        assert after_connect < ERROR_LIMIT_S, (case, after_connect, message)
        assert total < ERROR_LIMIT_S + STARTUP_ALLOWANCE_S, (case, total)
        results[case] = (round(total, 2), round(after_connect, 2))
    figures(
        "6-tls",
        ok_job=True,
        **{f"{case}_error_s": after for case, (_, after) in results.items()},
        **{f"{case}_total_s": total for case, (total, _) in results.items()},
    )


def test_auth_role_per_prefix_and_secret_hygiene(auth_etcd: NetnsEtcdCluster, hosts: list[Host], figures: Callable[..., None], tmp_path: Path) -> None:
    endpoint = auth_etcd.members[0].endpoint
    secret = tmp_path / "team-a.password"
    secret.write_text(TEAM_A_PASSWORD + "\n")
    secret.chmod(0o600)
    run_id = new_run_id("s6auth")
    conf = {**BASE_CONF, "prefix": "/team-a", "user": "team-a"}
    # h0 reads the password from a file, h1 from $RDZV_ETCD_PASSWORD: neither is on a command line.
    p0 = launch(hosts[0], name="s6-auth-h0", run_id=run_id, endpoints=endpoint, nnodes="2",
                conf={**conf, "password_file": str(secret)}, args=["--epochs", "4", "--samples", "8192"])
    p1 = launch(hosts[1], name="s6-auth-h1", run_id=run_id, endpoints=endpoint, nnodes="2", conf=conf,
                args=["--epochs", "4", "--samples", "8192"],
                env=host_env(extra={"RDZV_ETCD_PASSWORD": TEAM_A_PASSWORD}))
    p0.wait_until(lambda p: formations(p), WAIT, "formation")

    def workers_up() -> list[int]:
        pids = ns_pids(hosts[0].ns) + ns_pids(hosts[1].ns)
        return pids if sum("train_ddp.py" in c for c in cmdlines(pids).values()) >= 4 else []

    # Every process of both hosts, the launchers and their workers: no password in argv.
    pids = wait_until(workers_up, WAIT, "the workers", step=0.02)
    lines = cmdlines(pids)
    assert len(lines) >= 4
    leaks = {pid: c for pid, c in lines.items() if TEAM_A_PASSWORD in c}
    assert not leaks, leaks
    file_host_env_leaks = [
        pid for pid, env in environs(ns_pids(hosts[0].ns)).items() if TEAM_A_PASSWORD.encode() in env
    ]
    assert not file_host_env_leaks
    env_host_inherited = sum(
        TEAM_A_PASSWORD.encode() in env for env in environs(ns_pids(hosts[1].ns)).values()
    )
    # Only the launcher's own start-up environment holds it; its workers do not inherit it.
    assert env_host_inherited <= 1, env_host_inherited
    # The ops command reads the team's credentials from PET_RDZV_CONF (not argv) and sees the run.
    status = rdzv_ops(
        hosts[2], "status", f"--rdzv-endpoint={endpoint}", "--prefix=/team-a", "--json",
        env=host_env(extra={"PET_RDZV_CONF": f"user=team-a,password={TEAM_A_PASSWORD}"}),
    )
    assert status.returncode == 0, status.stderr
    assert run_id in {r["run_id"] for r in json.loads(status.stdout)}
    assert TEAM_A_PASSWORD not in status.stdout + status.stderr
    assert_ok([p0, p1])
    for p in (p0, p1):
        assert TEAM_A_PASSWORD not in p.text()
    assert auth_etcd.count_keys("/team-a/", user=f"team-a:{TEAM_A_PASSWORD}") == 0

    bad = {
        "wrong_password": ({**conf}, {"RDZV_ETCD_PASSWORD": "not-the-password"}, r"invalid user ID or password"),
        "other_teams_prefix": (
            {**conf, "prefix": "/team-b"}, {"RDZV_ETCD_PASSWORD": TEAM_A_PASSWORD}, r"permission denied"
        ),
        "no_credentials": ({k: v for k, v in conf.items() if k != "user"}, {}, r"user name is empty"),
    }
    results = {}
    for case, (case_conf, extra_env, expected) in bad.items():
        total, after_connect, message = _expect_refused(
            hosts[2], name=f"s6-auth-{case}", endpoint=endpoint,
            conf=case_conf,
            env=host_env(omp=False, extra=extra_env),
        )
        assert re.search(expected, message, re.I), (case, message)
        assert "authentication/authorization failed" in message, (case, message)
        assert after_connect < ERROR_LIMIT_S, (case, after_connect, message)
        assert total < ERROR_LIMIT_S + STARTUP_ALLOWANCE_S, (case, total)
        for secret_text in (TEAM_A_PASSWORD, "not-the-password"):
            assert secret_text not in message
        results[case] = (round(total, 2), round(after_connect, 2))
    for p in hosts[2].procs:
        assert TEAM_A_PASSWORD not in p.text() and "not-the-password" not in p.text()
    figures(
        "6-auth",
        ok_job=True,
        processes_checked=len(lines),
        password_in_cmdline=0,
        env_password_holders=env_host_inherited,  # the launcher it was given to; no worker
        **{f"{case}_error_s": after for case, (_, after) in results.items()},
        **{f"{case}_total_s": total for case, (total, _) in results.items()},
    )

