"""Run the app on Flower's deployment runtime on this machine: a SuperLink and N SuperNodes.

    python -m deploy.local --nodes 3
    python -m deploy.local --nodes 3 --tls --auth -c 'num-server-rounds=5 secagg=true'

Starts ``flower-superlink`` and ``--nodes`` ``flower-supernode`` processes on loopback, on
free ports, each SuperNode holding partition i of N (node config ``partition-id``,
``num-partitions``); with ``--tls``, development credentials are made in the work folder
(``deploy/credentials.py``) and every connection is TLS; with ``--auth`` (implies
``--tls``), the SuperLink admits only SuperNodes whose keys were registered, and the
launcher registers one key per node. Then ``flwr run`` submits the app and its progress
is streamed here. Every process it started is stopped, by process group, whatever
happens (also on Ctrl-C). The exit status is 0 only if the run's ``summary.json`` says
``completed`` (``flwr run`` itself exits 0 even when the ServerApp fails).

Each SuperNode runs each message in a fresh ClientApp process, as on a real device, and
gets a ``cache-dir`` (its partition, kept between messages) and a ``state-dir`` (its DP
spend, kept across restarts) under ``<workdir>/node-<i>/``; the folder also holds the
SuperLink's and SuperNodes' logs (``--workdir``, default
``deployment/<time>``), and the run's results go to ``<workdir>/results/<run-name>``.
The SuperNodes share this machine's cores, so each runs PyTorch on one thread
(``OMP_NUM_THREADS=1`` unless the environment sets it; ``deploy/launch.py``). Their
ClientApp processes are forked by one warm server that imported Flower and PyTorch once
(``deploy/warm_clientapp.py``: about 1.4 s a message instead of 8 s here); ``--cold``
starts every message from nothing, as Flower does (and so does every message off Linux).
The SuperNodes wait at most ``--pull-seconds`` (default 0.2 s) between asking the
SuperLink for a message, where Flower's own wait is 3 s (``deploy/prompt_supernode.py``);
``--flower-waits`` keeps Flower's.
For SuperNodes on other machines, see docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from datetime import datetime
from pathlib import Path

from flwr.common.config import parse_config_args

from deploy.credentials import make_all
from .launch import REPO, LocalSuperLink, raise_keyboard_interrupt
from .prompt_supernode import DEFAULT_SECONDS, check_seconds
from .warm_clientapp import supported as warm_supported


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes to start (>= 1)")
    parser.add_argument("--tls", action="store_true", help="TLS with development credentials")
    parser.add_argument("--auth", action="store_true",
                        help="SuperNode authentication (registered keys only; implies --tls)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for logs, credentials and results")
    parser.add_argument("-c", "--run-config", default="",
                        help="run-config overrides, as for flwr run -c ('key=value ...')")
    parser.add_argument("--timeout", type=float, default=24 * 3600, help="seconds for the run")
    parser.add_argument("--cold", action="store_true",
                        help="no warm ClientApp server: every message in a fresh process")
    parser.add_argument("--pull-seconds", type=float, default=DEFAULT_SECONDS,
                        help="the SuperNodes' longest wait between pulls (Flower's: 3 s)")
    parser.add_argument("--flower-waits", action="store_true",
                        help="Flower's flower-supernode as it is (3 s between idle pulls)")
    args = parser.parse_args(argv)
    if not args.flower_waits:
        try:
            check_seconds(args.pull_seconds, "--pull-seconds")
        except ValueError as err:
            parser.error(str(err))
    if args.nodes < 1:
        parser.error(f"--nodes must be >= 1, got {args.nodes}")
    try:
        overrides = parse_config_args([args.run_config]) if args.run_config else {}
    except Exception as err:  # noqa: BLE001 - Flower's parser raises several kinds
        parser.error(f"-c {args.run_config!r} is not 'key=value ...' TOML: {err}")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = (args.workdir or Path("deployment") / stamp).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    overrides.setdefault("run-name", f"deployed-{stamp}")
    overrides.setdefault("results-dir", str(workdir / "results"))
    secure = args.tls or args.auth
    files = make_all(workdir / "credentials", nodes=args.nodes) if secure else None

    link = LocalSuperLink(workdir, log_path=workdir / "superlink.log", simulation=False,
                          tls=files.root if files else None, node_auth=args.auth,
                          warm_clientapp=not args.cold and warm_supported(),
                          supernode_pull_seconds=None if args.flower_waits else args.pull_seconds)
    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        link.start()
        print(f"SuperLink on 127.0.0.1:{link.port} ({'TLS' if secure else 'insecure'}"
              f"{', SuperNode authentication' if args.auth else ''}"
              f"{', warm ClientApp server' if link.warm_clientapp else ''}); logs in {workdir}",
              flush=True)
        for pid in range(args.nodes):
            if args.auth:
                link.register_node(files.node_public_key(pid))
            node_dir = workdir / f"node-{pid}"
            config = (f'partition-id={pid} num-partitions={args.nodes} '
                      f'cache-dir="{node_dir / "cache"}" state-dir="{node_dir / "state"}"')
            link.add_supernode(pid, args.nodes, node_config=config,
                               private_key=files.node_key(pid) if args.auth else None)
        print(f"{args.nodes} SuperNode(s) started; submitting the run", flush=True)
        link.run(overrides, app=REPO, timeout=args.timeout, output="-")
    except KeyboardInterrupt:
        print("Interrupted: stopping every process started here", file=sys.stderr)
        return 130
    finally:
        link.stop()
        signal.signal(signal.SIGTERM, previous)
    summary_path = Path(overrides["results-dir"]) / overrides["run-name"] / "summary.json"
    if not summary_path.exists():
        print(f"The run left no summary ({summary_path}): it failed before training; see the "
              f"output above and {workdir / 'superlink.log'}", file=sys.stderr)
        return 1
    summary = json.loads(summary_path.read_text())
    status = summary.get("status")
    print(f"Run {overrides['run-name']}: status {status}, final test accuracy "
          f"{summary.get('final_test_accuracy')}; {summary_path}")
    if status != "completed":
        print(f"The run did not complete: {summary.get('error', status)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
