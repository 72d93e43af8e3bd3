"""Smoke tests for the etcd test harness itself (cheap: one process or cluster each)."""

from __future__ import annotations

import json
import os
import ssl
import urllib.request

import pytest
from etcd_harness import AuthInfo, EtcdCluster, EtcdServer, TLSInfo, etcd_binary


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_single_member_put_get(etcd: EtcdServer) -> None:
    etcd.etcdctl("put", "/harness/k", "v")
    assert etcd.etcdctl("get", "/harness/k", "--print-value-only").strip() == "v"
    with urllib.request.urlopen(etcd.client_urls[0] + "/version", timeout=2) as r:
        assert json.loads(r.read())["etcdserver"].startswith(etcd.version)


def test_binaries_resolved_by_full_path() -> None:
    for v in ("3.4", "3.5"):
        assert os.path.isabs(etcd_binary(v))


def test_cluster_kill_restart(etcd_cluster: EtcdCluster) -> None:
    assert len(etcd_cluster.endpoints) == 3
    assert etcd_cluster.endpoint.count(",") == 2
    victim = etcd_cluster.members[0]
    pid = victim.pid
    assert pid and _alive(pid)
    victim.kill()
    assert not victim.running
    others = [m.client_url for m in etcd_cluster.members[1:]]
    etcd_cluster.wait_leader()
    etcd_cluster.etcdctl("put", "/harness/c", "1", endpoints=others)
    victim.restart()
    assert victim.running and victim.pid != pid
    out = etcd_cluster.etcdctl(
        "get", "/harness/c", "--print-value-only", endpoints=[victim.client_url]
    )
    assert out.strip() == "1"


def test_stop_removes_everything() -> None:
    srv = EtcdServer("3.5").start()
    pid, base = srv.pid, srv.base_dir
    assert pid and base.exists()
    srv.stop()
    assert not _alive(pid)
    assert not base.exists()


def test_tls(etcd_tls: TLSInfo) -> None:
    assert etcd_tls.server.client_urls[0].startswith("https://")
    etcd_tls.server.etcdctl("put", "/harness/tls", "ok")
    assert etcd_tls.server.member.health()
    # Without a client certificate the server must refuse the handshake.
    ctx = ssl.create_default_context(cafile=str(etcd_tls.certs.ca_cert))
    with pytest.raises(OSError):
        urllib.request.urlopen(etcd_tls.server.client_urls[0] + "/health", timeout=2, context=ctx)


def test_auth(etcd_auth: AuthInfo) -> None:
    c = etcd_auth.cluster
    root = f"{etcd_auth.root_user}:{etcd_auth.root_password}"
    alice = f"{etcd_auth.user}:{etcd_auth.password}"
    c.etcdctl("put", etcd_auth.prefix + "k", "v", user=alice)
    with pytest.raises(Exception, match="permission denied"):
        c.etcdctl("put", "/elsewhere", "v", user=alice)
    c.etcdctl("put", "/elsewhere", "v", user=root)
    with pytest.raises(Exception, match="user name is empty|authentication"):
        c.etcdctl("get", "/elsewhere")
    assert "alicepw" not in repr(etcd_auth)


def test_v2(etcd_v2: EtcdServer) -> None:
    req = urllib.request.Request(
        etcd_v2.client_urls[0] + "/v2/keys/harness", data=b"value=1", method="PUT"
    )
    with urllib.request.urlopen(req, timeout=2) as r:
        assert json.loads(r.read())["node"]["value"] == "1"
