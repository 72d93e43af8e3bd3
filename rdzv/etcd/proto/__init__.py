"""Generated gRPC stubs for the subset of etcd's v3 API we use (see etcd_min.proto)."""
