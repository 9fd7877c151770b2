"""Everything a run leaves behind, under ``<results-dir>/<run-name>/``.

- ``config.json``: the resolved run config (``server-lr = "auto"`` replaced by its value);
- ``summary.json``: rewritten after every round, so a crash loses at most the round in
  flight; ``complete`` turns true at the end, and ``status`` says how the run ended:
  ``running``, ``completed``, ``no-progress`` (it finished, but no round's aggregate was
  ever kept: every reply rejected, or too few valid ones; the model is the initial one)
  or ``failed`` (the ServerApp raised; ``error`` holds the exception). It holds ``final_test_accuracy``,
  ``num_rounds`` and ``history``: one record per round (round 0 = the initial model) with
  ``test_accuracy``, ``test_loss``, the aggregated client metrics and round statistics;
  and what the split did before any accuracy: ``partition_sizes``,
  ``partition_train_sizes`` and ``label_counts`` (per partition, samples per label,
  counted from the drawn split; equal to flwr-datasets' ``compute_counts``, tested);
- ``final_model.npz``: the final global weights, by state-dict key (``load_model``;
  arrays only, loaded with ``allow_pickle=False``: no pickle in a run's files);
- ``checkpoint.json`` and the ``checkpoint-<round>-<random>.npz`` it names: the last
  complete round's model, strategy state, random generators and history, as data only
  (typed JSON and arrays, no pickle; ``fl_app/checkpoint.py``; run-config ``resume-from``);
- ``client-state/`` (simulation): the clients' state that outlives a round (SCAFFOLD's
  c_i, the DP accountant), per partition;
- ``accuracy.png``: test accuracy per round;
- ``label_distribution.png``: flwr-datasets' ``plot_label_distributions`` of the split
  (up to 100 partitions).

Nothing is overwritten: a run whose directory already exists gets a numbered suffix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fl_common.atomic import write_atomic

SUMMARY = "summary.json"
RUNNING, COMPLETED, NO_PROGRESS, FAILED = "running", "completed", "no-progress", "failed"
CONFIG = "config.json"
MODEL = "final_model.npz"
PLOT = "accuracy.png"


def resolve_results_dir(results_dir: str) -> Path:
    """Relative ``results-dir`` values resolve against ``$FL_APP_WORKDIR`` if set, else
    the current directory (for a simulation, the one the SuperLink was started from)."""
    path = Path(results_dir).expanduser()
    if not path.is_absolute():
        path = Path(os.environ.get("FL_APP_WORKDIR", os.getcwd())) / path
    return path


def run_status(run_dir: Path) -> str | None:
    """The ``status`` of a run's summary (``completed`` for finished runs recorded before
    the field existed), or None without a readable summary."""
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return summary.get("status", COMPLETED if summary.get("complete") else RUNNING)


def is_complete(run_dir: Path) -> bool:
    """True if ``run_dir`` holds the summary of a finished run."""
    try:
        return bool(json.loads((run_dir / SUMMARY).read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def fresh_run_dir(root: Path, name: str) -> Path:
    """``root/name``, or ``root/name-2``, ``-3``... if taken; created empty."""
    root.mkdir(parents=True, exist_ok=True)
    candidate, n = root / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = root / f"{name}-{n}"


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    write_atomic(path, lambda handle: handle.write(text.encode()))


class RunRecorder:
    """Collects the per-round history of one run and keeps ``summary.json`` current."""

    def __init__(self, run_dir: Path, config: dict[str, Any], extra: dict[str, Any],
                 history: list[dict[str, Any]] | None = None) -> None:
        """``history``: the rounds already done (a run resumed from its checkpoint)."""
        self.run_dir = run_dir
        self.config = config
        self.extra = extra
        self.history: list[dict[str, Any]] = list(history or [])
        self.status = RUNNING
        self.error: str | None = None
        write_json(run_dir / CONFIG, config)

    def add_round(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        self._write(complete=False)

    def summary(self, complete: bool) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "complete": complete,
            "status": self.status,
            **({"error": self.error} if self.error else {}),
            "run_name": self.run_dir.name,
            "num_rounds": self.config.get("num-server-rounds"),
            "rounds_completed": max((r["round"] for r in self.history), default=0),
            "final_test_accuracy": last.get("test_accuracy"),
            "final_test_loss": last.get("test_loss"),
            "best_test_accuracy": max((r["test_accuracy"] for r in self.history), default=None),
            **self.extra,
            "config": self.config,
            "history": self.history,
        }

    def _write(self, complete: bool) -> None:
        write_json(self.run_dir / SUMMARY, self.summary(complete))

    def fail(self, error: BaseException) -> None:
        """Record that the run failed (the summary keeps the rounds done so far)."""
        self.status, self.error = FAILED, f"{type(error).__name__}: {error}"
        self._write(complete=False)

    def finish(self, state_dict: Any) -> dict[str, Any]:
        aggregated = any(r.get("round_aggregated") for r in self.history if r.get("round", 0) > 0)
        self.status = COMPLETED if aggregated else NO_PROGRESS
        save_model(state_dict, self.run_dir / MODEL)
        plot_accuracy(self.history, self.run_dir / PLOT, title=self.run_dir.name)
        self._write(complete=True)
        return self.summary(True)


def plot_accuracy(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(rounds, [r["test_accuracy"] for r in history], marker="o", ms=3, label="test (server)")
    val = [(r["round"], r["val_accuracy"]) for r in history if r.get("val_accuracy") is not None]
    if val:
        ax.plot(*zip(*val), marker="s", ms=3, ls="--", label="validation (clients)")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_model(state_dict: Any, path: Path) -> None:
    """A state dict (tensors or arrays) as an npz of plain arrays, written atomically."""
    import io

    import numpy as np

    arrays = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
              for k, v in state_dict.items()}

    def write(handle) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        handle.write(buffer.getvalue())

    write_atomic(path, write)


def load_model(path: Path) -> dict[str, Any]:
    """The weights ``save_model`` wrote, as NumPy arrays (no pickle is ever loaded)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
