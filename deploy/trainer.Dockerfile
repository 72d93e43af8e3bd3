# The trainer image of docker-compose.yml: a Python base, CPU torch 2.13.0, and this project
# installed editable (`pip install torch==2.13.0 -e .`), so examples/ and rdzv-launch are on hand.
#
#   docker compose build            (or: docker build -f deploy/trainer.Dockerfile -t rdzv-trainer:dev .)
#
# torch comes from PyTorch's CPU index: the default PyPI wheel drags in several GB of CUDA
# libraries that a gloo-on-CPU demo never uses. For GPUs, start FROM a CUDA base image and
# install torch==2.13.0 from the matching index instead; nothing else changes.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# Only what the package needs: changes to tests or docs do not rebuild the torch layer.
COPY pyproject.toml README.md ./
COPY rdzv ./rdzv
COPY launcher ./launcher
COPY examples ./examples
RUN pip install -e . && rdzv-launch --help >/dev/null
# etcdctl, from etcd's own image: deploy/k8s/etcd-auth-job.yaml runs it here (that image has no
# shell), and it is at hand to look at etcd from a trainer pod.
COPY --from=quay.io/coreos/etcd:v3.5.17 /usr/local/bin/etcdctl /usr/local/bin/etcdctl

# rdzv-launch forwards SIGTERM to the workers and stops them within --shutdown-timeout.
STOPSIGNAL SIGTERM
CMD ["rdzv-launch", "--help"]
