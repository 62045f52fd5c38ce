"""Test harness helpers (PgCluster in cluster.py; pgtree.sh builds the private install tree)."""
