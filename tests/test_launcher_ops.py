"""`rdzv status` / `rdzv clean`: formatting over rdzv.inspect, and one real etcd round trip."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import types
from typing import Any

import pytest
from launcher_helpers import clean_env

from launcher.ops import cli as ops

pytestmark = pytest.mark.timeout(60)

RUNS = [
    {"run_id": "job42", "round": 3, "world_size": 2, "min_nodes": 2, "max_nodes": 4, "closed": False,
     "members": [{"node_id": "a", "node_rank": 0}, {"node_id": "b", "node_rank": 1}], "waiting": [], "master": "h:1"},
    {"run_id": "old", "round": 1, "world_size": 1, "min_nodes": 1, "max_nodes": 1, "closed": True,
     "members": [], "waiting": [], "master": None},
]


@pytest.fixture
def fake_inspect(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Stands in for rdzv.inspect (in sys.modules only) and records the calls."""
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
    module = types.ModuleType("rdzv.inspect")

    def recorder(name: str, result: Any) -> Any:
        def fn(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args, kwargs))
            return result

        return fn

    module.list_runs = recorder("list_runs", RUNS)  # type: ignore[attr-defined]
    module.describe_run = recorder("describe_run", RUNS[0])  # type: ignore[attr-defined]
    module.clean_run = recorder("clean_run", 7)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rdzv.inspect", module)
    return calls


def test_status_table(fake_inspect: list, capsys: pytest.CaptureFixture[str]) -> None:
    assert ops.main(["status", "--rdzv-endpoint", "e:2379", "--rdzv-conf", "cacert=/ca.pem"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["RUN_ID", "ROUND", "WORLD_SIZE", "MIN_NODES", "MAX_NODES", "CLOSED"]
    assert lines[1].split()[:7] == ["job42", "3", "2", "2", "4", "False", "2"]
    assert lines[2].split()[-1] == "-"
    assert fake_inspect == [("list_runs", ("e:2379",), {"cacert": "/ca.pem"})], "prefix only when given"


def test_status_one_run_and_json(fake_inspect: list, capsys: pytest.CaptureFixture[str]) -> None:
    assert ops.main(["status", "--rdzv-endpoint", "e", "--rdzv-id", "job42", "--prefix", "/p"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^round\s+3$", out, re.M) and re.search(r"^master\s+h:1$", out, re.M), out
    assert "members:" in out and "NODE_RANK" in out
    assert fake_inspect[-1] == ("describe_run", ("e", "job42"), {"prefix": "/p"})
    assert ops.main(["status", "--rdzv-endpoint", "e", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == RUNS


def test_clean(fake_inspect: list, capsys: pytest.CaptureFixture[str]) -> None:
    assert ops.main(["clean", "--rdzv-endpoint", "e", "--rdzv-id", "old", "--yes", "--force"]) == 0
    assert capsys.readouterr().out.strip() == "cleaned run old: 7 key(s) removed"
    assert fake_inspect[-1] == ("clean_run", ("e", "old"), {"force": True})


@pytest.mark.parametrize("run_id", ["../..", "job/x", "a" * 129, ".hidden", ""])
def test_bad_run_ids_are_one_line_exit_2(run_id: str, fake_inspect: list, capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["status"], ["clean", "--yes"]):
        assert ops.main([*command, "--rdzv-endpoint", "e", "--rdzv-id", run_id]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "run id" in err, err
    assert not fake_inspect, "nothing asked of etcd"


def test_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    module = types.ModuleType("rdzv.inspect")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("etcd at e:1 unreachable")

    module.list_runs = broken  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "rdzv.inspect", module)
    assert ops.main(["status", "--rdzv-endpoint", "e:1"]) == 1
    assert capsys.readouterr().err == "rdzv: error: ConnectionError: etcd at e:1 unreachable\n"
    assert ops.main(["clean", "--rdzv-endpoint", "e:1"]) == 2, "--rdzv-id is required"


def test_not_available_without_rdzv_inspect(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "rdzv.inspect", None)  # what a missing module looks like to import
    assert ops.main(["status", "--rdzv-endpoint", "e"]) == 1
    assert "not available" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("rdzv.inspect") is None, reason="rdzv.inspect not yet available")
def test_against_a_real_etcd(etcd35: Any) -> None:
    def rdzv(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "launcher.ops", *args], capture_output=True, text=True, env=clean_env(), timeout=30)

    proc = rdzv("status", "--rdzv-endpoint", etcd35.endpoint, "--json")
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads(proc.stdout), list)
    proc = rdzv("clean", "--rdzv-endpoint", etcd35.endpoint, "--rdzv-id", "never-ran", "--yes")
    assert proc.returncode == 0 and "never-ran" in proc.stdout, proc.stderr
