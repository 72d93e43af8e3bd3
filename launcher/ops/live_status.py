"""`rdzv status --rdzv-id RUN --watch`: one run's state, kept current by a watch of its keys.

On a terminal the screen is redrawn in place on every change and once a second (for the
ages); otherwise one block is printed per change, separated by blank lines. Ends when the run
was closed and its keys are gone (exit 0), or on Ctrl-C.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from rdzv.inspect import connect, run_root
from rdzv.keyfeed import KeyFeed
from rdzv.view import RunView

TICK = 1.0  # seconds between redraws while nothing changes (ages move on)
HOME_CLEAR = "\x1b[H\x1b[2J"

MEMBER_COLUMNS = (("RANK", "node_rank"), ("HOST", "host"), ("LOCAL_WORLD_SIZE", "local_world_size"),
                  ("PID", "pid"), ("WANTS_ROUND", "wants_round"), ("NODE_ID", "node_id"))
NODE_COLUMNS = (("HOST", "host"), ("LOCAL_WORLD_SIZE", "local_world_size"), ("PID", "pid"),
                ("WANTS_ROUND", "wants_round"), ("NODE_ID", "node_id"))


def _age(seconds: float, up: bool = False) -> str:
    seconds = max(math.ceil(seconds) if up else int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> list[str]:
    cells = [[title for title, _ in columns]]
    cells += [["-" if row.get(key) is None else str(row[key]) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]


def _names(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "-"


def render(run_id: str, desc: dict[str, Any] | None, now: float, ages: bool = True) -> list[str]:
    """The lines of one screen. `ages=False` leaves out everything that moves with the clock
    (to tell whether anything else changed)."""
    clock = time.strftime("%H:%M:%S", time.localtime(now)) if ages else ""
    if desc is None:
        return [f"run {run_id}: no keys (not started, or ended)  {clock}".rstrip()]
    head = f"run {run_id}  round {desc['round']}"
    if desc["round"]:
        head += f"  {desc['world_size']} node(s) (min {desc['min_nodes']}, max {desc['max_nodes']})"
        head += f"  master {desc['master']}"
        if ages and desc["round_age"] is not None:
            head += f"  age {'' if desc['round_age_exact'] else '>='}{_age(desc['round_age'])}"
    if desc["closed"]:
        head += "  CLOSED"
    lines = [f"{head}  {clock}".rstrip(), ""]
    if desc["members"]:
        lines += ["members:", *_table(desc["members"], MEMBER_COLUMNS)]
    else:
        lines.append("members: -")
    forming = desc["forming"]
    lines += ["waiting:", *_table(desc["waiting"], NODE_COLUMNS)] if desc["waiting"] else ["waiting: -"]
    lines += ["spares:", *_table(desc["spares"], NODE_COLUMNS)] if desc["spares"] else ["spares: -"]
    # Members of a closed run leave one by one: gone, not lost.
    lines.append(f"{'left' if desc['closed'] else 'lost'} members: {_names(desc['lost_hosts'])}")
    if forming:
        lines.append(f"forming round {forming}: asked by {_names(desc['asking'])}")
    if forming and desc["round"]:
        lines.append(f"not back yet (of round {desc['round']}): {_names(desc['not_back'])}")
    left = desc["last_call_left"]
    if left is not None:
        lines.append(f"last call for round {forming}: " + (f"{_age(left, up=True)} left" if ages else "running"))
    if desc["corrupt"]:
        lines += ["corrupt keys:", *("  " + line for line in desc["corrupt"])]
    return lines


def watch_status(endpoint: str, run_id: str, prefix: str, conn: dict[str, Any], out: TextIO = sys.stdout) -> int:
    """Show the run until it is gone; returns the exit code (Ctrl-C raises KeyboardInterrupt)."""
    root = run_root(prefix, run_id)
    tty = out.isatty()
    with connect(endpoint, **conn) as client:
        feed = KeyFeed(client, root)
        view = RunView(run_id, root, time.time())
        for event in feed.start():
            view.apply(event, time.time(), live=False)
        seen_keys = not view.empty
        shown: list[str] | None = None
        while True:
            now = time.time()
            desc = None if view.empty else view.describe(now)
            if tty:
                out.write(HOME_CLEAR + "\n".join(render(run_id, desc, now)) + "\n")
            else:
                stable = render(run_id, desc, now, ages=False)
                if stable != shown:
                    shown = stable
                    out.write("\n".join(render(run_id, desc, now)) + "\n\n")
            out.flush()
            if seen_keys and view.empty:
                return 0
            resyncs = feed.resyncs
            batch = feed.get(TICK)
            for event in batch or ():
                view.apply(event, time.time(), live=feed.resyncs == resyncs)
            seen_keys = seen_keys or not view.empty
