"""The static backend: fixed node ranks, no store of its own beyond rank 0's TCPStore."""
