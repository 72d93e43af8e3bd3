"""GPU code paths without a GPU: torch.cuda and torch.accelerator mocked (as the XPU/NPU tests in
test_launcher_cli.py do), bench/gpu_worker.py's timing, and bench/gpu_check.sh's skip. On a
machine with NVIDIA GPUs, `bash bench/gpu_check.sh` runs the real thing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launcher_helpers import ROOT, clean_env

from launcher.devices import check_oversubscription, resolve_nproc
from launcher.problems import UsageProblem

pytestmark = pytest.mark.timeout(60)

sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))
import gpu_worker  # noqa: E402
import train_ddp  # noqa: E402


class FakeCuda:
    """What torch.cuda and torch.accelerator report: `count` CUDA devices; `chosen` collects
    what torch.cuda.set_device was given."""

    def __init__(self) -> None:
        self.count = 0
        self.chosen: list[object] = []


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    import torch

    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: fake.count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "set_device", fake.chosen.append)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: fake.count > 0)
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a: torch.device("cuda") if fake.count else None)
    return fake


def test_gpu_and_auto_count_cuda_devices(cuda: FakeCuda) -> None:
    cuda.count = 8
    assert resolve_nproc("gpu") == 8
    assert resolve_nproc("auto") == 8
    assert resolve_nproc("cuda") == 8
    assert resolve_nproc("3") == 3


def test_no_gpu_visible(cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    cuda.count = 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(UsageProblem, match=r"--nproc-per-node=gpu but no GPU is visible \(CUDA_VISIBLE_DEVICES=''\)"):
        resolve_nproc("gpu")
    with pytest.raises(UsageProblem, match="--nproc-per-node=cuda but no cuda device is visible"):
        resolve_nproc("cuda")
    assert resolve_nproc("auto") >= 1  # the CPUs


def test_one_worker_per_gpu_is_not_oversubscription(cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch) -> None:
    import launcher.devices as devices

    monkeypatch.setattr(devices, "_cpu_count", lambda: 2)
    cuda.count = 16
    check_oversubscription(16, "16", allowed=False)
    with pytest.raises(UsageProblem, match="more than its 16 accelerator"):
        check_oversubscription(17, "17", allowed=False)


def test_the_example_puts_each_worker_on_its_gpu_with_nccl(cuda: FakeCuda) -> None:
    import torch

    cuda.count = 2
    assert train_ddp.choose_device(1) == (torch.device("cuda", 1), "nccl")
    # More workers than GPUs: they share, round robin.
    assert train_ddp.choose_device(3) == (torch.device("cuda", 1), "nccl")
    assert cuda.chosen == [torch.device("cuda", 1)] * 2


def test_the_example_uses_gloo_on_cpu(cuda: FakeCuda) -> None:
    import torch

    cuda.count = 0
    assert train_ddp.choose_device(1) == (torch.device("cpu"), "gloo")
    assert cuda.chosen == []


def _write(out: Path, name: str, **fields: float) -> None:
    (out / f"{name}.json").write_text(json.dumps(fields))


def test_gpu_worker_phases(tmp_path: Path) -> None:
    _write(tmp_path, "0_0", started=100.0, ready=104.0, failed=104.5)
    _write(tmp_path, "0_1", started=100.1, ready=104.0)
    _write(tmp_path, "1_0", started=106.0, ready=109.5)
    _write(tmp_path, "1_1", started=106.2, ready=110.0)
    restart, init, workers = gpu_worker.phases(tmp_path)
    assert (round(restart, 3), round(init, 3), workers) == (1.5, 4.0, 2)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_worker.py"), "--phases", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    assert proc.stdout.strip() == "failure -> new workers 1.50 s, CUDA/NCCL init 4.00 s (2 worker(s))"


def test_gpu_worker_phases_name_what_is_missing(tmp_path: Path) -> None:
    _write(tmp_path, "0_0", started=100.0, ready=104.0)
    with pytest.raises(ValueError, match="no worker of the first attempt recorded its failure"):
        gpu_worker.phases(tmp_path)
    _write(tmp_path, "0_0", started=100.0, ready=104.0, failed=104.5)
    _write(tmp_path, "1_0", started=106.0)
    with pytest.raises(ValueError, match=r"did not all get ready .* \(1 started\)"):
        gpu_worker.phases(tmp_path)


def _gpu_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          env=clean_env(PYTHON=sys.executable, **env), cwd=tmp_path, timeout=60)


def test_gpu_check_skips_without_nvidia_smi(tmp_path: Path) -> None:
    proc = _gpu_check(tmp_path, NVIDIA_SMI=str(tmp_path / "no-nvidia-smi"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"gpu_check: no GPU: skipped ({tmp_path / 'no-nvidia-smi'} lists no NVIDIA GPU)"]


def test_gpu_check_skips_when_torch_sees_no_gpu(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    proc = _gpu_check(tmp_path, NVIDIA_SMI=str(fake), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert line.startswith("gpu_check: no GPU: skipped (torch ") and line.endswith(" sees no CUDA device)"), line
