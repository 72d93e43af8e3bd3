"""Which rendezvous a launch uses: the backend, endpoint and run id from --rdzv-* (and torchrun's
--standalone, --master-addr/--master-port), with the endpoint checked for an answer. --rdzv-conf
comes in parsed and checked (launcher.config)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from launcher.parsers import parse_endpoint, parse_endpoint_list
from launcher.probes import check_reachable, is_this_host
from launcher.problems import UsageProblem
from launcher.settings import Notice

# Torch-free: run ids are checked by the same code as in the handlers.
from rdzv.registry import BACKENDS
from rdzv.rendezvous.settings import ConfigError, check_run_id

DEFAULT_MASTER_PORT = 29500
# torchrun's rendezvous timeout when --rdzv-conf does not set one.
DEFAULT_RDZV_TIMEOUT = 900
EMBEDDED_ENDPOINT = "localhost:0"


def generate_run_id() -> str:
    """A fresh run id for a run that needs no shared one (a single node)."""
    return uuid.uuid4().hex[:12]


def known_backends() -> list[str]:
    """The rendezvous backend names --rdzv-backend accepts."""
    # rdzv.registry loads no torch: bad input is answered before torch prints anything.
    from rdzv.registry import backend_names

    return backend_names()


@dataclass
class RendezvousChoice:
    """The rendezvous a launch uses (`embedded`: a c10d store served by this node)."""

    backend: str
    endpoint: str
    run_id: str
    configs: dict[str, Any]
    embedded: bool = False


def resolve_rendezvous(
    v: Mapping[str, Any],
    given: set[str],
    configs: dict[str, Any],
    min_nodes: int,
    max_nodes: int,
    notices: list[Notice],
) -> RendezvousChoice:
    """Choose the backend, endpoint and run id from the option values `v` (`given`: the options
    set explicitly) and the checked --rdzv-conf `configs` (which the choice completes and keeps);
    what the user should know is appended to `notices`."""
    configs.setdefault("timeout", DEFAULT_RDZV_TIMEOUT)
    backend: str | None = v["rdzv_backend"] or None
    endpoint: str = (v["rdzv_endpoint"] or "").strip()
    run_id: str | None = (v["rdzv_id"] or "").strip() or None
    if run_id is not None:
        # Also where --standalone ignores it: a bad id is bad input either way.
        try:
            check_run_id(run_id)
        except ConfigError as exc:
            raise UsageProblem(f"--rdzv-id: {exc}") from None
    if run_id is not None and run_id.lower() == "none":
        # torchrun's default id; as a shared key it would join unrelated jobs together.
        run_id = None

    if v["standalone"]:
        if max_nodes > 1:
            raise UsageProblem(f"--standalone runs one node, but --nnodes={v['nnodes']} asks for up to {max_nodes}")
        ignored = [f"--{d.replace('_', '-')}" for d in ("rdzv_backend", "rdzv_endpoint", "rdzv_id") if d in given]
        if ignored:
            notices.append(Notice("options_ignored", f"--standalone ignores {', '.join(ignored)}", "warning"))
        return _embedded(None, configs, notices)

    if not endpoint:
        if backend in (None, "static", "c10d") and max_nodes == 1 and v["master_port"] is None:
            return _embedded(run_id, configs, notices)
        if backend not in (None, "static"):
            raise UsageProblem(f"--rdzv-backend={backend} needs --rdzv-endpoint=HOST:PORT")
        backend = "static"
    backend = backend or "etcd"

    names = known_backends()
    if backend not in names:
        raise UsageProblem(f"unknown rendezvous backend {backend!r}; choose one of {', '.join(names)}")

    for opt in ("master_addr", "master_port", "node_rank"):
        if opt in given and backend != "static":
            notices.append(
                Notice("option_ignored", f"--{opt.replace('_', '-')} is only used by the static backend; ignored", "warning")
            )

    if backend == "static":
        return _static(v, endpoint, run_id, configs, min_nodes, max_nodes, notices)

    timeout = float(v["endpoint_check_timeout"])
    if backend in ("etcd", "etcd-v2"):
        targets = parse_endpoint_list(endpoint, BACKENDS[backend].default_port)
        check_reachable([(h, p) for h, p in targets if p is not None], timeout, backend)
    elif backend == "c10d":
        _one_endpoint(endpoint, backend)
        host, port = parse_endpoint(endpoint, BACKENDS["c10d"].default_port)
        is_host = str(configs.get("is_host", "")).lower()
        hosting = is_host in ("1", "true", "t", "yes", "y") or (is_host == "" and (port == 0 or is_this_host(host)))
        if not hosting and port is not None:
            check_reachable([(host, port)], timeout, "c10d")
    else:
        parse_endpoint(endpoint, None)

    if run_id is None:
        if max_nodes > 1:
            raise UsageProblem(
                f"--rdzv-id is required for a multi-node {backend} run: give every node the same id "
                "(e.g. --rdzv-id=$SLURM_JOB_ID)"
            )
        run_id = generate_run_id()
        notices.append(
            Notice("run_id_generated", f"generated run id {run_id} (--rdzv-id={run_id})", fields={"run_id": run_id})
        )
    return RendezvousChoice(backend, endpoint, run_id, configs)


def _one_endpoint(endpoint: str, backend: str) -> None:
    if "," in endpoint:
        raise UsageProblem(f"--rdzv-endpoint: the {backend} backend takes one HOST:PORT endpoint, got {endpoint!r}")


def _embedded(run_id: str | None, configs: dict[str, Any], notices: list[Notice]) -> RendezvousChoice:
    run_id = run_id or generate_run_id()
    notices.append(
        Notice(
            "standalone",
            f"standalone run {run_id}: embedded c10d rendezvous on {EMBEDDED_ENDPOINT} (no etcd needed)",
            fields={"run_id": run_id, "backend": "c10d", "endpoint": EMBEDDED_ENDPOINT},
        )
    )
    return RendezvousChoice("c10d", EMBEDDED_ENDPOINT, run_id, configs, embedded=True)


def _static(
    v: Mapping[str, Any],
    endpoint: str,
    run_id: str | None,
    configs: dict[str, Any],
    min_nodes: int,
    max_nodes: int,
    notices: list[Notice],
) -> RendezvousChoice:
    if not endpoint:
        endpoint = f"{v['master_addr']}:{v['master_port'] or DEFAULT_MASTER_PORT}"
    _one_endpoint(endpoint, "static")
    _, port = parse_endpoint(endpoint, v["master_port"])
    if port is None:
        raise UsageProblem(f"static rendezvous needs a port: --rdzv-endpoint={endpoint}:PORT or --master-port")
    node_rank = int(v["node_rank"])
    if not 0 <= node_rank < max_nodes:
        raise UsageProblem(f"--node-rank={node_rank} is outside 0..{max_nodes - 1} for --nnodes={v['nnodes']}")
    if min_nodes != max_nodes:
        notices.append(Notice("static_not_elastic", f"the static backend always waits for {max_nodes} nodes", "warning"))
    configs["rank"] = node_rank
    # The static backend does not coordinate on the id, every node must simply agree: keep torchrun's.
    return RendezvousChoice("static", endpoint, run_id or "none", configs)
