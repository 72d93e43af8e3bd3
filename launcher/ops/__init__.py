"""`rdzv`: the operator's commands on rendezvous runs in etcd (status, events, exporter, clean,
quarantine). `cli` is the command line; `live_status`, `events` and `exporter` are the
watch-driven commands it loads on use. Nothing here imports torch."""
