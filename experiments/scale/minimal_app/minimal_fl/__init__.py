"""Minimal FedAvg app (benchmark fixture)."""
