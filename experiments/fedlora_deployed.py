"""FedLoRA on Flower's deployment runtime: a SuperLink and SuperNode processes on this
machine, each node holding its own copy of the base (node config ``lora-base``), and one
extra node holding another base, which must refuse every message naming the key.

    python -m experiments.fedlora_deployed [--rounds 3] [--out docs/results/fedlora-digits/deployed]

Writes the run's summary.json, the SuperNodes' refusal lines and a record.json (what was
started, the uploads, the refusals) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from deploy.launch import LocalSuperLink

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "bases" / "cnn-digits-mnist.npz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=3, help="nodes with the run's base")
    parser.add_argument("--out", type=Path, default=REPO / "docs/results/fedlora-digits/deployed")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fedlora-deployed-"))
    num = args.nodes + 1
    link = LocalSuperLink(work, log_path=work / "superlink.log", simulation=False)
    try:
        link.start()
        for pid in range(num):
            node = work / f"node-{pid}"
            node.mkdir()
            base = node / "base.npz"
            if pid < args.nodes:
                shutil.copyfile(BASE, base)  # the node's own copy of the run's base
            else:  # another base: the FMNIST one has other shapes; use a digits file re-made
                from fl_app.model import build_model
                from partitions import dataset_info
                from strategies.fedlora import save_base

                save_base(base, build_model(dataset_info("digits"), seed=5).state_dict(),
                          {"source": "a different base (experiments/fedlora_deployed.py)"})
            link.add_supernode(pid, num, node_config=(
                f'partition-id={pid} num-partitions={num} cache-dir="{node / "cache"}" '
                f'state-dir="{node / "state"}" lora-base="{base}"'))
        overrides = {"strategy": "fedlora", "lora-base": str(BASE), "num-server-rounds": args.rounds,
                     "min-train-nodes": args.nodes, "fraction-train": 1.0,
                     "results-dir": str(work / "results"), "run-name": "fedlora-deployed"}
        done = link.run(overrides, app=REPO, timeout=1800)
    finally:
        link.stop()
    summary_path = work / "results" / "fedlora-deployed" / "summary.json"
    args.out.mkdir(parents=True, exist_ok=True)
    refusals = []
    for log in [link.supernode_log(i) for i in range(num)]:
        refusals += [line.strip() for line in log.read_text(errors="replace").splitlines()
                     if "base-refused" in line]
    record = {"nodes_with_the_base": args.nodes, "nodes_with_another_base": 1,
              "rounds": args.rounds, "flwr_run_returncode": done.returncode,
              "refusal_lines": sorted(set(refusals))[:5]}
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        shutil.copyfile(summary_path, args.out / "summary.json")
        record.update(status=summary["status"], final_test_accuracy=summary["final_test_accuracy"],
                      history=[{k: r.get(k) for k in ("round", "test_accuracy", "replies_valid",
                                                       "replies_rejected", "upload_bytes_per_client",
                                                       "train_seconds")}
                               for r in summary["history"]])
    else:
        record["output_tail"] = (done.stdout or "")[-3000:] + (done.stderr or "")[-2000:]
    (args.out / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if record.get("status") == "completed" else 1


if __name__ == "__main__":
    raise SystemExit(main())
