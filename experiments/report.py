"""Collect the summaries of a grid into tables (Markdown, CSV) and plots.

Figures are final-round test accuracy (not best-over-rounds, which is biased upward),
mean ± sample standard deviation over the seeds that finished; "rounds to X" is the first
round whose test accuracy reaches the grid's target (mean over the seeds that reached it,
with how many did). The CSV also has the mean training-phase seconds per warm round
(configure, client training, replies, aggregation) and its ratio to the baseline's; a
grid runs for hours on a shared machine, so these are indicative only: the Markdown
table leaves them out, and experiments/benchmark_round.py measures strategy cost in one
quiet, interleaved run instead.

Beside the final round the tables give the mean test accuracy of the last 10 rounds (a
final-round snapshot of a noisy curve carries claims it cannot hold), and a table of paired
differences: each strategy against its reference (the baseline strategy in the same setting,
see :func:`reference_label`) and, where a label has a setting such as SecAgg+ or an attack,
against the same strategy without it (:func:`plain_label`), seed by seed on the same
split, with a 95 % t-interval over the seeds and a paired t-test's p-value, for the final
round and for the last-10 mean.

A difference is only paired if both runs of a seed saw the same clients and data and
differed only in what the grid compares. :func:`check_pairing` checks that from the records
and refuses (:class:`PairingError`, naming the runs) when it does not hold:

* the same data: partition sizes (and, where recorded, train sizes and label counts), the
  dataset, the number of nodes, the model size (unless the model is what is compared);
* the recorded config equal in every key the grid does not vary between the two labels
  (bookkeeping such as the run name left out); a key recorded by one run only means the
  records come from different code versions;
* the same initial model: round 0's test loss and accuracy equal (unless the comparison is
  of the initial model itself: ``model``, ``init-from``, ``lora-base``);
* where the two runs must start identically (SCAFFOLD with eta_g = 1 has c = 0 in round 1
  and is FedAvg's step; FedAvgM with server lr 1 has an empty momentum buffer; FedProx with
  mu = 0 and FedPer with 0 personal layers are FedAvg), round 1's test loss and accuracy equal.
  Records from different code versions are accepted only with this evidence.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from .grids import GRIDS, Grid

LAST_ROUNDS = 10  # the "last 10 rounds" mean
# Keys that choose or tune the aggregation algorithm: a label's other overrides are its
# setting (model, attack, DP, SecAgg+, ...), and a strategy is compared with the baseline's
# strategy in the same setting.
ALGORITHM_KEYS = frozenset({
    "strategy", "server-lr", "server-momentum", "proximal-mu", "scaffold-control-variate",
    "scaffold-weighting", "beta-1", "beta-2", "tau", "trim-fraction", "num-malicious",
    "num-selected", "personal-layers", "lora-rank", "lora-alpha", "lora-train-head",
    "lora-target-modules"})
# Keys that change the initial model on purpose (a pretrained base, another architecture):
# runs compared on them need not start from the same round 0 or have the same size.
INITIAL_MODEL_KEYS = frozenset({"model", "init-from", "lora-base"})
BOOKKEEPING_KEYS = frozenset({"run-name", "results-dir", "sweep-file", "resume-from"})
LOSS_RTOL = 1e-6  # float32 sums in another order differ by ~1e-8 relative; a real change by >1e-5


class PairingError(ValueError):
    """Rows of a table that should be paired are not: the message names the runs."""


def load_summaries(runs_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(runs_dir.glob("*/summary.json")):
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            continue
        if summary.get("complete") and "__" in path.parent.name:
            out[path.parent.name] = summary
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def rounds_to_target(history: list[dict[str, Any]], target: float) -> int | None:
    for record in history:
        if record["round"] > 0 and record["test_accuracy"] >= target:
            return record["round"]
    return None


def _train_seconds(history: list[dict[str, Any]]) -> float:
    # Round 1 pays the simulation's warm-up (actors, data loading): leave it out.
    warm = [r["train_seconds"] for r in history if r["round"] > 1 and "train_seconds" in r]
    return statistics.fmean(warm) if warm else float("nan")


def last_rounds_mean(history: list[dict[str, Any]], k: int = LAST_ROUNDS) -> float:
    """Mean test accuracy of the last ``k`` trained rounds (all of them if fewer)."""
    acc = [r["test_accuracy"] for r in history if r["round"] > 0]
    return statistics.fmean(acc[-k:]) if acc else float("nan")


def aggregate(grid: Grid, summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for name, summary in summaries.items():
        label, split, _seed = Grid.parse_run_name(name)
        cells[(label, split)].append(summary)
    base_time = {
        split: statistics.fmean(_train_seconds(s["history"]) for s in cells[(grid.baseline, split)])
        for split in grid.splits if cells.get((grid.baseline, split))
    }
    rows = []
    for split in grid.splits:
        for label in grid.strategies:
            runs = cells.get((label, split), [])
            if not runs:
                continue
            final = [s["final_test_accuracy"] for s in runs]
            target = grid.target_for(split)
            reached = [r for r in (rounds_to_target(s["history"], target) for s in runs)
                       if r is not None]
            seconds = statistics.fmean(_train_seconds(s["history"]) for s in runs)
            # The largest round's upload: a round whose replies were all rejected uploads 0.
            upload = statistics.fmean(
                max((r.get("upload_bytes_per_client", 0) for r in s["history"]), default=0)
                for s in runs)
            mean, std = _mean_std(final)
            last_mean, last_std = _mean_std([last_rounds_mean(s["history"]) for s in runs])
            rows.append({
                "split": split,
                "strategy": label,
                "seeds": len(runs),
                "final_acc_mean": mean,
                "final_acc_std": std,
                "last10_acc_mean": last_mean,
                "last10_acc_std": last_std,
                "best_acc_mean": statistics.fmean(s["best_test_accuracy"] for s in runs),
                "target_accuracy": target,
                "rounds_to_target_mean": statistics.fmean(reached) if reached else None,
                "reached_target": len(reached),
                "train_seconds_per_round": seconds,
                "time_vs_baseline": seconds / base_time[split] if split in base_time else None,
                "upload_bytes_per_client": upload,
            })
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(grid: Grid, rows: list[dict[str, Any]]) -> str:
    if grid.split_targets:
        target_head = "rounds to target (see split)"
    else:
        target_head = f"rounds to {grid.target_accuracy:.0%}"
    head = (f"| split | strategy | seeds | final test acc (mean ± std) | best acc | {target_head} "
            f"| upload / client | mean of the last {LAST_ROUNDS} rounds (mean ± std) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    def split_note(r: dict[str, Any]) -> str:
        return f" (target {r['target_accuracy']:.0%})" if grid.split_targets else ""

    for r in rows:
        target = (f"{r['rounds_to_target_mean']:.1f} ({r['reached_target']}/{r['seeds']})"
                  if r["rounds_to_target_mean"] is not None else f"— (0/{r['seeds']})")
        lines.append(
            f"| {r['split']}{split_note(r)} | {r['strategy']} | {r['seeds']} | "
            f"{100 * r['final_acc_mean']:.2f} ± {100 * r['final_acc_std']:.2f} | "
            f"{100 * r['best_acc_mean']:.2f} | {target} | "
            f"{r['upload_bytes_per_client'] / 1024:.0f} KiB | "
            f"{100 * r['last10_acc_mean']:.2f} ± {100 * r['last10_acc_std']:.2f} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- pairing and paired differences
def _setting(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if k not in ALGORITHM_KEYS}


def reference_label(grid: Grid, label: str) -> str | None:
    """The label ``label`` is compared with: the baseline's strategy in the same setting
    (e.g. scaffold-logreg against fedavg-logreg, krum-alie1 against fedavg-alie1), else the
    baseline itself; None for the baseline."""
    if label == grid.baseline:
        return None
    base_strategy = grid.strategies[grid.baseline].get("strategy")
    setting = _setting(grid.strategies[label])
    same = [other for other, overrides in grid.strategies.items()
            if other != label and overrides.get("strategy") == base_strategy
            and _setting(overrides) == setting]
    if grid.baseline in same or not same:
        return grid.baseline
    return same[0]


def plain_label(grid: Grid, label: str) -> str | None:
    """The same algorithm without ``label``'s setting (scaffold-secagg: scaffold; krum-alie1:
    krum-none), if the grid has it: what the setting itself costs that algorithm."""
    algorithm = {k: v for k, v in grid.strategies[label].items() if k in ALGORITHM_KEYS}
    if not _setting(grid.strategies[label]):
        return None
    for other, overrides in grid.strategies.items():
        if other != label and not _setting(overrides) and {
                k: v for k, v in overrides.items() if k in ALGORITHM_KEYS} == algorithm:
            return other
    return None


def comparisons(grid: Grid) -> list[tuple[str, str]]:
    """(label, reference) pairs in the grid's order: every label but the baseline against
    its reference_label, and a label with a setting also against its plain_label."""
    out: list[tuple[str, str]] = []
    for label in grid.strategies:
        for reference in (reference_label(grid, label), plain_label(grid, label)):
            if reference is not None and (label, reference) not in out:
                out.append((label, reference))
    return out


def _round1_algorithm(cfg: dict[str, Any]) -> tuple[Any, frozenset[str]]:
    """The algorithm as far as round 1 can tell, and the keys only its later rounds use:
    algorithms that equal FedAvg in their first round are FedAvg there."""
    strategy = cfg.get("strategy")

    def equals(key: str, value: float) -> bool:  # a key the record lacks: cannot tell
        try:
            return float(cfg[key]) == value
        except (KeyError, TypeError, ValueError):
            return False

    server_lr_one = equals("server-lr", 1.0)
    # records from before scaffold-weighting existed weighted the model update by examples
    if strategy == "scaffold" and server_lr_one and cfg.get(
            "scaffold-weighting", "num-examples") == "num-examples":
        # c = c_i = 0 in round 1: the clients' step is plain SGD, the server's eta_g = 1
        # step the weighted mean; which rule updates c_i matters from round 2 on.
        return "fedavg", frozenset({"scaffold-control-variate", "scaffold-weighting"})
    if strategy == "fedavgm" and server_lr_one:
        return "fedavg", frozenset({"server-momentum"})  # the momentum buffer is empty
    if strategy == "fedprox" and equals("proximal-mu", 0.0):
        return "fedavg", frozenset({"proximal-mu"})
    if strategy == "fedper" and equals("personal-layers", 0.0):
        return "fedavg", frozenset({"personal-layers"})
    return strategy, frozenset()


def must_start_identically(ca: dict[str, Any], cb: dict[str, Any], compared: set[str]) -> bool:
    """Whether two recorded configs must give the same round 1: the same algorithm there
    and every other compared key equal (and recorded by both)."""
    if "strategy" not in ca or "strategy" not in cb:
        return False  # records that do not say their algorithm cannot tell
    (sa, drop_a), (sb, drop_b) = _round1_algorithm(ca), _round1_algorithm(cb)
    if sa != sb:
        return False
    skip = drop_a | drop_b | BOOKKEEPING_KEYS | {"strategy"}
    for key in (set(ca) | set(cb)) - skip:
        if key in ca and key in cb:
            if ca[key] != cb[key]:
                return False
        elif key in compared and key not in ALGORITHM_KEYS - {"server-lr"}:
            # a compared key one record does not hold: cannot tell (another algorithm's
            # parameter, e.g. Krum's num-malicious, says nothing about FedAvg's round 1)
            return False
    return True


def _close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(float(a), float(b), rel_tol=LOSS_RTOL, abs_tol=1e-12)


def _round(history: list[dict[str, Any]], number: int) -> dict[str, Any] | None:
    return next((r for r in history if r["round"] == number), None)


def pair_problems(grid: Grid, label: str, reference: str,
                  a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], str]:
    """What makes runs ``a`` (of ``label``) and ``b`` (of ``reference``), same split and seed,
    not a pair (empty if nothing), and what the pairing rests on."""
    problems: list[str] = []
    va, vb = grid.strategies[label], grid.strategies[reference]
    compared = {k for k in set(va) | set(vb) if va.get(k, object()) != vb.get(k, object())}
    if "strategy" in compared:
        compared |= ALGORITHM_KEYS  # e.g. server-lr "auto" resolves to each strategy's own
    # the data and the clients
    for key in ("partition_sizes", "partition_train_sizes", "label_counts", "dataset",
                "num_partitions", "num_nodes", "data_source"):
        if key in a and key in b and a[key] != b[key]:
            problems.append(f"different {key}")
    new_start = bool(compared & INITIAL_MODEL_KEYS)
    if not new_start and a.get("model_parameters") != b.get("model_parameters"):
        problems.append(f"model parameters {a.get('model_parameters')} vs {b.get('model_parameters')}")
    # the config apart from what is compared
    ca, cb = a.get("config", {}), b.get("config", {})
    ignore = compared | BOOKKEEPING_KEYS
    if new_start:  # the checksums of the files the runs started from
        ignore |= {"init-from-sha256", "lora-base-sha256"}
    differ = sorted(k for k in set(ca) & set(cb) - ignore if ca[k] != cb[k])
    if differ:
        problems.append("config differs in " + ", ".join(f"{k} ({ca[k]!r} vs {cb[k]!r})" for k in differ))
    only_a = sorted(set(ca) - set(cb) - ignore)
    only_b = sorted(set(cb) - set(ca) - ignore)
    versions = ""
    if only_a or only_b:
        versions = ("config keys recorded by one run only (different code versions): "
                    + "; ".join(f"{', '.join(keys)} only in {run.get('run_name', '?')}"
                                for keys, run in ((only_a, a), (only_b, b)) if keys))
    # the initial model
    r0a, r0b = _round(a["history"], 0), _round(b["history"], 0)
    if not new_start and r0a and r0b and not (
            _close(r0a["test_loss"], r0b["test_loss"])
            and _close(r0a["test_accuracy"], r0b["test_accuracy"])):
        problems.append(f"round 0 (the initial model) differs: test loss {r0a['test_loss']:.6f} "
                        f"vs {r0b['test_loss']:.6f}")
    # round 1, where the two must start identically
    basis = "config"
    must_equal = must_start_identically(ca, cb, compared)
    r1a, r1b = _round(a["history"], 1), _round(b["history"], 1)
    if must_equal and r1a and r1b:
        if _close(r1a["test_loss"], r1b["test_loss"]) and _close(
                r1a["test_accuracy"], r1b["test_accuracy"]):
            basis = "config + round 1" if not versions else "round 1 (code versions differ)"
            versions = ""
        else:
            problems.append(
                f"round 1 must equal ({ca.get('strategy')} starts as {cb.get('strategy')}) but "
                f"test loss {r1a['test_loss']:.6f} vs {r1b['test_loss']:.6f}, accuracy "
                f"{100 * r1a['test_accuracy']:.2f} vs {100 * r1b['test_accuracy']:.2f}")
    if versions:
        problems.append(versions)
    return problems, basis


def _grouped(summaries: dict[str, dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {Grid.parse_run_name(name): summary for name, summary in summaries.items()}


def check_pairing(grid: Grid, summaries: dict[str, dict[str, Any]]) -> dict[tuple[str, str], str]:
    """Check every (label, reference) pair of every split and seed both have; raise
    :class:`PairingError` naming each pair that is not one. Returns what each comparison's
    pairing rests on ("config", "config + round 1", "round 1 (code versions differ)"),
    keyed by (label, reference): the weakest over its seeds and splits."""
    runs = _grouped(summaries)
    strength = {"config + round 1": 2, "config": 1, "round 1 (code versions differ)": 0}
    basis: dict[tuple[str, str], str] = {}
    failures: list[str] = []
    checked = 0
    for label, reference in comparisons(grid):
        for (lab, split, seed), a in sorted(runs.items()):
            b = runs.get((reference, split, seed))
            if lab != label or b is None:
                continue
            checked += 1
            problems, how = pair_problems(grid, label, reference, a, b)
            if problems:
                failures.append(f"  {a.get('run_name', lab)} vs {b.get('run_name', reference)}: "
                                + "; ".join(problems))
            elif strength[how] < strength[basis.get((label, reference), "config + round 1")]:
                basis[(label, reference)] = how
            else:
                basis.setdefault((label, reference), how)
    if failures:
        raise PairingError(
            f"grid {grid.name}: {len(failures)} of {checked} run pairs that a paired table "
            f"compares are not paired, so no paired table is printed:\n" + "\n".join(failures))
    return basis


def _t_summary(diffs: list[float]) -> tuple[float, float, float, float]:
    """Mean, 95 % t-interval (low, high) and paired t-test p of per-seed differences."""
    from scipy import stats  # installed with scikit-learn

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sd = statistics.stdev(diffs)
    if sd == 0.0:
        return mean, mean, mean, (1.0 if mean == 0.0 else 0.0)
    half = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    p = float(stats.ttest_1samp(diffs, 0.0).pvalue)  # = ttest_rel(a, b) on the pairs
    return mean, mean - half, mean + half, p


def paired_differences(grid: Grid, summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """label − reference per split over the seeds both have, final round and last-10 mean
    (accuracy as a fraction). Raises PairingError first if the pairs are not paired."""
    basis = check_pairing(grid, summaries)
    runs = _grouped(summaries)
    rows = []
    for split in grid.splits:
        for label, reference in comparisons(grid):
            seeds = [seed for seed in grid.seeds_for(split)
                     if (label, split, seed) in runs and (reference, split, seed) in runs]
            if not seeds:
                continue
            row: dict[str, Any] = {"split": split, "strategy": label, "reference": reference,
                                   "seeds": len(seeds), "paired_by": basis.get((label, reference))}
            for key, value in (("final", lambda s: s["final_test_accuracy"]),
                               ("last10", lambda s: last_rounds_mean(s["history"]))):
                diffs = [value(runs[(label, split, seed)]) - value(runs[(reference, split, seed)])
                         for seed in seeds]
                mean, low, high, p = _t_summary(diffs)
                row.update({f"{key}_diff": mean, f"{key}_ci_low": low, f"{key}_ci_high": high,
                            f"{key}_p": p, f"{key}_diffs": diffs})
            rows.append(row)
    return rows


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def paired_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""

    def cell(r: dict[str, Any], key: str) -> str:
        if math.isnan(r[f"{key}_ci_low"]):
            return f"{_pp(r[f'{key}_diff'])} (1 seed)"
        p = r[f"{key}_p"]
        return (f"{_pp(r[f'{key}_diff'])} [{_pp(r[f'{key}_ci_low'])}, {_pp(r[f'{key}_ci_high'])}], "
                + (f"p = {p:.3f}" if p >= 0.001 else "p < 0.001"))

    lines = [f"Paired differences, percentage points (strategy − reference, seed by seed on the "
             f"same split; 95 % t-interval over the seeds; p: paired t-test). The pairing was "
             f"checked from the records (config, data, round 0 and, where the two must start "
             f"identically, round 1): `paired by` says what it rests on.",
             "",
             f"| split | strategy − reference | seeds | final round | last {LAST_ROUNDS} rounds "
             f"| per seed (final; last {LAST_ROUNDS}) | paired by |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = (", ".join(f"{100 * d:+.1f}" for d in r["final_diffs"]) + "; "
                    + ", ".join(f"{100 * d:+.1f}" for d in r["last10_diffs"]))
        lines.append(f"| {r['split']} | {r['strategy']} − {r['reference']} | {r['seeds']} | "
                     f"{cell(r, 'final')} | {cell(r, 'last10')} | {per_seed} | {r['paired_by']} |")
    return "\n".join(lines) + "\n"


def personalizes(grid: Grid) -> bool:
    """Whether the grid compares a personalized method (FedPer, or local fine-tuning
    before scoring), which is judged by each client's accuracy on its own data."""
    return any(over.get("strategy") == "fedper" or over.get("eval-finetune-epochs")
               for over in grid.strategies.values())


def plot_curves(grid: Grid, summaries: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    splits = [s for s in grid.splits if any(Grid.parse_run_name(n)[1] == s for n in summaries)]
    if not splits:
        return
    # a personalization grid also shows what its methods are judged by: each client's
    # accuracy on its own held-out data (val_accuracy), beside the server's central test
    metrics = [("test_accuracy", "test accuracy (server)")]
    if personalizes(grid):
        metrics.append(("val_accuracy", "personalized accuracy (clients' own data)"))
    fig, axes = plt.subplots(len(metrics), len(splits),
                             figsize=(4.2 * len(splits), 3.6 * len(metrics)), squeeze=False)
    for row, (metric, ylabel) in enumerate(metrics):
        for ax, split in zip(axes[row], splits):
            for label in grid.strategies:
                curves = [[r for r in s["history"] if r.get(metric) is not None]
                          for n, s in summaries.items()
                          if Grid.parse_run_name(n)[:2] == (label, split)]
                curves = [c for c in curves if c]
                if not curves:
                    continue
                length = min(len(c) for c in curves)
                acc = np.array([[r[metric] for r in c[:length]] for c in curves])
                rounds = [r["round"] for r in curves[0][:length]]
                mean = acc.mean(0)
                ax.plot(rounds, mean, label=f"{label} (n={len(curves)})")
                if len(curves) > 1:
                    ax.fill_between(rounds, acc.min(0), acc.max(0), alpha=0.15)
            ax.set_title(split)
            ax.set_xlabel("round")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel(ylabel)
        axes[row][-1].legend(fontsize=7, loc="lower right")
    import textwrap

    title = textwrap.fill(grid.description, width=int(40 * len(splits)))
    fig.suptitle(title + "\nLines: mean over seeds; bands: min-max over seeds.", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def personalized_markdown(grid: Grid, summaries: dict[str, dict[str, Any]],
                          local_only: dict[str, Any] | None = None) -> str:
    """The personalization table: each client's accuracy on its own held-out data after
    the last round (``val_accuracy``: example-weighted over clients; what FedPer, and
    FedAvg with local fine-tuning, are judged by), mean ± std over seeds, with the mean
    spread across clients (``val_accuracy_std``) in brackets; beside it local training
    only (``local-only.json``, experiments/local_only.py) where it was run. Empty when
    no run records ``val_accuracy`` or the grid compares no personalized method (FedPer,
    or local fine-tuning before scoring)."""
    if not personalizes(grid):
        return ""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for name, summary in summaries.items():
        label, split, _seed = Grid.parse_run_name(name)
        last = summary["history"][-1] if summary.get("history") else {}
        if "val_accuracy" in last:
            cells[(label, split)].append(last)
    if not cells:
        return ""
    local: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for key, cell in (local_only or {}).items():
        split, seed = key.rsplit("__s", 1)
        if split in grid.splits and int(seed) in grid.seeds_for(split):
            local[split].append(cell)
    labels = list(grid.strategies) + (["local only"] if local else [])

    def cell_text(values: list[float], spreads: list[float | None]) -> str:
        if not values:
            return "—"
        mean, std = _mean_std(values)
        spread = ("" if None in spreads  # one global model: no spread was recorded
                  else f" [{100 * statistics.fmean(spreads):.1f}]")
        return f"{100 * mean:.1f} ± {100 * std:.1f} ({len(values)}){spread}"

    lines = ["Personalized accuracy after the last round, % (each client's own held-out data, "
             "weighted by its size): mean ± std over seeds (number of seeds) [mean spread "
             "across clients].\n",
             "| split | " + " | ".join(labels) + " |",
             "|---|" + "---|" * len(labels)]
    for split in grid.splits:
        row = []
        for label in grid.strategies:
            runs = cells.get((label, split), [])
            row.append(cell_text([r["val_accuracy"] for r in runs],
                                 [r.get("val_accuracy_std") for r in runs]))
        if local:
            row.append(cell_text([c["val_accuracy"] for c in local.get(split, [])],
                                 [c["val_accuracy_std"] for c in local.get(split, [])]))
        lines.append(f"| {split} | " + " | ".join(row) + " |")
    # paired by seed against FedAvg with local fine-tuning, the baseline FedPer must beat
    reference = next((label for label, over in grid.strategies.items()
                      if over.get("eval-finetune-epochs")), None)
    if reference is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"Paired differences in personalized accuracy against `{reference}`, "
              "percentage points, seed by seed (95 % t-interval; p: paired t-test):\n",
              "| split | strategy − " + reference + " | seeds | difference | 95 % interval "
              "| p | per seed |", "|---|---|---|---|---|---|---|"]
    by_seed = {Grid.parse_run_name(name): s["history"][-1].get("val_accuracy")
               for name, s in summaries.items() if s.get("history")}
    for split in grid.splits:
        for label in grid.strategies:
            if label == reference:
                continue
            diffs = [by_seed[(label, split, seed)] - by_seed[(reference, split, seed)]
                     for seed in grid.seeds_for(split)
                     if by_seed.get((label, split, seed)) is not None
                     and by_seed.get((reference, split, seed)) is not None]
            if not diffs:
                continue
            mean, low, high, p = _t_summary(diffs)
            interval = "—" if math.isnan(low) else f"[{_pp(low)}, {_pp(high)}]"
            lines.append(f"| {split} | {label} − {reference} | {len(diffs)} | {_pp(mean)} | "
                         f"{interval} | {'—' if math.isnan(p) else f'{p:.3f}'} | "
                         + ", ".join(f"{100 * d:+.1f}" for d in diffs) + " |")
    return "\n".join(lines) + "\n"


def refusal_markdown(error: PairingError) -> str:
    """What table.md says in place of the paired table when the records are not paired."""
    return ("**No paired differences**: the report refuses to pair these records, so the "
            "rows above are not comparable seed by seed (rerun the runs named below on one "
            "code version):\n\n```\n" + str(error) + "\n```\n")


def report_markdown(grid: Grid, summaries: dict[str, dict[str, Any]],
                    rows: list[dict[str, Any]], paired: list[dict[str, Any]],
                    local_only: dict[str, Any] | None = None,
                    refused: PairingError | None = None) -> str:
    personalized = personalized_markdown(grid, summaries, local_only)
    return (
        f"# Grid `{grid.name}`\n\n{grid.description}\n\n"
        f"Settings: {json.dumps(grid.base)}; {grid.num_supernodes} clients; seeds "
        f"{list(grid.seeds)}"
        + "".join(f" ({split}: seeds {list(seeds)})" for split, seeds in grid.split_seeds.items())
        + f"; {len(summaries)} of {len(grid.runs())} runs complete.\n\n"
        + markdown_table(grid, rows)
        + (f"\n{personalized}" if personalized else "")
        + (f"\n{paired_markdown(paired)}" if paired else "")
        + (f"\n{refusal_markdown(refused)}" if refused is not None else "")
        + "".join(f"\n{note}\n" for note in grid.notes)
    )


def read_local_only(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "local-only.json"
    return json.loads(path.read_text()) if path.exists() else None


def build_report(grid: Grid, out_dir: Path, summaries: dict[str, dict[str, Any]] | None = None,
                 *, unpaired_ok: bool = False
                 ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], str]:
    """(summaries, rows, paired rows, table.md's text) of the grid's records in
    ``out_dir`` (or of ``summaries``). Where they are not paired it raises PairingError,
    or with ``unpaired_ok`` gives no paired rows and a text that says why in their place."""
    if summaries is None:
        summaries = load_summaries(out_dir / "runs")
    rows = aggregate(grid, summaries)
    refused = None
    try:
        paired = paired_differences(grid, summaries)
    except PairingError as error:
        if not unpaired_ok:
            raise
        paired, refused = [], error
    return summaries, rows, paired, report_markdown(grid, summaries, rows, paired,
                                                    read_local_only(out_dir), refused)


def write_report(grid: Grid, out_dir: Path, *, unpaired_ok: bool = False) -> list[dict[str, Any]]:
    """Write table.md, table.csv, paired.csv and curves.png; raises PairingError (and writes
    nothing) if the rows the paired table compares are not paired, unless ``unpaired_ok``:
    then table.md says why in place of the paired table, and paired.csv is empty."""
    summaries, rows, paired, text = build_report(grid, out_dir, unpaired_ok=unpaired_ok)
    write_csv(rows, out_dir / "table.csv")
    if not paired:  # none to compare, or refused: no stale file from an earlier report
        (out_dir / "paired.csv").unlink(missing_ok=True)
    write_csv([{k: v for k, v in r.items() if not k.endswith("_diffs")} for r in paired],
              out_dir / "paired.csv")
    (out_dir / "table.md").write_text(text)
    plot_curves(grid, summaries, out_dir / "curves.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print a grid's tables from its committed records (nothing is written), or what
    makes its pairs unpaired."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("grid", choices=sorted(GRIDS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "results",
                        help="root of grid outputs")
    parser.add_argument("--runs", type=Path, default=None, metavar="DIR",
                        help="read the runs from this folder instead of the grid's runs/ "
                             "(e.g. docs/results/fmnist-niid/superseded-2026-12: the records "
                             "a rerun replaced)")
    parser.add_argument("--also", type=Path, nargs="+", default=[], metavar="DIR",
                        help="more run folders whose records replace the same-named ones "
                             "(e.g. docs/results/fmnist-niid/superseded)")
    args = parser.parse_args(argv)
    grid = GRIDS[args.grid]
    runs = args.runs if args.runs is not None else args.out / grid.name / "runs"
    if not runs.is_dir():
        print(f"no run folder {runs}", file=sys.stderr)
        return 2
    summaries = load_summaries(runs)
    for folder in args.also:
        summaries.update(load_summaries(folder))
    try:
        text = build_report(grid, args.out / grid.name, summaries)[3]
    except PairingError as error:
        print(error, file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
