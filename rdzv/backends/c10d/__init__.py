"""The c10d backend: one node hosts a TCPStore; heartbeats stand in for leases."""
