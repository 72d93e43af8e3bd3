"""The rendezvous algorithm, independent of any store: the join loop, the coordinator, the
records and torch's handler over them (docs/architecture.md names the file of each concept)."""
