"""rdzv-launch's command line: torchrun parity, PET_ variables, and bad input (exit 2, one line, nothing spawned)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import click
import pytest
from launcher_helpers import LAUNCH, LEGACY, clean_env, free_port

from launcher import cli, config, entrypoint, options, parsers, probes
from launcher.problems import UsageProblem
from launcher.settings import LaunchSettings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def torchrun_parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def _torchrun_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings]


# ---------------------------------------------------------------- parity with torchrun


def test_help_lists_every_torchrun_option(torchrun_parser: argparse.ArgumentParser) -> None:
    """A flag torchrun adds later fails here until rdzv-launch has it."""
    proc = subprocess.run([*LAUNCH, "--help"], capture_output=True, text=True, env=clean_env(COLUMNS="200"), timeout=30)
    assert proc.returncode == 0, proc.stderr
    listed = set(proc.stdout.replace(",", " ").replace(";", " ").replace("]", " ").split())
    missing = [s for a in _torchrun_options(torchrun_parser) for s in a.option_strings if s not in listed]
    assert not missing, f"rdzv-launch --help does not list: {missing}"
    for topic in options.TOPICS:
        assert f"{topic}:" in proc.stdout


def test_every_torchrun_option_string_is_accepted(torchrun_parser: argparse.ArgumentParser) -> None:
    for action in _torchrun_options(torchrun_parser):
        if "-h" in action.option_strings or action.dest == "print_completion":
            continue  # actions that print and exit (tested below)
        flag = action.nargs == 0
        for spelling in action.option_strings:
            value = [] if flag else [str(action.choices[0]) if action.choices else "1"]
            parsed = cli.parse([spelling, *value, "train.py"], "rdzv-launch")
            assert isinstance(parsed, tuple), spelling
            values, given = parsed
            assert action.dest in values, f"{spelling} -> dest {action.dest} missing"
            assert action.dest in given
            got = values[action.dest]
            assert got is True if flag else got == type(got)(value[0]), spelling


# Where rdzv-launch deliberately differs from torchrun's parser defaults (see docs/migration.md).
DIFFERENT_DEFAULTS = {
    "rdzv_backend": "chosen from the endpoint (etcd with one, else static/embedded)",
    "rdzv_id": "None: generated for one node, required for several ('none' is never shared)",
    "duplicate_stdout_filters": "'' parsed to [] as torchrun's default",
    "duplicate_stderr_filters": "'' parsed to [] as torchrun's default",
}


# torchrun 2.9-2.11's defaults that 2.12 changed; rdzv-launch has 2.12's on every release
# (docs/migration.md): --master-port None is 29500 for static, a free port for one node.
OLD_TORCHRUN_DEFAULTS = {"master_port": 29500}


def test_defaults_match_torchrun(torchrun_parser: argparse.ArgumentParser) -> None:
    ours = {o.dest: o.default for o in options.OPTIONS}
    for action in _torchrun_options(torchrun_parser):
        if action.dest in ("help", "print_completion") or action.dest in DIFFERENT_DEFAULTS:
            continue
        theirs = action.default if action.nargs != 0 else False
        if action.dest in OLD_TORCHRUN_DEFAULTS and theirs == OLD_TORCHRUN_DEFAULTS[action.dest]:
            continue
        assert ours[action.dest] == theirs, f"--{action.dest}: ours {ours[action.dest]!r}, torchrun {theirs!r}"


def test_choices_match_torch() -> None:
    from torch.numa.binding import AffinityMode

    assert set(options.NUMA_MODES) == {m.value for m in AffinityMode}


def test_script_arguments_pass_through_untouched() -> None:
    args = ["--nnodes=7", "-m", "--standalone", "--", "x", "--nproc-per-node", "3"]
    values, _ = cli.parse(["--nproc-per-node=2", "train.py", *args], "rdzv-launch")  # type: ignore[misc]
    assert values["training_script"] == "train.py"
    assert list(values["training_script_args"]) == args
    assert values["nproc_per_node"] == "2" and values["nnodes"] == "1:1" and not values["standalone"]


# ---------------------------------------------------------------- PET_ variables


def test_pet_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PET_NPROC_PER_NODE", "3")
    monkeypatch.setenv("PET_STANDALONE", "1")
    monkeypatch.setenv("PET_MAX_RESTARTS", "2")
    monkeypatch.setenv("PET_RDZV_CONF", "join_timeout=5")
    monkeypatch.setenv("PET_NO_PYTHON", "0")
    values, given = cli.parse(["--max-restarts=1", "train.py"], "rdzv-launch")  # type: ignore[misc]
    assert values["nproc_per_node"] == "3"
    assert values["standalone"] is True and values["no_python"] is False
    assert values["max_restarts"] == 1, "the command line wins over PET_"
    assert values["rdzv_conf"] == "join_timeout=5"
    assert {"nproc_per_node", "standalone", "max_restarts", "rdzv_conf"} <= given
    assert "nnodes" not in given


@pytest.mark.parametrize(("raw", "expected"), [("1", True), ("2", True), ("0", False), ("true", True), ("no", False)])
def test_pet_flag_values(raw: str, expected: bool) -> None:
    assert options.parse_env_flag("PET_STANDALONE", raw) is expected


# ---------------------------------------------------------------- bad input

WORKER = "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('spawned')\n"


def _closed_port() -> int:
    return free_port()  # nothing listens there once the probe socket is closed


BAD_INPUT: list[tuple[list[str], dict[str, str], str]] = [
    (["--nnodes=two"], {}, "--nnodes must be N or MIN:MAX"),
    (["--nnodes=1:2:3"], {}, "--nnodes must be N or MIN:MAX"),
    (["--nnodes=4:2"], {}, "MIN (4) is greater than MAX (2)"),
    (["--nnodes=0:2"], {}, "at least 1"),
    (["--nnodes=0"], {}, "at least 1"),
    (["--max-restarts=-1"], {}, "--max-restarts must be 0 or more"),
    (["--max-restarts=x"], {}, "not a valid integer"),
    (["--nproc-per-node=0"], {}, "--nproc-per-node must be at least 1"),
    (["--nproc-per-node=2.5"], {}, "--nproc-per-node must be a number"),
    (["--rdzv-conf=join_timeout"], {}, "is not KEY=VALUE"),
    (["--rdzv-conf=a=1,,b=2"], {}, "is not KEY=VALUE"),
    (["--rdzv-conf=join_timeout="], {}, "'join_timeout' has no value"),
    (["--redirects=7"], {}, "--redirects must be 0, 1, 2, 3"),
    (["--local-ranks-filter=a,b"], {}, "--local-ranks-filter must be comma-separated integers"),
    (["--signals-to-handle=SIGTERM,SIGNOPE"], {}, "unknown signal name(s) SIGNOPE"),
    (["--logs-specs=no-such-spec"], {}, "no 'torchrun.logs_specs' entry point named 'no-such-spec'"),
    (["--start-method=thread"], {}, "'thread' is not one of"),
    (["--standalone", "--nnodes=2"], {}, "--standalone runs one node"),
    (["--nnodes=2", "--node-rank=2"], {}, "--node-rank=2 is outside 0..1"),
    (["--bogus-flag"], {}, "No such option"),
    ([], {"PET_MAX_RESTARTS": "-3"}, "--max-restarts must be 0 or more"),
    (["--exit-barrier-timeout=-1"], {}, "--exit-barrier-timeout must be 0 or more seconds, got -1"),
    (["--exit_barrier_timeout=nan"], {}, "--exit-barrier-timeout must be 0 or more seconds, got nan"),
    (["--exit-barrier-timeout=inf"], {}, "--exit-barrier-timeout must be 0 or more seconds, got inf"),
    (["--exit-barrier-timeout", "soon"], {}, "'soon' is not a valid float"),
    ([], {"PET_EXIT_BARRIER_TIMEOUT": "-5"}, "--exit-barrier-timeout must be 0 or more seconds, got -5"),
    ([], {"PET_STANDALONE": "maybe"}, "PET_STANDALONE='maybe' must be 0 or 1"),
    ([], {"PET_NNODES": "3:1"}, "MIN (3) is greater than MAX (1)"),
    # run ids: one rule for rdzv-launch, the library and the torchrun plugins
    (["--rdzv-id=job/x"], {}, "--rdzv-id: run id 'job/x' contains '/'; a run id is 1 to 128 letters"),
    (["--rdzv-id=../.."], {}, "run id '../..' contains '/'"),
    (["--rdzv-id=.."], {}, "run id '..' starts with '.'"),
    (["--rdzv-id=-job"], {}, "run id '-job' starts with '-'"),
    (["--rdzv-id=" + "x" * 1000], {}, "is 1000 characters long"),
    (["--standalone", "--rdzv-id=a b"], {}, "run id 'a b' contains ' '"),
    (["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "--rdzv-id=a/b"], {}, "contains '/'"),
    ([], {"PET_RDZV_ID": "team/job"}, "run id 'team/job' contains '/'"),
    # --rdzv-conf keys and values
    (["--rdzv-conf=lease_tll=3"], {}, "--rdzv-conf: unknown rendezvous setting 'lease_tll'; did you mean 'lease_ttl'?"),
    (["--rdzv-conf=read_timeout=inf"], {}, "read_timeout='inf' must be a finite number, 0 or more"),
    (["--rdzv-conf=join_timeout=nan"], {}, "join_timeout='nan' must be a finite number"),
    (["--rdzv-conf=last_call_timeout=-1"], {}, "last_call_timeout='-1' must be a finite number, 0 or more"),
    (["--rdzv-conf=rank=-2"], {}, "rank='-2' must be 0 or more"),
    (["--rdzv-conf=password="], {}, "'password': the etcd password is not accepted on the command line"),
    (["--rdzv-conf=password=secret"], {}, "the etcd password is not accepted on the command line"),
    (["--rdzv-conf=user=u,passwd=secret"], {}, "'passwd': the etcd password is not accepted"),
    ([], {"PET_RDZV_CONF": "password=secret"}, "the etcd password is not accepted on the command line"),
    # endpoints: answered at once, not after the reachability check
    (["--rdzv-endpoint=127.0.0.1:2379:x", "--rdzv-id=j"], {}, "--rdzv-endpoint: cannot read endpoint '127.0.0.1:2379:x'"),
    (["--rdzv-endpoint=,", "--rdzv-id=j"], {}, "--rdzv-endpoint: endpoint list ',' has an empty item"),
    (["--rdzv-endpoint=127.0.0.1:1,,127.0.0.1:2", "--rdzv-id=j"], {}, "has an empty item"),
    (["--rdzv-endpoint=127.0.0.1:1,", "--rdzv-id=j", "--rdzv-backend=etcd-v2"], {}, "has an empty item"),
    (["--rdzv-endpoint=127.0.0.1:70000", "--rdzv-id=j"], {}, "'70000' in '127.0.0.1:70000' is not a port number"),
    (["--rdzv-endpoint=ftp://127.0.0.1:1", "--rdzv-id=j"], {}, "the scheme must be http or https"),
    (["--rdzv-backend=c10d", "--rdzv-endpoint=a:1,b:2", "--rdzv-id=j"], {}, "the c10d backend takes one HOST:PORT endpoint"),
]


def _run_bad(args: list[str], env: dict[str, str], tmp_path: Path, script: str | None = "w.py") -> subprocess.CompletedProcess[str]:
    (tmp_path / "w.py").write_text(WORKER)
    argv = [*LAUNCH, *args] + ([script, str(tmp_path / "spawned")] if script else [])
    return subprocess.run(argv, capture_output=True, text=True, env=clean_env(**env), cwd=tmp_path, timeout=60)


def _assert_usage_error(proc: subprocess.CompletedProcess[str], expected: str, tmp_path: Path) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{proc.stderr}"
    assert lines[0].startswith("rdzv-launch: error: ")
    assert expected in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "spawned").exists(), "a worker was started"


@pytest.mark.parametrize(("args", "env", "expected"), BAD_INPUT, ids=[" ".join(a) or next(iter(e)) for a, e, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2(args: list[str], env: dict[str, str], expected: str, tmp_path: Path) -> None:
    started = time.monotonic()
    proc = _run_bad(args, env, tmp_path)
    _assert_usage_error(proc, expected, tmp_path)
    # None of these needs torch: answered in well under the ~1.5 s torch import.
    assert time.monotonic() - started < 5


def test_missing_script(tmp_path: Path) -> None:
    _assert_usage_error(_run_bad(["--standalone"], {}, tmp_path, "nope.py"), "training script 'nope.py' not found", tmp_path)


def test_a_directory_is_not_a_script(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    _assert_usage_error(_run_bad(["--standalone"], {}, tmp_path, "d"), "training script 'd' is a directory", tmp_path)
    # As python itself: a directory with a __main__.py runs.
    (tmp_path / "d" / "__main__.py").write_text("")
    assert entrypoint.resolve_entrypoint(str(tmp_path / "d"), False, False, False)[1][-1] == str(tmp_path / "d")


def test_unknown_device_word_is_one_line_exit_2(tmp_path: Path) -> None:
    """A word may name a privateuse1 backend, so torch answers it (slower, still one line)."""
    (tmp_path / "w.py").write_text("")
    proc = subprocess.run([*LAUNCH, "--standalone", "--nproc-per-node=atuo", "w.py"], capture_output=True, text=True, env=clean_env(), timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--nproc-per-node must be a number, auto, cpu, gpu, xpu" in lines[0], proc.stderr


def test_far_too_many_workers_need_a_confirmation(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = _run_bad(["--standalone", "--nproc-per-node=100000"], {}, tmp_path)
    _assert_usage_error(proc, "--nproc-per-node=100000 is more than 4x this machine's", tmp_path)
    assert "pass --allow-oversubscribe if you mean it" in proc.stderr
    assert time.monotonic() - started < 30


def test_oversubscription_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher import devices

    monkeypatch.setattr(devices, "_cpu_count", lambda: 2)
    monkeypatch.setattr(devices, "_accelerator_count", lambda torch: 0)
    devices.check_oversubscription(8, "8", allowed=False)  # 4x the CPUs is fine
    devices.check_oversubscription(2, "cpu", allowed=False)
    with pytest.raises(UsageProblem, match=r"--nproc-per-node=9 is more than 4x this machine's 2 CPU\(s\) and more than its 0"):
        devices.check_oversubscription(9, "9", allowed=False)
    devices.check_oversubscription(9, "9", allowed=True)
    monkeypatch.setattr(devices, "_accelerator_count", lambda torch: 16)
    devices.check_oversubscription(16, "16", allowed=False)  # one worker per accelerator is fine
    with pytest.raises(UsageProblem):
        devices.check_oversubscription(17, "17", allowed=False)


def test_allow_oversubscribe_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _settings(["--standalone", "--allow-oversubscribe"], tmp_path).allow_oversubscribe
    assert not _settings(["--standalone"], tmp_path).allow_oversubscribe
    monkeypatch.setenv("PET_ALLOW_OVERSUBSCRIBE", "1")
    assert _settings(["--standalone"], tmp_path).allow_oversubscribe


def test_missing_training_script_argument(tmp_path: Path) -> None:
    _assert_usage_error(_run_bad(["--standalone"], {}, tmp_path, None), "Missing argument 'TRAINING_SCRIPT'", tmp_path)


def test_missing_module(tmp_path: Path) -> None:
    _assert_usage_error(_run_bad(["-m"], {}, tmp_path, "no_such_pkg.mod"), "module 'no_such_pkg.mod' not found", tmp_path)


def test_no_python_needs_a_program(tmp_path: Path) -> None:
    _assert_usage_error(
        _run_bad(["--no-python"], {}, tmp_path, "no-such-program-xyz"), "is not an executable file or a command on PATH", tmp_path
    )
    _assert_usage_error(_run_bad(["--no-python", "-m"], {}, tmp_path), "--no-python and -m/--module cannot be used together", tmp_path)


def test_legacy_no_python_needs_use_env(tmp_path: Path) -> None:
    (tmp_path / "w.py").write_text(WORKER)
    proc = subprocess.run([*LEGACY, "--no-python", "true"], capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=30)
    assert proc.returncode == 2 and proc.stderr.strip() == "launcher.legacy: error: when using --no-python, you must also set --use-env"


def test_unknown_backend(tmp_path: Path) -> None:
    proc = _run_bad(["--rdzv-backend=zookeeper", "--rdzv-endpoint=127.0.0.1:1", "--rdzv-id=j"], {}, tmp_path)
    _assert_usage_error(proc, "unknown rendezvous backend 'zookeeper'; choose one of etcd, etcd-v2, c10d, static", tmp_path)


def test_backend_without_endpoint(tmp_path: Path) -> None:
    _assert_usage_error(_run_bad(["--rdzv-backend=etcd"], {}, tmp_path), "--rdzv-backend=etcd needs --rdzv-endpoint=HOST:PORT", tmp_path)


def test_static_endpoint_needs_a_port(tmp_path: Path) -> None:
    proc = _run_bad(["--rdzv-backend=static", "--rdzv-endpoint=127.0.0.1", "--nnodes=2"], {}, tmp_path)
    _assert_usage_error(proc, "static rendezvous needs a port", tmp_path)


def test_malformed_endpoint_port(tmp_path: Path) -> None:
    proc = _run_bad(["--rdzv-backend=etcd", "--rdzv-endpoint=127.0.0.1:http", "--rdzv-id=j"], {}, tmp_path)
    _assert_usage_error(proc, "'http' in '127.0.0.1:http' is not a port number", tmp_path)


@pytest.mark.parametrize("backend", ["etcd", "etcd-v2"])
def test_unreachable_etcd_endpoint(backend: str, tmp_path: Path) -> None:
    port = _closed_port()
    started = time.monotonic()
    proc = _run_bad([f"--rdzv-backend={backend}", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=j"], {}, tmp_path)
    _assert_usage_error(proc, f"cannot reach the {backend} endpoint 127.0.0.1:{port}", tmp_path)
    assert time.monotonic() - started < 10


def test_unreachable_c10d_endpoint_of_another_host(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never this machine, never answers.
    proc = _run_bad(["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=192.0.2.1:29400", "--rdzv-id=j"], {}, tmp_path)
    _assert_usage_error(proc, "cannot reach the c10d endpoint 192.0.2.1:29400", tmp_path)


def test_multi_node_needs_a_run_id(tmp_path: Path) -> None:
    # The endpoint is this machine, so no reachability check: the missing id is the problem.
    proc = _run_bad(["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_closed_port()}"], {}, tmp_path)
    _assert_usage_error(proc, "--rdzv-id is required for a multi-node c10d run", tmp_path)
    proc = _run_bad(["--nnodes=1:2", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:1", "--rdzv-id=none"], {}, tmp_path)
    _assert_usage_error(proc, "--rdzv-id is required", tmp_path)


def test_gpu_workers_without_gpus(tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count() > 0:
        pytest.skip("this machine has GPUs")
    proc = _run_bad(["--standalone", "--nproc-per-node=gpu"], {"CUDA_VISIBLE_DEVICES": ""}, tmp_path)
    _assert_usage_error(proc, "--nproc-per-node=gpu but no GPU is visible (CUDA_VISIBLE_DEVICES='')", tmp_path)


def test_unknown_event_log_handler(tmp_path: Path) -> None:
    _assert_usage_error(_run_bad(["--standalone", "--event-log-handler=kafka"], {}, tmp_path), "unknown handler 'kafka'", tmp_path)


# ---------------------------------------------------------------- how the rendezvous is chosen (in-process)


def _settings(args: list[str], tmp_path: Path) -> LaunchSettings:
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    values, given = cli.parse([*args, str(script)], "rdzv-launch")  # type: ignore[misc]
    return config.build_settings(values, given, values["legacy_local_rank"])


def test_one_node_runs_embedded(tmp_path: Path) -> None:
    for args in ([], ["--standalone"], ["--nnodes=1", "--rdzv-backend=c10d"], ["--standalone", "--rdzv-id=x", "--rdzv-backend=etcd"]):
        s = _settings(args, tmp_path)
        assert (s.backend, s.endpoint, s.embedded) == ("c10d", "localhost:0", True), args
        assert s.run_id not in ("", "none", "x") and len(s.run_id) == 12
        assert s.rdzv_configs == {"timeout": 900}
    assert any("--standalone ignores --rdzv-backend, --rdzv-id" in n.message for n in s.notices)


def test_one_node_keeps_a_given_run_id(tmp_path: Path) -> None:
    assert _settings(["--rdzv-id=job7"], tmp_path).run_id == "job7"


def test_several_nodes_without_endpoint_are_static(tmp_path: Path) -> None:
    s = _settings(["--nnodes=2", "--node-rank=1", "--master-addr=10.1.2.3", "--master-port=1234"], tmp_path)
    assert (s.backend, s.endpoint, s.run_id) == ("static", "10.1.2.3:1234", "none")
    assert s.rdzv_configs["rank"] == 1


def test_endpoint_defaults_to_etcd(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        s = _settings([f"--rdzv-endpoint=127.0.0.1:{port}", "--nnodes=2:4", "--rdzv-id=j", "--rdzv-conf=last_call_timeout=3"], tmp_path)
    assert (s.backend, s.endpoint, s.run_id, s.min_nodes, s.max_nodes) == ("etcd", f"127.0.0.1:{port}", "j", 2, 4)
    assert s.rdzv_configs == {"last_call_timeout": "3", "timeout": 900}


def test_ignored_static_options_are_noticed(tmp_path: Path) -> None:
    s = _settings(["--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", "--node-rank=1", "--master-port=5"], tmp_path)
    messages = " ".join(n.message for n in s.notices)
    assert "--master-port is only used by the static backend" in messages
    assert "--node-rank is only used by the static backend" in messages


def test_rdzv_conf_is_parsed_and_checked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One pass over the command line: --rdzv-conf is parsed and checked one time, and the
    handler is told so; the library's own path (no config_checked) still checks it."""
    from rdzv.rendezvous import settings as rdzv_settings

    calls: list[str] = []
    real_check, real_parse = config.check_config, config.parse_rdzv_conf
    monkeypatch.setattr(config, "check_config", lambda conf: calls.append("check") or real_check(conf))
    monkeypatch.setattr(config, "parse_rdzv_conf", lambda *a, **k: calls.append("parse") or real_parse(*a, **k))
    s = _settings(["--rdzv-conf=last_call_timeout=3,segment_size=0"], tmp_path)
    assert calls == ["parse", "check"]
    assert s.rdzv_configs == {"last_call_timeout": "3", "segment_size": "0", "timeout": 900}

    checked: list[object] = []
    monkeypatch.setattr(rdzv_settings, "check_config", lambda conf: checked.append(dict(conf)))
    params = types.SimpleNamespace(run_id="j", config={"lease_tll": "3"}, endpoint="h:1", backend="etcd",
                                   min_nodes=1, max_nodes=1, local_addr="h")
    rdzv_settings.parse_settings(params, config_checked=True)  # type: ignore[arg-type]
    assert checked == []
    rdzv_settings.parse_settings(params)  # type: ignore[arg-type]
    assert checked == [{"lease_tll": "3"}]


# ---------------------------------------------------------------- small parsers


def test_parse_endpoint() -> None:
    assert parsers.parse_endpoint("h:1", 2) == ("h", 1)
    assert parsers.parse_endpoint("h", 2) == ("h", 2)
    assert parsers.parse_endpoint("http://h:2379/", None) == ("h", 2379)
    assert parsers.parse_endpoint("[::1]:5", None) == ("::1", 5)
    assert parsers.parse_endpoint("::1", 7) == ("::1", 7)
    with pytest.raises(UsageProblem):
        parsers.parse_endpoint("h:99999", None)


def test_parse_filters_and_conf() -> None:
    assert parsers.parse_filters("") == []
    assert parsers.parse_filters("a,b,,c") == ["a", "b,c"]
    assert parsers.parse_rdzv_conf(" a = 1 , b=x=y ") == {"a": "1", "b": "x=y"}
    with pytest.raises(UsageProblem, match="given twice"):
        parsers.parse_rdzv_conf("a=1,a=2")


def test_module_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("raise SystemExit('imported')\n")
    (tmp_path / "pkg" / "mod.py").write_text("")
    assert entrypoint.module_exists("pkg.mod"), "found without importing pkg"
    assert not entrypoint.module_exists("pkg.nope")
    assert entrypoint.module_exists("json.tool")
    assert entrypoint.module_exists("launcher.runpath"), "installed packages, editable ones included"
    assert not entrypoint.module_exists("no_such_module_xyz.sub")


def test_is_this_host() -> None:
    assert probes.is_this_host("localhost")
    assert probes.is_this_host("127.0.0.1")
    assert probes.is_this_host(socket.gethostname())
    assert not probes.is_this_host("192.0.2.1")


def test_help_is_fast_and_imports_no_torch() -> None:
    code = "import sys; from launcher import cli; cli.main(['--help']); assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_bad_rendezvous_input_imports_no_torch(tmp_path: Path) -> None:
    (tmp_path / "w.py").write_text(WORKER)
    cases = [["--rdzv-id=a/b"], ["--rdzv-conf=lease_tll=3"], ["--rdzv-conf=password="],
             ["--rdzv-endpoint=,", "--rdzv-id=j"], ["--rdzv-endpoint=h:1:x", "--rdzv-id=j"]]
    code = (
        "import sys; from launcher import cli\n"
        f"for args in {cases!r}:\n"
        "    assert cli.main([*args, 'w.py']) == 2, args\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stderr.splitlines()) == len(cases)


def test_nproc_per_node_words() -> None:
    import os

    import torch

    from launcher.devices import resolve_nproc

    cpus = len(os.sched_getaffinity(0))
    assert resolve_nproc("3") == 3
    assert resolve_nproc("cpu") == cpus
    assert resolve_nproc("auto") == (torch.cuda.device_count() or cpus), "visible GPUs, else CPUs"


# ---------------------------------------------------------------- torchrun 2.14+ options, abbreviations


@pytest.mark.parametrize("shell", ["bash", "zsh", "tcsh"])
def test_print_completion(shell: str) -> None:
    proc = subprocess.run([*LAUNCH, "--print-completion", shell], capture_output=True, text=True, env=clean_env(), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "rdzv-launch" in proc.stdout
    assert ("nproc-per-node" in proc.stdout) if shell == "tcsh" else ("_RDZV_LAUNCH_COMPLETE" in proc.stdout)


def test_bash_completion_offers_options() -> None:
    env = clean_env(COMP_WORDS="rdzv-launch --nproc", COMP_CWORD="1", _RDZV_LAUNCH_COMPLETE="bash_complete")
    proc = subprocess.run([*LAUNCH], capture_output=True, text=True, env=env, timeout=30)
    assert "--nproc-per-node" in proc.stdout, proc.stdout + proc.stderr


def test_log_line_prefix_template_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "[env]")
    assert _settings(["--standalone"], tmp_path).log_line_prefix_template == "[env]"
    template = "${hostname}:${rank}: "
    assert _settings(["--standalone", "--log-line-prefix-template", template], tmp_path).log_line_prefix_template == template


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["--nproc", "2"], "nproc_per_node", "2"),
        (["--nproc_per", "2"], "nproc_per_node", "2"),
        (["--nproc=3"], "nproc_per_node", "3"),
        (["--redirect", "3"], "redirects", "3"),
        (["--max_re", "4"], "max_restarts", 4),
        (["--stand"], "standalone", True),
        (["--rdzv-i", "job"], "rdzv_id", "job"),
        # --exit-barrier-timeout takes the --ex prefixes, which named nothing before; --ev and
        # --en name what they named (torchrun's --ev: --event-log-handler).
        (["--ex", "7"], "exit_barrier_timeout", 7.0),
        (["--exit_barrier", "7"], "exit_barrier_timeout", 7.0),
        (["--ev", "console"], "event_log_handler", "console"),
        (["--en", "3"], "endpoint_check_timeout", 3.0),
    ],
)
def test_unique_prefixes_name_their_option(argv: list[str], dest: str, value: object) -> None:
    values, given = cli.parse([*argv, "train.py", "--nproc", "9"], "rdzv-launch")  # type: ignore[misc]
    assert values[dest] == value and dest in given
    assert list(values["training_script_args"]) == ["--nproc", "9"], "the script's own arguments stay untouched"


@pytest.mark.parametrize("launcher", [LAUNCH, LEGACY], ids=["rdzv-launch", "legacy"])
def test_ambiguous_prefix_is_one_line_exit_2(launcher: list[str], tmp_path: Path) -> None:
    proc = subprocess.run([*launcher, "--rdzv", "x", "w.py"], capture_output=True, text=True, env=clean_env(), timeout=30, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ambiguous option: --rdzv could match --rdzv-backend, --rdzv-conf, --rdzv-endpoint, --rdzv-id" in lines[0], proc.stderr


def test_e_stays_ambiguous() -> None:
    with pytest.raises(click.UsageError, match="--e could match --endpoint-check-timeout, --event-log-handler, --exit-barrier-timeout"):
        cli.parse(["--e", "1", "train.py"], "rdzv-launch")


def test_exit_barrier_timeout_reaches_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert _settings(["--standalone"], tmp_path).exit_barrier_timeout == 300, "torch's default"
    assert _settings(["--standalone", "--exit-barrier-timeout=0"], tmp_path).exit_barrier_timeout == 0
    assert _settings(["--standalone", "--exit_barrier_timeout", "12.5"], tmp_path).exit_barrier_timeout == 12.5
    monkeypatch.setenv("PET_EXIT_BARRIER_TIMEOUT", "40")
    assert _settings(["--standalone"], tmp_path).exit_barrier_timeout == 40
    assert _settings(["--standalone", "--exit-barrier-timeout=9"], tmp_path).exit_barrier_timeout == 9, "the command line wins"


def test_legacy_prefixes_include_use_env() -> None:
    from launcher import legacy

    values, _ = cli.parse(["--use_e", "--nproc_per", "2", "train.py"], "launcher.legacy", extra=[legacy.USE_ENV])  # type: ignore[misc]
    assert values["use_env"] is True and values["nproc_per_node"] == "2"


def test_auto_and_gpu_count_any_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """An XPU (or any torch.accelerator) counts for 'auto' and 'gpu', as with torchrun."""
    import torch

    from launcher.devices import resolve_nproc

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 3)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("xpu"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_nproc("auto") == 3
    assert resolve_nproc("gpu") == 3


def test_privateuse1_name_counts_its_devices(monkeypatch: pytest.MonkeyPatch) -> None:

    import torch

    from launcher.devices import resolve_nproc

    monkeypatch.setattr(torch._C, "_get_privateuse1_backend_name", lambda: "npu")
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 4), raising=False)
    assert resolve_nproc("npu") == 4
    with pytest.raises(UsageProblem, match="must be a number, auto, cpu, gpu, xpu"):
        resolve_nproc("tpu")
