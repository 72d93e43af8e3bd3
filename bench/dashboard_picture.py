"""A picture of deploy/grafana-rdzv-dashboard.json drawn from real runs, for docs/observability.md.

    pip install -e .[bench]                     # matplotlib: not a dependency of rdzv, only of this script
    apt-get install prometheus                  # the real Prometheus the panels are queried from
    python bench/dashboard_picture.py           # about 2 minutes: runs, queries, writes docs/img/dashboard.png
    python bench/dashboard_picture.py --from-samples /tmp/answers.json   # redraw from an earlier capture

It starts a local etcd (tests/etcd_harness.py), `rdzv exporter` on it and two runs of real
`rdzv-launch` nodes (one gloo worker each, looping all_reduce until a stop file appears), with a
node of run A SIGKILLed midway and a replacement started later. A real Prometheus
(tests/prometheus_server.py) scrapes the exporter and two of the launchers' --metrics-port every
0.5 s; at the end every panel's PromQL (tests/dashboard_queries.py) is sent to it, as a range
query for time series and an instant query at "now" for stats and the table, and each panel is
drawn at its grid position from Prometheus' answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

OPS = [sys.executable, "-m", "launcher.ops"]
RUNS = ("train-a", "train-b")
SCRAPE_EVERY = 0.5
# The launchers whose --metrics-port Prometheus scrapes (they run from start to stop).
SCRAPED_NODES = ("node-a1", "node-b1")

import dashboard_queries  # noqa: E402 - from tests/, put on the path above
from dashboard_queries import legend  # noqa: E402

Series = list[tuple[dict[str, str], list[tuple[float, float]]]]
Vector = list[tuple[dict[str, str], float]]


@dataclass
class Capture:
    """Prometheus' answers for every panel target (key "<panel index>/<refId>"), times in seconds
    since Prometheus began scraping: range answers for time series, instant ones at ``now``."""

    now: float = 0.0  # the dashboard's "now": the stop of the runs, the end of every range
    ranges: dict[str, Series] = field(default_factory=dict)
    instants: dict[str, Vector] = field(default_factory=dict)
    rounds: Series = field(default_factory=list)  # rdzv_run_round of every run, for the annotation
    marks: list[tuple[float, str]] = field(default_factory=list)  # what the script did, when

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__))

    @classmethod
    def load(cls, path: Path) -> Capture:
        data = json.loads(path.read_text())
        as_series = lambda raw: [(labels, [tuple(p) for p in points]) for labels, points in raw]  # noqa: E731
        return cls(data["now"], {k: as_series(v) for k, v in data["ranges"].items()},
                   {k: [tuple(x) for x in v] for k, v in data["instants"].items()}, as_series(data["rounds"]),
                   [tuple(m) for m in data["marks"]])

# ------------------------------------------------------------------------------ the runs


def capture_runs(work: Path, seconds: dict[str, float], dashboard: dict) -> Capture:
    """Etcd, the exporter, two runs with a lost node, Prometheus scraping all along; then every
    panel's answers from Prometheus. Everything is stopped on the way out."""
    from etcd_harness import EtcdServer, free_port
    from launcher_helpers import ALLREDUCE_LOOP, launchers, write_script
    from prometheus_server import PrometheusServer

    capture = Capture()
    server = EtcdServer("3.5").start()
    try:
        with launchers(work) as start:
            exporter = start(["exporter", "--rdzv-endpoint", server.endpoint, "--port", "0", "--host", "127.0.0.1"],
                             cmd=OPS)
            url = _wait_for(lambda: _url_in(exporter.stderr), 60, "the exporter's address")
            # Ports chosen now: Prometheus' targets are fixed before the launchers start.
            ports = {host: free_port() for host in SCRAPED_NODES}
            jobs = {"rdzv-exporter": [url.split("/")[2]], "rdzv-launch": [f"127.0.0.1:{p}" for p in ports.values()]}
            script = write_script(work, "loop.py", ALLREDUCE_LOOP)
            outs = {run: work / run for run in RUNS}
            for out in outs.values():
                out.mkdir()

            def node(run: str, host: str):  # noqa: ANN202 - launcher_helpers.Launcher
                args = [
                    "--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=etcd", f"--rdzv-endpoint={server.endpoint}",
                    f"--rdzv-id={run}", "--rdzv-conf=lease_ttl=3,last_call_timeout=3,join_timeout=120",
                    f"--local-addr={host}", "--monitor-interval=0.5", "--max-restarts=5",
                    *([f"--metrics-port={ports[host]}"] if host in ports else []), str(script), str(outs[run]),
                ]
                return start(args)

            with PrometheusServer(jobs, interval=f"{int(SCRAPE_EVERY * 1000)}ms") as prom:
                # Prometheus takes up new targets every 5 s: start the clock once it scrapes them
                # (the exporter answers, the launchers not yet started are down).
                _wait_for(lambda: _all_tried(prom), 60, "Prometheus scraping its targets")
                t0, wall0 = time.monotonic(), time.time()

                def mark(text: str) -> None:
                    capture.marks.append((time.monotonic() - t0, text))
                    print(f"  {time.monotonic() - t0:5.1f} s  {text}", flush=True)

                def at(t: float) -> None:
                    time.sleep(max(t - (time.monotonic() - t0), 0))

                try:
                    at(seconds["a"])
                    node("train-a", "node-a1")
                    a2 = node("train-a", "node-a2")
                    mark("train-a: node-a1 and node-a2 start")
                    at(seconds["b1"])
                    node("train-b", "node-b1")
                    mark("train-b: node-b1 starts")
                    at(seconds["b2"])
                    node("train-b", "node-b2")
                    mark("train-b: node-b2 starts (joins the running group)")
                    at(seconds["kill"])
                    a2.kill()
                    mark("train-a: node-a2 SIGKILLed (launcher and worker)")
                    at(seconds["replace"])
                    node("train-a", "node-a3")
                    mark("train-a: node-a3 starts (a replacement)")
                    at(seconds["stop"])
                    capture.now = time.monotonic() - t0
                    for out in outs.values():
                        (out / "stop").write_text("")
                    mark("stop files written: the workers finish, the runs close")
                    _ask(prom, dashboard, capture, wall0)
                    at(seconds["stop"] + 20)  # the runs close and their keys go before etcd stops
                finally:
                    exporter.signal(signal.SIGTERM)
                    with contextlib.suppress(Exception):
                        exporter.wait(15)
    finally:
        server.stop()
    return capture


def _ask(prom, dashboard: dict, capture: Capture, wall0: float) -> None:  # noqa: ANN001 - PrometheusServer
    """Every panel target's answer from Prometheus, times made relative to ``wall0``."""
    start, end = wall0, wall0 + capture.now

    def relative(series: Series) -> Series:
        return [(labels, [(t - wall0, v) for t, v in points]) for labels, points in series]

    for panel, target, expr in dashboard_queries.targets(dashboard):
        key = f"{dashboard['panels'].index(panel)}/{target['refId']}"
        if panel["type"] == "timeseries":
            capture.ranges[key] = relative(prom.query_range(expr, start, end, SCRAPE_EVERY))
        else:
            capture.instants[key] = prom.query(expr, wall0 + capture.now)
    job = dashboard_queries.defaults(dashboard)["exporter_job"]
    capture.rounds = relative(prom.query_range(f'rdzv_run_round{{job="{job}"}}', start, end, SCRAPE_EVERY))


def _all_tried(prom) -> str | None:  # noqa: ANN001 - PrometheusServer
    health = prom.targets_up()
    return "yes" if health and "unknown" not in health.values() else None


def _url_in(text: str) -> str | None:
    found = re.search(r"http://\S+/metrics", text)
    return found.group(0) if found else None


def _wait_for(probe: Callable[[], str | None], timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"no {what} within {timeout:g} s")


# ------------------------------------------------------------------------------ the picture


COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
GRID_COLUMNS, ROW_INCHES, WIDTH_INCHES = 24, 0.36, 15.0


def render(capture: Capture, dashboard: dict, out: Path, dpi: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    head = 1.1  # inches above the grid: the title and what this is
    height = rows * ROW_INCHES + head
    fig = plt.figure(figsize=(WIDTH_INCHES, height))
    now = capture.now
    fig.text(0.01, 1 - 0.3 / height, dashboard["title"], fontsize=15, weight="bold", va="top")
    fig.text(0.01, 1 - 0.6 / height,
             f"Drawn by bench/dashboard_picture.py from a real Prometheus scraping `rdzv exporter` every {SCRAPE_EVERY:g} s "
             "(not a Grafana screenshot): each panel is Prometheus' answer to its PromQL. run = All.\n"
             f"Time axis: seconds since Prometheus began scraping; \"now\" (stats, table) = {now:.0f} s, when the runs "
             "were told to stop. Dotted lines: a run's round changed (the dashboard's annotation).",
             fontsize=9, va="top", color="#444", linespacing=1.5)
    steps = _round_steps(capture.rounds)
    for index, panel in enumerate(panels):
        g = panel["gridPos"]
        pad = 0.012
        left = g["x"] / GRID_COLUMNS + pad / 2
        width = g["w"] / GRID_COLUMNS - pad
        top = 1 - (head + g["y"] * ROW_INCHES) / height
        panel_h = g["h"] * ROW_INCHES / height
        kind = panel["type"]
        inset = 0.028 if kind == "timeseries" else 0.0  # room for the y tick labels
        box = (left + inset, top - panel_h + 0.012, width - inset, panel_h - 0.03)
        ax = fig.add_axes(box)
        ax.set_title(panel["title"], fontsize=10, loc="left", weight="bold", x=-inset / (width - inset))
        answers = {t["refId"]: (capture.instants if kind != "timeseries" else capture.ranges).get(f"{index}/{t['refId']}", [])
                   for t in panel["targets"]}
        if kind == "stat":
            _stat(ax, panel, answers["A"])
        elif kind == "table":
            _table(ax, panel, answers)
        else:
            _timeseries(ax, panel, answers, now, steps)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def _round_steps(rounds: Series) -> list[float]:
    """Times at which some run's round changed (the dashboard's annotation, per scrape step)."""
    steps = set()
    for _, points in rounds:
        steps.update(t for (_, before), (t, v) in zip(points, points[1:], strict=False) if v != before)
    return sorted(steps)


def _threshold_color(panel: dict, value: float) -> str:
    colors = {"green": "#37872d", "orange": "#e0752d", "red": "#c4162a"}
    color = "#37872d"
    for step in panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", []):
        if step["value"] is None or value >= step["value"]:
            color = colors.get(step["color"], step["color"])
    return color


def _stat(ax, panel: dict, vector: Vector) -> None:  # noqa: ANN001 - a matplotlib Axes
    value = None if not vector else sum(v for _, v in vector)
    ax.set_xticks([])
    ax.set_yticks([])
    if value is None:
        ax.text(0.5, 0.45, "No data", ha="center", va="center", fontsize=14, color="#666")
        return
    ax.set_facecolor(_threshold_color(panel, value))
    text = f"{value:g}" if not math.isnan(value) else "NaN"
    ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=26, color="white", weight="bold")


def _table(ax, panel: dict, answers: dict[str, Vector]) -> None:  # noqa: ANN001
    rename = next((t["options"]["renameByName"] for t in panel.get("transformations", []) if t["id"] == "organize"), {})
    columns, cells = ["run_id"], {}
    for target in panel["targets"]:
        column = rename.get(f"Value #{target['refId']}", target["refId"])
        columns.append(column)
        for labels, value in answers[target["refId"]]:
            cells.setdefault(labels.get("run_id", ""), {})[column] = value
    ax.axis("off")
    if not cells:
        ax.text(0.5, 0.5, "No data", ha="center", va="center", color="#666")
        return
    body = [[run] + [_cell(cells[run].get(c)) for c in columns[1:]] for run in sorted(cells)]
    table = ax.table(cellText=body, colLabels=columns, loc="upper center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.5)
    for (row, _), cell in table.get_celld().items():
        cell.set_edgecolor("#ccc")
        if row == 0:
            cell.set_facecolor("#eee")
            cell.set_text_props(weight="bold")


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:g}" if value == int(value) else f"{value:.1f}"


def _timeseries(ax, panel: dict, answers: dict[str, Series], end: float, steps: list[float]) -> None:  # noqa: ANN001
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for target in panel["targets"]:
        for labels, points in answers[target["refId"]]:
            xs, ys = lines.setdefault(legend(target.get("legendFormat"), labels), ([], []))
            for t, value in points:
                if xs and t - xs[-1] > 3 * SCRAPE_EVERY:  # the series was absent: leave a gap
                    xs.append(math.nan)
                    ys.append(math.nan)
                xs.append(t)
                ys.append(value)
    for t in steps:
        ax.axvline(t, color="#e0752d", linestyle=":", linewidth=0.8)
    for i, (name, (xs, ys)) in enumerate(sorted(lines.items())):
        ax.step(xs, ys, where="post", label=name, color=COLORS[i % len(COLORS)], linewidth=1.2)
    ax.set_xlim(0, end or 1)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.margins(y=0.15)
    if lines:
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + (high - low) * 0.35)  # room for the legend above the lines
        ax.legend(fontsize=7, loc="upper left", ncol=3, frameon=False)
    else:
        ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes, color="#666")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    ap.add_argument("--samples", type=Path, help="also write Prometheus' answers here (JSON)")
    ap.add_argument("--from-samples", type=Path, help="draw from these answers instead of running anything")
    ap.add_argument("--dpi", type=int, default=80)
    args = ap.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("bench/dashboard_picture.py draws with matplotlib: pip install matplotlib") from None
    dashboard = dashboard_queries.load()
    if args.from_samples:
        capture = Capture.load(args.from_samples)
    else:
        # Seconds since Prometheus started scraping at which each step happens.
        plan = {"a": 2, "b1": 10, "b2": 24, "kill": 38, "replace": 55, "stop": 75}
        with tempfile.TemporaryDirectory() as tmp:
            capture = capture_runs(Path(tmp), plan, dashboard)
        if args.samples:
            capture.dump(args.samples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render(capture, dashboard, args.out, args.dpi)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB, {len(capture.ranges) + len(capture.instants)} answers")


if __name__ == "__main__":
    main()
