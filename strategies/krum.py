"""Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
https://proceedings.neurips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html

With n replies V_1..V_n of which at most f are Byzantine, and i -> j meaning that V_j is
one of the n - f - 2 replies closest to V_i (squared Euclidean distance, V_i excluded):

    score(i) = sum_{i -> j} ||V_i - V_j||^2
    Krum:        x <- V_{i*},  i* = argmin_i score(i)
    Multi-Krum:  x <- weighted mean of the m replies with the lowest scores

The paper proves Krum's resilience for n > 2f + 2, i.e. n >= 2f + 3; with fewer valid
replies a round is skipped (model unchanged, ``krum-skipped`` = 1 in the round metrics).
Multi-Krum's mean uses num-examples weights, as FedAvg does. Symbols: f =
``num-malicious``, m = ``num-selected`` (Krum is m = 1). Ties are broken by reply order
(the guard sorts replies by partition), so a run is reproducible.

Numerics, a deliberate departure from Flower's ``Krum``/``MultiKrum``
(``flwr/serverapp/strategy/multikrum.py``): Flower computes ||a||^2 + ||b||^2 - 2 a.b
between whole models in float32; when models are large and close the three terms cancel
and the distances are rounding noise (``tests/test_krum.py`` shows a case where its
selection is then wrong). Here the distances are between updates V_i - x (x the global
model the replies started from), centred on their mean and accumulated in float64, with
one matrix product (no Python loop over pairs or parameters).
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from threadpoolctl import threadpool_limits
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore import log

from .spec import StrategySpec, Traits, fedavg_kwargs

SKIPPED_METRIC = "krum-skipped"  # 1 when a round had fewer than 2f + 3 valid replies
SELECTED_METRIC = "krum-selected"  # how many replies went into the aggregate


# ------------------------------------------------------------------ pure math
def min_replies(num_malicious: int) -> int:
    """The fewest replies Krum's guarantee holds for: n >= 2f + 3."""
    return 2 * num_malicious + 3


def flatten_updates(records: list[ArrayRecord], reference: dict[str, np.ndarray]) -> np.ndarray:
    """An (n, d) float64 matrix of the updates V_i - x, in the reference's key order."""
    keys = list(reference)
    ref = np.concatenate([np.asarray(reference[k], np.float64).ravel() for k in keys])
    out = np.empty((len(records), ref.size), dtype=np.float64)
    for row, record in zip(out, records):
        start = 0
        for key in keys:
            values = record[key].numpy().ravel()
            end = start + values.size
            np.subtract(values, ref[start:end], out=row[start:end])  # exact in float64
            start = end
    return out


def pairwise_sq_distances(updates: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """Squared Euclidean distances between the rows of ``updates`` (float64).

    Rows are centred on their mean first (distances do not change; the cancellation in
    ||a||^2 + ||b||^2 - 2 a.b shrinks with the norms); negative rounding is clipped to 0
    and the diagonal is exactly 0. ``overwrite=True`` centres a float64 ``updates`` in
    place instead of copying it (it is 8 * n * d bytes).
    """
    centred = np.asarray(updates, dtype=np.float64)
    if overwrite:
        centred -= centred.mean(axis=0, keepdims=True)
    else:
        centred = centred - centred.mean(axis=0, keepdims=True)
    norms = np.einsum("ij,ij->i", centred, centred)
    # One BLAS thread: for this shape (small n, huge d) multithreaded OpenBLAS was 15-20x
    # slower whenever other processes kept the cores busy (docs/benchmarks.md).
    with threadpool_limits(limits=1, user_api="blas"):
        gram = centred @ centred.T
    dist = norms[:, None] + norms[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_scores(distances: np.ndarray, num_malicious: int) -> np.ndarray:
    """score(i): the sum of the n - f - 2 smallest distances from i to the others."""
    n = distances.shape[0]
    if n < min_replies(num_malicious):
        raise ValueError(f"Krum needs n >= 2f + 3 = {min_replies(num_malicious)} replies, got {n}")
    k = n - num_malicious - 2
    others = distances.astype(np.float64, copy=True)
    np.fill_diagonal(others, np.inf)
    nearest = np.partition(others, k - 1, axis=1)[:, :k]
    return nearest.sum(axis=1)


def select(scores: np.ndarray, num_selected: int) -> np.ndarray:
    """Indices of the ``num_selected`` lowest scores (ties: the earlier reply)."""
    if not 1 <= num_selected <= len(scores):
        raise ValueError(f"Cannot select {num_selected} of {len(scores)} replies")
    return np.argsort(scores, kind="stable")[:num_selected]


def validate_krum(num_malicious: int, num_selected: int | None) -> None:
    if not isinstance(num_malicious, int) or num_malicious < 0:
        raise ValueError(f"Krum num_malicious (f) must be an integer >= 0, got {num_malicious!r}")
    if num_selected is not None and (not isinstance(num_selected, int) or num_selected < 1):
        raise ValueError("Multi-Krum num_selected (m) must be an integer >= 1 or None (n - f), "
                         f"got {num_selected!r}")


# ------------------------------------------------------------------ strategy
class MultiKrum(FedAvg):
    """Multi-Krum (Krum for ``num_selected = 1``; ``None``: m = n - f, the n valid replies
    of the round less the f that may be Byzantine); see the module docstring."""

    def __init__(self, *, num_malicious: int = 0, num_selected: int | None = None,
                 **fedavg_kwargs) -> None:
        validate_krum(num_malicious, num_selected)
        super().__init__(**fedavg_kwargs)
        self.num_malicious = num_malicious
        self.num_selected = num_selected
        self.x: dict[str, np.ndarray] | None = None
        self.last_selected: list[int] = []  # node ids whose replies were aggregated

    def summary(self) -> None:
        log(INFO, "\t├──> %s: f = %d, m = %s (n >= %d replies per round)",
            "Krum" if self.num_selected == 1 else "Multi-Krum", self.num_malicious,
            "n - f" if self.num_selected is None else self.num_selected,
            min_replies(self.num_malicious))
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.x = {k: a.numpy() for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        self.last_selected = []
        if self.x is None:
            raise RuntimeError("Krum.aggregate_train called before configure_train")
        m = self.num_selected if self.num_selected is not None else len(valid) - self.num_malicious
        needed = max(min_replies(self.num_malicious), self.num_malicious + max(m, 1))
        if len(valid) < needed:
            log(WARNING, "Krum: %d valid replies, fewer than the %d that f = %d, m = %s need; "
                         "the model is left unchanged this round", len(valid), needed,
                self.num_malicious, m)
            return None, MetricRecord({SKIPPED_METRIC: 1, SELECTED_METRIC: 0})
        contents = [m.content for m in valid]
        records = [next(iter(c.array_records.values())) for c in contents]
        updates = flatten_updates(records, self.x)  # a fresh buffer: centre it in place
        scores = krum_scores(pairwise_sq_distances(updates, overwrite=True), self.num_malicious)
        chosen = select(scores, m)
        self.last_selected = [int(valid[i].metadata.src_node_id) for i in chosen]
        picked = [contents[i] for i in chosen]
        arrays = aggregate_arrayrecords(picked, self.weighted_by_key)
        metrics = self.train_metrics_aggr_fn(picked, self.weighted_by_key)
        metrics[SKIPPED_METRIC] = 0
        metrics[SELECTED_METRIC] = len(picked)
        return arrays, metrics


class Krum(MultiKrum):
    """Krum: the single reply with the lowest score becomes the model."""

    def __init__(self, *, num_malicious: int = 0, **fedavg_kwargs) -> None:
        super().__init__(num_malicious=num_malicious, num_selected=1, **fedavg_kwargs)


# Byzantine-robust rules need each client's update: refused under SecAgg+ and user-level DP.
ROBUST_REFUSALS = {
    "user_dp": "a robust rule (median, trimmed mean, Krum, Bulyan) does not compute",
    "secagg": "it needs each client's individual update, which secure aggregation exists to "
              "hide from the server (robust rules compare, sort or select individual replies)",
}
KRUM_TRAITS = Traits(min_replies=lambda f: 2 * f + 3, selects=True, refusals=ROBUST_REFUSALS)


def _num_selected(cfg) -> int | None:
    return None if cfg.num_selected == "auto" else int(cfg.num_selected)


def _check_num_selected(cfg, sampled: int) -> None:
    f = cfg.num_malicious
    if cfg.num_selected != "auto" and cfg.num_selected > sampled - f:
        raise ValueError(
            f"Run config 'num-selected' = {cfg.num_selected} exceeds n - f = {sampled} - {f} = "
            f"{sampled - f} (n: the {sampled} nodes sampled per round); accepted: 1 to "
            f"{sampled - f}, or \"auto\""
        )


KRUM_SPEC = StrategySpec(
    name="krum",
    reference="Blanchard et al., Machine Learning with Adversaries: Byzantine Tolerant "
              "Gradient Descent, NeurIPS 2017",
    build=lambda b: Krum(**fedavg_kwargs(b.cfg), num_malicious=b.cfg.num_malicious),
    traits=KRUM_TRAITS,
)
MULTIKRUM_SPEC = StrategySpec(
    name="multikrum",
    reference="Blanchard et al., NeurIPS 2017 (Multi-Krum, section 5)",
    build=lambda b: MultiKrum(**fedavg_kwargs(b.cfg), num_malicious=b.cfg.num_malicious,
                              num_selected=_num_selected(b.cfg)),
    traits=KRUM_TRAITS,
    check_sampled=_check_num_selected,
)
