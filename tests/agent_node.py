"""One node of a real job: torch's LocalElasticAgent driving workers through an rdzv handler.

Usage: agent_node.py BACKEND ENDPOINT RUN_ID NNODES NPROC OUT_DIR [CONF_JSON]
"""

from __future__ import annotations

import json
import sys
import tempfile

from torch.distributed.elastic.agent.server.api import WorkerSpec
from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.rendezvous import RendezvousParameters

from rdzv import create_handler


def main() -> None:
    backend, endpoint, run_id, nnodes, nproc, out_dir = sys.argv[1:7]
    conf = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
    lo, _, hi = nnodes.partition(":")
    handler = create_handler(RendezvousParameters(backend, endpoint, run_id, int(lo), int(hi or lo), **conf))
    spec = WorkerSpec(
        role="trainer",
        local_world_size=int(nproc),
        entrypoint=sys.executable,
        args=("-u", __file__.replace("agent_node.py", "workers/allreduce.py"), out_dir),
        rdzv_handler=handler,
        max_restarts=0,
        monitor_interval=0.1,
    )
    agent = LocalElasticAgent(spec, logs_specs=DefaultLogsSpecs(log_dir=tempfile.mkdtemp()), start_method="spawn")
    try:
        result = agent.run()
    finally:
        handler.shutdown()
    sys.exit(1 if result.is_failed() else 0)


if __name__ == "__main__":
    main()
