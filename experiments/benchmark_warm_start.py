"""How long the warm ClientApp path takes before Flower's code runs: shim start to child.

    python -m experiments.benchmark_warm_start                 # the server's default preload
    python -m experiments.benchmark_warm_start --preload numpy # a small server, to compare

Starts a real warm server (``deploy/warm_clientapp.py``) whose target only stamps the
time, then runs its ``flwr-clientapp`` shim ``--messages`` times, as a SuperExec would.
For each message: from just before the shim is started to the child's first line (the
shim's interpreter, the request with its descriptors, the fork, the child's set-up:
session, streams, environment, generators, threads), and the shim's whole run. Appends
one row to docs/benchmarks/warm_start.jsonl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from deploy.launch import REPO
from deploy.warm_clientapp import start_server
from experiments.records import append_record

OUT = REPO / "docs" / "benchmarks" / "warm_start.jsonl"
TARGET = '''import os, time


def main():
    with open(os.environ["WARM_START_OUT"], "w") as handle:
        handle.write(repr(time.time()))
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--preload", nargs="*", default=None,
                        help="modules for the server (default: its own list)")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="warm-start-") as tmp:
        root = Path(tmp)
        (root / "warm_start_target.py").write_text(TARGET)
        sock = root / "s.sock"
        extra = ["--target", "warm_start_target:main"]
        if args.preload is not None:
            extra += ["--preload", *args.preload]
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{root}"}
        with open(root / "server.log", "wb") as log:
            try:
                server = start_server(sock, root / "bin", extra, env=env, cwd=REPO, log=log,
                                      timeout=300)
            except RuntimeError as err:
                raise RuntimeError(f"{err}: {(root / 'server.log').read_text()}") from None
            try:
                to_child, whole = [], []
                stamp = root / "stamp"
                for _ in range(args.messages):
                    stamp.unlink(missing_ok=True)
                    start = time.time()
                    proc = subprocess.run([str(root / "bin" / "flwr-clientapp")], timeout=120,
                                          env={"PATH": os.environ["PATH"],
                                               "WARM_START_OUT": str(stamp)})
                    end = time.time()
                    if proc.returncode != 0 or not stamp.exists():
                        raise RuntimeError(f"the shim exited {proc.returncode}")
                    to_child.append(float(stamp.read_text()) - start)
                    whole.append(end - start)
            finally:
                server.terminate()
                server.wait(timeout=30)
    append_record(args.out, args.label, os.cpu_count(), {
        "preload": args.preload, "messages": args.messages, "shim_to_child_s": to_child,
        "shim_whole_s": whole, "median_shim_to_child_s": statistics.median(to_child),
        "median_shim_whole_s": statistics.median(whole)},
        shown=lambda key: not key.startswith("shim_"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
