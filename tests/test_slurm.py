"""deploy/slurm/rdzv-train.sbatch on a real Slurm: one sbatch job across two network hosts.

tests/slurm_cluster.py starts munged, slurmctld and one slurmd per host namespace
(tests/netns.py); the test submits the script in deploy/slurm/ itself with sbatch, as an operator
would. Workers report through files (tests/workers/ddp_linear.py writes rank<R>.json; the example
writes its checkpoint). Skipped, in one line, where Slurm cannot start (not root, not installed,
no network namespaces).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import slurm_cluster
import torch
from etcd_binaries import etcd_binary
from netns import Host, NetnsEtcdCluster, Network, ns_pids
from rdzv_testlib import ROOT
from waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = ROOT / "deploy" / "slurm" / "rdzv-train.sbatch"
WORKER = ROOT / "tests" / "workers" / "ddp_linear.py"
EXAMPLE = ROOT / "examples" / "train_ddp.py"
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
WAIT = 180.0


@pytest.fixture(scope="module")
def nodes(netns_net: Network) -> list[Host]:
    return [netns_net.add_host(f"node{i}", i) for i in (1, 2)]


@pytest.fixture(scope="module")
def slurm(netns_net: Network, nodes: list[Host]) -> Iterator[slurm_cluster.SlurmCluster]:
    reason = slurm_cluster.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with slurm_cluster.SlurmCluster(netns_net, nodes) as cluster:
        yield cluster


def job_env(cluster: slurm_cluster.SlurmCluster, **extra: str) -> dict[str, str]:
    """What sbatch passes to the job: this venv's rdzv-launch and rdzv first on PATH, gloo on eth0."""
    drop = ("PET_", "TORCHELASTIC_", "RDZV_", "MASTER_", "GLOO_", "SLURM_")
    env = {k: v for k, v in cluster.env().items() if not k.startswith(drop) or k == "SLURM_CONF"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env.update(GLOO_SOCKET_IFNAME="eth0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def wait_done(cluster: slurm_cluster.SlurmCluster, job_id: int, output: Path) -> dict[str, str]:
    def finished() -> dict[str, str] | None:
        job = cluster.job(job_id)
        return job if job.get("JobState") in DONE else None

    def why() -> str:
        text = output.read_text(errors="replace") if output.exists() else "(no output yet)"
        return f"job {job_id}: {cluster.job(job_id)}\n--- job output:\n{text[-6000:]}\n{cluster.logs(20)}"

    return wait_until(finished, WAIT, f"job {job_id} to end", why, step=0.2)


def etcd_processes(host: Host) -> list[int]:
    found = []
    for pid in ns_pids(host.ns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode()).name == "etcd":
            found.append(pid)
    return found


def test_two_node_job_forms_over_its_own_etcd_and_trains(
    slurm: slurm_cluster.SlurmCluster, nodes: list[Host], tmp_path: Path
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    output = tmp_path / "job.out"
    env = job_env(slurm, RESULTS_DIR=str(results), ETCD_BIN=str(etcd_binary("3.5")), TMPDIR=str(tmp_path))
    job_id = slurm.submit(SCRIPT, [str(WORKER)], sbatch_args=["--nodes=2", f"--output={output}"], env=env, cwd=ROOT)
    job = wait_done(slurm, job_id, output)
    log = output.read_text(errors="replace")
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log
    assert job["NodeList"] == "node[1-2]"
    assert f"etcd for this job at {nodes[0].ip}:2379" in log, log
    ranks = [json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # One rank per node (GROUP_RANK is the node's rank), one DDP group: the same parameters.
    assert sorted(r["env"]["GROUP_RANK"] for r in ranks) == ["0", "1"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and ranks[0]["sum"] == 1.0
    # The job's etcd is gone with the job: no process, no data dir.
    assert not etcd_processes(nodes[0])
    assert not (tmp_path / f"rdzv-etcd-{job_id}").exists()


def test_requeued_job_keeps_its_run_id_and_resumes_on_a_shared_etcd(
    slurm: slurm_cluster.SlurmCluster, netns_net: Network, tmp_path: Path
) -> None:
    etcd_host = netns_net.add_host("etcd0", 11)
    cluster = NetnsEtcdCluster("3.5", [etcd_host], netns_net.control)
    cluster.start()
    try:
        ckpt_root = tmp_path / "ckpt"
        output = tmp_path / "job.out"
        env = job_env(slurm, RDZV_ETCD_ENDPOINTS=cluster.endpoint, RDZV_CHECKPOINT_ROOT=str(ckpt_root))
        args = [str(EXAMPLE), "--epochs=400", "--samples=256"]
        job_id = slurm.submit(SCRIPT, args, sbatch_args=["--nodes=2", f"--output={output}"], env=env, cwd=ROOT)
        checkpoint = ckpt_root / f"slurm-{job_id}" / "checkpoint.pt"
        wait_until(checkpoint.exists, WAIT, "the first checkpoint",
                   lambda: output.read_text(errors="replace")[-4000:] if output.exists() else "")
        r = slurm.command(["scontrol", "requeue", str(job_id)])
        assert r.returncode == 0, r.stderr
        job = wait_done(slurm, job_id, output)
        log = output.read_text(errors="replace")
        assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log
        assert f"job {job_id} attempt 1, run slurm-{job_id}" in log
        assert f"cleaned run slurm-{job_id}:" in log, log  # the killed attempt's keys, if any
        # The second attempt resumed from the first one's checkpoint and finished the epochs.
        assert f"resumed from {checkpoint} after epoch" in log, log
        assert torch.load(checkpoint, weights_only=False)["epoch"] == 400
        assert cluster.count_keys(f"/rdzv/slurm-{job_id}/") == 0
    finally:
        cluster.stop()
