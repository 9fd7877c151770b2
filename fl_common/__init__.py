"""Leaves every layer may import: wire keys, atomic writes, seeds and secret randomness.

Nothing here imports the app's other packages (``partitions``, ``strategies``,
``fl_app``, ``experiments``, ``deploy``); the import contracts in pyproject.toml check it.
"""


import logging as _logging


def keep_root_logger_quiet() -> None:
    """Opacus calls logging.basicConfig when it is imported (opacus/utils/module_utils.py),
    which gives the root logger a stream handler; Flower's "flwr" logger has its own and
    propagates to the root, so with dp = true every log line was printed twice. A root
    handler set before Opacus is imported makes that basicConfig a no-op. Called by the
    packages that import Opacus (fl_app, strategies) before any of their modules loads."""
    if not _logging.getLogger().handlers:
        _logging.getLogger().addHandler(_logging.NullHandler())
