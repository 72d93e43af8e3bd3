"""A run whose node died right after closing it: the relaunch is refused with a remedy that works.

The dead node's record and the closed marker stay until their leases expire (the run lease's
TTL is 3 x the dying node's `lease_ttl`, not the relaunching node's). The refusal quotes an `rdzv clean`
command; run as quoted, it frees the id at once, without --force, and the relaunch then runs.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from etcd_harness import EtcdServer
from launcher_helpers import ENV_DUMP, clean_env, run_launcher, write_script

from rdzv.backends.common.run_keepers import RUN_TTL_LEASES
from rdzv.etcd import EtcdClient

pytestmark = pytest.mark.timeout(180)

OLD_TTL = 30  # the dead job's lease_ttl: its keys outlive the whole test unless cleaned
NEW_CONF = "lease_ttl=3,last_call_timeout=1,join_timeout=20"

CLOSE_AND_DIE = textwrap.dedent(
    """
    import os, signal, sys
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from rdzv import create_handler

    endpoint, run_id, ttl = sys.argv[1:4]
    handler = create_handler(RendezvousParameters("etcd", endpoint, run_id, 1, 1, lease_ttl=ttl))
    handler.next_rendezvous()
    handler.set_closed()
    os.kill(os.getpid(), signal.SIGKILL)  # dies before shutdown(): nothing is cleaned up
    """
)


def _keys(endpoint: str, run_id: str) -> list[str]:
    with EtcdClient(endpoint) as client:
        return [kv.key.decode() for kv in client.range(f"/rdzv/{run_id}/", prefix=True, keys_only=True).kvs]


def test_closed_run_of_a_dead_node_is_freed_by_the_quoted_command(etcd35: EtcdServer, tmp_path: Path) -> None:
    run_id = f"stale-{uuid.uuid4().hex[:8]}"
    dying = subprocess.run(
        [sys.executable, "-c", CLOSE_AND_DIE, etcd35.endpoint, run_id, str(OLD_TTL)],
        env=clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert dying.returncode == -9, dying.stderr
    died = time.monotonic()
    keys = _keys(etcd35.endpoint, run_id)
    assert any(k.endswith("/ctl/closed") for k in keys) and any("/node/" in k for k in keys), keys

    script = write_script(tmp_path, "dump.py", ENV_DUMP)
    args = [
        "--nnodes=1", "--rdzv-backend=etcd", f"--rdzv-endpoint={etcd35.endpoint}", f"--rdzv-id={run_id}",
        f"--rdzv-conf={NEW_CONF}", "--local-addr=127.0.0.1", "--nproc-per-node=1", str(script), str(tmp_path),
    ]
    rc, _, err = run_launcher(args, tmp_path, timeout=60)
    assert rc == 1, err
    refusal = [line for line in err.splitlines() if "RendezvousClosedError" in line]
    assert len(refusal) == 1, err
    quoted = re.search(r"`(rdzv clean [^`]+)`", refusal[0])
    expiry = re.search(r"expire by themselves within (\d+) s", refusal[0])
    assert quoted and expiry, refusal[0]
    # The old run's own expiry (its run lease of RUN_TTL_LEASES x OLD_TTL s, partly run down), not
    # our lease_ttl of 3 s.
    run_ttl = RUN_TTL_LEASES * OLD_TTL
    assert run_ttl - (time.monotonic() - died) - 2 <= int(expiry.group(1)) <= run_ttl, refusal[0]

    # The command as quoted (it asks for confirmation: answer it), without --force.
    argv = shlex.split(quoted.group(1))
    assert argv[:2] == ["rdzv", "clean"] and "--force" not in argv
    clean = subprocess.run([sys.executable, "-m", "launcher.ops", *argv[1:]], input="y\n", env=clean_env(),
                           capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stderr
    assert f"cleaned run {run_id}: {len(keys)} key(s) removed" in clean.stdout, clean.stdout
    assert _keys(etcd35.endpoint, run_id) == []

    rc, out, err = run_launcher(args, tmp_path, timeout=60)
    assert rc == 0, err
    assert "worker 0 ok" in out
    assert time.monotonic() - died < OLD_TTL, "freed by the command, not by the old keys expiring"
