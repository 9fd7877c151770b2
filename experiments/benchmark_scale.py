"""Benchmark: the app's warm round at 1,000+ simulated nodes against a minimal Flower app.

    python -m experiments.benchmark_scale                         # 1000 nodes, 3 rounds
    python -m experiments.benchmark_scale --nodes 1000 --rounds 4 --strategies fedavg scaffold
    python -m experiments.benchmark_scale --passes 2              # A B C C B A ordering
    python -m experiments.benchmark_scale --py-spy 12             # + sample every process

In ONE invocation, one after another (alternating when ``--passes 2``), it runs
``experiments/scale/minimal_app`` (Flower's built-in FedAvg with ``start()``, the same CNN
shape, the same partitions, the same hyperparameters) and ``fl_app`` with each strategy
of ``--strategies``, each on a fresh private SuperLink (``deploy.launch.LocalSuperLink``:
``flower-superlink --simulation`` on a free port, ``num-supernodes=N
client-resources-num-cpus=1``), Fashion-MNIST IID, fraction-train = fraction-evaluate =
0.1. A warm round is any round after the first; both apps' round seconds span the same
work (train, federated evaluation, the server's test-set evaluation: the minimal app's
``central-eval`` is on unless ``--no-minimal-central-eval``).

While a run goes, the whole process tree of its SuperLink (the SuperLink, the simulation
process that runs the ServerApp and the Ray driver, Ray's GCS/raylet and the ClientApp
actors) is polled every 0.5 s: summed RSS and summed PSS (PSS splits shared pages, e.g.
torch's libraries and Ray's object store, between the processes that map them: it does
not double count). Rounds are located by Flower's own ``[ROUND k/R]`` log line; per round
we record the tree's peak and end-of-round memory, to show growth round over round.

With ``--py-spy S``, at the start of round 2 (warm) it records S seconds of py-spy
samples (``--format raw``: collapsed stacks) of the simulation process and of every Ray
actor, and prints the heaviest frames per process (experiments/scale/stacks.py reads them).

The app's code is snapshotted (pyproject.toml, fl_app/, strategies/, partitions/,
fl_common/) into a temporary folder before the first run (``--code-from REV``: as commit
REV has it, e.g. to measure the code before a change with the same script), so that
edits in the working tree during the benchmark do not change what is measured; ``PYTHONPATH`` points at the snapshot, so the
minimal app's ``import partitions`` reads the same code.

Results are appended as JSON lines to docs/benchmarks/scale.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from deploy.launch import REPO, LocalSuperLink, executable

OUT = REPO / "docs" / "benchmarks" / "scale.jsonl"
MINIMAL_APP = REPO / "experiments" / "scale" / "minimal_app"
ROUND_LINE = re.compile(r"\[ROUND (\d+)/(\d+)\]")


# ------------------------------------------------------------------ process-tree memory
def _tree(root_pid: int) -> list[int]:
    """``root_pid`` and all its descendants, from /proc (no psutil needed)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _mem_kib(pid: int) -> dict[str, int]:
    """RSS, PSS and PSS split into anonymous, file-backed and shared-memory pages (Ray's
    object store is a shared-memory file mapped into every worker), in KiB, from
    smaps_rollup."""
    out = {"Rss": 0, "Pss": 0, "Pss_Anon": 0, "Pss_File": 0, "Pss_Shmem": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def tree_memory(root_pid: int) -> dict:
    rss = pss = 0
    per: dict[str, int] = {}
    split: dict[str, dict[str, int]] = {}
    for pid in _tree(root_pid):
        mem = _mem_kib(pid)
        rss += mem["Rss"]
        pss += mem["Pss"]
        cmd = _cmdline(pid)
        kind = ("actor" if "ClientAppActor" in cmd else "simulation" if "flwr-simulation" in cmd
                else "superlink" if "flower-superlink" in cmd else "ray-core" if "ray" in cmd
                else "other")
        per[kind] = per.get(kind, 0) + mem["Pss"]
        parts = split.setdefault(kind, {"anon": 0, "file": 0, "shmem": 0})
        for part in parts:
            parts[part] += mem[f"Pss_{part.capitalize()}"]
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024,
            "pss_by_kind_mib": {k: round(v / 1024, 1) for k, v in per.items()},
            "pss_split_mib": {k: {part: round(v / 1024, 1) for part, v in parts.items()}
                              for k, parts in split.items()}}


def find_processes(root_pid: int) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {"simulation": [], "actors": []}
    for pid in _tree(root_pid):
        cmd = _cmdline(pid)
        if "flwr-simulation" in cmd:
            found["simulation"].append(pid)
        elif "ClientAppActor" in cmd:
            found["actors"].append(pid)
    return found


def kill_tree(root_pid: int) -> None:
    """SIGTERM the SuperLink's process group, then SIGKILL every process left in its tree
    (the simulation and Ray run in other process groups)."""
    pids = _tree(root_pid)
    try:
        os.killpg(root_pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    time.sleep(3)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def du_bytes(path: Path) -> tuple[int, int]:
    """(bytes on disk, files) under ``path``; (0, 0) if it does not exist."""
    total = files = 0
    if not path.exists():
        return 0, 0
    for entry in path.rglob("*"):
        try:
            if entry.is_file():
                files += 1
                total += entry.stat().st_blocks * 512
        except OSError:
            pass
    return total, files


# ------------------------------------------------------------------ one run
class Monitor:
    """Polls a SuperLink's process tree and the run's streamed log while the run goes."""

    def __init__(self, root_pid: int, log_path: Path, py_spy: float, spy_dir: Path,
                 max_rss_mib: float = 0.0) -> None:
        self.root_pid = root_pid
        self.max_rss_mib = max_rss_mib
        self.killed_for_memory: dict | None = None
        self.log_path = log_path
        self.py_spy = py_spy
        self.spy_dir = spy_dir
        self.samples: list[tuple[float, dict]] = []
        self.round_starts: dict[int, float] = {}
        self.spy_procs: list[tuple[str, subprocess.Popen, Path]] = []
        self._offset = 0

    def _scan_log(self) -> None:
        if not self.log_path.exists():
            return
        with open(self.log_path, errors="replace") as handle:
            handle.seek(self._offset)
            text = handle.read()
            self._offset = handle.tell()
        now = time.time()
        for match in ROUND_LINE.finditer(text):
            rnd = int(match.group(1))
            if rnd not in self.round_starts:
                self.round_starts[rnd] = now
                if rnd == 2 and self.py_spy > 0:
                    self._start_py_spy()

    def _start_py_spy(self) -> None:
        procs = find_processes(self.root_pid)
        targets = [("simulation", p) for p in procs["simulation"]]
        targets += [(f"actor{i}", p) for i, p in enumerate(procs["actors"])]
        for name, pid in targets:
            out = self.spy_dir / f"{name}-{pid}.txt"
            cmd = [executable("py-spy"), "record", "-p", str(pid), "-d", str(int(self.py_spy)),
                   "-r", "50", "--format", "raw", "-o", str(out), "--nonblocking"]
            self.spy_procs.append((name, subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out))

    def poll(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._scan_log()
            memory = tree_memory(self.root_pid)
            self.samples.append((time.time(), memory))
            if (self.max_rss_mib and memory["rss_mib"] > self.max_rss_mib
                    and self.killed_for_memory is None):
                self.killed_for_memory = {"rss_mib": round(memory["rss_mib"], 1),
                                          "pss_mib": round(memory["pss_mib"], 1),
                                          "rounds_started": sorted(self.round_starts)}
                print(f"!! tree RSS {memory['rss_mib']:.0f} MiB > {self.max_rss_mib:.0f} MiB: "
                      "stopping the run", flush=True)
                kill_tree(self.root_pid)
            stop.wait(0.5)
        self._scan_log()
        for _, proc, _ in self.spy_procs:
            try:
                proc.wait(timeout=self.py_spy + 30)
            except subprocess.TimeoutExpired:
                proc.terminate()

    def per_round(self, end: float) -> list[dict]:
        rounds = sorted(self.round_starts)
        out = []
        for i, rnd in enumerate(rounds):
            lo = self.round_starts[rnd]
            hi = self.round_starts[rounds[i + 1]] if i + 1 < len(rounds) else end
            window = [m for t, m in self.samples if lo <= t < hi]
            if not window:
                continue
            out.append({"round": rnd,
                        "peak_pss_mib": round(max(m["pss_mib"] for m in window), 1),
                        "peak_rss_mib": round(max(m["rss_mib"] for m in window), 1),
                        "end_pss_mib": round(window[-1]["pss_mib"], 1),
                        "end_pss_by_kind_mib": window[-1]["pss_by_kind_mib"],
                        "end_pss_split_mib": window[-1].get("pss_split_mib", {})})
        return out


def run_app(kind: str, strategy: str | None, args, workdir: Path, app_dir: Path,
            tag: str) -> dict:
    """One ``flwr run`` on a fresh private SuperLink; returns its measurements."""
    run_dir = workdir / tag
    run_dir.mkdir(parents=True)
    results = run_dir / "results"
    times_file = run_dir / "minimal_times.jsonl"
    common = {"num-server-rounds": args.rounds, "fraction-train": args.fraction,
              "fraction-evaluate": args.fraction, "dataset": args.dataset}
    if kind == "minimal":
        overrides = {**common, "times-file": str(times_file),
                     "central-eval": not args.no_minimal_central_eval}
        app = MINIMAL_APP
    else:
        overrides = {**common, "strategy": strategy, "partitioner": "iid", "model": args.model,
                     "results-dir": str(results), "run-name": tag}
        app = app_dir
    log_path = run_dir / "flwr_run.log"
    spy_dir = run_dir / "py-spy"
    spy_dir.mkdir()
    link = LocalSuperLink(run_dir / "superlink-cwd", log_path=run_dir / "superlink.log")
    link.start()
    proc_box: dict = {}
    try:
        monitor = Monitor(link.process.pid, log_path, args.py_spy, spy_dir,
                          max_rss_mib=args.max_rss_gib * 1024)
        stop = threading.Event()
        poller = threading.Thread(target=monitor.poll, args=(stop,), daemon=True)
        poller.start()
        started = time.time()
        t0 = time.perf_counter()
        try:
            proc_box["proc"] = link.run(overrides, num_supernodes=args.nodes,
                                        num_cpus=args.num_cpus, app=app, timeout=args.timeout,
                                        output=log_path)
        except subprocess.TimeoutExpired:
            proc_box["error"] = f"flwr run exceeded --timeout {args.timeout:g} s"
        total = time.perf_counter() - t0
        ended = time.time()
        stop.set()
        poller.join()
    finally:
        # The simulation and Ray run in their own process group: a simulation stuck in
        # Flower's delivery loop outlived its SuperLink's SIGTERM (seen at 10,000 nodes,
        # flwr run timed out) and went on burning a core. Note the tree first, then stop
        # the SuperLink, then SIGKILL whatever of that tree is left.
        leftover = _tree(link.process.pid) if link.process is not None else []
        link.stop()
        for pid in leftover:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    rounds_memory = monitor.per_round(ended)
    peak = max((m for _, m in monitor.samples), key=lambda m: m["pss_mib"], default={})
    out = {"app": "minimal" if kind == "minimal" else f"fl_app/{strategy}", "tag": tag,
           "flwr_run_seconds": total,
           "exit_code": proc_box["proc"].returncode if "proc" in proc_box else None,
           # Flower's start-up: from `flwr run` to the first [ROUND 1/R] line (FAB build and
           # upload, SuperLink run creation, simulation start, Ray, N node contexts, ServerApp
           # start-up up to its first round)
           "startup_seconds": (round(monitor.round_starts[1] - started, 1)
                               if 1 in monitor.round_starts else None),
           "peak_pss_mib": round(peak.get("pss_mib", 0.0), 1),
           "peak_rss_mib": round(max((m["rss_mib"] for _, m in monitor.samples), default=0.0), 1),
           "peak_pss_by_kind_mib": peak.get("pss_by_kind_mib", {}),
           "rounds_memory": rounds_memory, "run_dir": str(run_dir)}
    if monitor.killed_for_memory is not None:
        out["killed_for_memory"] = monitor.killed_for_memory
    if "error" in proc_box:
        out["error"] = proc_box["error"]
    if kind != "minimal":
        run_folder = results / tag
        state_bytes, state_files = du_bytes(run_folder / "client-state")
        all_bytes, _ = du_bytes(run_folder)
        checkpoint_files = [run_folder / "checkpoint.json", *run_folder.glob("checkpoint-*.npz")]
        out["disk"] = {"client_state_bytes": state_bytes, "client_state_files": state_files,
                       "run_folder_bytes": all_bytes,
                       "checkpoint_bytes": sum(f.stat().st_size for f in checkpoint_files
                                               if f.exists())}
    if kind == "minimal":
        if not times_file.exists():
            out.setdefault("error", f"minimal app wrote no times; see {log_path}")
            history = []
        else:
            history = [json.loads(line) for line in times_file.read_text().splitlines() if line]
    else:
        summary_path = results / tag / "summary.json"
        if not summary_path.exists():
            out.setdefault("error", f"fl_app wrote no summary; see {log_path}")
            history = []
        else:
            summary = json.loads(summary_path.read_text())
            out["status"] = summary.get("status")
            history = [h for h in summary["history"] if h["round"] >= 1]
    out["round_seconds"] = [round(h["round_seconds"], 3) for h in history]
    out["train_seconds"] = [round(h["train_seconds"], 3) for h in history]
    warm = [h for h in history if h["round"] >= 2]
    out["warm_round_seconds"] = statistics.median(h["round_seconds"] for h in warm) if warm else None
    out["warm_train_seconds"] = statistics.median(h["train_seconds"] for h in warm) if warm else None
    # Clients' mean local-training seconds (the same work in both apps): a load gauge, as
    # other processes on the machine slow it down exactly as they slow the rest.
    local = [h.get("local_seconds") for h in warm if h.get("local_seconds") is not None]
    out["warm_local_seconds_mean"] = statistics.median(local) if local else None
    if args.py_spy > 0:
        out["py_spy_files"] = sorted(str(p) for p in spy_dir.glob("*.txt"))
    return out


# ------------------------------------------------------------------ snapshot, main
SNAPSHOT_PACKAGES = ("fl_app", "strategies", "partitions", "fl_common")


def snapshot(dest: Path, code_from: str = "") -> Path:
    """A copy of the app as the working tree has it now, or as commit ``code_from`` had
    it (``--code-from``: e.g. the code before a change, measured by the same script)."""
    dest.mkdir(parents=True)
    if code_from:
        archive = subprocess.run(["git", "archive", code_from, "pyproject.toml",
                                  *SNAPSHOT_PACKAGES], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        return dest
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    for package in SNAPSHOT_PACKAGES:
        shutil.copytree(REPO / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def git_state(code_from: str = "") -> dict:
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    if code_from:
        return {"commit": git("rev-parse", code_from), "code_from": code_from, "dirty_files": []}
    return {"commit": git("rev-parse", "HEAD"),
            "dirty_files": [l[3:] for l in git("status", "--porcelain").splitlines()
                            if l[3:].startswith(("fl_app", "strategies", "partitions", "pyproject"))]}


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=["fedavg", "scaffold"])
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="cnn", choices=["cnn", "mlp", "logreg"],
                        help="this app's model (run-config `model`); the minimal app keeps its "
                             "CNN, so compare other models across this app's runs only")
    parser.add_argument("--num-cpus", type=float, default=1)
    parser.add_argument("--passes", type=int, default=1,
                        help="2: run the order forward then backward (spreads load drift)")
    parser.add_argument("--no-minimal-central-eval", action="store_true",
                        help="the minimal app skips the server's test-set evaluation")
    parser.add_argument("--py-spy", type=float, default=0.0,
                        help="seconds of py-spy sampling from the start of round 2 "
                             "(needs `pip install py-spy`, not a dependency of the app)")
    parser.add_argument("--apps", nargs="+", default=None,
                        help="what to run, in order, e.g. `--apps scaffold` (no minimal app): "
                             "'minimal' and strategy names; default: minimal + --strategies")
    parser.add_argument("--timeout", type=float, default=3600, help="per flwr run, seconds")
    parser.add_argument("--max-rss-gib", type=float, default=20.0,
                        help="stop a run whose process tree's summed RSS exceeds this (0: never)")
    parser.add_argument("--workdir", default="", help="default: a new temporary folder")
    parser.add_argument("--no-write", action="store_true", help="do not append to scale.jsonl")
    parser.add_argument("--no-snapshot", action="store_true",
                        help="run the working tree as it is (edits during the run count)")
    parser.add_argument("--code-from", default="",
                        help="snapshot the app as this commit has it (e.g. HEAD~1: the code "
                             "before a change), not the working tree")
    args = parser.parse_args(argv)
    if args.code_from and args.no_snapshot:
        parser.error("--code-from needs the snapshot")

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    git_at_snapshot = git_state(args.code_from)  # what the snapshot holds (HEAD may move)
    app_dir = REPO if args.no_snapshot else snapshot(workdir / "app-snapshot", args.code_from)
    if not args.no_snapshot:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(app_dir)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    names = args.apps if args.apps else ["minimal", *args.strategies]
    order = [("minimal", None) if n == "minimal" else ("fl_app", n) for n in names]
    if args.passes >= 2:
        order = order + order[::-1]
    print(f"workdir {workdir}; order {[s or k for k, s in order]}; load {load_average()}", flush=True)
    runs = []
    for i, (kind, strategy) in enumerate(order):
        tag = f"{i:02d}-{strategy or kind}"
        load_before = load_average()
        result = run_app(kind, strategy, args, workdir, app_dir, tag)
        result["load_before"] = load_before
        result["load_after"] = load_average()
        runs.append(result)
        with open(workdir / "runs-so-far.jsonl", "a") as handle:  # survives an interrupted sitting
            handle.write(json.dumps(result) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k not in ("rounds_memory",)}),
              flush=True)
        for r in result["rounds_memory"]:
            print(f"  round {r['round']}: peak PSS {r['peak_pss_mib']:.0f} MiB, end PSS "
                  f"{r['end_pss_mib']:.0f} MiB {r['end_pss_by_kind_mib']} {r['end_pss_split_mib']}", flush=True)

    def median_of(app: str, key: str) -> float | None:
        values = [r[key] for r in runs if r["app"] == app and r.get(key) is not None]
        return statistics.median(values) if values else None

    base_round = median_of("minimal", "warm_round_seconds")
    base_train = median_of("minimal", "warm_train_seconds")
    ratios = {}
    def fmt(value: float | None, spec: str) -> str:
        return format(value, spec) if value is not None else "n/a"

    for app in dict.fromkeys(r["app"] for r in runs):
        round_s, train_s = median_of(app, "warm_round_seconds"), median_of(app, "warm_train_seconds")
        ratios[app] = {"warm_round_seconds": round_s, "warm_train_seconds": train_s,
                       "ratio_round_vs_minimal": round_s / base_round if base_round and round_s else None,
                       "ratio_train_vs_minimal": train_s / base_train if base_train and train_s else None,
                       "warm_local_seconds": median_of(app, "warm_local_seconds_mean"),
                       "startup_seconds": median_of(app, "startup_seconds"),
                       "peak_pss_mib": max(r["peak_pss_mib"] for r in runs if r["app"] == app),
                       "peak_rss_mib": max(r["peak_rss_mib"] for r in runs if r["app"] == app),
                       "errors": [r["error"] for r in runs if r["app"] == app and "error" in r]}
        print(f"{app:18s} warm round {fmt(round_s, '7.2f')} s "
              f"({fmt(ratios[app]['ratio_round_vs_minimal'], '.2f')}x minimal), train phase "
              f"{fmt(train_s, '7.2f')} s ({fmt(ratios[app]['ratio_train_vs_minimal'], '.2f')}x), "
              f"peak PSS {ratios[app]['peak_pss_mib']:.0f} MiB", flush=True)
    record = {"date": datetime.now().isoformat(timespec="seconds"), "nodes": args.nodes,
              "rounds": args.rounds, "fraction": args.fraction, "dataset": args.dataset,
              "model": args.model,
              "num_cpus": args.num_cpus, "cores": os.cpu_count(), "passes": args.passes,
              "minimal_central_eval": not args.no_minimal_central_eval,
              "load_start": runs[0]["load_before"], "git": git_at_snapshot,
              "snapshot": not args.no_snapshot, "apps": names, "summary": ratios, "runs": runs}
    if not args.no_write:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with open(OUT, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"appended to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
