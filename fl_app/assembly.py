"""The server's run, assembled in one place from the run config and the strategy's spec.

``assemble`` builds, in this order (innermost first):

1. the strategy, from its spec (``strategies.spec(name).build``);
2. the simulated attack (a test facility, simulation only), if the run asks for one;
3. user-level DP (DP-FedAvg's mechanism on the clipped mean), with ``dp-mode = "user"``;
4. ``Guarded``: seeded sampling, reply validation against the spec's reply layout,
   rollback, round statistics; it attaches the spec's per-client records;
5. the SecAgg+ grid stage, with ``secagg = true``: the strategy sees one reply, the
   unmasked weighted mean.

Which layers a strategy may have is decided by the config validation from the spec's
traits (``fl_app/config.py``); nothing here names a strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

import strategies
from partitions import check_partitions, label_counts, train_sizes
from strategies.attack_sim import AttackSimulation
from strategies.guard import ExampleLimits, Guarded
from strategies.sampling import PartitionSampler
from strategies.secagg import SecAggSettings, SecureAggregationGrid
from strategies.validation import array_spec

from .attacks import attacker_partitions
from .config import RunConfig
from .nodes import NodeDirectory


@dataclass(frozen=True)
class Split:
    """What each partition holds, as far as the server knows it."""

    sizes: list[int | None]  # samples per partition (None: its node keeps it private)
    train: list[int | None]  # training examples per partition
    counts: dict[str, list[int] | None]  # label counts per partition (None: private)
    own: frozenset[int]  # partitions whose node trains on its own data (data-path)

    @property
    def known_train(self) -> list[int]:
        return [n for n in self.train if n is not None]

    @property
    def private(self) -> list[int]:
        return [pid for pid, n in enumerate(self.train) if n is None]

    def limits(self, max_num_examples: int) -> ExampleLimits:
        """The largest num-examples a reply may claim per partition: its known share (in
        simulation the server computed the split), else ``max-num-examples``."""
        return ExampleLimits(
            default=max_num_examples,
            train={pid: min(n, max_num_examples) for pid, n in enumerate(self.train)
                   if n is not None},
            evaluate={pid: min(size - n, max_num_examples)
                      for pid, (size, n) in enumerate(zip(self.sizes, self.train))
                      if n is not None and size is not None},
        )


def the_split(cfg: RunConfig, nodes: NodeDirectory, node_ids: list[int], num_partitions: int,
              num_classes: int) -> Split:
    """Nodes with their own data say what they hold (as far as the run's privacy level
    lets them); the benchmark partitions' split is computed here, as the nodes compute
    it, and checked (every partition at least 2 samples) before any training."""
    reported = nodes.own_data(node_ids, num_partitions, num_classes)
    if len(reported) == num_partitions:  # no benchmark split at all
        sizes = [reported[p][0] for p in range(num_partitions)]
        counts = {str(p): reported[p][1] for p in range(num_partitions)}
    else:  # benchmark partitions, where nodes with their own data replace theirs
        sizes = list(check_partitions(cfg.data, num_partitions))
        counts = label_counts(cfg.data, num_partitions)
        for pid, (size, own) in reported.items():
            sizes[pid], counts[str(pid)] = size, own
    split = Split(sizes, train_sizes(sizes, float(cfg.validation_fraction)), counts,
                  frozenset(reported))
    if split.private:
        log(INFO, "Partition(s) %s keep their data size private (DP or the node's own policy)",
            split.private)
        if strategies.spec(cfg.strategy).needs_sizes(cfg):
            raise ValueError(
                f"Strategy {cfg.strategy!r} as configured needs every node's data size (e.g. "
                f"SCAFFOLD's 'scaffold-weighting' = \"num-examples\"), and partition(s) "
                f"{split.private} keep theirs private; change the weighting or the strategy")
    return split


@dataclass
class Assembly:
    strategy: Guarded  # the outermost strategy: what the round loop runs
    grid: Grid  # the grid the round loop uses (the SecAgg+ stage, or the plain one)


def assemble(cfg: RunConfig, grid: Grid, nodes: NodeDirectory, split: Split, *,
             num_partitions: int, num_nodes: int, secagg: SecAggSettings | None) -> Assembly:
    """The wrapper stack of one run (see the module docstring)."""
    spec = strategies.spec(cfg.strategy)
    sampler = PartitionSampler(cfg.seed, nodes.discover)
    base: Strategy = spec.build(strategies.BuildInputs(
        cfg, num_partitions, sum(split.known_train), partition_of=sampler.partition_of.get))
    inner: Strategy = base
    if cfg.attack != "none":  # simulated Byzantine clients: a test facility
        inner = AttackSimulation(
            inner, attack=cfg.attack,
            attackers=attacker_partitions(cfg.seed, num_partitions, cfg.num_attackers),
            partition_of=sampler.partition_of.get, epsilon=float(cfg.attack_epsilon),
            selected=(lambda: base.last_selected) if spec.traits.selects else None)
    min_valid = cfg.min_train_nodes
    if cfg.dp and cfg.dp_mode == "user":  # DP-FedAvg: exactly m clipped updates per release
        from strategies.user_dp import UserLevelDP, user_noise

        m = min(strategies.sampled_per_round(cfg, num_nodes), num_nodes)
        inner = UserLevelDP(inner, noise_multiplier=user_noise(cfg),
                            clipping_norm=float(cfg.dp_max_grad_norm), num_sampled_clients=m,
                            delta=float(cfg.dp_delta), randomness=cfg.dp_randomness,
                            seed=cfg.seed, max_epsilon=float(cfg.dp_target_epsilon))
        min_valid = m
    strategy = strategies.guarded(cfg.strategy, base, inner=inner, sampler=sampler,
                                  min_valid_replies=min_valid,
                                  example_limits=split.limits(cfg.max_num_examples))
    run_grid = grid
    if secagg is not None:  # the strategy sees one reply: the unmasked weighted mean
        run_grid = SecureAggregationGrid(
            grid, secagg, reply_spec=strategies.reply_layout(cfg.strategy, base) or array_spec)
    return Assembly(strategy, run_grid)
