"""Several network hosts on one machine: Linux network namespaces on a private bridge.

Layout of one :class:`Network` (namespace names are unique: ``rdzvt-<pid>-<tag>-<role>``)::

    switch namespace   bridge br0 = 10.77.0.254/24 (the test's control host), lo
    host namespace     eth0 = 10.77.0.<n>/24  <-- veth -->  port <name> on br0, lo

The root namespace's interfaces, addresses and routes are never touched: the bridge lives in its
own "switch" namespace and every address is inside namespaces created here, so parallel or aborted
runs cannot collide (each run has its own switch, so they may all use the same subnet).

Processes run in a host with ``ip netns exec``. Code that must talk to the private network from
the test process itself (health checks, etcdctl) runs in a short-lived thread moved into a
namespace with setns(2) (:meth:`Host.call`); children forked from that thread inherit it.

Teardown (:meth:`Network.close`) kills every process left in our namespaces (by pid, from
``ip netns pids``) and deletes the namespaces. An atexit hook closes networks a failed fixture
left behind, and :func:`sweep_stale` removes namespaces whose owning test process is gone (a
SIGKILLed pytest).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from etcd_harness import CertPaths, EtcdCluster, EtcdMember

T = TypeVar("T")

NS_PREFIX = "rdzvt"
NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
_NAME_RE = re.compile(rf"^{NS_PREFIX}-(\d+)-")

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """A namespace, link or address could not be set up."""


def ip(*args: str, check: bool = True, timeout: float = 20.0) -> str:
    """Run ``ip ARGS``; returns stdout, raises :class:`NetnsError` with stderr on failure."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def _die_with_parent() -> None:
    # In the child before exec: SIGKILL it if the test process dies (kept across exec).
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ns_pids(ns: str) -> list[int]:
    """Pids of the processes in namespace ``ns``."""
    out = ip("netns", "pids", ns, check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_ns(ns: str) -> None:
    for _ in range(20):
        pids = ns_pids(ns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _delete_ns(ns: str) -> None:
    _kill_ns(ns)
    ip("netns", "delete", ns, check=False)


def sweep_stale() -> list[str]:
    """Delete our namespaces (and their processes) whose owning test process has exited."""
    removed = []
    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _delete_ns(name)
            removed.append(name)
    return removed


_probe_result: list[str | None] = []


def unavailable_reason() -> str | None:
    """None when namespaces, veths and bridges can be created here; else why not (cached)."""
    if _probe_result:
        return _probe_result[0]
    reason: str | None = None
    name = f"{NS_PREFIX}-{os.getpid()}-probe{uuid.uuid4().hex[:4]}"
    try:
        if sys.platform != "linux":
            reason = "network namespaces need Linux"
        else:
            ip("netns", "add", name)
            try:
                ip("-n", name, "link", "set", "lo", "up")
                ip("-n", name, "link", "add", "br0", "type", "bridge")
                ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
                ip("-n", name, "link", "set", "p0", "master", "br0")
            finally:
                ip("netns", "delete", name, check=False)
    except FileNotFoundError:
        reason = "the `ip` command (iproute2) is not installed"
    except (NetnsError, subprocess.TimeoutExpired) as e:
        reason = f"cannot create network namespaces here (needs root/CAP_SYS_ADMIN): {e}"
    _probe_result.append(reason)
    return reason


# ------------------------------------------------------------------------------------- processes


@dataclass
class HostProcess:
    """A process started in a host namespace; stdout and stderr go to one log file."""

    host: Host
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log: Path
    started: float  # time.time() at spawn

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} on {self.host.name} still running after {timeout:g} s; log tail:\n"
                + self.tail()
            ) from None

    def signal(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON records this process wrote (``--log-format=json``), optionally one kind."""
        out = []
        for line in self.text().splitlines():
            start = line.find('{"ts"')
            if start < 0:
                continue
            try:
                rec = json.loads(line[start:])
            except ValueError:
                continue
            if event is None or rec.get("event") == event:
                out.append(rec)
        return out

    def wait_until(self, predicate: Callable[[HostProcess], Any], timeout: float, what: str) -> Any:
        """Poll ``predicate(self)`` until truthy; fails with the log tail on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self)
            if value:
                return value
            if self.poll() is not None:
                value = predicate(self)
                if value:
                    return value
                raise AssertionError(
                    f"{self.name} on {self.host.name} exited ({self.poll()}) before {what}; "
                    f"log tail:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:g} s waiting for {what} ({self.name} on "
                    f"{self.host.name}); log tail:\n{self.tail()}"
                )
            time.sleep(0.05)


# ------------------------------------------------------------------------------------- hosts


@dataclass
class Host:
    """One network namespace on the private network (or the switch itself, port None)."""

    network: Network
    name: str
    ns: str
    ip: str
    port: str | None  # the veth end on the bridge, in the switch namespace
    iface: str = "eth0"
    procs: list[HostProcess] = field(default_factory=list)

    def exec_args(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    def spawn(
        self,
        argv: Sequence[str],
        *,
        name: str,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> HostProcess:
        """Start ``argv`` in this host in its own session; output to ``<logdir>/<name>.log``."""
        log = self.network.log_dir / f"{name}.log"
        on_main = threading.current_thread() is threading.main_thread()
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                self.exec_args(argv),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                # PDEATHSIG fires when the forking *thread* dies: only set it from the main one.
                preexec_fn=_die_with_parent if on_main else None,
            )
        proc = HostProcess(self, name, list(argv), popen, log, time.time())
        self.procs.append(proc)
        return proc

    def call(self, fn: Callable[[], T], timeout: float = 60.0) -> T:
        """Run ``fn()`` in a thread inside this namespace (sockets and children it makes live here)."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                fd = os.open(NETNS_DIR / self.ns, os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.ns}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                box["value"] = fn()
            except BaseException as e:  # handed to the caller
                box["error"] = e

        t = threading.Thread(target=target, name=f"netns-{self.name}", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"call in namespace {self.ns} did not finish in {timeout:g} s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def run(self, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.exec_args(argv), capture_output=True, text=True, timeout=timeout)

    def link_down(self) -> None:
        """Pull this host's cable: its switch port goes down (eth0 loses carrier, packets drop)."""
        assert self.port, "the switch has no uplink to cut"
        ip("-n", self.network.switch_ns, "link", "set", self.port, "down")

    def link_up(self) -> None:
        assert self.port, "the switch has no uplink"
        ip("-n", self.network.switch_ns, "link", "set", self.port, "up")

    def pids(self) -> list[int]:
        return ns_pids(self.ns)

    def tcp_peers(self, pid: int, port: int) -> set[str]:
        """Addresses that process ``pid`` has established TCP connections with on ``port``."""
        r = self.run(["ss", "-Htnp", "state", "established"])
        peers = set()
        for line in r.stdout.splitlines():
            if f"pid={pid}," not in line:
                continue
            parts = line.split()
            # Recv-Q Send-Q Local:Port Peer:Port Process
            peer = parts[3] if len(parts) >= 4 else ""
            addr, _, p = peer.rpartition(":")
            if p == str(port):
                # gRPC uses dual-stack sockets: [::ffff:10.77.0.11] is 10.77.0.11.
                addr = addr.strip("[]")
                peers.add(addr.removeprefix("::ffff:"))
        return peers

    def kill_all(self) -> None:
        """SIGKILL every process in this namespace (the host loses power)."""
        _kill_ns(self.ns)

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.ip}, ns={self.ns})"


_open_networks: set[Network] = set()
_open_lock = threading.Lock()


def _close_open_networks() -> None:
    with _open_lock:
        nets = list(_open_networks)
    for net in nets:
        with contextlib.suppress(Exception):
            net.close()


atexit.register(_close_open_networks)


class Network:
    """A private L2 network: a switch namespace with a bridge, and hosts attached by veth pairs."""

    SUBNET = "10.77.0"
    CONTROL_OCTET = 254

    def __init__(self, log_dir: str | Path, tag: str | None = None, subnet: str = SUBNET) -> None:
        reason = unavailable_reason()
        if reason:
            raise NetnsError(reason)
        sweep_stale()
        self.tag = tag or uuid.uuid4().hex[:6]
        self.base = f"{NS_PREFIX}-{os.getpid()}-{self.tag}"
        self.subnet = subnet
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.switch_ns = f"{self.base}-sw"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._closed = False
        with _open_lock:
            _open_networks.add(self)
        try:
            self._add_ns(self.switch_ns)
            ip("-n", self.switch_ns, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
            ip("-n", self.switch_ns, "addr", "add", f"{subnet}.{self.CONTROL_OCTET}/24", "dev", "br0")
            ip("-n", self.switch_ns, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        self.control = Host(self, "switch", self.switch_ns, f"{subnet}.{self.CONTROL_OCTET}", None)

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self._namespaces.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def add_host(self, name: str, octet: int) -> Host:
        """A new namespace ``name`` with eth0 = <subnet>.<octet>/24 plugged into the bridge."""
        if name in self.hosts:
            raise NetnsError(f"host {name} exists")
        if not 1 <= octet <= 253:
            raise NetnsError(f"octet {octet} outside 1..253")
        ns = f"{self.base}-{name}"
        self._add_ns(ns)
        # Created in the switch namespace, peer moved straight into the host: no names in the root ns.
        ip("-n", self.switch_ns, "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.switch_ns, "link", "set", name, "master", "br0")
        ip("-n", self.switch_ns, "link", "set", name, "up")
        addr = f"{self.subnet}.{octet}"
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        host = Host(self, name, ns, addr, name)
        self.hosts[name] = host
        return host

    def close(self) -> None:
        """Kill everything in our namespaces and delete them. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for host in self.hosts.values():
            for p in host.procs:
                if p.poll() is None:
                    p.signal(signal.SIGKILL)
        for ns in reversed(self._namespaces):
            _delete_ns(ns)
        for host in self.hosts.values():
            for p in host.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=5)
        with _open_lock:
            _open_networks.discard(self)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def network(log_dir: str | Path, tag: str | None = None) -> Iterator[Network]:
    net = Network(log_dir, tag)
    try:
        yield net
    finally:
        net.close()


# ------------------------------------------------------------------------------------- etcd


class NetnsEtcdMember(EtcdMember):
    """An etcd member on its own host: listens on <host ip>:2379 (clients) and :2380 (peers)."""

    def __init__(self, cluster: EtcdCluster, name: str, host: Host) -> None:
        super().__init__(cluster, name, 2379, 2380)
        self.host = host
        self.ip = host.ip

    def _args(self, initial_state: str) -> list[str]:
        return self.host.exec_args(super()._args(initial_state))

    def health(self, timeout: float = 1.0) -> bool:
        control = self.cluster.control  # type: ignore[attr-defined]
        return control.call(lambda: EtcdMember.health(self, timeout), timeout=timeout + 10)


class NetnsEtcdCluster(EtcdCluster):
    """A real etcd cluster with one member per host namespace; etcdctl runs on the control host.

    ``certs`` needs a server certificate whose SANs include the member addresses
    (``deploy/gen-certs.sh DIR <addr>...`` makes one).
    """

    def __init__(
        self,
        version: str,
        hosts: Sequence[Host],
        control: Host,
        *,
        certs: CertPaths | None = None,
        client_cert_auth: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(
            version,
            members=len(hosts),
            certs=certs,
            client_cert_auth=client_cert_auth,
            extra_args=extra_args,
        )
        self.hosts = list(hosts)
        self.control = control

    def _assign_ports(self) -> None:
        self.members = [NetnsEtcdMember(self, f"m{i}", h) for i, h in enumerate(self.hosts)]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def etcdctl(self, *args: str, **kwargs: Any) -> str:
        return self.control.call(lambda: EtcdCluster.etcdctl(self, *args, **kwargs), timeout=60)

    def member_on(self, addr: str) -> NetnsEtcdMember:
        for m in self.members:
            assert isinstance(m, NetnsEtcdMember)
            if m.host.ip == addr:
                return m
        raise KeyError(addr)

    def count_keys(self, prefix: str, user: str | None = None) -> int:
        out = self.etcdctl("get", prefix, "--prefix", "--keys-only", "-w", "json", user=user)
        return int(json.loads(out).get("count", 0))
