"""Clusters: membership, VM ownership and fencing on etcd (docs/CLUSTER.md)."""
