"""Leaves every layer may import: wire keys, atomic writes, seeds and secret randomness.

Nothing here imports the app's other packages (``partitions``, ``strategies``,
``fl_app``, ``experiments``, ``deploy``); the import contracts in pyproject.toml check it.
"""
