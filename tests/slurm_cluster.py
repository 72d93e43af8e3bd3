"""A real Slurm cluster on one machine: munged, slurmctld and one slurmd per network namespace.

Debian's `slurm-wlm` and `munge`, every daemon in the foreground with a configuration, key and
state of its own under one test-owned directory (nothing under /etc, /var or /run is used):

    munged      root namespace; a unix socket in the state dir (sockets cross namespaces)
    slurmctld   the network's control host (the switch namespace, 10.77.0.254)
    slurmd -N   one per host namespace, NodeAddr = the host's address, so one job spans hosts

:meth:`SlurmCluster.close` stops every daemon and removes the state dir; the network's own
close kills whatever the jobs left in the namespaces (slurmstepd, launchers, etcd).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from netns import NETNS_DIR, Host, HostProcess, Network
from process_tracking import die_with_parent, drop_data_dir, new_data_dir, track, untrack
from waiting import wait_until

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "srun")
SBIN = ("/usr/sbin", "/usr/bin")


def unavailable_reason() -> str | None:
    """None when a Slurm cluster can be started here; else why not, in one line."""
    if os.geteuid() != 0:
        return "Slurm test cluster needs root (slurmd runs jobs as their user)"
    missing = [d for d in DAEMONS if not _which(d)]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    return None


def _which(name: str) -> str | None:
    path = os.pathsep.join([*SBIN, os.environ.get("PATH", "")])
    return shutil.which(name, path=path)


class SlurmCluster:
    """slurmctld on ``network.control`` and a slurmd on each of ``hosts``; state in a dir of its own."""

    def __init__(self, network: Network, hosts: Sequence[Host]) -> None:
        self.network = network
        self.hosts = list(hosts)
        # Not under pytest's tmp dir: munged wants every directory above its socket searchable
        # by all, and pytest's are 0700. Removed at exit even if close() never runs.
        self.state = new_data_dir("rdzv-slurm-")
        self.state.chmod(0o755)
        self.conf = self.state / "slurm.conf"
        self.munge_socket = self.state / "munge" / "munge.socket"
        self._munged: subprocess.Popen[bytes] | None = None
        self.ctld: HostProcess | None = None
        self.slurmds: list[HostProcess] = []

    # ------------------------------------------------------------------------------ start/stop

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        try:
            self._start_munge()
            self._write_conf()
            env = self.env()
            # -D: foreground; -i: ignore a state dir left by a previous run (it is fresh anyway).
            self.ctld = spawn_in(self.network.control, [_bin("slurmctld"), "-D", "-i", "-f", str(self.conf)],
                                 name="slurmctld", env=env)
            for host in self.hosts:
                (self.state / f"spool-{host.name}").mkdir()
                self.slurmds.append(spawn_in(host, [_bin("slurmd"), "-D", "-N", host.name, "-f", str(self.conf)],
                                             name=f"slurmd-{host.name}", env=env))
            wait_until(self._all_idle, timeout, "every slurmd registered and idle", self.logs)
        except BaseException:
            self.close()
            raise
        return self

    def _start_munge(self) -> None:
        mdir = self.munge_socket.parent
        mdir.mkdir(mode=0o755)
        key = mdir / "munge.key"
        subprocess.run([_bin("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True, timeout=30)
        log = open(mdir / "munged.out", "ab")  # noqa: SIM115 - handed to the daemon
        with log:
            self._munged = subprocess.Popen(
                [_bin("munged"), "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                 f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
                 f"--seed-file={mdir / 'munged.seed'}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent if threading.current_thread() is threading.main_thread() else None)
        track(self._munged)
        wait_until(lambda: self.munge_socket.exists() or self._munged.poll() is not None, 30,
                   "munged's socket", self.logs)
        if self._munged.poll() is not None:
            raise RuntimeError(f"munged exited ({self._munged.poll()}):\n{self.logs()}")

    def _write_conf(self) -> None:
        s = self.state
        (s / "ctld").mkdir()
        cpus = os.cpu_count() or 1
        nodes = "\n".join(
            # The machine's CPUs (slurmd drains a node that claims more), less memory than it has.
            f"NodeName={h.name} NodeAddr={h.ip} CPUs={cpus} RealMemory=100 State=UNKNOWN" for h in self.hosts)
        # slurmctld only runs where the host name is a SlurmctldHost: the machine's own name,
        # reached at the control host's address.
        me = socket.gethostname().split(".")[0]
        self.conf.write_text(f"""\
ClusterName=rdzvtest
SlurmctldHost={me}({self.network.control.ip})
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={s / 'ctld'}
SlurmdSpoolDir={s}/spool-%n
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/linear
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=60
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of the daemons and of sbatch/squeue/scontrol run by the test."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([*SBIN, env.get("PATH", "")])
        env.update(extra or {})
        return env

    def close(self) -> None:
        """Stop every daemon (SIGTERM, then SIGKILL) and remove the state dir. Idempotent."""
        procs = [p.popen for p in self.slurmds] + ([self.ctld.popen] if self.ctld else [])
        if self._munged is not None:
            procs.append(self._munged)
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            untrack(p)
        self.slurmds.clear()
        self.ctld = None
        self._munged = None
        drop_data_dir(self.state)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ commands

    def command(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """A Slurm client command, run on the control host (where slurmctld listens)."""
        argv = self.network.control.exec_args([_bin(argv[0]), *argv[1:]])
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=dict(env or self.env()))

    def _all_idle(self) -> bool:
        for p in [self.ctld, *self.slurmds]:
            if p is not None and p.poll() is not None:
                raise AssertionError(f"{p.name} exited ({p.poll()}):\n{self.logs()}")
        r = self.command(["sinfo", "-h", "-N", "-o", "%N %t"])
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return bool(states) and all(states.get(h.name) == "idle" for h in self.hosts)

    def submit(self, script: Path, args: Sequence[str], *, sbatch_args: Sequence[str],
               env: Mapping[str, str], cwd: Path) -> int:
        """``sbatch`` the script (the file itself, as an operator would); returns the job id."""
        argv = self.network.control.exec_args(
            [_bin("sbatch"), "--parsable", *sbatch_args, str(script), *args])
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=dict(env), cwd=cwd)
        if r.returncode != 0:
            raise AssertionError(f"sbatch failed ({r.returncode}): {r.stderr.strip()}\n{self.logs()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        r = self.command(["scontrol", "-o", "show", "job", str(job_id)])
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def logs(self, lines: int = 40) -> str:
        parts = []
        for p in [self.ctld, *self.slurmds]:
            if p is not None:
                parts.append(f"--- {p.name}:\n{p.tail(lines)}")
        munge_log = self.munge_socket.parent / "munged.log"
        if munge_log.exists():
            parts.append("--- munged:\n" + "\n".join(munge_log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


def spawn_in(host: Host, argv: Sequence[str], *, name: str, env: Mapping[str, str]) -> HostProcess:
    """``host.spawn`` through nsenter: only the network namespace changes. `ip netns exec` also
    mounts a fresh /sys, without /sys/fs/cgroup, and slurmd will not start without it (it only
    reads it here: proctrack/linuxproc and task/none make no cgroups)."""
    saved = host.exec_args
    host.exec_args = lambda args: ["nsenter", f"--net={NETNS_DIR / host.ns}", "--", *args]  # type: ignore[method-assign]
    try:
        return host.spawn(argv, name=name, env=dict(env))
    finally:
        host.exec_args = saved  # type: ignore[method-assign]


def _bin(name: str) -> str:
    path = _which(name)
    if path is None:
        raise FileNotFoundError(name)
    return path
