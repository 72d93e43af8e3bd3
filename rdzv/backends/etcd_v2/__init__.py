"""The etcd v2 backend (python-etcd): TTL keys for liveness, one state document per run, a
wait-index feed."""
