"""The PromQL of deploy/grafana-rdzv-dashboard.json as Grafana would send it to Prometheus.

Grafana replaces the dashboard's variables before it queries: `$run_id` (All: `.*`) and
`$exporter_job` (the textbox's value). Used by tests/test_prometheus.py and
bench/dashboard_picture.py, which send the result to a real Prometheus.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana-rdzv-dashboard.json"


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def defaults(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """Each query or textbox variable's value with its default selection (All: the allValue)."""
    values = {}
    for var in dashboard.get("templating", {}).get("list", []):
        current = var.get("current", {}).get("value")
        if var["type"] == "textbox":
            values[var["name"]] = current or var.get("query", "")
        elif var["type"] == "query":
            values[var["name"]] = var.get("allValue", ".*") if current in (None, "$__all") else str(current)
    return values


def expand(expr: str, variables: Mapping[str, str]) -> str:
    """`$name` and `${name}` replaced; an unknown variable is an error (Grafana would send it as is)."""
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"dashboard variable ${name} has no value")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def targets(dashboard: Mapping[str, Any], variables: Mapping[str, str] | None = None
            ) -> Iterator[tuple[dict[str, Any], dict[str, Any], str]]:
    """(panel, target, PromQL with the variables replaced) for every target of every panel."""
    values = defaults(dashboard) if variables is None else dict(variables)
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target, expand(target["expr"], values)


def legend(fmt: str | None, labels: Mapping[str, str]) -> str:
    """Grafana's legendFormat: `{{label}}` replaced by the series' label value."""
    if not fmt:
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return f"{labels.get('__name__', '')}{{{inner}}}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)
