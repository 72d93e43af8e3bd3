"""Backends: `api.py` is the interface the rendezvous algorithm drives; one subpackage per store
(`etcd_v3`, `etcd_v2`, `c10d`, `static`) holds what differs for it; `common` what several share."""
