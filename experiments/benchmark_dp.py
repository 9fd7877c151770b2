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
PROFILE_DIR = OUT.parent

GHOST = "ghost"  # Opacus's fast gradient clipping, benchmarked only: the app does not use it


def ghost_private(data, info, batch_size: int, noise_multiplier: float):
    """Opacus's ghost clipping set up the documented way (``PrivacyEngine.make_private``
    with ``grad_sample_mode="ghost"``: per-sample gradient norms without per-sample
    gradients, then a second backward pass of the clipping-weighted loss), on a Poisson
    loader over ``data``. Returns (model, optimizer, criterion, loader)."""
    from opacus import PrivacyEngine

    model = build_model(info, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y)),
        batch_size=batch_size)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    private = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                               criterion=torch.nn.CrossEntropyLoss(),
                               noise_multiplier=noise_multiplier, max_grad_norm=1.0,
                               grad_sample_mode=GHOST,
                               noise_generator=torch.Generator().manual_seed(0))
    # make_private truncates the expected batch size to an int (q n = 31.95 -> 31 at
    # n = 5,400, B = 32); the app divides by q n itself, so match it for the comparison
    private[1].expected_batch_size = len(data) * privacy.sample_rate(len(data), batch_size)
    return private


def ghost_gradient(data, info) -> torch.Tensor:
    """Ghost clipping's privatized (sigma = 0) gradient of the batch ``one_batch_gradient``
    uses, to compare with ``hooks``."""
    model, optimizer, criterion, _ = ghost_private(data, info, 32, 0.0)
    x, y = torch.from_numpy(data.x[:32]), torch.from_numpy(data.y[:32])
    optimizer.zero_grad(set_to_none=True)
    criterion(model(x), y).backward()
    optimizer.pre_step()  # accumulate the clipped sum, add (zero) noise, scale
    return torch.cat([p.grad.flatten().clone() for p in model.parameters()])


def ghost_epoch_seconds(data, info, batch_size: int) -> float:
    model, optimizer, criterion, loader = ghost_private(data, info, batch_size, 1.0)
    started = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad(set_to_none=True)
        if len(y):
            criterion(model(x), y).backward()
        optimizer.step()
    return time.perf_counter() - started


def profile_epoch(data, info, mode: str, batch_size: int, randomness: str, top: int = 30,
                  tries: int = 3) -> Path:
    """One DP epoch and one plain epoch under ``torch.profiler`` (CPU, one thread; the
    fastest of ``tries`` each); writes the operators by self CPU time to docs/benchmarks/dp_profile_<date>_<mode>_b<batch>.txt and returns the
    path."""
    from torch.profiler import ProfilerActivity, profile

    def fastest(run):  # the least disturbed of `tries` profiled epochs (a shared machine)
        kept = None
        for _ in range(tries):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                seconds = run()
            if kept is None or seconds < kept[1]:
                kept = (prof, seconds)
        return kept

    epoch_seconds(data, info, mode, batch_size, randomness)  # warm-up
    prof, seconds = fastest(lambda: epoch_seconds(data, info, mode, batch_size, randomness))
    plain, plain_seconds = fastest(lambda: epoch_seconds(data, info, None, batch_size))
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    path = PROFILE_DIR / f"dp_profile_{day}_{mode}_b{batch_size}.txt"
    header = (f"# python -m experiments.benchmark_dp --profile {mode} --batch-sizes {batch_size} "
              f"--randomness {randomness}\n# {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
              f", one thread, load {os.getloadavg()[0]:.2f}; fastest of {tries} under the profiler: DP epoch "
              f"{seconds:.2f} s, plain epoch {plain_seconds:.2f} s ({seconds / plain_seconds:.2f}x)\n")
    path.write_text(header + "\n## DP epoch, by self CPU time\n"
                    + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
                    + "\n## Plain epoch, by self CPU time\n"
                    + plain.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return path


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
    parser.add_argument("--ghost", action="store_true",
                        help="also check and time Opacus's ghost clipping (make_private, "
                             "grad_sample_mode='ghost'; seeded noise, benchmark only)")
    parser.add_argument("--profile", metavar="MODE",
                        help="instead of timing, profile one DP epoch of MODE at the first "
                             "batch size and write the operator table to docs/benchmarks/")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = dataset_info(args.dataset)
    data = load_client_data(DataConfig(args.dataset, "iid", 0.5, 2, 2, 0.1, 0), 0, 10).train
    if args.profile:
        print("wrote", profile_epoch(data, info, args.profile, args.batch_sizes[0], args.randomness))
        return 0
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
    if args.ghost:
        try:
            correct[GHOST] = bool(torch.allclose(ghost_gradient(data, info), reference,
                                                 rtol=1e-4, atol=1e-6))
        except Exception as err:  # noqa: BLE001 - Opacus cannot run it on this model
            print(f"{GHOST}: fails here ({type(err).__name__}: {err})")
            correct[GHOST] = False
    print("correct (same gradient as hooks, survives an empty batch):", correct)
    timed = [m for m in args.modes if correct[m] or (args.time_all and runs.get(m))]
    ghost = args.ghost and correct[GHOST]
    for batch_size in args.batch_sizes:
        best = {"plain": float("inf"), **{m: float("inf") for m in timed}}
        if ghost:
            best[GHOST] = float("inf")
        epoch_seconds(data, info, None, batch_size)  # warm-up
        for _ in range(args.repeat):
            best["plain"] = min(best["plain"], epoch_seconds(data, info, None, batch_size))
            for mode in timed:
                best[mode] = min(best[mode], epoch_seconds(data, info, mode, batch_size,
                                                          args.randomness))
            if ghost:
                best[GHOST] = min(best[GHOST], ghost_epoch_seconds(data, info, batch_size))
        row = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.node(), "dataset": args.dataset, "n": len(data),
               "batch_size": batch_size, "randomness": args.randomness, "threads": 1, "repeat": args.repeat,
               "load_avg": os.getloadavg()[0], "empty_batch": "empty_step",
               "plain_s": best["plain"],
               **{f"{m}_s": best[m] for m in best if m != "plain"},
               **{f"{m}_ratio": best[m] / best["plain"] for m in best if m != "plain"},
               "agrees": correct, **({"ghost_randomness": "seeded"} if ghost else {})}
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
