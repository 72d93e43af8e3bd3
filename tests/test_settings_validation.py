"""Run ids, --rdzv-conf keys and values, and endpoints are checked once, up front, for every entry
point (library, torchrun plugins, rdzv-launch); neighbouring run ids never share keys."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import etcd as etcd_v2_client
import pytest
from launcher_helpers import clean_env
from rdzv_testlib import new_run_id, node_group
from torch.distributed.elastic.rendezvous import RendezvousParameters
from waiting import wait_until

from rdzv import create_handler
from rdzv.etcd import EtcdClient
from rdzv.rendezvous import settings
from rdzv.rendezvous.settings import ConfigError, check_run_id, parse_endpoints

pytestmark = pytest.mark.timeout(120)

BACKENDS = ["etcd", "etcd-v3", "etcd-v2", "c10d", "static", "rdzv-etcd-v2", "rdzv-c10d", "rdzv-static"]
# Nothing listens there: every case below must be refused before anything connects.
NOWHERE = "127.0.0.1:1"


def _params(backend: str = "etcd", run_id: str = "job", endpoint: str = NOWHERE, **conf: object) -> RendezvousParameters:
    return RendezvousParameters(backend, endpoint, run_id, 1, 1, **conf)


def _refused(params: RendezvousParameters, match: str) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match=match):
        create_handler(params)
    # Well below read_timeout (10 s): refused up front, not after trying to connect.
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- run ids


GOOD_RUN_IDS = ["job", "none", "job-x", "job.x", "job_x", "_x", "7", "J0b.2024-01_a", "x" * 128]
BAD_RUN_IDS = [
    ("job/x", "contains '/'"),
    ("../..", "contains '/'"),
    ("..", "starts with '.'"),
    (".hidden", "starts with '.'"),
    ("-x", "starts with '-'"),
    ("job x", "contains ' '"),
    ("job:1", "contains ':'"),
    ("jöb", "contains 'ö'"),
    ("x" * 129, "is 129 characters long"),
    ("x" * 1000, "is 1000 characters long"),
]


@pytest.mark.parametrize("run_id", GOOD_RUN_IDS, ids=lambda r: r[:20])
def test_good_run_ids(run_id: str) -> None:
    assert check_run_id(run_id) == run_id


@pytest.mark.parametrize(("run_id", "why"), BAD_RUN_IDS, ids=[r[:20] for r, _ in BAD_RUN_IDS])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_run_ids_are_refused_by_every_backend(backend: str, run_id: str, why: str) -> None:
    _refused(_params(backend, run_id, rank="0"), re.escape(why) + ".*a run id is 1 to 128 letters, digits")


def test_a_missing_run_id_is_refused() -> None:
    _refused(_params(run_id=""), "a run id is required")


def test_stock_torchrun_plugin_refuses_a_bad_run_id(tmp_path: Path) -> None:
    """torchrun --rdzv-backend=etcd-v3 (our entry point) with an id containing '/': nothing runs."""
    marker = tmp_path / "spawned"
    script = tmp_path / "w.py"
    script.write_text(f"open({str(marker)!r}, 'w').close()\n")
    argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1",
            "--rdzv-backend=etcd-v3", f"--rdzv-endpoint={NOWHERE}", "--rdzv-id=job/x", str(script)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=90)
    assert proc.returncode != 0
    assert "ConfigError: run id 'job/x' contains '/'" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists(), "a worker was started"


# ---------------------------------------------------------------- --rdzv-conf keys and values


@pytest.mark.parametrize(
    ("conf", "match"),
    [
        ({"lease_tll": "3"}, "unknown rendezvous setting 'lease_tll'; did you mean 'lease_ttl'"),
        ({"join-timeout": "3"}, "unknown rendezvous setting 'join-timeout'; did you mean 'join_timeout'"),
        ({"last_call": "3"}, "did you mean 'last_call_timeout'"),
        ({"zzz": "1"}, "unknown rendezvous setting 'zzz'; see the settings table"),
        ({"read_timeout": "inf"}, "read_timeout='inf' must be a finite number"),
        ({"read_timeout": "nan"}, "read_timeout='nan' must be a finite number"),
        ({"lease_ttl": "NaN"}, "lease_ttl='NaN' must be a finite number"),
        ({"join_timeout": "-5"}, "join_timeout='-5' must be a finite number, 0 or more"),
        ({"timeout": "-1"}, "timeout='-1' must be a finite number"),
        ({"close_timeout": "0"}, "close_timeout='0' must be > 0 seconds"),
        ({"store_ttl": "inf"}, "store_ttl='inf' must be a finite number"),
        ({"heartbeat_timeout": "-1"}, "heartbeat_timeout='-1'"),
        ({"rank": "-1"}, "rank='-1' must be 0 or more"),
        ({"local_world_size": "two"}, "local_world_size='two' is not a whole number"),
        ({"read_timeout": "soon"}, "read_timeout='soon' is not a number"),
        ({"is_host": "maybe"}, "is_host='maybe' is not a boolean"),
        ({"protocol": "ftp"}, "protocol='ftp' must be http or https"),
        ({"password": "p"}, "'password': the etcd password is not accepted on the command line"),
        ({"password": ""}, "'password': the etcd password is not accepted"),
        ({"user": "u", "password": "p"}, "'password': the etcd password is not accepted"),
        ({"passwd": "p"}, "'passwd': the etcd password is not accepted"),
        ({"etcd_password": "p"}, "'etcd_password': the etcd password is not accepted"),
    ],
)
@pytest.mark.parametrize("backend", ["etcd", "etcd-v2", "c10d"])
def test_bad_settings_are_refused(backend: str, conf: dict[str, str], match: str) -> None:
    _refused(_params(backend, **conf), match)


def _torch_config_keys(source_dir: Path) -> set[str]:
    """The keys torch's own rendezvous handlers read from RendezvousParameters, by reading their
    source: get("k"), get_as_int("k"), get_as_bool("k"), config["k"], and _get_timeout(.., "k")."""
    keys: set[str] = set()
    for path in source_dir.glob("*.py"):
        text = path.read_text()
        keys |= set(re.findall(r"(?:params|self)\.(?:config\.)?get(?:_as_\w+)?\(\s*\"(\w+)\"", text))
        keys |= set(re.findall(r"params\.config\[\"(\w+)\"\]", text))
        keys |= {f"{k}_timeout" for k in re.findall(r"_get_timeout\(params, \"(\w+)\"\)", text)}
    return keys


def test_every_key_torch_reads_is_accepted() -> None:
    """A torchrun command line keeps working when only the backend changes (whichever torch
    runs the tests: CI checks 2.9, 2.13 and 2.15)."""
    import torch.distributed.elastic.rendezvous as torch_rdzv

    keys = _torch_config_keys(Path(torch_rdzv.__file__).parent)
    assert {"read_timeout", "join_timeout", "is_host", "etcd_prefix", "ssl_cert", "keep_alive_interval"} <= keys
    missing = keys - set(settings.KNOWN_KEYS)
    assert not missing, f"keys torch's handlers read that ours refuse: {sorted(missing)}"


def test_torch_keys_and_launcher_keys_are_accepted() -> None:
    conf = {
        "timeout": "900", "join_timeout": "60", "last_call_timeout": "1", "close_timeout": "5",
        "heartbeat_timeout": "30", "keep_alive_interval": "5", "keep_alive_max_attempt": "3",
        "cas_backoff_max_seconds": "0", "read_timeout": "60", "is_host": "false", "store_type": "tcp",
        "use_libuv": "1", "protocol": "http", "etcd_prefix": "/torchelastic/p2p", "rank": "0",
        "local_world_size": 8, "store_ttl": "120",
    }
    s = settings.parse_settings(_params(**conf))
    assert (s.join_timeout, s.read_timeout, s.prefix, s.rank_hint, s.local_world_size) == (60.0, 60.0, "/torchelastic/p2p", 0, 8)


# ---------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("endpoint", "match"),
    [
        ("127.0.0.1:2379:x", "cannot read endpoint '127.0.0.1:2379:x'"),
        (",", "endpoint list ',' has an empty item"),
        ("127.0.0.1:2379,", "has an empty item"),
        ("a:1,,b:2", "has an empty item"),
        ("127.0.0.1:99999", "'99999' in '127.0.0.1:99999' is not a port number"),
        ("127.0.0.1:http", "'http' in '127.0.0.1:http' is not a port number"),
        ("127.0.0.1:", "'' in '127.0.0.1:' is not a port number"),
        (":2379", "names no host"),
        ("ftp://h:1", "the scheme must be http or https"),
        ("[nothost]:1", "is not an IPv6 address"),
        ("a b:1", "'a b' is not a host name or address"),
    ],
)
def test_bad_endpoints_are_refused_at_once(endpoint: str, match: str) -> None:
    _refused(_params(endpoint=endpoint), match)


def test_endpoint_forms() -> None:
    assert parse_endpoints("", 2379) == (("localhost:2379",), False)
    assert parse_endpoints("h", 2379) == (("h:2379",), False)
    assert parse_endpoints(" a:1 , https://b:2/ ", 2379) == (("a:1", "b:2"), True)
    assert parse_endpoints("[::1]:5,::1", 7) == (("[::1]:5", "[::1]:7"), False)


# ---------------------------------------------------------------- neighbouring run ids (real etcd)

NEIGHBOURS = ("-x", ".x", "_x")


def _v3_keys(endpoint: str, prefix: str) -> set[str]:
    client = EtcdClient(endpoint)
    try:
        return {kv.key.decode() for kv in client.range(prefix, prefix=True, keys_only=True).kvs}
    finally:
        client.close()


def _v2_keys(endpoint: str, prefix: str) -> set[str]:
    host, port = endpoint.rsplit(":", 1)
    client = etcd_v2_client.Client(host=host, port=int(port))
    try:
        return {n.key for n in client.read(prefix.rstrip("/"), recursive=True).leaves if not n.dir}
    except etcd_v2_client.EtcdKeyNotFound:
        return set()


def _neighbours_stay_apart(
    backend: str, endpoint: str, list_keys: Callable[[str, str], set[str]], clean: bool
) -> None:
    """Run `job` next to running `job-x`, `job.x`, `job_x`: it never counts their nodes, and
    ending (or cleaning) it deletes none of their keys."""
    base = new_run_id("job").replace("-", "")

    def neighbour_keys() -> dict[str, set[str]]:
        return {s: list_keys(endpoint, f"/rdzv/{base}{s}/") for s in NEIGHBOURS}

    with ExitStack() as stack:
        neighbours = [stack.enter_context(node_group(backend, endpoint, base + s)) for s in NEIGHBOURS]
        for g in neighbours:
            g.join_all([g.node(1, 1)])
        # A spare waiting in `job-x`: a node record right next to run `job`'s prefix.
        neighbours[0].join(neighbours[0].node(1, 1))
        wait_until(lambda: sum("/node/" in k for k in list_keys(endpoint, f"/rdzv/{base}-x/")) == 2, 30,
                   "the spare of job-x to register")

        with node_group(backend, endpoint, base) as g:
            member = g.node(1, 3)
            (info,) = g.join_all([member])
            assert info.world_size == 1, "run job counted its neighbours' nodes"
            # A newcomer of job itself: once it is seen, every earlier event has been read too.
            g.join(g.node(1, 3))
            wait_until(lambda: member.num_nodes_waiting() > 0, 30, "run job to see its own newcomer")
            assert member.num_nodes_waiting() == 1, "run job counted a neighbour's node as waiting"
            before = neighbour_keys()
            assert all(before.values()) and list_keys(endpoint, f"/rdzv/{base}/")
        # Every node of job has shut down: the last one deleted its run's prefix, and only that.
        wait_until(lambda: not list_keys(endpoint, f"/rdzv/{base}/"), 30, f"run job's keys to go: {list_keys(endpoint, f'/rdzv/{base}/')}")
        assert neighbour_keys() == before

        if clean:
            from rdzv.inspect import clean_run

            with node_group(backend, endpoint, base) as g:
                g.join_all([g.node(1, 1)])
                assert clean_run(endpoint, base, force=True) > 0
                assert neighbour_keys() == before
        # The neighbours' groups go on undisturbed (job-x is full: its spare just waits).
        assert [g.handlers[0].num_nodes_waiting() for g in neighbours] == [0, 0, 0]


def test_neighbouring_run_ids_stay_apart_v3(etcd) -> None:
    _neighbours_stay_apart("etcd", etcd.endpoint, _v3_keys, clean=True)


def test_neighbouring_run_ids_stay_apart_v2(etcd_v2) -> None:
    _neighbours_stay_apart("etcd-v2", etcd_v2.endpoint, _v2_keys, clean=False)
