"""Real etcd servers for tests: single members, 3-member clusters, TLS, auth, v2.

Members are tests/etcd_member.py, binaries tests/etcd_binaries.py, certificates
tests/etcd_certs.py; every process and data dir is cleaned up (tests/process_tracking.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from etcd_binaries import VERSIONS as VERSIONS
from etcd_binaries import EtcdHarnessError as EtcdHarnessError
from etcd_binaries import etcd_binary as etcd_binary
from etcd_binaries import etcdctl_binary
from etcd_certs import CertPaths as CertPaths
from etcd_member import EtcdMember as EtcdMember
from process_tracking import drop_data_dir, new_data_dir
from process_tracking import free_port as free_port


class EtcdCluster:
    """1..N real etcd members on loopback, started by :meth:`start`, removed by :meth:`stop`.

    ``certs`` turns on TLS for client URLs (peers stay plain HTTP); with
    ``client_cert_auth`` the server also demands a client certificate signed by ``certs.ca_cert``.
    """

    def __init__(
        self,
        version: str = "3.5",
        *,
        members: int = 1,
        enable_v2: bool = False,
        certs: CertPaths | None = None,
        client_cert_auth: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        if members < 1:
            raise ValueError("members must be >= 1")
        self.version = version
        self.binary = etcd_binary(version)
        self.size = members
        self.enable_v2 = enable_v2
        self.certs = certs
        self.client_cert_auth = client_cert_auth
        self.extra_args = tuple(extra_args)
        self.token = f"rdzv-test-{uuid.uuid4().hex[:12]}"
        self.base_dir = new_data_dir("rdzv-etcd-")
        self.members: list[EtcdMember] = []
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------

    def _assign_ports(self) -> None:
        self.members = [
            EtcdMember(self, f"m{i}", free_port(), free_port()) for i in range(self.size)
        ]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    def start(self, timeout: float = 30.0, attempts: int = 3) -> EtcdCluster:
        """Start every member and wait until each reports healthy; cleans up on failure."""
        last: Exception | None = None
        for _ in range(attempts):
            self._assign_ports()
            try:
                for m in self.members:
                    m._spawn("new")
                for m in self.members:
                    m.wait_healthy(timeout)
                return self
            except EtcdHarnessError as e:
                last = e
                for m in self.members:
                    m.kill()
                # Another process grabbed one of our ports: wipe and retry on fresh ones.
                if "address already in use" not in str(e):
                    break
                for m in self.members:
                    shutil.rmtree(m.data_dir, ignore_errors=True)
        self.stop()
        assert last is not None
        raise last

    def stop(self) -> None:
        """Stop all members (SIGTERM, then SIGKILL) and remove the data dirs. Idempotent."""
        try:
            for m in self.members:
                with contextlib.suppress(Exception):
                    m.stop(grace=3.0)
        finally:
            drop_data_dir(self.base_dir)
            self._stopped = True

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- addresses ---------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def endpoint(self) -> str:
        return ",".join(self.endpoints)

    @property
    def client_urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    # -- etcdctl -----------------------------------------------------------------------

    def etcdctl(
        self,
        *args: str,
        user: str | None = None,
        endpoints: Sequence[str] | None = None,
        check: bool = True,
        timeout: float = 20.0,
    ) -> str:
        """Run ``etcdctl`` (v3 API) against this cluster; returns stdout.

        ``user`` is ``"name:password"``. TLS flags are added automatically.
        """
        cmd = [
            str(etcdctl_binary()),
            "--endpoints=" + ",".join(endpoints or self.client_urls),
            "--dial-timeout=3s",
            "--command-timeout=10s",
        ]
        if self.certs:
            cmd += [
                f"--cacert={self.certs.ca_cert}",
                f"--cert={self.certs.client_cert}",
                f"--key={self.certs.client_key}",
            ]
        if user:
            cmd.append(f"--user={user}")
        cmd += list(args)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL")}
        env["ETCDCTL_API"] = "3"
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if check and r.returncode != 0:
            shown = [a for a in cmd if not a.startswith("--user=")]
            raise EtcdHarnessError(
                f"etcdctl {' '.join(shown[5:])} failed ({r.returncode}): {r.stderr.strip()}"
            )
        return r.stdout

    def member_id_of(self, member: EtcdMember) -> int:
        """The raft member ID of ``member`` (as found in response headers)."""
        out = self.etcdctl("endpoint", "status", "-w", "json", endpoints=[member.client_url])
        return int(json.loads(out)[0]["Status"]["header"]["member_id"])

    def leader(self) -> EtcdMember:
        out = self.etcdctl("endpoint", "status", "-w", "json")
        for st in json.loads(out):
            s = st["Status"]
            if s["leader"] == s["header"]["member_id"]:
                for m in self.members:
                    if m.client_url == st["Endpoint"]:
                        return m
        raise EtcdHarnessError(f"no leader found in: {out}")

    def wait_leader(self, timeout: float = 15.0) -> EtcdMember:
        """Wait until every running member agrees on a running leader; returns it."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            live = [m for m in self.members if m.running]
            out = self.etcdctl(
                "endpoint",
                "status",
                "-w",
                "json",
                endpoints=[m.client_url for m in live],
                check=False,
                timeout=10,
            )
            last = out
            try:
                sts = [st["Status"] for st in json.loads(out)]
            except ValueError:
                sts = []
            leaders = {s.get("leader") for s in sts}
            ids = {s["header"]["member_id"]: m for s, m in zip(sts, live, strict=False)}
            if len(sts) == len(live) and len(leaders) == 1:
                lead = leaders.pop()
                if lead in ids:
                    return ids[lead]
            time.sleep(0.1)
        raise EtcdHarnessError(f"no agreed leader after {timeout:.0f}s: {last}")

    def enable_auth(
        self,
        *,
        root_password: str = "rootpw",
        user: str = "alice",
        password: str = "alicepw",
        prefix: str = "/alice/",
    ) -> AuthInfo:
        """Create ``root`` and a user limited to read/write under ``prefix``, then ``auth enable``."""
        root = f"root:{root_password}"
        self.etcdctl("user", "add", root, "--interactive=false")
        # `role add root` fails on versions that create it implicitly; either way root needs it.
        self.etcdctl("role", "add", "root", check=False)
        self.etcdctl("user", "grant-role", "root", "root")
        role = f"{user}-role"
        self.etcdctl("role", "add", role)
        self.etcdctl("role", "grant-permission", role, "readwrite", prefix, "--prefix=true")
        self.etcdctl("user", "add", f"{user}:{password}", "--interactive=false")
        self.etcdctl("user", "grant-role", user, role)
        self.etcdctl("auth", "enable")
        return AuthInfo(
            cluster=self,
            endpoint=self.endpoint,
            endpoints=self.endpoints,
            root_user="root",
            root_password=root_password,
            user=user,
            password=password,
            prefix=prefix,
        )

    def __repr__(self) -> str:
        return f"EtcdCluster(etcd {self.version}, {self.client_urls})"


class EtcdServer(EtcdCluster):
    """A single-member :class:`EtcdCluster` with member shortcuts (pid, kill, restart)."""

    def __init__(
        self,
        version: str = "3.5",
        *,
        enable_v2: bool = False,
        certs: CertPaths | None = None,
        client_cert_auth: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(
            version,
            members=1,
            enable_v2=enable_v2,
            certs=certs,
            client_cert_auth=client_cert_auth,
            extra_args=extra_args,
        )

    def start(self, timeout: float = 30.0, attempts: int = 3) -> EtcdServer:
        super().start(timeout, attempts)
        return self

    @property
    def member(self) -> EtcdMember:
        return self.members[0]

    @property
    def pid(self) -> int | None:
        return self.member.pid

    def kill(self) -> None:
        self.member.kill()

    def restart(self, timeout: float = 20.0) -> None:
        self.member.restart(timeout)

    def log_tail(self, lines: int = 40) -> str:
        return self.member.log_tail(lines)


@dataclass(frozen=True)
class AuthInfo:
    """What :meth:`EtcdCluster.enable_auth` set up."""

    cluster: EtcdCluster
    endpoint: str
    endpoints: list[str]
    root_user: str
    root_password: str = ""
    user: str = ""
    password: str = ""
    prefix: str = ""

    def __repr__(self) -> str:  # keep passwords out of test reports
        return f"AuthInfo({self.endpoint}, user={self.user!r}, prefix={self.prefix!r})"


@dataclass(frozen=True)
class TLSInfo:
    """A mutual-TLS server plus the PKI it trusts."""

    server: EtcdServer
    certs: CertPaths

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def endpoints(self) -> list[str]:
        return self.server.endpoints


@contextlib.contextmanager
def running(cluster: EtcdCluster) -> Iterator[EtcdCluster]:
    """Start ``cluster`` and always stop it (processes and data dirs) afterwards."""
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
