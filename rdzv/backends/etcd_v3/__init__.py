"""The etcd v3 backend: a run under one prefix, leases for liveness, watches for changes, a
sealed round as a header plus one key per member (docs/rendezvous.md)."""
