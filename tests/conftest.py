"""Shared pytest fixtures: real etcd servers (see tests/etcd_harness.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Test files that serve gRPC in this process (the fault proxy, tests/etcd_fault_proxy.py) run
# last. Once a gRPC server has run here, a child forked afterwards (an etcd member, a launcher)
# can abort in gRPC's fork handler before it execs (seen in CI: 'Epoll1Poller ... epoll_wait
# error: Bad file descriptor', the member exiting with SIGABRT); these files fork nothing.
SERVES_GRPC = ("test_backpressure.py", "test_fault_proxy.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name in SERVES_GRPC)  # stable: the rest keep their order

from etcd_certs import make_certs  # noqa: E402
from etcd_fault_proxy import FaultProxy  # noqa: E402
from etcd_harness import (  # noqa: E402 - needs the sys.path entry above
    VERSIONS,
    AuthInfo,
    CertPaths,
    EtcdCluster,
    EtcdHarnessError,
    EtcdServer,
    TLSInfo,
)

_IDS = [f"etcd{v}" for v in VERSIONS]


def _start(cluster_factory: type[EtcdCluster], version: str, **kwargs: object) -> EtcdCluster:
    # A missing binary or a server that won't come up fails the test with the reason, not a trace.
    try:
        return cluster_factory(version, **kwargs).start()  # type: ignore[arg-type]
    except EtcdHarnessError as e:
        pytest.fail(str(e), pytrace=False)


def _server(request: pytest.FixtureRequest, version: str, **kwargs: object) -> EtcdServer:
    srv = _start(EtcdServer, version, **kwargs)
    request.addfinalizer(srv.stop)
    assert isinstance(srv, EtcdServer)
    return srv


@pytest.fixture(scope="module", params=VERSIONS, ids=_IDS)
def etcd(request: pytest.FixtureRequest) -> EtcdServer:
    """A single etcd member, once per version (module-scoped)."""
    return _server(request, request.param)


@pytest.fixture(scope="module")
def etcd34(request: pytest.FixtureRequest) -> EtcdServer:
    return _server(request, "3.4")


@pytest.fixture(scope="module")
def etcd35(request: pytest.FixtureRequest) -> EtcdServer:
    return _server(request, "3.5")


@pytest.fixture(scope="session")
def proxied_etcd(request: pytest.FixtureRequest) -> EtcdServer:
    """The etcd 3.4 behind the fault proxy: one for the session, started before any proxy
    serves (no etcd member is forked once gRPC has served here: see SERVES_GRPC)."""
    return _server(request, "3.4")


@pytest.fixture(scope="session")
def _etcd34_fault_proxy(proxied_etcd: EtcdServer) -> Iterator[FaultProxy]:
    with FaultProxy(proxied_etcd.endpoint) as proxy:
        yield proxy


@pytest.fixture
def etcd_fault_proxy(_etcd34_fault_proxy: FaultProxy) -> Iterator[FaultProxy]:
    """A started fault-injecting proxy (tests/etcd_fault_proxy.py) in front of ``proxied_etcd``:
    dial ``proxy.endpoint``. Each test starts and ends with no rules and zeroed counters."""
    _etcd34_fault_proxy.reset()
    try:
        yield _etcd34_fault_proxy
    finally:
        _etcd34_fault_proxy.reset()


@pytest.fixture(params=VERSIONS, ids=_IDS)
def etcd_cluster(request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    """A fresh 3-member cluster per test (tests may kill members)."""
    cluster = _start(EtcdCluster, request.param, members=3)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """Throwaway CA, server/client certs and an untrusted second CA."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module", params=VERSIONS, ids=_IDS)
def etcd_tls(request: pytest.FixtureRequest, certs: CertPaths) -> TLSInfo:
    """A mutual-TLS server (client certs required) and the cert paths."""
    return TLSInfo(server=_server(request, request.param, certs=certs), certs=certs)


@pytest.fixture(scope="module", params=VERSIONS, ids=_IDS)
def etcd_auth(request: pytest.FixtureRequest) -> AuthInfo:
    """A server with auth enabled: ``root`` plus a user confined to ``info.prefix``."""
    srv = _server(request, request.param)
    try:
        return srv.enable_auth()
    except EtcdHarnessError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def etcd_servers() -> Iterator[Callable[[str], EtcdServer]]:
    """One etcd per version with the v2 API enabled, serving both etcd backends."""
    servers: dict[str, EtcdServer] = {}

    def get(version: str) -> EtcdServer:
        if version not in servers:
            try:
                servers[version] = EtcdServer(version, enable_v2=True).start()
            except EtcdHarnessError as e:
                pytest.fail(str(e), pytrace=False)
        return servers[version]

    try:
        yield get
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def etcd_v2(request: pytest.FixtureRequest) -> EtcdServer:
    """etcd 3.4 with the v2 API enabled (``--enable-v2=true``)."""
    return _server(request, "3.4", enable_v2=True)


# ---------------------------------------------------------------- hosts as network namespaces

import os  # noqa: E402 - appended section

from netns import NetnsError, Network, unavailable_reason  # noqa: E402


@pytest.fixture(scope="module")
def netns_net(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Network:
    """A private network (tests/netns.py) for this module: add hosts with ``add_host(name, octet)``.

    Skips where network namespaces cannot be created (not root, no iproute2); with
    ``RDZV_REQUIRE_NETNS=1`` (CI on machines that can) that is a failure instead.
    """
    reason = unavailable_reason()
    if reason:
        if os.environ.get("RDZV_REQUIRE_NETNS") == "1":
            pytest.fail(f"RDZV_REQUIRE_NETNS=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    try:
        net = Network(tmp_path_factory.mktemp("netns-logs"))
    except NetnsError as e:
        pytest.fail(str(e), pytrace=False)
    request.addfinalizer(net.close)
    return net
