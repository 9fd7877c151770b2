"""What DP-SGD costs with FedLoRA's adapters, beside the full model: epoch ratios in one run.

    python -m experiments.benchmark_lora                 # ranks 1, 4, 16; 3 repeats
    python -m experiments.benchmark_lora --ranks 4 --repeat 1

One client's local epoch on a tenth of Fashion-MNIST (5,400 training samples, batch 32,
lr 0.05, one thread), four ways, interleaved (the machine is shared; the best of the
repeats is kept): the full CNN (46,826 trainable parameters) plain and under Opacus's
DP-SGD (hooks mode, secure randomness: the app's defaults), and the CNN on
bases/cnn-fmnist-mnist.npz with rank-r LoRA adapters (peft; only the adapters and the head
train, so Opacus computes per-sample gradients of those only) plain and under DP-SGD.
Ratios: each DP epoch over its own plain epoch, and each LoRA epoch over the full model's.
Records go to docs/benchmarks/lora_overhead.jsonl (``--no-record``: printed only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from opacus.accountants import RDPAccountant

from experiments.benchmark_secagg import make_model
from fl_app.privacy import DPSGD, DPSettings
from fl_app.training import train_local
from partitions import DataConfig, load_client_data

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "lora_overhead.jsonl"


def epoch_seconds(kind: str, data, dp: bool) -> float:
    model = make_model(kind)
    settings = DPSGD(DPSettings(1.0, 1.0, 1e-5), RDPAccountant()) if dp else None
    started = time.perf_counter()
    train_local(model, data, epochs=1, batch_size=32, lr=0.05, seed=1, dp=settings)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = load_client_data(DataConfig("fashion-mnist", "iid", 0.5, 2, 2, 0.1, 0), 0, 10).train
    kinds = ["cnn"] + [f"cnn-lora{r}" for r in args.ranks]
    best = {(k, dp): float("inf") for k in kinds for dp in (False, True)}
    for _ in range(args.repeat):
        for kind in kinds:  # alternating: plain, DP, next model
            for dp in (False, True):
                best[(kind, dp)] = min(best[(kind, dp)], epoch_seconds(kind, data, dp))
    rows = []
    for kind in kinds:
        model = make_model(kind)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.node(), "load_1min": os.getloadavg()[0],
               "model": kind, "trainable": trainable,
               "samples": len(data.y), "batch_size": 32, "repeat": args.repeat,
               "plain_s": best[(kind, False)], "dp_s": best[(kind, True)],
               "dp_over_plain": best[(kind, True)] / best[(kind, False)],
               "plain_over_full_plain": best[(kind, False)] / best[("cnn", False)],
               "dp_over_full_dp": best[(kind, True)] / best[("cnn", True)],
               "dp_over_full_plain": best[(kind, True)] / best[("cnn", False)]}
        rows.append(row)
        print(f"{kind:11s} ({trainable:6,} trainable): plain {row['plain_s']:.2f} s, DP "
              f"{row['dp_s']:.2f} s -> DP/plain {row['dp_over_plain']:.2f}x; against the full "
              f"model: plain {row['plain_over_full_plain']:.2f}x, DP {row['dp_over_full_dp']:.2f}x",
              flush=True)
    if not args.no_record:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with OUT.open("a") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
