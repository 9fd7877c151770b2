"""ServerApp: validates the run config, checks the split, runs the strategy, records it.

One ``flwr run`` executes one run, or, with ``sweep-file``, a list of runs one after
another on the same nodes (the simulation's start-up is paid once). Before any training:
the config is validated, the nodes are asked which partition they hold (in simulation
none is asked: the server assigns the partitions, fl_app/nodes.py), and the split is
computed and checked (every partition at least 2 samples); any problem raises here.
"""

from __future__ import annotations

import os
import shutil
import time
import traceback
from contextlib import contextmanager
from datetime import datetime
from logging import DEBUG, ERROR, INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid
from flwr.supercore import log

import strategies
from fl_common import wire
from fl_common.randomness import derive_seed
from partitions import dataset_info, load_test_data, plot_label_distribution, preflight
from strategies.grid_wrapper import PromptPollingGrid
from strategies.secagg import SecAggSettings
from strategies.state import capture, restore

from . import checkpoint as ckpt
from .assembly import Split, assemble, the_split
from .config import RunConfig, load_sweep
from .model import INIT_SEED_TAG, build_model, num_parameters
from .nodes import AssigningGrid, NodeDirectory
from .results import RunRecorder, fresh_run_dir, is_complete, resolve_results_dir
from .training import evaluate, resolve_device

app = ServerApp()

LABEL_PLOT = "label_distribution.png"
# More bars than this make an unreadable picture that costs ~10 s per 1,000 partitions
# (measured); summary.json's label_counts hold the numbers at any scale.
LABEL_PLOT_MAX_PARTITIONS = 100
CLIENT_STATE = "client-state"  # in simulation: the clients' state folder, in the run folder
NODE_WAIT_TIMEOUT = 600.0
ALL_NODES_GRACE = 60.0  # seconds a deployment waits for every partition's node
SIMULATION_NODE_GRACE = 10.0  # seconds for the simulation engine to register its nodes


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = NODE_WAIT_TIMEOUT) -> list[int]:
    """The connected node ids, once at least ``minimum`` are connected.

    In simulation the node count is fixed for the run (``num-supernodes``): too few
    nodes fail at once (after a short grace for the engine to register them), naming
    both settings, instead of waiting ``timeout`` for nodes that can never come.
    """
    simulation = is_simulation(grid)
    deadline = time.monotonic() + (SIMULATION_NODE_GRACE if simulation else timeout)
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            if simulation:
                raise ValueError(
                    f"The simulation has {len(nodes)} node(s) ('num-supernodes' in the "
                    f"federation config) but 'min-train-nodes' = {minimum}: no round could "
                    f"ever run. Set num-supernodes >= {minimum} (flwr run . "
                    f"--federation-config 'num-supernodes={minimum}') or lower "
                    "'min-train-nodes'")
            raise RuntimeError(
                f"Only {len(nodes)} node(s) connected after {timeout:.0f}s; "
                f"'min-train-nodes' asks for {minimum}"
            )
        log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), minimum)
        time.sleep(1.0)
    return nodes


def check_results_dir(results_dir: str) -> None:
    """``results-dir`` must be a directory this process can create and write into."""
    path = resolve_results_dir(results_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"Run config 'results-dir' = {results_dir!r} ({path}) is not a "
                         f"writable directory: {err.strerror or err}") from err


def is_simulation(grid: Grid) -> bool:
    """True when the ServerApp runs in Flower's simulation engine (its in-memory grid)."""
    return isinstance(grid, InMemoryGrid)


def check_test_facilities(cfg: RunConfig, grid: Grid, num_partitions: int) -> None:
    """Simulated attacks and faults exist only in simulation, with no more attackers than
    partitions."""
    if cfg.fault_kind != "none" and not is_simulation(grid):
        raise ValueError(f"Run config 'fault-kind' = {cfg.fault_kind!r} is a simulation-only "
                         "test facility; outside simulation it must be \"none\"")
    if cfg.attack == "none":
        return
    if not is_simulation(grid):
        raise ValueError(f"Run config 'attack' = {cfg.attack!r} is a simulation-only test "
                         f"facility; outside simulation it must be \"none\"")
    if cfg.num_attackers > num_partitions:
        raise ValueError(f"Run config 'num-attackers' = {cfg.num_attackers} exceeds the "
                         f"{num_partitions} partitions; accepted: 1 to {num_partitions}")


SEEDED_WARNING = ("dp-randomness = \"seeded\": the DP noise and Poisson batches are derived "
                  "from the run config's seed; they give NO guarantee against anyone who "
                  "knows it (the server, every client). For experiments only")


def check_dp_deployment(cfg: RunConfig, grid: Grid, nodes: NodeDirectory,
                        node_ids: list[int]) -> None:
    """Deployment: sample-level DP needs every node to keep its accountant across restarts
    (node config ``state-dir``; the nodes say so in the query reply), or a restart would
    forget its spend; refused before training, naming the partitions."""
    if not (cfg.dp and cfg.dp_mode == "sample") or is_simulation(grid):
        return
    if missing := nodes.without_state(node_ids):
        raise ValueError(
            f"Run config 'dp' = true (dp-mode \"sample\") in deployment needs every SuperNode "
            f"to keep its privacy accountant across restarts; the node(s) of partition(s) "
            f"{missing} have no node config '{wire.NODE_STATE_DIR}'. Start each with "
            f"--node-config '... {wire.NODE_STATE_DIR}=\"/path/on/the/node\"'")


def check_dp_randomness(cfg: RunConfig, grid: Grid) -> None:
    """Seeded DP randomness only in simulation, and said loudly there."""
    if not (cfg.dp and cfg.dp_randomness == "seeded"):
        return
    if not is_simulation(grid):
        raise ValueError("Run config 'dp-randomness' = \"seeded\" is accepted only in "
                         "simulation: it lets the server regenerate and remove every client's "
                         "DP noise. Use \"secure\" (the default) in deployment")
    log(WARNING, SEEDED_WARNING)


def _history_record(metrics: MetricRecord | None) -> dict:
    """MetricRecord entries as snake_case history fields ("val-accuracy" -> "val_accuracy")."""
    if metrics is None:
        return {}
    return {k.replace("-", "_"): v for k, v in metrics.items()}


def resume_point(cfg: RunConfig) -> tuple[ckpt.Checkpoint, Path] | None:
    """The checkpoint ``resume-from`` names, checked against ``cfg``; None for a new run.
    The folder must lie under ``results-dir`` (symbolic links resolved), and is returned
    resolved."""
    if not cfg.resume_from:
        return None
    path = ckpt.check_location(resolve_results_dir(cfg.resume_from),
                               resolve_results_dir(cfg.results_dir))
    checkpoint = ckpt.load(path)
    ckpt.check_resumable(checkpoint, cfg.resolved(), path)
    return checkpoint, path


class SimulatedFailure(RuntimeError):
    """Raised by run-config ``fail-after-round`` (a test facility)."""


def connect(grid: Grid, cfg: RunConfig, nodes: NodeDirectory) -> tuple[list[int], int]:
    """The nodes of the run and the number of partitions they say the federation has."""
    node_ids = wait_for_nodes(grid, cfg.min_train_nodes)
    num_partitions = nodes.num_partitions(node_ids)
    if len(node_ids) < num_partitions and not is_simulation(grid):
        # Deployment: give the other SuperNodes a moment, so that what they hold (their
        # sizes, their own data) is known before the run; then go on with those connected.
        try:
            node_ids = wait_for_nodes(grid, num_partitions, timeout=ALL_NODES_GRACE)
        except RuntimeError:
            node_ids = list(grid.get_node_ids())
            log(WARNING, "%d of %d partitions' nodes connected; the run starts with them",
                len(node_ids), num_partitions)
    return node_ids, num_partitions


def check_privacy(cfg: RunConfig, split: Split, model, num_partitions: int) -> None:
    """DP's own checks before training: delta, a reachable target, a model Opacus can
    privatize (sample level) or enough clients (user level)."""
    if not cfg.dp:
        return
    if cfg.dp_mode == "sample":
        from . import privacy  # imports Opacus: only when DP is on

        privacy.check_run(cfg, split.known_train or [cfg.max_num_examples], model)
    else:
        from strategies.user_dp import check_user_run

        check_user_run(cfg, num_partitions)
    if cfg.fraction_evaluate > 0:
        log(INFO, "Federated evaluation is off under DP: its metrics would leave the clients "
                  "un-noised ('fraction-evaluate' = %s not used; the server's central test "
                  "runs as usual)", cfg.fraction_evaluate)


def run_one(grid: Grid, cfg: RunConfig, nodes: NodeDirectory, run_dir_name: str,
            resume: tuple[ckpt.Checkpoint, Path] | None = None) -> dict:
    """Train one run config to the end and record it; returns its summary. ``resume``:
    the checkpoint to continue from and its run folder (``resume_point(cfg)``)."""
    node_ids, num_partitions = connect(grid, cfg, nodes)
    with refusal():
        strategies.check_feasible(cfg, len(node_ids))  # e.g. Krum's n >= 2f + 3
        check_test_facilities(cfg, grid, num_partitions)
        check_dp_randomness(cfg, grid)
        check_dp_deployment(cfg, grid, nodes, node_ids)
    info = dataset_info(cfg.dataset)
    split = the_split(cfg, nodes, node_ids, num_partitions, info.num_classes)
    spec = strategies.spec(cfg.strategy)
    test = load_test_data(cfg.dataset)
    model = build_model(info, seed=derive_seed(cfg.seed, INIT_SEED_TAG), kind=cfg.model)
    if cfg.init_from:  # e.g. full fine-tuning of FedLoRA's base (whole-model strategies only)
        start_from(model, cfg.init_from)
    payload = spec.payload(cfg)
    payload.check(model)  # e.g. FedPer's personal layers exist and leave a base to share
    initial = payload.initial(model)
    if spec.traits.personalized:
        log(INFO, "%s keeps part of the model on each client: the central test below uses "
                  "the initial %s and is not its metric; the personalized accuracy is the "
                  "federated evaluation's (val_accuracy, val_accuracy_std)", cfg.strategy,
            "personal layers")
    model.to(resolve_device(cfg.device))  # the server's evaluation runs there
    secagg = secagg_settings(cfg, split.known_train, len(node_ids)) if cfg.secagg else None
    check_privacy(cfg, split, model, num_partitions)
    # simulation: every message carries the node's assigned partition (fl_app/nodes.py)
    assembly = assemble(cfg, AssigningGrid(grid, nodes) if nodes.assign else grid, nodes, split,
                        num_partitions=num_partitions,
                        num_nodes=len(node_ids), secagg=secagg)
    strategy, run_grid = assembly.strategy, assembly.grid
    first_round = 1
    if resume is not None:  # the same folder and run name: clients find their state by it
        checkpoint, run_dir = resume
        initial = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in checkpoint.arrays.items()})
        restore(strategy, checkpoint.strategy)
        ckpt.restore_rng(checkpoint.rng)
        first_round = checkpoint.round + 1
        resumed_at = [*checkpoint.resumed_at, checkpoint.round]
        log(INFO, "Resuming run %s after round %d of %d", run_dir.name, checkpoint.round,
            cfg.num_server_rounds)
    else:
        run_dir = fresh_run_dir(resolve_results_dir(cfg.results_dir), run_dir_name)
        resumed_at = []
    recorder = RunRecorder(
        run_dir,
        cfg.resolved(),
        history=checkpoint.history if resume is not None else None,
        extra={
            **({"resumed_after_rounds": resumed_at} if resumed_at else {}),
            "num_partitions": num_partitions,
            "num_nodes": len(node_ids),
            "partition_sizes": split.sizes,
            "partition_train_sizes": split.train,
            "label_counts": split.counts,
            "data_source": {str(p): ("node data-path" if p in split.own else "benchmark partition")
                            for p in range(num_partitions)},
            **({"dp_randomness": {"mode": cfg.dp_randomness,
                                  "guarantee": "none against whoever knows the seed"
                                  if cfg.dp_randomness == "seeded" else
                                  "noise and batches keyed from each process's OS CSPRNG"}}
               if cfg.dp else {}),
            "model_parameters": num_parameters(model),
            "dataset": {"image_shape": list(info.image_shape), "num_classes": info.num_classes,
                        "num_train": info.num_train, "num_test": info.num_test},
        },
    )
    try:  # a picture of the split; a failure here must not cost the run
        if not split.own and num_partitions <= LABEL_PLOT_MAX_PARTITIONS:  # of the benchmark split
            plot_label_distribution(cfg.data, num_partitions, run_dir / LABEL_PLOT)
    except Exception as err:  # noqa: BLE001
        log(WARNING, "Could not draw the label distribution: %s", err)
    log(INFO, "Run %s: %s, %d partitions of %s (%s), results in %s", run_dir.name,
        cfg.strategy, num_partitions, cfg.dataset, cfg.partitioner, run_dir)
    clock = {"last": time.perf_counter()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        payload.load(model, arrays)
        loss, accuracy = evaluate(model, test)
        now = time.perf_counter()
        record = {"round": server_round, "test_accuracy": accuracy, "test_loss": loss,
                  "round_seconds": now - clock["last"] if server_round else 0.0}
        clock["last"] = now
        if server_round > 0:
            record.update(_history_record(strategy.last_train_metrics))
            record.update(_history_record(strategy.last_evaluate_metrics))
            if "val_accuracy_sq" in record and "val_accuracy" in record:  # the spread
                record["val_accuracy_std"] = float(np.sqrt(max(
                    0.0, record.pop("val_accuracy_sq") - record["val_accuracy"] ** 2)))
        if cfg.checkpoint:  # before the summary: a checkpoint never lags the history
            ckpt.save(run_dir, ckpt.Checkpoint(
                round=server_round, arrays={k: a.numpy() for k, a in arrays.items()},
                strategy=capture(strategy), history=[*recorder.history, record],
                rng=ckpt.rng_state(), config=cfg.resolved(), resumed_at=resumed_at))
        recorder.add_round(record)
        log(INFO, "[%s] round %d/%d: test accuracy %.4f, test loss %.4f", run_dir.name,
            server_round, cfg.num_server_rounds, accuracy, loss)
        if cfg.fail_after_round and server_round == cfg.fail_after_round:
            raise SimulatedFailure(f"fail-after-round = {server_round}: a simulated ServerApp "
                                   "failure (test facility)")
        return MetricRecord({"test-accuracy": accuracy, "test-loss": loss})

    def round_config() -> ConfigRecord:
        config = ConfigRecord({wire.RUN_CONFIG: cfg.to_json(), wire.RUN_TAG: run_dir.name,
                               wire.IMAGE_SHAPE: [int(v) for v in info.image_shape],
                               wire.NUM_CLASSES: int(info.num_classes),
                               **payload.round_config()})
        if cfg.checkpoint and is_simulation(grid):  # clients share this machine's disk
            config[wire.CLIENT_STATE_DIR] = str(run_dir / CLIENT_STATE)
        return config

    try:
        result = strategy.start(
            grid=run_grid,
            initial_arrays=initial,
            num_rounds=cfg.num_server_rounds,
            train_config=round_config(),
            evaluate_config=round_config(),
            evaluate_fn=evaluate_fn,
            timeout=float(cfg.round_timeout),
            first_round=first_round,
        )
    except Exception as err:
        recorder.fail(err)  # `flwr run` exits 0 anyway: the summary must say it failed
        raise
    final = result.arrays if len(result.arrays) else initial
    summary = recorder.finish(payload.final_state(model.to("cpu"), final))
    if summary["status"] != "completed":
        log(WARNING, "Run %s ended with status %s: no round's aggregate was kept; the final "
                     "model is the initial one", run_dir.name, summary["status"])
    log(INFO, "Run %s finished (%s): final test accuracy %.4f (summary: %s)", run_dir.name,
        summary["status"], summary["final_test_accuracy"], run_dir / "summary.json")
    return summary


def start_from(model, path: str) -> None:
    """Load run-config ``init-from`` (a file of fl_app.pretrain) into ``model``."""
    from strategies.fedlora import check_base_fits, read_base

    state, meta = read_base(path, key="init-from")
    check_base_fits(model, state, path, key="init-from")
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    log(INFO, "The model starts from %s (%s)", path, meta.get("source", "no source recorded"))


def secagg_settings(cfg: RunConfig, train_n: list[int], num_nodes: int) -> SecAggSettings:
    """The run's SecAgg+ settings, checked against the split and the sampled count."""
    if not train_n and cfg.secagg_max_weight == "auto":
        raise ValueError("Run config 'secagg-max-weight' = \"auto\" needs the nodes' data "
                         "sizes, which they keep private here; set it to a number >= the "
                         "largest client's training examples")
    largest = max(train_n, default=0)
    sampled = min(strategies.sampled_per_round(cfg, num_nodes), num_nodes)
    settings = cfg.secagg_settings(max_weight=float(largest or 1), sampled=sampled).check()
    if largest > settings.max_weight:
        raise ValueError(
            f"Run config 'secagg-max-weight' = {settings.max_weight:g} is below the largest "
            f"client's {largest} training examples: that client could never take part. "
            f"Set it >= {largest}, or \"auto\"")
    settings.check_sampled(sampled)
    log(INFO, "SecAgg+: %d shares, threshold %d, clipping range %g, quantization range %d, "
              "max weight %g", settings.num_shares, settings.threshold, settings.clipping_range,
        settings.quantization_range, settings.max_weight)
    return settings


class RunRefused(ValueError):
    """A run config refused before training: the reason alone, no traceback chain."""


@contextmanager
def refusal():
    """Checks before training: a ValueError becomes one ERROR line with the reason, first
    (the traceback that led to it goes to the DEBUG log, not the console), and a short
    RunRefused, so that Flower's own report of the failure ends with the same reason."""
    try:
        yield
    except RunRefused:
        raise
    except ValueError as err:
        log(ERROR, "Run refused before training: %s", err)
        log(DEBUG, "Where the refusal came from:\n%s", traceback.format_exc())
        raise RunRefused(str(err)) from None


@app.main()
def main(grid: Grid, context: Context) -> None:
    if not is_simulation(grid):  # Flower's deployment grid pulls replies every 3 s
        grid = PromptPollingGrid(grid)
    with refusal():
        base = RunConfig.from_mapping(context.run_config)
        runs = load_sweep(base)  # every entry validated before the first run starts
        resumes = []
        for cfg in runs:  # before any node is asked anything
            check_results_dir(cfg.results_dir)
            resolve_device(cfg.device)  # 'cuda' on a server without a GPU fails here
            resumes.append(resume_point(cfg))  # a missing or bad checkpoint, or another config
            preflight(cfg.data)
    # What own-data nodes report of their data: nothing private under DP.
    stats = ("none" if any(c.dp and c.dp_mode == "user" for c in runs) else
             "size" if any(c.dp for c in runs) else "all")
    nodes = NodeDirectory(grid, data_stats=stats, assign=is_simulation(grid))
    node_ids = wait_for_nodes(grid, min(cfg.min_train_nodes for cfg in runs))
    num_partitions = nodes.num_partitions(node_ids)
    # Impossible splits, for every entry before the first run; the benchmark split is
    # drawn only if some node holds a benchmark partition (not its own data-path).
    draw = len(nodes.own_data_of) < num_partitions
    with refusal():
        for data in dict.fromkeys(cfg.data for cfg in runs):
            preflight(data, num_partitions, draw=draw)
    timestamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for i, (cfg, resume) in enumerate(zip(runs, resumes), start=1):
        name = cfg.run_name or cfg.default_run_name(timestamp)
        if base.sweep_file:
            run_dir = resolve_results_dir(cfg.results_dir) / name
            if is_complete(run_dir):
                log(INFO, "Sweep %d/%d: %s already complete, skipped", i, len(runs), name)
                continue
            if run_dir.exists():  # an interrupted earlier attempt: resume it, or keep it aside
                resumed, point = None, None
                try:
                    if cfg.checkpoint:
                        resumed = cfg.replace(**{"resume-from": str(run_dir)})
                        point = resume_point(resumed)
                except ValueError as err:
                    log(WARNING, "Sweep %d/%d: %s cannot be resumed (%s); set aside, started "
                                 "again", i, len(runs), name, err)
                    point = None
                if point is not None:
                    log(INFO, "Sweep %d/%d: %s resumed from its checkpoint", i, len(runs), name)
                    run_one(grid, resumed, nodes, name, point)
                    continue
                shutil.move(str(run_dir), str(run_dir.with_name(f"{name}.incomplete-{timestamp}")))
            log(INFO, "Sweep %d/%d: %s", i, len(runs), name)
        run_one(grid, cfg, nodes, name, resume)
