"""Profile deployed messages from ClientApp process start to reply, next to simulation.

    python -m experiments.benchmark_message_profile                      # digits, 2 nodes
    python -m experiments.benchmark_message_profile --dataset fashion-mnist --rounds 3
    python -m experiments.benchmark_message_profile --label after --repeat 2

Real Flower processes: a private SuperLink and ``--nodes`` ``flower-supernode`` processes
(``deploy/launch.py``) on free ports. Each SuperNode's SuperExec starts
``flwr-clientapp`` by name for every message; a wrapper of that name is put first on the
SuperNodes' ``PATH``: it stamps the process's start (the kernel's start time of the
process, before the interpreter runs), then runs Flower's own ``flwr-clientapp`` with
timers around its steps and around the app's (``fl_app.client_app``): Flower's imports,
pulling the task, installing the FAB, ``import torch``, ``import torch._dynamo`` (which
``torch.optim``'s first ``step()`` would otherwise import inside the training loop:
about 1.5 s), the rest of the app's imports,
the node's data, the model build, the training (or evaluation) loop, the handler as a
whole (mods included) and pushing the reply. One JSON record per process.

Alternating in one invocation: the same run config in simulation (``flower-superlink
--simulation``: ClientApps in long-lived Ray actors of one CPU each) and on the deployment
runtime; ``--repeat`` pairs. Reported per deployment run: the median of each phase over
the train messages of rounds 2.., the fixed part of a message (process start to reply,
minus the training loop), and the training phase (``train_seconds``) against
simulation's. Appends to docs/benchmarks/deployment_profile.jsonl: one ``run`` row per
deployment run (with the simulated run it alternated with) and one ``message`` row per
profiled process.

``--node-config`` adds keys to every SuperNode's config (e.g. ``num-threads=1``),
``--env`` sets variables in the SuperNodes' environment (e.g. ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from deploy.launch import LocalSuperLink

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "deployment_profile.jsonl"

# The wrapper: runs as ``flwr-clientapp`` (first on PATH), times Flower's steps and the app's.
CHILD = r'''
import os, sys, time, json
_T0 = time.time()


def _process_start(pid="self"):
    """When the process began, on time.time()'s clock: its start in clock ticks after
    boot (/proc/<pid>/stat), placed by /proc/uptime. (/proc/stat's ``btime`` is whole
    seconds: records without ``start_clock`` used it and place the start up to 1 s early,
    by the boot time's dropped fraction: 0.42 s on the machine of 2026-12-03's later
    records, unknown for earlier machines. Their fixed parts and interpreter starts
    include it.)"""
    with open(f"/proc/{pid}/stat") as handle:
        ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as handle:
        uptime = float(handle.read().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


# Forked by the warm server (deploy/warm_clientapp.py): the message began when the shim
# the SuperExec started did, not at the fork.
_SHIM = getattr(sys.modules.get("deploy.warm_clientapp"), "SHIM_PID", None)
REC = {"pid": os.getpid(), "t_exec": _process_start(_SHIM or "self"), "t_wrapper": _T0,
       "start_clock": "uptime",
       "phases": {}, "warm": _SHIM is not None}
PH = REC["phases"]


def _timed(owner, name, label):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            PH[label] = PH.get(label, 0.0) + time.time() - start
    setattr(owner, name, wrapper)
    return original


_GC = {"collections": 0, "seconds": 0.0, "gen2": 0}


def _gc_callback(phase, info):
    if phase == "start":
        _GC["_t"] = time.perf_counter()
    elif "_t" in _GC:
        _GC["seconds"] += time.perf_counter() - _GC.pop("_t")
        _GC["collections"] += 1
        _GC["gen2"] += info.get("generation") == 2


import gc  # noqa: E402
gc.callbacks.append(_gc_callback)


def _thread_cpu():
    """Every thread of this process: name and CPU seconds (user + system)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as handle:
                raw = handle.read()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[f"{tid}:{name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _loop_counters():
    """CPU, page faults, context switches and gc time of this process, now."""
    with open("/proc/self/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    status = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return {"wall": time.perf_counter(), "thread_cpu": time.thread_time(),
            "process_cpu": time.process_time(), "minflt": int(fields[7]),
            "majflt": int(fields[9]),
            "voluntary_ctxt": int(status.get("voluntary_ctxt_switches", 0)),
            "nonvoluntary_ctxt": int(status.get("nonvoluntary_ctxt_switches", 0)),
            "gc_seconds": _GC["seconds"], "gc_collections": _GC["collections"],
            "gc_gen2": _GC["gen2"], "threads": int(status.get("Threads", 0)),
            "gc_tracked": len(gc.get_objects())}


import flwr.supernode.runtime.run_clientapp as rc  # noqa: E402
from flwr.clientapp.client_app import ClientApp  # noqa: E402

PH["flwr_imports"] = time.time() - _T0
_timed(rc, "install_from_fab", "install_fab")
_timed(rc, "pull_and_inflate_object_from_tree", "pull_objects")  # part of pull_task
_pull = rc.pull_task_input


def pull(client):
    start = time.time()
    message, context, run, fab = _pull(client)
    PH["pull_task"] = time.time() - start
    REC["message_type"] = str(message.metadata.message_type)
    REC["group_id"] = str(message.metadata.group_id)
    REC["node_config"] = {k: str(v) for k, v in context.node_config.items()}
    config = message.content.get("config") if message.content is not None else None
    if config is not None and "server-round" in config:
        REC["server_round"] = int(config["server-round"])
    if config is not None and "secaggplus_configs" in message.content:
        REC["secagg"] = True
    return message, context, run, fab


rc.pull_task_input = pull
_get_loader = rc.get_load_client_app_fn


def get_loader(*args, **kwargs):
    load = _get_loader(*args, **kwargs)

    def loader(*a, **k):
        start = time.time()
        import torch  # noqa: F401 - timed on its own
        PH["import_torch"] = time.time() - start
        start = time.time()
        import torch._dynamo  # noqa: F401 - the optimizer's first step imports it
        PH["import_torch_dynamo"] = time.time() - start
        start = time.time()
        app = load(*a, **k)
        PH["import_app"] = time.time() - start
        try:
            import fl_app.client_app as ca
            for name, label in (("node_data", "data"), ("build_model", "model_build"),
                                ("train_local", "train_loop"), ("evaluate", "eval_loop")):
                _timed(ca, name, label)
            original_train = ca.train_local

            def train_local(*args, **kwargs):
                REC["torch_threads"] = torch.get_num_threads()
                REC["torch_interop_threads"] = torch.get_num_interop_threads()
                before = _loop_counters()
                try:
                    return original_train(*args, **kwargs)
                finally:
                    after = _loop_counters()
                    REC["train_loop_counters"] = {k: after[k] - before[k] for k in before}
                    REC["threads_at_loop_end"] = _thread_cpu()
            ca.train_local = train_local
        except Exception as err:  # the profile must not break the message
            REC["patch_error"] = repr(err)
        return app
    return loader


rc.get_load_client_app_fn = get_loader
_call = ClientApp.__call__


def call(self, *args, **kwargs):
    start = time.time()
    try:
        return _call(self, *args, **kwargs)
    finally:
        PH["handler"] = time.time() - start
        try:
            import torch
            REC.setdefault("torch_threads", torch.get_num_threads())
        except Exception:
            pass


ClientApp.__call__ = call
_push = rc.push_message


def push(*args, **kwargs):
    start = time.time()
    try:
        return _push(*args, **kwargs)
    finally:
        end = time.time()
        PH["push_reply"] = end - start
        REC["t_replied"] = end
        REC["affinity"] = len(os.sched_getaffinity(0))
        REC["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
        folder = os.environ["FL_PROFILE_DIR"]
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as handle:
            json.dump(REC, handle)


rc.push_message = push
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # noqa: E402

sys.argv[0] = "flwr-clientapp"
sys.exit(flwr_clientapp())
'''

PHASES = ("flwr_imports", "pull_task", "pull_objects", "install_fab", "import_torch", "import_torch_dynamo",
          "import_app", "data",
          "model_build", "train_loop", "eval_loop", "handler", "push_reply")


def write_warm_target(folder: Path) -> Path:
    """The same profile as a function for the warm server's ``--target``: the server
    imports this module once, each forked child runs ``main`` (the wrapper's code)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fl_profile_target.py").write_text(
        f"CHILD = {CHILD!r}\n\n\ndef main():\n    exec(compile(CHILD, 'fl_profile_target', 'exec'), "
        "{'__name__': 'fl_profile_target_child'})\n")
    return folder


def write_wrapper(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "flwr-clientapp"
    script.write_text(f"#!{sys.executable}\n{CHILD}")
    script.chmod(0o755)
    return folder


def summarize(records: list[dict]) -> dict:
    """Per-phase medians over ``records``, the process's whole life (start to reply),
    its time before the handler, and the fixed part (start to reply minus the loop)."""
    out: dict = {"messages": len(records)}
    for phase in PHASES:
        values = [r["phases"][phase] for r in records if phase in r["phases"]]
        if values:
            out[phase] = statistics.median(values)
    total = [r["t_replied"] - r["t_exec"] for r in records]
    loop = [r["phases"].get("train_loop", r["phases"].get("eval_loop", 0.0)) for r in records]
    out["interpreter_start"] = statistics.median(r["t_wrapper"] - r["t_exec"] for r in records)
    out["start_to_reply"] = statistics.median(total)
    out["fixed"] = statistics.median(t - x for t, x in zip(total, loop))
    handler = [r["phases"].get("handler", 0.0) for r in records]
    out["handler_minus_loop"] = statistics.median(h - x for h, x in zip(handler, loop))
    return out


def one_run(mode: str, args, workdir: Path, tag: str) -> dict:
    name = f"{mode}-{tag}-{datetime.now().strftime('%H%M%S%f')}"
    run = {"dataset": args.dataset, "num-server-rounds": args.rounds, "run-name": name,
           "results-dir": str(workdir / "results"), "min-train-nodes": args.nodes,
           "fraction-train": 1.0}
    profile_dir = workdir / f"profile-{name}"
    profile_dir.mkdir(parents=True)
    env = dict(kv.split("=", 1) for kv in args.env)
    warm_args = None
    if mode == "deployment":
        wrapper = write_wrapper(workdir / "wrapper-bin")
        path = f"{wrapper}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        env.update({"PATH": path, "FL_PROFILE_DIR": str(profile_dir)})
    elif mode.startswith("deployment-warm"):
        target = write_warm_target(workdir / "warm-target")
        env.update({"PYTHONPATH": str(target), "FL_PROFILE_DIR": str(profile_dir)})
        warm_args = ["--target", "fl_profile_target:main"]
    deployed = mode.startswith("deployment")
    started = time.monotonic()
    if args.flower_defaults:  # what Flower does: PyTorch's threads, a 1 s task poll
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "1.0")
    with LocalSuperLink(workdir / name, simulation=(mode == "simulation"),
                        extra_env=env if deployed else None,
                        supernode_threads=None if args.flower_defaults else 1,
                        warm_clientapp=mode.startswith("deployment-warm"), warm_args=warm_args,
                        supernode_pull_seconds=(args.prompt if mode == "deployment-warm-prompt"
                                                else None)) as link:
        if deployed:
            for pid in range(args.nodes):
                cache = f' cache-dir="{workdir / "cache"}"' if args.cache else ""
                extra = "".join(f" {kv}" for kv in args.node_config)
                link.add_supernode(pid, args.nodes, node_config=(
                    f"partition-id={pid} num-partitions={args.nodes}{cache}{extra}"))
            proc = link.run(run, timeout=3600)
        else:
            proc = link.run(run, num_supernodes=args.nodes, timeout=3600)
    wall = time.monotonic() - started
    path = workdir / "results" / name / "summary.json"
    if not path.exists():
        raise RuntimeError(f"{mode} run left no summary: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    summary = json.loads(path.read_text())
    history = summary["history"][1:]
    warm = [r for r in history if r["round"] >= 2]
    out = {"mode": mode, "wall_s": wall, "status": summary["status"],
           "train_s": statistics.median(r["train_seconds"] for r in warm),
           "local_s": statistics.median(r["local_seconds"] for r in warm),
           "train_s_rounds": [r["train_seconds"] for r in history],
           "local_s_rounds": [r["local_seconds"] for r in history]}
    if deployed:
        records = [json.loads(p.read_text()) for p in sorted(profile_dir.glob("*.json"))]
        out["records"] = records
        train = [r for r in records if r.get("message_type") == "train"
                 and r.get("server_round", 0) >= 2]
        out["profile_train"] = summarize(train) if train else {}
        evals = [r for r in records if r.get("message_type") == "evaluate"]
        out["profile_evaluate"] = summarize(evals) if evals else {}
        out["torch_threads"] = sorted({r.get("torch_threads") for r in records} - {None})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--label", default="", help="what this measures (recorded)")
    parser.add_argument("--no-cache", dest="cache", action="store_false",
                        help="no cache-dir in the node config (load and split every message)")
    parser.add_argument("--node-config", action="append", default=[],
                        help="key=value added to every SuperNode's node config")
    parser.add_argument("--env", action="append", default=[],
                        help="NAME=value in the SuperNodes' environment")
    parser.add_argument("--flower-defaults", action="store_true",
                        help="the SuperNodes as Flower starts them: no OMP_NUM_THREADS from "
                             "the launcher, the SuperExec's 1 s task poll")
    parser.add_argument("--warm", action="store_true",
                        help="also the deployment with the warm ClientApp server "
                             "(deploy/warm_clientapp.py), alternating with the other two")
    parser.add_argument("--prompt", type=float, default=None, metavar="SECONDS",
                        help="also the warm deployment with the SuperNodes' waits capped at "
                             "SECONDS (deploy/prompt_supernode.py; Flower's: 3 s)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        for i in range(args.repeat):
            sim = one_run("simulation", args, Path(tmp), f"r{i}")
            # alternate which deployment goes first, so neither always follows simulation
            modes = ["deployment", "deployment-warm"] if args.warm else ["deployment"]
            if args.prompt is not None:
                modes.append("deployment-warm-prompt")
            for mode in (modes if i % 2 == 0 else modes[::-1]):
                dep = one_run(mode, args, Path(tmp), f"r{i}")
                when = datetime.now(timezone.utc).isoformat(timespec="seconds")
                records = dep.pop("records")
                row = {"kind": "run", "when": when, "label": args.label,
                       "machine": platform.node(), "cores": os.cpu_count(),
                       "dataset": args.dataset, "nodes": args.nodes, "rounds": args.rounds,
                       "cache_dir": args.cache, "node_config": args.node_config, "env": args.env,
                       "flower_defaults": args.flower_defaults, "warm_clientapp": mode != "deployment",
                       "supernode_pull_seconds": args.prompt if mode.endswith("prompt") else None,
                       "simulation": sim, "deployment": dep,
                       "deployment_over_simulation": dep["train_s"] / sim["train_s"],
                       "loop_deployment_over_simulation": dep["local_s"] / sim["local_s"],
                       "load_average": os.getloadavg()}
                print(json.dumps({k: v for k, v in row.items() if k != "simulation"}, indent=1),
                      flush=True)
                rows.append(row)
                rows += [{"kind": "message", "when": when, "label": args.label,
                          "dataset": args.dataset, **{k: v for k, v in r.items()
                                                      if k != "node_config"}} for r in records]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
