"""Tables of the benchmark records (and of run records no grid report tabulates), for the
docs to include (issue 24).

    python -m experiments.benchmark_tables     # writes docs/benchmarks/tables.md

Each table is built from one JSON-lines record under docs/benchmarks/, every row that
the table's rule selects, so a figure the docs show cannot drift from its record:
``experiments.docs_check`` rebuilds tables.md and fails when the committed copy differs,
and the docs include its tables (``<!-- generated: benchmarks/tables.md, table k -->``).

1. ``secagg_overhead.jsonl``, the rows of the current masks and of the measurement-only
   comparison (``mask_prg`` present): what a SecAgg+ round costs against a plain one
   (``experiments.benchmark_secagg``).
2-4. ``dp_overhead.jsonl``, the invocations of ``DP_RUNS``: DP-SGD's epoch per mode
   against a plain epoch (``experiments.benchmark_dp``).
5-6. ``round_overhead.jsonl``: a warm round against the compute floor, and a sweep
   against separate runs, and 7, each strategy's training phase against FedAvg's
   (``experiments.benchmark_round``).
8. ``krum.jsonl``: our Krum against Flower's (``experiments.benchmark_krum``).
9. ``deployment_profile.jsonl``: a deployed round's training phase against the simulated
   one, cold, warm and warm with prompt SuperNodes (``experiments.benchmark_message_profile``).
10. ``lora_overhead.jsonl``: LoRA's epoch with and without DP-SGD (``experiments.benchmark_lora``).
11. ``../results/redesign-check/``: every run before and after the redesign
    (``experiments.redesign_check``).
12. ``../results/scaffold-lr-sweep/`` with ``fmnist-niid``'s seed-0 runs: SCAFFOLD's client
    lr against eta_g (``experiments.run_grid``).
13. ``../results/secagg-time-10/`` and ``secagg-digits/``: a SecAgg+ round's training
    phase against a plain one in Flower's simulation.
14. ``../results/fmnist-niid/`` (and its superseded sets), ``scaffold-variates/`` and
    ``momentum-path2/``: SCAFFOLD's control variates under momentum.

Nothing in the app imports this module.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.records import read_records

BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"

MODELS = {"cnn": "CNN", "mlp-1m": "MLP 784-1024-256-10", "cnn-lora4": "CNN + rank-4 LoRA"}


def secagg_table(rows: list[dict]) -> str:
    """Every row with a ``mask_prg`` (issue 20's records on), in the order recorded."""
    lines = ["| when (UTC) | model, values masked | n | mask expansion | n × epoch (s) | "
             "plain messaging + aggregation (s) | SecAgg+ round (s) | protocol − plain (s) | "
             "round ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "mask_prg" not in r:
            continue
        prg = "AES-256-CTR" if r["mask_prg"].startswith("aes-256-ctr") else "Flower's MT19937 (measurement only)"
        lines.append(
            f"| {r['when'][:16].replace('T', ' ')} | {MODELS.get(r['model'], r['model'])}, "
            f"{r['parameters']:,} | {r['clients']} | {prg} | {r['train_s']:.1f} | {r['plain_s']:.2f} | "
            f"{r['secagg_s']:.2f} | {r['protocol_over_plain_s']:.2f} | {r['round_ratio']:.3f}x |")
    return "\n".join(lines) + "\n"


# the invocations of experiments.benchmark_dp that docs/benchmarks.md shows, each by the
# span of its rows' "when" (UTC): label, first, last
DP_RUNS = (
    ("2026-12-02, `--modes hooks ew --repeat 4`, seeded then secure noise",
     "2026-12-02T04:11", "2026-12-02T04:26"),
    ("2026-12-02 21:40, `--modes hooks ew --ghost --batch-sizes 32 256 --repeat 3`",
     "2026-12-02T21:41", "2026-12-02T21:43"),
    ("2026-12-04, `--modes hooks ew --batch-sizes 32 128 512 --repeat 3`",
     "2026-12-04T02:05:30", "2026-12-04T02:07"),
)


def dp_table(rows: list[dict], first: str, last: str) -> str:
    """The rows of one benchmark_dp invocation: each mode's epoch against the plain epoch
    of the same batch, and ``ew`` against the plain epoch at batch 32 of the same noise."""
    rows = [r for r in rows if first <= r.get("when", "") <= last and "plain_s" in r]
    if not rows:
        raise ValueError(f"dp_overhead.jsonl has no row from {first} to {last}")
    plain32 = {r.get("randomness") or "seeded": r["plain_s"] for r in rows if r["batch_size"] == 32}
    loads = [r["load_avg"] for r in rows]
    lines = ["| batch | noise | plain epoch | `hooks` | `ew` | ghost clipping | "
             "`ew` against the plain epoch at batch 32 |", "|---|---|---|---|---|---|---|"]

    def mode(r: dict, name: str) -> str:
        if f"{name}_s" not in r:
            return "–"
        note = f" ({r['ghost_randomness']})" if name == "ghost" and r.get("ghost_randomness") else ""
        return f"{r[f'{name}_s']:.2f} s, {r[f'{name}_ratio']:.2f}x{note}"

    for r in rows:
        noise = r.get("randomness") or "seeded"
        base = plain32.get(noise)
        lines.append(f"| {r['batch_size']:,} | {noise} | {r['plain_s']:.2f} s | {mode(r, 'hooks')} | "
                     f"{mode(r, 'ew')} | {mode(r, 'ghost')} | "
                     + (f"{r['ew_s'] / base:.2f}x" if base else "–") + " |")
    return (f"Rows {rows[0]['when'][:19]} to {rows[-1]['when'][:19]}, load average "
            f"{min(loads):.2f}-{max(loads):.2f}.\n\n" + "\n".join(lines) + "\n")


ROUND_FIELDS = (  # round_overhead.jsonl: label, field, format
    ("floor: 10 trainings on 2 one-thread processes", "floor_seconds", "{:.2f} s"),
    ("Flower training phase (configure → client training → replies → aggregate)",
     "warm_train_phase_seconds", "{:.2f} s"),
    ("**ratio training phase / floor**", "ratio_train_phase_vs_floor", "**{:.2f}x**"),
    ("whole round, with federated evaluation (10 clients) and server test (10,000 images)",
     "warm_round_seconds", "{:.2f} s"),
    ("ratio whole round / floor", "ratio_round_vs_floor", "{:.2f}x"),
    ("first round (Ray actors start, data loads)", "first_round_seconds", "{:.1f} s"),
    ("`flwr run` total for 4 rounds", "flwr_run_total_seconds", "{:.1f} s"),
    ("fixed cost: total − 4 warm rounds (SuperLink, Ray, actors, data, teardown)",
     "fixed_cost_seconds", "{:.1f} s"),
)


def round_table(rows: list[dict]) -> str:
    """The warm round against the compute floor: one column per measurement whose floor
    was warmed up first (warm rounds 2-4, median)."""
    rows = [r for r in rows if r.get("floor_warmed_up")]
    lines = ["| measurement (warm rounds 2-4, median) | "
             + " | ".join(r["date"].replace("T", " ") for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for label, field, fmt in ROUND_FIELDS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(r[field]) for r in rows) + " |")
    return "\n".join(lines) + "\n"


def sweep_table(rows: list[dict]) -> str:
    """3 configs x 2 rounds in one sweep against three separate runs (the row that has it)."""
    r = next(r for r in rows if "sweep_3x2_rounds_seconds" in r)
    sweep, separate = r["sweep_3x2_rounds_seconds"], r["separate_3x2_rounds_seconds"]
    return ("| 3 configs x 2 rounds (same setting) | seconds |\n|---|---|\n"
            f"| one `flwr run` with a 3-entry sweep | {sweep:.1f} |\n"
            f"| three separate `flwr run`s (same SuperLink) | {separate:.1f} |\n"
            f"| ratio | {separate / sweep:.2f}x |\n")


def strategy_table(rows: list[dict]) -> str:
    """Each strategy's warm training phase against FedAvg's in the same invocation, one
    column per invocation that compared them (FedAvg's own seconds in its row)."""
    rows = [r for r in rows if "strategy_round_ratio" in r]
    lines = ["| strategy | " + " | ".join(r["date"].replace("T", " ") for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for name in rows[0]["strategy_round_ratio"]:
        cells = []
        for r in rows:
            ratio = r["strategy_round_ratio"][name]
            cells.append(f"{ratio:.3f}x" + (f" ({r['warm_train_phase_seconds']:.2f} s)"
                                            if name == "fedavg" else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def krum_table(rows: list[dict]) -> str:
    """Every Krum measurement: ours against Flower's on the same n replies of d values."""
    lines = ["| n | d | f | ours | Flower's `Krum` | ours / Flower |", "|---|---|---|---|---|---|"]
    for r in rows:
        d = f"{r['d'] // 1_000_000}M" if r["d"] % 1_000_000 == 0 else f"{r['d'] // 1000}k"
        lines.append(f"| {r['n']} | {d} | {r['f']} | {r['ours_s']:.3f} s | {r['flower_s']:.3f} s | "
                     f"{r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


DEPLOYMENT_LABEL = "quiet, after the object-pull caps and the clock fix"  # the latest pairs
DEPLOYMENT_MODES = (  # the record's deployment mode -> the row's name
    ("deployment", "cold, Flower's way (a fresh ClientApp process a message, Flower's waits)"),
    ("deployment-warm", "warm ClientApps (`deploy/warm_clientapp.py`)"),
    ("deployment-warm-prompt", "warm + prompt SuperNodes (`deploy/prompt_supernode.py`), "
                               "`deploy.local`'s default"),
)


def deployment_table(rows: list[dict], label: str = DEPLOYMENT_LABEL) -> str:
    """A deployed round's training phase against the simulated one, per mode, for the runs
    whose label starts with ``label``: pair k is each mode's k-th run, in the order run."""
    runs = [r for r in rows if r.get("kind") == "run" and str(r.get("label", "")).startswith(label)]
    by_mode = {mode: [r for r in runs if r["deployment"]["mode"] == mode] for mode, _ in DEPLOYMENT_MODES}
    pairs = max(len(v) for v in by_mode.values())
    lines = ["| deployed / simulated training phase | "
             + " | ".join(f"pair {k + 1}" for k in range(pairs)) + " |", "|---|" + "---|" * pairs]
    for mode, name in DEPLOYMENT_MODES:
        cells = [f"{r['deployment_over_simulation']:.2f}x ({r['when'][11:16]})" for r in by_mode[mode]]
        lines.append(f"| {name} | " + " | ".join(cells + ["–"] * (pairs - len(cells))) + " |")
    return "\n".join(lines) + "\n"


LORA_MODELS = {"cnn": "full CNN", "cnn-lora1": "LoRA r = 1", "cnn-lora4": "LoRA r = 4",
               "cnn-lora16": "LoRA r = 16"}


def lora_table(rows: list[dict]) -> str:
    """The latest benchmark_lora invocation (the rows with a recorded load): each model's
    plain and DP-SGD epoch, against its own plain epoch and against the full CNN's."""
    latest = max(r["when"] for r in rows if "load_1min" in r)
    lines = ["| model | trained | plain epoch | DP-SGD epoch | DP / plain | plain / full plain | "
             "DP / full DP |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["when"] == latest:
            lines.append(f"| {LORA_MODELS.get(r['model'], r['model'])} | {r['trainable']:,} | "
                         f"{r['plain_s']:.2f} s | {r['dp_s']:.2f} s | {r['dp_over_plain']:.2f}x | "
                         f"{r['plain_over_full_plain']:.2f}x | {r['dp_over_full_dp']:.2f}x |")
    load = next(r["load_1min"] for r in rows if r["when"] == latest)
    return f"Rows of {latest[:16]}, load {load:.1f}.\n\n" + "\n".join(lines) + "\n"


REDESIGN_ORDER = ("default", "fedavg", "fedprox", "scaffold", "fedadam", "fedavgm", "fedyogi",
                  "fedadagrad", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")


def redesign_table(before: dict, after: dict) -> str:
    """Every run of experiments.redesign_check before and after, to the records' digits
    shown (accuracy 6, loss 10), and whether they are equal to the last digit."""
    lines = ["| run | final test accuracy before | after | final test loss before | after | "
             "equal |", "|---|---|---|---|---|---|"]
    for name in REDESIGN_ORDER:
        b, a = before["runs"][name], after["runs"][name]
        same = (b["final_test_accuracy"], b["final_test_loss"]) == (a["final_test_accuracy"],
                                                                  a["final_test_loss"])
        label = "default (FedAvg, IID, 10 rounds)" if name == "default" else name
        lines.append(f"| {label} | {b['final_test_accuracy']:.6f} | {a['final_test_accuracy']:.6f} | "
                     f"{b['final_test_loss']:.10f} | {a['final_test_loss']:.10f} | "
                     f"{'yes' if same else '**no**'} |")
    return "\n".join(lines) + "\n"


def _final_and_lowest(summary_path: Path) -> str:
    """A run's final test accuracy, and in brackets the lowest of its last 10 rounds (%)."""
    summary = json.loads(summary_path.read_text())
    acc = [100 * r["test_accuracy"] for r in summary["history"] if r["round"] >= 1]
    return f"{100 * summary['final_test_accuracy']:.2f} ({min(acc[-10:]):.1f})"


def lr_sweep_table(results: Path) -> str:
    """SCAFFOLD's client lr x eta_g (grid scaffold-lr-sweep, seed 0), with fmnist-niid's
    own seed-0 SCAFFOLD run for lr 0.05 and eta_g 1 and its FedAvg run beside them."""
    sweep, niid = results / "scaffold-lr-sweep" / "runs", results / "fmnist-niid" / "runs"
    lines = ["| client lr | eta_g | dir0.1 | path2 |", "|---|---|---|---|"]
    for lr in ("0.01", "0.02", "0.05"):
        for eta in ("0.5", "1"):
            own = (lr, eta) == ("0.05", "1")
            cells = [_final_and_lowest((niid / f"scaffold__{split}__s0" if own else
                                        sweep / f"scaffold-lr{lr}-etag{eta}__{split}__s0") / "summary.json")
                     for split in ("dir0.1", "path2")]
            lines.append(f"| {lr} | {eta}{' (`fmnist-niid`)' if own else ''} | " + " | ".join(cells) + " |")
    cells = [_final_and_lowest(niid / f"fedavg__{split}__s0" / "summary.json") for split in ("dir0.1", "path2")]
    lines.append("| FedAvg, lr 0.05 (`fmnist-niid`, seed 0) | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SECAGG_GRIDS = (  # label, grid, plain strategy, SecAgg+ strategy
    ("Fashion-MNIST IID, 10 clients, CNN, 5 rounds, 2 seeds alternating (`secagg-time-10`)",
     "secagg-time-10", "fedavg", "fedavg-secagg"),
    ("digits, 10 clients, CNN, 20 rounds, 3 seeds × 2 splits (`secagg-digits`), FedAvg",
     "secagg-digits", "fedavg", "fedavg-secagg"),
    ("same, SCAFFOLD", "secagg-digits", "scaffold", "scaffold-secagg"),
)


def _median_train_seconds(runs: Path, strategy: str) -> float:
    """The median of the per-round ``train_seconds`` from round 2 on, over every run of
    ``strategy`` (``<strategy>__<split>__s<seed>``)."""
    import statistics

    values = [r["train_seconds"] for p in sorted(runs.glob(f"{strategy}__*/summary.json"))
              for r in json.loads(p.read_text())["history"] if r["round"] >= 2 and "train_seconds" in r]
    if not values:
        raise ValueError(f"{runs} has no round 2+ of {strategy}")
    return statistics.median(values)


def secagg_simulation_table(results: Path) -> str:
    """A SecAgg+ round's training phase against a plain one in Flower's simulation."""
    lines = ["| setting | plain | SecAgg+ | ratio |", "|---|---|---|---|"]
    for label, grid, plain, secure in SECAGG_GRIDS:
        runs = results / grid / "runs"
        a, b = _median_train_seconds(runs, plain), _median_train_seconds(runs, secure)
        digits = 1 if a >= 10 else 2
        lines.append(f"| {label} | {a:.{digits}f} s | {b:.{digits}f} s | {b / a:.2f}x |")
    return "\n".join(lines) + "\n"


MOMENTUM_ROWS = (  # split, variant, the run folders under docs/results/ ({s}: the seed)
    ("dir0.1", "scaffold, momentum 0.9, gradient-mean c_i (`fmnist-niid/superseded/`, before "
               "the weighting fix)", "fmnist-niid/superseded/scaffold__dir0.1__s{s}"),
    ("dir0.1", "scaffold, momentum 0.9, gradient-mean c_i (`fmnist-niid`, after the fix)",
     "fmnist-niid/runs/scaffold__dir0.1__s{s}"),
    ("dir0.1", "scaffold, momentum 0.9, displacement c_i (the paper's formula)",
     "scaffold-variates/runs/scaffold-displacement__dir0.1__s{s}"),
    ("dir0.1", "scaffold, plain SGD (before the weighting fix)",
     "scaffold-variates/runs/scaffold-sgd__dir0.1__s{s}"),
    ("dir0.1", "fedavg, plain SGD", "scaffold-variates/runs/fedavg-sgd__dir0.1__s{s}"),
    ("dir0.1", "fedavg, momentum 0.9 (`fmnist-niid/superseded-2026-12/`)",
     "fmnist-niid/superseded-2026-12/fedavg__dir0.1__s{s}"),
    ("dir0.1", "fedavg, momentum 0.9 (`fmnist-niid`, the rerun)", "fmnist-niid/runs/fedavg__dir0.1__s{s}"),
    ("path2", "scaffold, momentum 0.9, gradient-mean c_i (`fmnist-niid/superseded/`, before "
              "the weighting fix)", "fmnist-niid/superseded/scaffold__path2__s{s}"),
    ("path2", "scaffold, momentum 0.9, gradient-mean c_i (`fmnist-niid`, after the fix)",
     "fmnist-niid/runs/scaffold__path2__s{s}"),
    ("path2", "scaffold, momentum 0.9, displacement c_i (the paper's formula)",
     "scaffold-variates/runs/scaffold-displacement__path2__s{s}"),
    ("path2", "scaffold, plain SGD (before the weighting fix)",
     "scaffold-variates/runs/scaffold-sgd__path2__s{s}"),
    ("path2", "fedavg, plain SGD", "scaffold-variates/runs/fedavg-sgd__path2__s{s}"),
    ("path2", "fedavg, momentum 0.9 (`fmnist-niid/superseded-2026-12/`)",
     "fmnist-niid/superseded-2026-12/fedavg__path2__s{s}"),
    ("path2", "fedavg, momentum 0.9 (`fmnist-niid`, the rerun)", "fmnist-niid/runs/fedavg__path2__s{s}"),
    ("path2", "fedprox, plain SGD (grid `momentum-path2`)", "momentum-path2/runs/fedprox-sgd__path2__s{s}"),
    ("path2", "fedadam, plain SGD (grid `momentum-path2`)", "momentum-path2/runs/fedadam-sgd__path2__s{s}"),
)


def momentum_table(results: Path, seeds=(0, 1, 2)) -> str:
    """SCAFFOLD's control variates and momentum, beside FedAvg, FedProx and FedAdam: the
    final test accuracy (mean ± std over seeds 0-2) and each run's best over rounds
    (mean over the seeds), from the record sets each row names."""
    import statistics

    lines = ["| split | variant | final test acc (mean ± std, 3 seeds) | best over rounds |",
             "|---|---|---|---|"]
    for split, variant, pattern in MOMENTUM_ROWS:
        runs = [json.loads((results / pattern.format(s=s) / "summary.json").read_text()) for s in seeds]
        final = [100 * r["final_test_accuracy"] for r in runs]
        best = [100 * r["best_test_accuracy"] for r in runs]
        lines.append(f"| {split} | {variant} | {statistics.mean(final):.2f} ± "
                     f"{statistics.stdev(final):.2f} | {statistics.mean(best):.2f} |")
    return "\n".join(lines) + "\n"


def build_tables(benchmarks: Path = BENCHMARKS) -> str:
    benchmarks = Path(benchmarks)
    dp = read_records(benchmarks / "dp_overhead.jsonl")
    rounds = read_records(benchmarks / "round_overhead.jsonl")
    redesign = benchmarks.parent / "results" / "redesign-check"
    return ("# Benchmark tables, from their records\n\n"
            "Generated by `python -m experiments.benchmark_tables`; "
            "`python -m experiments.docs_check` checks this file and the docs' copies.\n\n"
            "1. What a SecAgg+ round costs against a plain one "
            "(`secagg_overhead.jsonl`, the rows since the AES-CTR masks; ratio = (n × epoch "
            "+ SecAgg+ round) / (n × epoch + plain)):\n\n"
            + secagg_table(read_records(benchmarks / "secagg_overhead.jsonl"))
            + "".join(f"\n{k}. DP-SGD's local epoch against the same epoch without DP "
                      f"(`dp_overhead.jsonl`), {label}:\n\n" + dp_table(dp, first, last)
                      for k, (label, first, last) in enumerate(DP_RUNS, start=2))
            + "\n5. A warm round against the compute floor (`round_overhead.jsonl`, the "
              "measurements with the floor warmed up):\n\n" + round_table(rounds)
            + f"\n6. Several configs in one `flwr run` (`round_overhead.jsonl`, "
              f"{next(r['date'] for r in rounds if 'sweep_3x2_rounds_seconds' in r)}):\n\n"
            + sweep_table(rounds)
            + "\n7. A warm round's training phase per strategy against FedAvg's "
              "(`round_overhead.jsonl`, the invocations that compared them):\n\n"
            + strategy_table(rounds)
            + "\n8. Krum's aggregation against Flower's `Krum` (`krum.jsonl`, every row):\n\n"
            + krum_table(read_records(benchmarks / "krum.jsonl"))
            + "\n9. A deployed round's training phase against the simulated one "
              f"(`deployment_profile.jsonl`, the runs labelled \"{DEPLOYMENT_LABEL} ...\", "
              "2026-12-03, UTC times):\n\n"
            + deployment_table(read_records(benchmarks / "deployment_profile.jsonl"))
            + "\n10. What LoRA costs with DP-SGD (`lora_overhead.jsonl`, the latest "
              "invocation):\n\n" + lora_table(read_records(benchmarks / "lora_overhead.jsonl"))
            + "\n11. The redesign check, before and after the specs and the assembly "
              "(`../results/redesign-check/before.json`, `after-specs.json`):\n\n"
            + redesign_table(*(json.loads((redesign / f"{n}.json").read_text())
                               for n in ("before", "after-specs")))
            + "\n12. SCAFFOLD's client lr against eta_g (`../results/scaffold-lr-sweep/` and "
              "`../results/fmnist-niid/`, seed 0): final test accuracy %, in brackets the lowest "
              "of the last 10 rounds:\n\n" + lr_sweep_table(benchmarks.parent / "results")
            + "\n13. A SecAgg+ round's training phase against a plain one in Flower's simulation "
              "(median of the per-round `train_seconds` from round 2 on, over the grid's runs):\n\n"
            + secagg_simulation_table(benchmarks.parent / "results")
            + "\n14. SCAFFOLD's control variates under momentum, beside FedAvg, FedProx and "
              "FedAdam with plain SGD (Fashion-MNIST, 10 clients, seeds 0-2; each row's record "
              "set under `../results/`):\n\n" + momentum_table(benchmarks.parent / "results"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BENCHMARKS / "tables.md")
    args = parser.parse_args(argv)
    args.out.write_text(build_tables())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
