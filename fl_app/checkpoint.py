"""Checkpoints of a run, and resuming from the last complete one.

After every round (and once before the first) the ServerApp writes
``<run folder>/checkpoint.pkl``: the round number, the global model, the strategy's
state (``strategies/state.py``: FedAdam's moments, SCAFFOLD's c and accepted map, ...),
the state of the global random generators (Python, NumPy, PyTorch), the history so far
and the run config. The file is written to a temporary file in the same folder,
flushed to disk, then renamed over the previous one (and the folder synced): a process
killed at any moment leaves the previous checkpoint or the new one, never a mix.

Run-config ``resume-from = "<run folder>"`` continues that run from its checkpoint:
the same folder, the same run name (so clients find their state), the remaining rounds
up to ``num-server-rounds`` (the total). Every other key must equal the checkpoint's:
a resumed run is the same experiment, not a new one.

Client state that outlives a round (SCAFFOLD's c_i, the DP accountant) is kept by the
clients, on disk in their state folder (see ``fl_app/client_app.py: state_dir``), not
here. A round interrupted after some clients trained is trained again on resume:
SCAFFOLD's commit protocol drops the interrupted round's pending c_i+ (the server's
accepted map never saw it), and the DP accountant keeps that round's spend (its noise
was drawn), so a resumed DP run can only over-count epsilon, never under-count it.

The file is a pickle: load checkpoints only from folders you trust.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import write_atomic

CHECKPOINT = "checkpoint.pkl"
FORMAT = 1
# Keys a resumed run may change: where and how long it runs, not what it computes.
RESUMABLE_CHANGES = ("num-server-rounds", "resume-from", "results-dir", "run-name", "sweep-file",
                     "fail-after-round")


@dataclass
class Checkpoint:
    round: int  # the last complete round (0: before the first)
    arrays: dict[str, np.ndarray]  # the global model after that round
    strategy: dict[str, Any]  # strategies.state.capture of the strategy
    history: list[dict[str, Any]]  # summary.json's history up to that round
    rng: dict[str, Any]  # global random generators' states
    config: dict[str, Any]  # the resolved run config
    resumed_at: list[int] = field(default_factory=list)  # rounds this run was resumed after
    format: int = FORMAT


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.random.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])


def save(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically (temporary file, fsync, rename, fsync the folder)."""
    path = run_dir / CHECKPOINT
    write_atomic(path, lambda handle: pickle.dump(checkpoint, handle,
                                                  protocol=pickle.HIGHEST_PROTOCOL))
    return path


def load(run_dir: Path) -> Checkpoint:
    """The checkpoint of the run in ``run_dir``; ValueError naming the problem."""
    path = Path(run_dir) / CHECKPOINT
    if not Path(run_dir).is_dir():
        raise ValueError(f"Run config 'resume-from' = {str(run_dir)!r} is not a folder; "
                         "accepted: the folder of an earlier run (it holds checkpoint.pkl)")
    if not path.is_file():
        raise ValueError(f"Run config 'resume-from': {run_dir} holds no {CHECKPOINT}; only runs "
                         "that checkpointed (checkpoint = true) can be resumed")
    try:
        with open(path, "rb") as handle:
            checkpoint = pickle.load(handle)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"Run config 'resume-from': cannot read {path} ({type(err).__name__}: "
                         f"{err})") from None
    if not isinstance(checkpoint, Checkpoint) or checkpoint.format != FORMAT:
        raise ValueError(f"Run config 'resume-from': {path} is not a checkpoint of this app's "
                         f"format {FORMAT}")
    return checkpoint


def check_resumable(checkpoint: Checkpoint, config: dict[str, Any], path: Path) -> None:
    """The run config must be the checkpoint's, up to ``RESUMABLE_CHANGES``, and leave
    rounds to do; raises ValueError naming every differing key."""
    differ = sorted(k for k in set(config) | set(checkpoint.config)
                    if k not in RESUMABLE_CHANGES and config.get(k) != checkpoint.config.get(k))
    if differ:
        detail = ", ".join(f"{k}: {checkpoint.config.get(k)!r} -> {config.get(k)!r}" for k in differ)
        raise ValueError(f"Run config 'resume-from' = {str(path)!r}: the run config differs from "
                         f"the checkpoint's in {detail}; a resumed run must be the same run "
                         f"(only {list(RESUMABLE_CHANGES)} may change)")
    total = int(config["num-server-rounds"])
    if total < checkpoint.round:
        raise ValueError(f"Run config 'num-server-rounds' = {total} is below the {checkpoint.round} "
                         f"rounds the checkpoint in {path} has done; it is the run's total")
