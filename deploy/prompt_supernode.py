"""``flower-supernode`` with its idle waits shortened: a message is picked up when it arrives.

    FL_APP_SUPERNODE_PULL_SECONDS=0.2 python -m deploy.prompt_supernode --superlink ... (Flower's flags)

Flower 1.42's SuperNode asks the SuperLink for a message, and when none is waiting it
sleeps **3 s** before it asks again; after handing a message to its ClientApp it checks
for the reply every 0.5 s (``flwr/supernode/start_client_internal.py``, ``time.sleep(3)``
and ``time.sleep(0.5)``, hard-coded). A round's train messages therefore wait on average
about half of 3 s before a node even sees them, and a deployed training phase is longer
than the slowest node's message by 2.3-2.6 s a round on this project's machine
(docs/deployment.md, "With the warm ClientApp server"). Nothing in Flower sets those waits.

This launcher runs Flower's own ``flower_supernode`` entry point with the
``time`` module that ``start_client_internal`` sees replaced by one whose ``sleep`` waits
at most ``FL_APP_SUPERNODE_PULL_SECONDS`` (default 0.2 s); everything else in the
SuperNode is Flower's; and the first retry of a message's object pull (Flower's 1 s,
doubling) comes after the same cap, since a node that asks promptly may ask before the
ServerApp has pushed all of a message's objects. The price is traffic: an idle node asks the SuperLink
``1 / seconds`` times a second instead of once every 3 s, which is nothing for the dozens of
nodes of a lab deployment and worth weighing for thousands (keep Flower's waits there:
start ``flower-supernode`` itself).

It refuses to start (rather than silently do nothing) if the installed Flower no longer
has the waits it shortens.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import time
from pathlib import Path
from types import ModuleType

PULL_ENV = "FL_APP_SUPERNODE_PULL_SECONDS"
DEFAULT_SECONDS = 0.2
MODULE = "flwr.supernode.start_client_internal"
EXPECTED = ("time.sleep(3)", "time.sleep(0.5)")  # the waits in Flower 1.42's loop


class _ShortSleeps:
    """The ``time`` module, with ``sleep`` capped at ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._seconds))

    def __getattr__(self, name: str):
        return getattr(time, name)


def check_seconds(value, name: str = PULL_ENV) -> float:
    """``value`` as a cap in seconds, in (0, 3] (Flower's own wait is 3); else a ValueError
    that names ``name``."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not 0.0 < seconds <= 3.0:
        raise ValueError(f"{name} must be a number of seconds in (0, 3] (Flower's own "
                         f"wait is 3); got {str(value).strip()!r}")
    return seconds


def pull_seconds(environ=None) -> float:
    """The cap from ``FL_APP_SUPERNODE_PULL_SECONDS`` (a number in (0, 3]), else the default."""
    environ = os.environ if environ is None else environ
    raw = str(environ.get(PULL_ENV, "")).strip()
    return check_seconds(raw) if raw else DEFAULT_SECONDS


def shorten_waits(module: ModuleType, seconds: float) -> None:
    """Give ``module`` (Flower's ``start_client_internal``) a ``time`` whose ``sleep`` waits
    at most ``seconds``; refuses a module without the waits this was written against."""
    source = inspect.getsource(module)
    missing = [s for s in EXPECTED if s not in source]
    if not isinstance(getattr(module, "time", None), ModuleType):
        missing.append("its time module")
    pull = getattr(module, "pull_objects", None)
    if pull is None or "initial_backoff" not in inspect.signature(pull).parameters:
        missing.append("pull_objects(initial_backoff=...)")
    if missing:
        raise RuntimeError(f"{module.__name__} does not have the waits deploy/prompt_supernode.py "
                           f"shortens (missing: {', '.join(missing)}); "
                           "this Flower is not 1.42's: start flower-supernode itself")
    module.time = _ShortSleeps(seconds)
    # A message pulled as soon as it reaches the SuperLink may be pulled before the
    # ServerApp has pushed all its objects; Flower then retries after 1 s, doubling
    # (PULL_INITIAL_BACKOFF, flwr/supercore/constant.py). Retry after ``seconds`` instead.
    module.pull_objects = functools.partial(pull, initial_backoff=seconds)


CLIENTAPP_MODULE = "flwr.supernode.runtime.run_clientapp"


def shorten_clientapp_retries(module: ModuleType, seconds: float) -> bool:
    """In a ClientApp process (``module``: Flower's ``run_clientapp``): the first retry of
    the message's object pull after ``seconds`` instead of 1 s. The SuperNode stores a
    message and creates its task before it has pulled the message's objects
    (``_pull_and_store_message``), so a ClientApp started promptly can ask for them
    first and then waits Flower's 1 s (measured: 1.1-1.2 s in 4 of 6 messages). The warm
    ClientApp server applies this in each child when the SuperNode has the cap set;
    False (nothing changed) for a Flower without that argument."""
    pull = getattr(module, "pull_and_inflate_object_from_tree", None)
    if pull is None or "initial_backoff" not in inspect.signature(pull).parameters:
        return False
    module.pull_and_inflate_object_from_tree = functools.partial(pull, initial_backoff=seconds)
    return True


def write_script(path: Path, text: str, mode: int) -> None:
    """Write an executable script so that a process executing ``path`` while it is
    rewritten runs the old script or the new one, never a truncated (empty) file: a
    temporary file in the same folder, its mode set, renamed over ``path``. Stdlib only,
    not ``fl_common.atomic``: the warm ClientApp server imports this module and must hold
    none of the app's packages (deploy/warm_clientapp.py, APP_PACKAGES)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def install_launcher(folder: Path, python: str | None = None) -> Path:
    """A ``flower-supernode`` script in ``folder`` that starts this launcher (the name is
    kept, so ``fl_app/node_runtime.py`` counts it as a SuperNode). Written atomically: a
    SuperNode whose interpreter opened a script being rewritten in place found it
    truncated, ran nothing and exited 0, silently (seen under load, when
    ``LocalSuperLink`` reinstalled it for each SuperNode; it now installs it once)."""
    script = Path(folder) / "flower-supernode"
    text = (f"#!{python or sys.executable}\n"
            "import sys\nfrom deploy.prompt_supernode import main\nsys.exit(main())\n")
    write_script(script, text, 0o755)
    return script


def main() -> int:
    shorten_waits(importlib.import_module(MODULE), pull_seconds())
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"
    return flower_supernode()


if __name__ == "__main__":
    sys.exit(main())
