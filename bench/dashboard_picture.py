"""A picture of deploy/grafana-rdzv-dashboard.json drawn from real runs, for docs/observability.md.

    pip install -e .[bench]                     # matplotlib: not a dependency of rdzv, only of this script
    python bench/dashboard_picture.py           # about 2 minutes: runs, scrapes, writes docs/img/dashboard.png
    python bench/dashboard_picture.py --from-samples /tmp/samples.json   # redraw from an earlier capture

It starts a local etcd (tests/etcd_harness.py), `rdzv exporter` on it and two runs of real
`rdzv-launch` nodes (one gloo worker each, looping all_reduce until a stop file appears), with a
node of run A SIGKILLed midway and a replacement started later; it scrapes the exporter's
/metrics every 0.5 s, then draws every panel of the dashboard at its grid position, each with
the series its PromQL selects. There is no Prometheus or Grafana here: `Promql` evaluates the
subset of PromQL the dashboard uses over the scraped samples (see its docstring).
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
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

DASHBOARD = ROOT / "deploy" / "grafana-rdzv-dashboard.json"
OPS = [sys.executable, "-m", "launcher.ops"]
RUNS = ("train-a", "train-b")
SCRAPE_EVERY = 0.5

from promql_subset import Capture, Promql, legend  # noqa: E402 - bench/ is the script's directory

# ------------------------------------------------------------------------------ the runs


def capture_runs(work: Path, seconds: dict[str, float]) -> Capture:
    """Etcd, the exporter, two runs with a lost node; scrapes all along. Everything is stopped on the way out."""
    from etcd_harness import EtcdServer
    from launcher_helpers import ALLREDUCE_LOOP, launchers, write_script

    capture = Capture()
    server = EtcdServer("3.5").start()
    try:
        with launchers(work) as start:
            exporter = start(["exporter", "--rdzv-endpoint", server.endpoint, "--port", "0", "--host", "127.0.0.1"],
                             cmd=OPS)
            url = _wait_for(lambda: _url_in(exporter.stderr), 60, "the exporter's address")
            script = write_script(work, "loop.py", ALLREDUCE_LOOP)
            outs = {run: work / run for run in RUNS}
            for out in outs.values():
                out.mkdir()

            def node(run: str, host: str):  # noqa: ANN202 - launcher_helpers.Launcher
                args = [
                    "--nnodes=1:2", "--nproc-per-node=1", "--rdzv-backend=etcd", f"--rdzv-endpoint={server.endpoint}",
                    f"--rdzv-id={run}", "--rdzv-conf=lease_ttl=3,last_call_timeout=3,join_timeout=120",
                    f"--local-addr={host}", "--monitor-interval=0.5", "--max-restarts=5", str(script), str(outs[run]),
                ]
                return start(args)

            stop_scraping = threading.Event()
            t0 = time.monotonic()
            scraper = threading.Thread(target=_scrape, args=(url, capture, t0, stop_scraping), daemon=True)
            scraper.start()

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
                at(seconds["stop"] + 20)  # the exporter sees the runs close and their keys go
            finally:
                stop_scraping.set()
                scraper.join(10)
                exporter.signal(signal.SIGTERM)
                with contextlib.suppress(Exception):
                    exporter.wait(15)
    finally:
        server.stop()
    return capture


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


def _scrape(url: str, capture: Capture, t0: float, stop: threading.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
            capture.add(started - t0, answer.read().decode())
        stop.wait(max(SCRAPE_EVERY - (time.monotonic() - started), 0.05))


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
    now = capture.now if capture.now is not None else capture.times[-1]
    fig.text(0.01, 1 - 0.3 / height, dashboard["title"], fontsize=15, weight="bold", va="top")
    fig.text(0.01, 1 - 0.6 / height,
             f"Drawn by bench/dashboard_picture.py from real `rdzv exporter` scrapes every {SCRAPE_EVERY:g} s "
             "(not a Grafana screenshot), each panel's PromQL evaluated over them. run = All.\n"
             f"Time axis: seconds since the exporter started; \"now\" (stats, table) = {now:.0f} s, when the runs "
             "were told to stop. Dotted lines: a run's round changed (the dashboard's annotation).",
             fontsize=9, va="top", color="#444", linespacing=1.5)
    promql = Promql(capture, {"run_id": ".*"})
    times = [t for t in capture.times if t <= now]
    steps = _round_steps(promql, times)
    for panel in panels:
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
        if kind == "stat":
            _stat(ax, panel, promql, now)
        elif kind == "table":
            _table(ax, panel, promql, now)
        else:
            _timeseries(ax, panel, promql, times, steps)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def _round_steps(promql: Promql, times: list[float]) -> list[float]:
    """Scrape times at which some run's round changed (the dashboard's annotation, per scrape)."""
    steps, before = [], {}
    for t in times:
        now = {dict(k)["run_id"]: v for k, v in promql.eval('rdzv_run_round{run_id=~"$run_id"}', t).items()}
        if any(run in before and before[run] != v for run, v in now.items()):
            steps.append(t)
        before = now
    return steps


def _threshold_color(panel: dict, value: float) -> str:
    colors = {"green": "#37872d", "orange": "#e0752d", "red": "#c4162a"}
    color = "#37872d"
    for step in panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", []):
        if step["value"] is None or value >= step["value"]:
            color = colors.get(step["color"], step["color"])
    return color


def _stat(ax, panel: dict, promql: Promql, now: float) -> None:  # noqa: ANN001 - a matplotlib Axes
    vec = promql.eval(panel["targets"][0]["expr"], now)
    value = next(iter(vec.values())) if len(vec) == 1 else (None if not vec else sum(vec.values()))
    ax.set_xticks([])
    ax.set_yticks([])
    if value is None:
        ax.text(0.5, 0.45, "No data", ha="center", va="center", fontsize=14, color="#666")
        return
    ax.set_facecolor(_threshold_color(panel, value))
    text = f"{value:g}" if not math.isnan(value) else "NaN"
    ax.text(0.5, 0.45, text, ha="center", va="center", fontsize=26, color="white", weight="bold")


def _table(ax, panel: dict, promql: Promql, now: float) -> None:  # noqa: ANN001
    rename = next((t["options"]["renameByName"] for t in panel.get("transformations", []) if t["id"] == "organize"), {})
    columns, cells = ["run_id"], {}
    for target in panel["targets"]:
        column = rename.get(f"Value #{target['refId']}", target["refId"])
        columns.append(column)
        for labels, value in promql.eval(target["expr"], now).items():
            cells.setdefault(dict(labels).get("run_id", ""), {})[column] = value
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


def _timeseries(ax, panel: dict, promql: Promql, times: list[float], steps: list[float]) -> None:  # noqa: ANN001
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for target in panel["targets"]:
        for t in times:
            for labels, value in promql.eval(target["expr"], t).items():
                xs, ys = lines.setdefault(legend(target.get("legendFormat"), labels), ([], []))
                if xs and t - xs[-1] > 3 * SCRAPE_EVERY:  # the series was absent: leave a gap
                    xs.append(math.nan)
                    ys.append(math.nan)
                xs.append(t)
                ys.append(value)
    for t in steps:
        ax.axvline(t, color="#e0752d", linestyle=":", linewidth=0.8)
    for i, (name, (xs, ys)) in enumerate(sorted(lines.items())):
        ax.step(xs, ys, where="post", label=name, color=COLORS[i % len(COLORS)], linewidth=1.2)
    ax.set_xlim(0, times[-1] if times else 1)
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
    ap.add_argument("--samples", type=Path, help="also write the scrapes here (JSON)")
    ap.add_argument("--from-samples", type=Path, help="draw from these scrapes instead of running anything")
    ap.add_argument("--dpi", type=int, default=80)
    args = ap.parse_args()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("bench/dashboard_picture.py draws with matplotlib: pip install matplotlib") from None
    dashboard = json.loads(DASHBOARD.read_text())
    if args.from_samples:
        capture = Capture.load(args.from_samples)
    else:
        # Seconds since the exporter started at which each step happens.
        plan = {"a": 2, "b1": 10, "b2": 24, "kill": 38, "replace": 55, "stop": 75}
        with tempfile.TemporaryDirectory() as tmp:
            capture = capture_runs(Path(tmp), plan)
        if args.samples:
            capture.dump(args.samples)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    render(capture, dashboard, args.out, args.dpi)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB, {len(capture.times)} scrapes")


if __name__ == "__main__":
    main()
