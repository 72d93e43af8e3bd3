"""One etcd process of a test cluster (tests/etcd_harness.py)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from etcd_binaries import EtcdHarnessError, supports_flag
from process_tracking import die_with_parent, track, untrack

if TYPE_CHECKING:
    from etcd_harness import EtcdCluster

# Fast elections so clusters recover from a killed leader within ~1 s.
CLUSTER_TIMING = ("--heartbeat-interval=50", "--election-timeout=500")


class EtcdMember:
    """One etcd process of an :class:`EtcdCluster`. Created by the cluster, not directly."""

    def __init__(self, cluster: EtcdCluster, name: str, client_port: int, peer_port: int) -> None:
        self.cluster = cluster
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.ip = "127.0.0.1"  # the address it listens on (a namespace host's own address there)
        self.data_dir = cluster.base_dir / name
        self.log_path = cluster.base_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.cluster.certs else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.ip}:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.ip}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _args(self, initial_state: str) -> list[str]:
        c = self.cluster
        args = [
            str(c.binary),
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={c.initial_cluster}",
            f"--initial-cluster-token={c.token}",
            f"--initial-cluster-state={initial_state}",
            "--logger=zap",
            *CLUSTER_TIMING,
        ]
        if supports_flag(c.binary, "unsafe-no-fsync"):
            args.append("--unsafe-no-fsync")
        if c.enable_v2:
            args.append("--enable-v2=true")
        if c.certs:
            args += [f"--cert-file={c.certs.server_cert}", f"--key-file={c.certs.server_key}"]
            if c.client_cert_auth:
                args += ["--client-cert-auth", f"--trusted-ca-file={c.certs.ca_cert}"]
        args += list(c.extra_args)
        return args

    def _spawn(self, initial_state: str = "new") -> None:
        if self.running:
            raise EtcdHarnessError(f"{self.name} is already running (pid {self.pid})")
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            on_main = threading.current_thread() is threading.main_thread()
            self.proc = subprocess.Popen(
                self._args(initial_state),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent if on_main else None,
                env={k: v for k, v in os.environ.items() if not k.startswith("ETCD")},
            )
        finally:
            log.close()
        track(self.proc)

    def _reap(self) -> None:
        if self.proc is not None:
            untrack(self.proc)

    def kill(self) -> None:
        """SIGKILL this member (data dir kept, so :meth:`restart` resumes it)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reap()

    def pause(self) -> None:
        """SIGSTOP this member: a stalled etcd (its sockets stay open, nothing answers)."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause` (harmless on a running member)."""
        if self.running:
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.resume()  # a paused member would sit on SIGTERM until the grace ran out
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._reap()

    def restart(self, timeout: float = 20.0) -> None:
        """Start this member again on its old data dir and ports, and wait until healthy."""
        self.stop()
        self._spawn("existing")
        self.wait_healthy(timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def unary_requests(self) -> int:
        """Unary gRPC requests this member has served (etcd's /metrics), streams excluded."""
        with urllib.request.urlopen(self.client_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith("grpc_server_started_total{") and 'grpc_type="unary"' in line
        )

    def health(self, timeout: float = 1.0) -> bool:
        """GET /health on this member (with client certs when the server wants them)."""
        ctx = None
        certs = self.cluster.certs
        if certs:
            ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
            ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
        req = urllib.request.Request(self.client_url + "/health")
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
                body = json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            # 503 = no leader yet; keep polling.
            with contextlib.suppress(Exception):
                body = json.loads(e.read() or b"{}")
                return str(body.get("health")) == "true"
            return False
        except (OSError, ValueError):
            return False
        return str(body.get("health")) == "true"

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise EtcdHarnessError(
                    f"etcd {self.cluster.version} member {self.name} exited with "
                    f"{self.proc.returncode}; log tail:\n{self.log_tail()}"
                )
            if self.health():
                return
            if time.monotonic() > deadline:
                raise EtcdHarnessError(
                    f"etcd {self.cluster.version} member {self.name} not healthy after "
                    f"{timeout:.0f}s at {self.client_url}; log tail:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def __repr__(self) -> str:
        return f"EtcdMember({self.name}, {self.client_url}, pid={self.pid})"


