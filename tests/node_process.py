"""A rendezvous node as a process: joins, prints each round as JSON, re-joins when asked to.

Usage: node_process.py BACKEND ENDPOINT RUN_ID MIN MAX CONF_JSON
It behaves like torch's agent: polls num_nodes_waiting() and re-rendezvouses when it is > 0.
SIGTERM shuts the handler down cleanly; SIGKILL leaves its lease to expire.
"""

from __future__ import annotations

import json
import signal
import sys
import time

from torch.distributed.elastic.rendezvous import RendezvousParameters

from rdzv import create_handler


def main() -> None:
    backend, endpoint, run_id, min_nodes, max_nodes, conf = sys.argv[1:7]
    params = RendezvousParameters(backend, endpoint, run_id, int(min_nodes), int(max_nodes), **json.loads(conf))
    handler = create_handler(params)
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        while not stop:
            info = handler.next_rendezvous()
            print(json.dumps({"rank": info.rank, "world_size": info.world_size,
                              "round": getattr(handler, "round", None)}), flush=True)
            while not stop and handler.num_nodes_waiting() == 0:
                time.sleep(0.1)
    finally:
        handler.shutdown()


if __name__ == "__main__":
    main()
