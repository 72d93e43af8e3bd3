"""rdzv-launch end to end on one node: real launcher processes, real workers."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launcher_helpers import (
    ENV_DUMP,
    FAIL_ONCE,
    LEGACY,
    ROOT,
    WAIT_FOR_STOP,
    clean_env,
    launchers,
    records,
    run_launcher,
    write_script,
)
from waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

EXAMPLES = ROOT / "examples"
SCRIPT_ARGS = ["--nnodes=7", "-m", "--", "x y", "--nproc-per-node", "3"]


def _ok(rc: int, out: str, err: str) -> None:
    assert rc == 0, f"rc={rc}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}"


def test_standalone_two_workers(tmp_path: Path) -> None:
    script = write_script(tmp_path, "dump.py", ENV_DUMP)
    rc, out, err = run_launcher(["--standalone", "--nproc-per-node=2", str(script), str(tmp_path), *SCRIPT_ARGS], tmp_path)
    _ok(rc, out, err)
    recs = records(tmp_path, 0)
    assert sorted(recs) == [0, 1]
    run_id = re.search(r"standalone run (\w+):", err).group(1)  # type: ignore[union-attr]
    for rank, r in recs.items():
        assert r["RANK"] == str(rank) and r["LOCAL_RANK"] == str(rank) and r["ROLE_RANK"] == str(rank)
        assert (r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"], r["GROUP_RANK"], r["GROUP_WORLD_SIZE"]) == ("2", "2", "0", "1")
        assert (r["TORCHELASTIC_RESTART_COUNT"], r["TORCHELASTIC_MAX_RESTARTS"]) == ("0", "0")
        assert r["TORCHELASTIC_RUN_ID"] == run_id
        assert r["OMP_NUM_THREADS"] == "1", "set for more than one worker per node, as torchrun does"
        assert r["argv"] == SCRIPT_ARGS
        assert r["TORCHELASTIC_ERROR_FILE"].endswith(f"attempt_0/{rank}/error.json")
    assert recs[0]["MASTER_ADDR"] == recs[1]["MASTER_ADDR"] and recs[0]["MASTER_PORT"] == recs[1]["MASTER_PORT"]
    assert int(recs[0]["MASTER_PORT"]) > 0
    assert "worker 0 ok" in out and "worker 1 ok" in out
    assert "Setting OMP_NUM_THREADS environment variable for each process to be 1" in err
    assert re.search(rf"rendezvous {run_id} round 1 complete: node rank 0 of 1 nodes, took \d+\.\d s", err), err


def test_user_settings_win(tmp_path: Path) -> None:
    script = write_script(tmp_path, "dump.py", ENV_DUMP)
    env = clean_env(OMP_NUM_THREADS="3", CUDA_VISIBLE_DEVICES="")
    rc, out, err = run_launcher(["--nproc-per-node=2", "--role=trainer", str(script), str(tmp_path)], tmp_path, env=env)
    _ok(rc, out, err)
    recs = records(tmp_path, 0)
    assert {r["OMP_NUM_THREADS"] for r in recs.values()} == {"3"}
    assert {r["CUDA_VISIBLE_DEVICES"] for r in recs.values()} == {""}
    assert {r["ROLE_NAME"] for r in recs.values()} == {"trainer"}
    assert "OMP_NUM_THREADS" not in err


def test_pet_variables_drive_the_launch(tmp_path: Path) -> None:
    script = write_script(tmp_path, "dump.py", ENV_DUMP)
    env = clean_env(PET_STANDALONE="1", PET_NPROC_PER_NODE="3", PET_ROLE="worker", PET_MAX_RESTARTS="2")
    rc, out, err = run_launcher(["--nproc-per-node=2", str(script), str(tmp_path)], tmp_path, env=env)
    _ok(rc, out, err)
    recs = records(tmp_path, 0)
    assert sorted(recs) == [0, 1], "--nproc-per-node on the command line wins over PET_NPROC_PER_NODE"
    assert {(r["ROLE_NAME"], r["TORCHELASTIC_MAX_RESTARTS"]) for r in recs.values()} == {("worker", "2")}


def test_max_restarts_recovers_a_failed_worker(tmp_path: Path) -> None:
    script = write_script(tmp_path, "fail_once.py", FAIL_ONCE)
    rc, out, err = run_launcher(["--standalone", "--nproc-per-node=2", "--max-restarts=1", str(script), str(tmp_path), "1"], tmp_path)
    _ok(rc, out, err)
    first, second = records(tmp_path, 0), records(tmp_path, 1)
    assert sorted(second) == [0, 1]
    assert {r["TORCHELASTIC_RESTART_COUNT"] for r in second.values()} == {"1"}
    assert {r["TORCHELASTIC_MAX_RESTARTS"] for r in second.values()} == {"1"}
    assert first[1]["TORCHELASTIC_RESTART_COUNT"] == "0"
    assert err.count(" complete: node rank 0 of 1 nodes") == 2, "one formation line per (re)start"


def test_failure_prints_torch_summary_and_exits_non_zero(tmp_path: Path) -> None:
    script = write_script(tmp_path, "fail.py", "import os, sys\nsys.exit(7 if os.environ['RANK'] == '1' else 0)\n")
    rc, out, err = run_launcher(["--standalone", "--nproc-per-node=2", str(script)], tmp_path)
    assert rc == 1, err
    assert "fail.py FAILED" in err and "Root Cause (first observed failure)" in err
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: 7", err), err


def test_error_file_of_a_recorded_worker(tmp_path: Path) -> None:
    body = (
        "from torch.distributed.elastic.multiprocessing.errors import record\n"
        "@record\ndef main():\n    raise ValueError('boom from the worker')\nmain()\n"
    )
    script = write_script(tmp_path, "boom.py", body)
    error_file = tmp_path / "launcher_error.json"
    env = clean_env(TORCHELASTIC_ERROR_FILE=str(error_file))
    rc, out, err = run_launcher(["--standalone", str(script)], tmp_path, env=env)
    assert rc == 1
    assert "ValueError: boom from the worker" in err
    # @record on the launcher copies the root cause to the launcher's own error file.
    assert "boom from the worker" in json.loads(error_file.read_text())["message"]["message"]


def test_module_mode(tmp_path: Path) -> None:
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "dump.py").write_text(ENV_DUMP)
    rc, out, err = run_launcher(["--nproc-per-node=1", "-m", "mypkg.dump", str(tmp_path), "--flag"], tmp_path, cwd=tmp_path)
    _ok(rc, out, err)
    assert records(tmp_path, 0)[0]["argv"] == ["--flag"]


def test_no_python(tmp_path: Path) -> None:
    program = tmp_path / "worker.sh"
    program.write_text('#!/bin/sh\necho "$RANK $WORLD_SIZE $*" > "$1/sh_$RANK.txt"\n')
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    rc, out, err = run_launcher(["--nproc-per-node=2", "--no-python", str(program), str(tmp_path), "-x"], tmp_path)
    _ok(rc, out, err)
    assert (tmp_path / "sh_1.txt").read_text().split()[:2] == ["1", "2"]
    assert (tmp_path / "sh_0.txt").read_text().split()[-1] == "-x"


def test_run_path(tmp_path: Path) -> None:
    script = write_script(tmp_path, "dump.py", ENV_DUMP)
    rc, out, err = run_launcher(["--nproc-per-node=2", "--run-path", "dump.py", str(tmp_path), "a", "--b"], tmp_path, cwd=tmp_path)
    _ok(rc, out, err)
    recs = records(tmp_path, 0)
    assert sorted(recs) == [0, 1] and recs[1]["argv"] == ["a", "--b"]
    assert script.exists()



def test_run_path_with_the_main_example(tmp_path: Path) -> None:
    """The example skips interpreter shutdown (os._exit) only as its own process: under --run-path
    torch's worker function must still report back, or the agent waits forever."""
    train = str(EXAMPLES / "train_ddp.py")
    rc, out, err = run_launcher(["--standalone", "--nproc-per-node=2", "--run-path", train, "--epochs", "1"], tmp_path)
    _ok(rc, out, err)
    assert "final_loss=" in out

def test_legacy_module_passes_local_rank(tmp_path: Path) -> None:
    rc, out, err = run_launcher(
        ["--nproc-per-node=2", str(EXAMPLES / "legacy_local_rank.py"), "--out-dir", str(tmp_path)], tmp_path, cmd=LEGACY
    )
    _ok(rc, out, err)
    for rank in (0, 1):
        line = (tmp_path / f"{rank}.txt").read_text()
        assert f"rank={rank} world_size=2 local_rank={rank} sum_of_local_ranks=1" in line


def test_legacy_flag_and_use_env(tmp_path: Path) -> None:
    argv_file = tmp_path / "argv.json"
    script = write_script(tmp_path, "argv.py", f"import json, sys\nopen({str(argv_file)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    rc, out, err = run_launcher(["--legacy-local-rank", str(script), "--x"], tmp_path)
    _ok(rc, out, err)
    # Where torch.distributed.launch put it: right after the script, before its arguments.
    assert json.loads(argv_file.read_text()) == ["--local-rank=0", "--x"]
    rc, out, err = run_launcher(["--use-env", str(script), "--x"], tmp_path, cmd=LEGACY)
    _ok(rc, out, err)
    assert json.loads(argv_file.read_text()) == ["--x"]


def test_tee_redirects_and_log_dir(tmp_path: Path) -> None:
    script = write_script(
        tmp_path, "talk.py", "import os, sys\nprint('out', os.environ['RANK'])\nprint('err', os.environ['RANK'], file=sys.stderr)\n"
    )
    logs = tmp_path / "logs"
    rc, out, err = run_launcher(
        ["--nproc-per-node=2", f"--log-dir={logs}", "--tee=1", "--redirects=2", "--local-ranks-filter=1", str(script)], tmp_path
    )
    _ok(rc, out, err)
    (job_dir,) = logs.iterdir()
    for rank in (0, 1):
        attempt = job_dir / "attempt_0" / str(rank)
        assert (attempt / "stdout.log").read_text() == f"out {rank}\n"
        assert (attempt / "stderr.log").read_text() == f"err {rank}\n"
    # tee'd stdout reaches the console (rank 1 only: --local-ranks-filter), redirected stderr does not.
    assert "out 1" in out and "out 0" not in out
    assert "err 0" not in err and "err 1" not in err


def test_log_line_prefix_template(tmp_path: Path) -> None:
    """torchrun 2.14+'s option, on every torch: the macros, ${hostname} included, per worker."""
    import socket

    script = write_script(tmp_path, "talk.py", "import os\nfor i in range(5):\n    print('line', i, flush=True)\n")
    rc, out, err = run_launcher(
        ["--nproc-per-node=2", "--tee=1", "--log-line-prefix-template=${hostname}:${rank}/${local_rank}: ", str(script)],
        tmp_path,
        env=clean_env(TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE="[from-env]"),
    )
    _ok(rc, out, err)
    # A line through a pipe can be lost on this machine: any line of each rank will do.
    for rank in (0, 1):
        assert f"{socket.gethostname()}:{rank}/{rank}: line" in out, out
    assert "[from-env]" not in out, "the option wins over TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"


def test_json_and_quiet(tmp_path: Path) -> None:
    script = write_script(tmp_path, "dump.py", ENV_DUMP)
    rc, out, err = run_launcher(["--log-format=json", "--nproc-per-node=2", str(script), str(tmp_path)], tmp_path)
    _ok(rc, out, err)
    events = [json.loads(line) for line in err.splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "standalone" and "rendezvous_complete" in names and names[-1] == "succeeded"
    complete = next(e for e in events if e["event"] == "rendezvous_complete")
    assert (complete["node_rank"], complete["nodes"]) == (0, 1) and complete["took_s"] >= 0
    rc, out, err = run_launcher(["-q", "--nproc-per-node=2", str(script), str(tmp_path)], tmp_path)
    _ok(rc, out, err)
    assert err == ""


def test_no_cuda_in_the_agent_without_gpu_workers(tmp_path: Path) -> None:
    """The launcher must not ask torch.cuda anything unless GPUs are requested."""
    script = write_script(tmp_path, "dump.py", ENV_DUMP)
    probe = (
        "import sys, torch, torch.cuda\n"
        "def boom(*a, **k):\n    raise SystemExit('torch.cuda was touched')\n"
        "for name in ('is_available', 'device_count', 'init', '_lazy_init', 'current_device'):\n"
        "    setattr(torch.cuda, name, boom)\n"
        "from launcher.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    rc, out, err = run_launcher(["--nproc-per-node=2", str(script), str(tmp_path)], tmp_path, cmd=[sys.executable, "-c", probe])
    _ok(rc, out, err)


def test_sigterm_stops_all_workers(tmp_path: Path) -> None:
    script = write_script(tmp_path, "wait.py", WAIT_FOR_STOP)
    with launchers(tmp_path) as start:
        node = start(["--nproc-per-node=2", "--max-restarts=3", str(script), str(tmp_path)])
        wait_until(lambda: len(records(tmp_path, 0)) == 2, 60, "both workers", node.describe)
        pids = [r["pid"] for r in records(tmp_path, 0).values()]
        started = time.monotonic()
        node.signal(signal.SIGTERM)
        assert node.wait(30) == 1, node.describe()  # torchrun's exit code after a handled signal
        assert time.monotonic() - started < 20
        assert "stopped by SIGTERM" in node.stderr
        for pid in pids:
            wait_until(lambda pid=pid: not _alive(pid), 10, f"worker {pid} to exit")
        assert not records(tmp_path, 1), "a signal is not a failure to restart from"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not reaped it yet.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[-1][0] != "Z"


def _final_loss(out: str) -> float:
    return float(re.search(r"^final_loss=(\S+)$", out, re.M).group(1))  # type: ignore[union-attr]


def test_main_example_trains_to_the_end_and_resumes(tmp_path: Path) -> None:
    train = str(EXAMPLES / "train_ddp.py")
    rc, out, err = run_launcher(["--standalone", "--nproc-per-node=2", train, "--checkpoint-dir", str(tmp_path / "a")], tmp_path)
    _ok(rc, out, err)
    assert re.findall(r"^epoch (\d+)/5 loss=", out, re.M) == ["1", "2", "3", "4", "5"]
    # The README's main job: nothing on stderr reads as a warning (e.g. torch without numpy).
    warnings = [line for line in (out + err).splitlines() if "warning" in line.lower()]
    assert not warnings, warnings
    assert (tmp_path / "a" / "checkpoint.pt").exists()
    # Rank 0 dies in epoch 3 once; the restarted group resumes from epoch 2's checkpoint and
    # ends exactly where the uninterrupted run did.
    rc2, out2, err2 = run_launcher(
        ["--standalone", "--nproc-per-node=2", "--max-restarts=1", train, "--checkpoint-dir", str(tmp_path / "b"), "--fail-at-epoch=3"],
        tmp_path,
    )
    _ok(rc2, out2, err2)
    assert "resumed from" in out2 and "after epoch 2" in out2
    assert _final_loss(out2) == pytest.approx(_final_loss(out), rel=1e-5)


def test_console_script_is_installed() -> None:
    import shutil

    exe = shutil.which("rdzv-launch")
    if exe is None:
        pytest.skip("rdzv-launch is not on PATH (pip install -e .)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "Usage: rdzv-launch" in proc.stdout
