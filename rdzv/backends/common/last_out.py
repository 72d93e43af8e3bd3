"""How a node leaves a run, the same on every backend: end its liveness, and if it was the last
node, remove the run's keys (each backend says how it counts and removes); release the
connection whatever happened."""

from __future__ import annotations

from collections.abc import Callable


def leave_run(
    withdraw: Callable[[], None],
    nodes_left: Callable[[], bool],
    remove_run: Callable[[], None],
    release: Callable[[], None],
) -> None:
    try:
        withdraw()
        if not nodes_left():
            remove_run()
    finally:
        release()
