"""What DP-SGD costs: one client's local epoch with Opacus against the same epoch without.

    python -m experiments.benchmark_dp                  # Fashion-MNIST client, CNN
    python -m experiments.benchmark_dp --dataset digits --repeat 2

One client of a 10-way IID split (Fashion-MNIST: 5,400 training samples), the
46,826-parameter CNN, one thread, at each of ``--batch-sizes`` (default 32; DP practice
uses 64 to 1,024). Each of Opacus's per-sample-gradient modes ("hooks", "functorch",
"ew") is first checked against "hooks" on one batch (sigma 0: the clipped-and-summed
gradients must agree) and on an empty batch (Poisson sampling makes them; the app takes
their step without a forward pass, ``PrivateTraining.empty_step``), then timed,
interleaved with the plain epoch at the same batch size, best of ``--repeat``. Read the
ratios: the machine is shared (the load average is recorded). Results are appended to
docs/benchmarks/dp_overhead.jsonl.
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

from fl_app import privacy
from fl_app.model import build_model
from fl_app.training import train_local
from partitions import DataConfig, dataset_info, load_client_data

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "dp_overhead.jsonl"


def one_batch_gradient(mode: str, data, info) -> torch.Tensor:
    """The privatized (sigma = 0) gradient of one fixed batch under ``mode`` (an empty
    ``data`` takes the app's empty-batch step)."""
    torch.manual_seed(0)
    model = build_model(info, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    private = privacy.PrivateTraining(model, opt, privacy.DPSettings(0.0, 1.0, 1e-5, randomness="seeded", noise_seed=0,
                                                              sampler_seed=0, grad_sample_mode=mode),
                                      num_examples=len(data), batch_size=32,
                                      accountant=RDPAccountant())
    x, y = torch.from_numpy(data.x[:32]), torch.from_numpy(data.y[:32])
    private.zero_grad()
    out = {}
    keep = lambda m: out.update(g=torch.cat([p.grad.flatten().clone() for p in m.parameters()]))  # noqa: E731
    if len(y):
        torch.nn.functional.cross_entropy(private.module(x), y).backward()
        private.step(keep)
    else:
        private.empty_step(keep)
    private.close()
    return out["g"]


def epoch_seconds(data, info, mode: str | None, batch_size: int, randomness: str = "secure") -> float:
    model = build_model(info, seed=0)
    seeds = {"noise_seed": 0, "sampler_seed": 0} if randomness == "seeded" else {}
    dp = None if mode is None else privacy.DPSettings(1.0, 1.0, 1e-5, randomness=randomness,
                                                      grad_sample_mode=mode, **seeds)
    started = time.perf_counter()
    train_local(model, data, epochs=1, batch_size=batch_size, lr=0.05, seed=1,
                dp=privacy.DPSGD(dp, RDPAccountant()) if dp else None)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(privacy.GRAD_SAMPLE_MODES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32])
    parser.add_argument("--randomness", choices=["secure", "seeded"], default="secure",
                        help="the DP noise's randomness (the app's default: secure)")
    parser.add_argument("--time-all", action="store_true",
                        help="also time modes that failed the check (they are marked so)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = dataset_info(args.dataset)
    data = load_client_data(DataConfig(args.dataset, "iid", 0.5, 2, 2, 0.1, 0), 0, 10).train
    reference = one_batch_gradient("hooks", data, info)
    correct, runs = {}, {}
    for mode in args.modes:
        try:
            grad = one_batch_gradient(mode, data, info)
            runs[mode] = correct[mode] = bool(torch.allclose(grad, reference, rtol=1e-4, atol=1e-6))
            one_batch_gradient(mode, type(data)(data.x[:0], data.y[:0]), info)
        except Exception as err:  # noqa: BLE001 - a mode Opacus cannot run here
            print(f"{mode}: fails here ({type(err).__name__}: {err})")
            correct[mode] = False
    print("correct (same gradient as hooks, survives an empty batch):", correct)
    timed = [m for m in args.modes if correct[m] or (args.time_all and runs.get(m))]
    for batch_size in args.batch_sizes:
        best = {"plain": float("inf"), **{m: float("inf") for m in timed}}
        epoch_seconds(data, info, None, batch_size)  # warm-up
        for _ in range(args.repeat):
            best["plain"] = min(best["plain"], epoch_seconds(data, info, None, batch_size))
            for mode in timed:
                best[mode] = min(best[mode], epoch_seconds(data, info, mode, batch_size,
                                                          args.randomness))
        row = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.node(), "dataset": args.dataset, "n": len(data),
               "batch_size": batch_size, "randomness": args.randomness, "threads": 1, "repeat": args.repeat,
               "load_avg": os.getloadavg()[0], "empty_batch": "empty_step",
               "plain_s": best["plain"],
               **{f"{m}_s": best[m] for m in best if m != "plain"},
               **{f"{m}_ratio": best[m] / best["plain"] for m in best if m != "plain"},
               "agrees": correct}
        for mode in best:
            if mode != "plain":
                print(f"batch {batch_size:5d}  {mode:10s} {best[mode]:.2f} s  = "
                      f"{best[mode] / best['plain']:.2f}x plain ({best['plain']:.2f} s)", flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with OUT.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
