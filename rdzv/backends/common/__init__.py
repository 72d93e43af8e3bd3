"""Pieces several backends share: the pumped change feed, a feed's start-over (resync), the
ticker, the state document, the run's keepers, how a node leaves, etcd's expiry bound, torch
Store adapters and the Store algorithms of the etcd stores (kv_store). Retry pauses are in
`rdzv.backoff`, which the etcd client uses too."""
