"""rdzv-launch's metrics: what the agent tells them (`recorder`, no Prometheus needed), the
Prometheus registry fed by it (`prometheus`), and the HTTP side (`server`, shared with `rdzv
exporter`; `endpoint`, the launcher's `--metrics-port`)."""
