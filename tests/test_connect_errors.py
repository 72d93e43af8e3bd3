"""Connection mistakes answered at once, on one line, with the right hint (issue 10 weak spots).

* TLS on one side only: a plain client at a TLS etcd, and a TLS client at a plain etcd, are told
  which setting to change within a second (v3 and v2 backends).
* gRPC's C core prints nothing of its own around rdzv-launch's one-line error.
* The v2 backend honours read_timeout with an endpoint that accepts connections and never
  answers (urllib3 used to repeat the request: 4 x the timeout).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_harness import CertPaths, EtcdHarnessError, EtcdServer
from launcher_helpers import LAUNCH, clean_env, write_script
from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousParameters

from rdzv import create_handler

pytestmark = pytest.mark.timeout(120)

PLAIN_AT_TLS = r"etcd at 127\.0\.0\.1:\d+ speaks TLS, but this client does not: use https://"
TLS_AT_PLAIN = r"etcd at 127\.0\.0\.1:\d+ does not speak TLS, but this client does .*use http://"


def _server(**kwargs: object) -> EtcdServer:
    try:
        return EtcdServer(**kwargs).start()  # type: ignore[arg-type]
    except EtcdHarnessError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module", params=["etcd", "etcd-v2"])
def servers(request: pytest.FixtureRequest, certs: CertPaths) -> Iterator[tuple[str, EtcdServer, EtcdServer]]:
    """(backend, a mutual-TLS etcd, a plain etcd) for each backend (v2: etcd 3.4 with v2 on)."""
    v2 = request.param == "etcd-v2"
    version = "3.4" if v2 else "3.5"
    tls = _server(version=version, certs=certs, enable_v2=v2)
    try:
        plain = _server(version=version, enable_v2=v2)
        try:
            yield request.param, tls, plain
        finally:
            plain.stop()
    finally:
        tls.stop()


def _refused_within(params: RendezvousParameters, pattern: str, seconds: float) -> None:
    started = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match=pattern) as info:
        create_handler(params)
    took = time.monotonic() - started
    assert took < seconds, (took, str(info.value))
    assert "\n" not in str(info.value)


def test_a_plain_client_at_a_tls_etcd(servers: tuple[str, EtcdServer, EtcdServer]) -> None:
    backend, tls, _ = servers
    params = RendezvousParameters(backend, tls.endpoint, "tls-mix", 1, 1)
    _refused_within(params, PLAIN_AT_TLS, 1.0)


@pytest.mark.parametrize("how", ["cacert", "https"])
def test_a_tls_client_at_a_plain_etcd(servers: tuple[str, EtcdServer, EtcdServer], certs: CertPaths, how: str) -> None:
    backend, _, plain = servers
    conf = {"cacert": str(certs.ca_cert), "cert": str(certs.client_cert), "key": str(certs.client_key)}
    endpoint = plain.endpoint
    if how == "https":
        endpoint, conf = f"https://{endpoint}", {"cacert": str(certs.ca_cert)}
    params = RendezvousParameters(backend, endpoint, "tls-mix", 1, 1, **conf)
    _refused_within(params, TLS_AT_PLAIN, 1.0)


@pytest.mark.parametrize("version", ["3.4", "3.5"])
def test_no_grpc_core_lines_around_the_one_line_error(certs: CertPaths, tmp_path: Path, version: str) -> None:
    """etcd 3.4 (TLS 1.3) rejects a missing client certificate after the handshake, which gRPC's
    core logged as 'E1128 ... Decryption error: TSI_DATA_CORRUPTED'; 3.5's rejection came with
    'I1128 ... Handshake failed'. rdzv-launch prints its one line and nothing else."""
    server = _server(version=version, certs=certs)
    try:
        script = write_script(tmp_path, "w.py", "print('never runs')\n")
        cmd = [
            *LAUNCH, "--nnodes=1", "--rdzv-backend=etcd", f"--rdzv-endpoint=https://{server.endpoint}",
            "--rdzv-id=tls-quiet", f"--rdzv-conf=cacert={certs.ca_cert}", str(script),
        ]  # fmt: skip
        env = clean_env()
        env.pop("GRPC_VERBOSITY", None)
        env.pop("GRPC_TRACE", None)
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    finally:
        server.stop()
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1, done.stderr
    assert "client certificate missing or not signed" in lines[0] or "rejected the client certificate" in lines[0]
    assert not re.search(r"^[DIWEF]\d{4} |TSI_", done.stderr, re.M), done.stderr


def test_grpc_verbosity_set_by_the_user_is_left_alone() -> None:
    code = "import os, rdzv.etcd; print(os.environ.get('GRPC_VERBOSITY'))"
    for given, seen in ((None, "None"), ("DEBUG", "DEBUG")):
        env = clean_env()
        env.pop("GRPC_VERBOSITY", None)
        if given:
            env["GRPC_VERBOSITY"] = given
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert out.stdout.strip() == seen, out.stderr


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """host:port of a socket that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        server.close()


@pytest.mark.parametrize("backend", ["etcd", "etcd-v2"])
def test_an_endpoint_that_never_answers_is_waited_for_until_join_timeout(backend: str, silent_endpoint: str) -> None:
    """It accepts connections and answers nothing: an etcd in trouble (a stall, an election),
    not a typo, so a starting node waits for it within join_timeout (issue 21), then says how
    long it was silent, naming it."""
    params = RendezvousParameters(backend, silent_endpoint, "silent", 1, 1, read_timeout="1", join_timeout="3")
    started = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match=re.escape(silent_endpoint)) as caught:
        create_handler(params)
    took = time.monotonic() - started
    assert re.search(r"not answering for \d+ s, past join_timeout \(3 s\)", str(caught.value)), caught.value
    assert took >= 3, took  # it waited (no upper bound asserted: shared machines are noisy)
