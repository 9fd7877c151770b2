"""The wire keys moved to ``fl_common/wire.py`` (a leaf every layer may import)."""

from fl_common.wire import *  # noqa: F401,F403
