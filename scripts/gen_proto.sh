#!/usr/bin/env bash
# Regenerates rdzv/etcd/proto/etcd_min_pb2{,_grpc}.py(+.pyi) from etcd_min.proto.
#
# Deliberately uses an OLD grpcio-tools (1.56.0, bundling protoc 23 / protobuf 4.23 gencode):
# newer generators embed runtime version checks (protobuf >= gencode, grpcio >= generator) that
# make the stubs refuse to import on older runtimes. Old gencode sets a floor, not a ceiling,
# and still imports on protobuf 7 / grpcio 1.85. The output is committed; nothing runs this at
# install time.
#
# Usage: scripts/gen_proto.sh [path/to/grpcio_tools-1.56.0-*.whl]
#   Without an argument the wheel is taken from /tmp/old/ or downloaded from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${GENTOOLS_VENV:-/tmp/gentools}
WHEEL=${1:-$(ls /tmp/old/grpcio_tools-1.56.0-*.whl 2>/dev/null | head -n1 || true)}

if ! "$VENV/bin/python" -c 'import grpc_tools' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "${WHEEL:-grpcio-tools==1.56.0}"
fi
"$VENV/bin/python" -c 'import grpc_tools, importlib.metadata as m; v = m.version("grpcio-tools"); assert v == "1.56.0", v'

# -I . keeps the package path in the generated imports (from rdzv.etcd.proto import ...)
# and gives the descriptor a unique file name in protobuf's default pool.
"$VENV/bin/python" -m grpc_tools.protoc -I . \
    --python_out=. --pyi_out=. --grpc_python_out=. \
    rdzv/etcd/proto/etcd_min.proto

# pyproject only excludes *_pb2*.py from ruff; the generated .pyi needs its own opt-out.
sed -i '1i # ruff: noqa' rdzv/etcd/proto/etcd_min_pb2.pyi

# Smoke-check against the project's own runtime (whatever protobuf/grpcio is installed).
python3 -c 'from rdzv.etcd.proto import etcd_min_pb2, etcd_min_pb2_grpc; print("stubs import OK")'
