"""A stand-in for Flower's ``flwr-clientapp`` entry point in tests/test_warm_clientapp.py:
records what the process it runs in looks like, prints a line, exits with a given code.
Imports nothing of the app (the warm server must not)."""

from __future__ import annotations

import json
import os
import random
import sys


def _autogroup(pid: str = "self") -> str | None:
    """The scheduler's autogroup of a process (``/autogroup-N nice M``), where Linux has it."""
    try:
        with open(f"/proc/{pid}/autogroup") as handle:
            return handle.read().split()[0]
    except OSError:
        return None


def main() -> None:
    out, code = sys.argv[sys.argv.index("--out") + 1], int(sys.argv[sys.argv.index("--code") + 1])
    if "--wait" in sys.argv:  # write the pid, then wait for a signal (SIGTERM: note it)
        import signal
        import time

        def on_term(signum, frame):
            with open(out + ".term", "w") as handle:
                handle.write(str(signum))
            sys.exit(143)
        signal.signal(signal.SIGTERM, on_term)
        with open(out + ".pid", "w") as handle:
            handle.write(str(os.getpid()))
        time.sleep(120)
        sys.exit(0)
    app_loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("fl_app", "strategies"))
    record = {"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "pid": os.getpid(),
              "ppid": os.getppid(), "torch_preloaded": "torch" in sys.modules,
              "app_loaded": app_loaded, "random": random.random(), "sid": os.getsid(0),
              "autogroup": _autogroup()}
    import numpy as np
    import torch

    record.update({"numpy": float(np.random.rand()), "torch": float(torch.rand(1)),
                   "threads": torch.get_num_threads()})
    # the child can still do parallel work (no thread pool was created before the fork)
    record["matmul"] = float((torch.ones(256, 256) @ torch.ones(256, 256))[0, 0])
    with open(out, "w") as handle:
        json.dump(record, handle)
    print(f"probe {os.getpid()} on stdout", flush=True)
    print(f"probe {os.getpid()} on stderr", file=sys.stderr, flush=True)
    if "--crash" in sys.argv:
        os.abort()
    sys.exit(code)
