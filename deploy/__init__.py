"""Deployment helpers: development credentials and a one-machine launcher."""
