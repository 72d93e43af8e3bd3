"""Pieces several backends share: the pumped change feed, the ticker, the state document, the
run's keepers, torch Store adapters and the Store algorithms of the etcd stores (kv_store).
Retry pauses are in `rdzv.backoff`, which the etcd client uses too."""
