"""Thin Ray Serve deployments that wire the ingress, batching and backends together."""
