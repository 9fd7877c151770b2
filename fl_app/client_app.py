"""ClientApp: trains and evaluates on this node's partition.

The node's partition comes from its node config (``partition-id``, ``num-partitions``:
``flower-supernode --node-config`` in deployment), or, inside Flower's simulation engine
only, from the server's assignment that every message carries (fl_app/assignment.py).
The run config comes with every message (``wire.RUN_CONFIG``), validated again here, so
the server alone decides what a round means (a sweep changes it between runs).
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

import strategies
from partitions import DatasetInfo, dataset_info, load_client_data
from partitions.device import cached_client_data, load_device_data, read_device_data

from fl_common import wire
from .assignment import AssignmentRefused, node_partition
from .attacks import client_attack
from . import privacy_policy
from .privacy_policy import NodePolicy
from .user_dp_client import central_dp_gate
from .faults import fault_mod
from .node_runtime import node_runtime_mod
from .config import RunConfig
from .secagg_client import secagg_gate
from .model import INIT_SEED_TAG, build_model
from strategies.fedlora import BASE_KEY, BASE_PATH, BaseRefused
from fl_common.randomness import derive_seed

from .training import evaluate, resolve_device, train_local

app = ClientApp()
# Environment variable (set where `ray start` runs): log which Ray node trains each message
# (simulation on a Ray cluster; docs/deployment.md)
LOG_PLACEMENT = "FL_APP_LOG_PLACEMENT"
FINETUNE_TAG = 0xF17  # separates the evaluation fine-tuning's batches from training's


@lru_cache(maxsize=8)
def _run_config(text: str) -> RunConfig:
    return RunConfig.from_json(text)


def _info(msg: Message, cfg: RunConfig) -> DatasetInfo:
    """Image shape and classes from the message (the server sends them), else from the
    run's dataset (a benchmark partition needs the dataset anyway)."""
    config = msg.content[wire.CONFIG]
    if wire.IMAGE_SHAPE in config and wire.NUM_CLASSES in config:
        shape = tuple(int(v) for v in config[wire.IMAGE_SHAPE])
        return DatasetInfo(shape, int(config[wire.NUM_CLASSES]), 0, 0)  # type: ignore[arg-type]
    return dataset_info(cfg.dataset)


def node_data(cfg: RunConfig, info: DatasetInfo, context: Context, pid: int, num: int):
    """This node's data: its own (node config ``data-path``) or benchmark partition ``pid``."""
    if wire.DATA_PATH in context.node_config:
        return load_device_data(str(context.node_config[wire.DATA_PATH]), info,
                                validation_fraction=float(cfg.validation_fraction),
                                seed=derive_seed(cfg.seed, pid))
    if wire.CACHE_DIR in context.node_config:  # deployment: outlive the ClientApp process
        return cached_client_data(str(context.node_config[wire.CACHE_DIR]), cfg.data, pid, num,
                                  lambda: load_client_data(cfg.data, pid, num))
    return load_client_data(cfg.data, pid, num)


def _setup(msg: Message, context: Context, folder: str | None):
    """The run config, this node's partition, data and model: the run's initial model
    (every client starts its own layers where the server's model starts) with what the
    message carried loaded by the strategy's payload (and, for a payload that keeps
    layers on the client, this client's own)."""
    cfg = _run_config(str(msg.content[wire.CONFIG][wire.RUN_CONFIG]))
    pid, num = node_partition(context, msg)
    info = _info(msg, cfg)
    data = node_data(cfg, info, context, pid, num)
    model = build_model(info, seed=derive_seed(cfg.seed, INIT_SEED_TAG), kind=cfg.model)
    payload = strategies.spec(cfg.strategy).payload(cfg)
    payload.load(model, msg.content[wire.ARRAYS], _local(msg, context, pid, folder))
    return cfg, pid, num, data, model.to(resolve_device(cfg.device))


def _local(msg: Message, context: Context, pid: int, folder: str | None) -> strategies.ClientLocal:
    """What stays on this client, and the message it serves."""
    config = msg.content[wire.CONFIG]
    server_round = int(config.get(wire.SERVER_ROUND, 0))
    return strategies.ClientLocal(context.state, folder, pid,
                                  str(config.get(wire.RUN_TAG, "")), server_round, msg.content,
                                  node_files=node_files(msg, context))


def node_files(msg: Message, context: Context) -> dict[str, str]:
    """Files this node provides to the strategy's payload: FedLoRA's pretrained base, from
    node config ``lora-base``; else, only inside Flower's simulation engine, the server's
    file (one machine); a deployed node never reads a file the server names."""
    if BASE_KEY in context.node_config:
        return {BASE_KEY: str(context.node_config[BASE_KEY])}
    config = msg.content.get(wire.CONFIG)
    path = config.get(BASE_PATH) if config is not None else None
    if path and privacy_policy.in_simulation():
        return {BASE_KEY: str(path)}
    return {}


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (for reproducible sampling),
    whether it keeps state across restarts, and, for a node with its own data, what the
    server asks for of its statistics (``wire.DATA_STATS``: under DP no label counts, in
    user mode no size either; a node with a privacy policy sends neither)."""
    pid, num = node_partition(context)
    metrics = MetricRecord({wire.PARTITION_ID: pid, wire.NUM_PARTITIONS: num,
                            wire.KEEPS_STATE: int(wire.NODE_STATE_DIR in context.node_config)})
    config = msg.content.get(wire.CONFIG)
    level = str(config.get(wire.DATA_STATS, "all")) if config is not None else "all"
    if NodePolicy.from_node_config(context.node_config) is not None:
        level = "none"
    if wire.DATA_PATH in context.node_config:
        metrics[wire.OWN_DATA] = 1
    if wire.DATA_PATH in context.node_config and level != "none":
        data = read_device_data(Path(str(context.node_config[wire.DATA_PATH])).expanduser())
        metrics[wire.DATA_SIZE] = len(data)
        if level == "all":
            metrics[wire.LABEL_COUNTS] = [int(c) for c in np.bincount(data.y)]
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)


def state_dir(msg: Message, context: Context) -> tuple[str | None, bool]:
    """Where this client keeps state that must survive a restart (SCAFFOLD's c_i, the DP
    accountant), and whether that folder is the node's own (deployment: its accountant
    then spans every run on its data).

    Node config ``state-dir`` first; else, only inside Flower's simulation engine, the
    run's client-state folder the server sends (server and clients share one machine
    there); a deployed node ignores a server-sent folder (a server must not choose where
    a device writes); else nowhere (Context.state only)."""
    if wire.NODE_STATE_DIR in context.node_config:
        return str(context.node_config[wire.NODE_STATE_DIR]), not privacy_policy.in_simulation()
    folder = msg.content[wire.CONFIG].get(wire.CLIENT_STATE_DIR)
    if folder and privacy_policy.in_simulation():
        return str(folder), False
    if folder:
        log(WARNING, "Ignoring the server's '%s' outside simulation: set node config '%s'",
            wire.CLIENT_STATE_DIR, wire.NODE_STATE_DIR)
    return None, False


def _refused(msg: Message, code: int, reason: str) -> Message:
    log(WARNING, "Refusing the %s message: %s", msg.metadata.message_type, reason)
    return Message(error=Error(code=code, reason=reason), reply_to=msg)


# Mods listed first wrap outermost: the node's threads are set first (fl_app/node_runtime.py);
# SecAgg+ masks what user-level DP's clipping left of what a (simulated) faulty client replied.
@app.train(mods=[node_runtime_mod, secagg_gate, central_dp_gate, fault_mod])
def train(msg: Message, context: Context) -> Message:
    cfg = _run_config(str(msg.content[wire.CONFIG][wire.RUN_CONFIG]))
    # The node's own rules first, before its data is touched (fl_app/privacy_policy.py).
    try:
        policy = NodePolicy.from_node_config(context.node_config)
    except ValueError as err:
        return _refused(msg, wire.DP_POLICY_ERROR_CODE, f"{wire.DP_POLICY_REFUSED}: {err}")
    if policy is not None and (reason := policy.refuse_run(cfg)):
        return _refused(msg, wire.DP_POLICY_ERROR_CODE, reason)
    folder, node_scope = state_dir(msg, context)
    sample_dp = cfg.dp and cfg.dp_mode == "sample"
    if sample_dp and folder is None and not privacy_policy.in_simulation():
        return _refused(msg, wire.DP_POLICY_ERROR_CODE, (
            f"{wire.DP_POLICY_REFUSED}: sample-level DP on a deployed node needs node config "
            f"'{wire.NODE_STATE_DIR}', so that its spend survives a restart and composes "
            "across runs"))
    try:
        cfg, pid, num, data, model = _setup(msg, context, folder)
    except BaseRefused as err:  # FedLoRA: no base here, or another one
        return _refused(msg, wire.BASE_ERROR_CODE, f"{wire.BASE_REFUSED}: {err}")
    except AssignmentRefused as err:  # a deployed node is never told its partition
        return _refused(msg, wire.ASSIGNMENT_ERROR_CODE, str(err))
    server_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
    if os.environ.get(LOG_PLACEMENT) and (node := privacy_policy.ray_node_id()) is not None:
        log(INFO, "placement: ray-node=%s partition=%d round=%d", node, pid, server_round)
    spec = strategies.spec(cfg.strategy)
    payload = spec.payload(cfg)
    half = spec.client_half(strategies.ClientInputs(
        model, msg.content, context.state, float(cfg.lr), pid, folder,
        local=_local(msg, context, pid, folder), payload=payload))
    # Simulated Byzantine client (test facility, off by default): see fl_app/attacks.py.
    attack = client_attack(cfg, pid, num, server_round)
    train_data = attack.data(data.train, _info(msg, cfg).num_classes) if attack else data.train
    user_dp = cfg.dp and cfg.dp_mode == "user"  # the update is clipped by central_dp_gate
    dp_round = None
    if sample_dp:  # DP-SGD; the spend composes over every round (and run, on a deployed node)
        from .privacy import ClientRound  # imports Opacus: only when DP is on

        dp_round = ClientRound(cfg, context.state, folder,
                              run_tag=str(msg.content[wire.CONFIG][wire.RUN_TAG]),
                              partition_id=pid, num_examples=len(train_data),
                              server_round=server_round, node_scope=node_scope, policy=policy)
        if reason := dp_round.policy_refusal():
            return _refused(msg, wire.DP_POLICY_ERROR_CODE, reason)
        if reason := dp_round.over_budget():
            return Message(error=Error(code=wire.DP_BUDGET_ERROR_CODE, reason=reason), reply_to=msg)
    started = time.perf_counter()
    result = train_local(
        model,
        train_data,
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=float(cfg.lr),
        momentum=float(cfg.momentum),
        seed=derive_seed(cfg.seed, server_round, pid),
        hooks=half.hooks,
        dp=dp_round.dpsgd if dp_round else None,
    )
    seconds = time.perf_counter() - started
    model.to("cpu")  # the reply (and the client half's arrays) in host memory
    arrays = payload.reply(model)
    if attack is not None:
        x = {k: a.numpy() for k, a in msg.content[wire.ARRAYS].items()}
        y = attack.update(x, {k: a.numpy() for k, a in arrays.items()})
        arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in y.items()})
    for key, value in half.finish(model, result.steps).items():
        arrays[key] = Array(value)
    dp_metrics = dp_round.finish() if dp_round else {}
    # Under DP (either mode) the training loss and accuracy stay on the client: they are
    # computed on the private data without noise, so they would leak around the guarantee.
    plain = {} if cfg.dp else {wire.TRAIN_LOSS: result.loss, wire.TRAIN_ACCURACY: result.accuracy}
    # User-level DP: equal weights (the mean the server's noise is calibrated for), and
    # nothing that reveals a client's data size, which is its private data too (the
    # steps and the seconds of an epoch grow with it).
    sizes = {} if user_dp else {wire.LOCAL_STEPS: result.steps, wire.LOCAL_SECONDS: seconds}
    metrics = MetricRecord({
        wire.NUM_EXAMPLES: 1 if user_dp else result.num_examples,
        **plain,
        **sizes,
        **half.metrics(),
        **dp_metrics,
    })
    content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: metrics})
    return Message(content, reply_to=msg)


@app.evaluate(mods=[node_runtime_mod])
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Loss and accuracy on this node's validation data. Under DP (either mode) refused:
    those metrics are computed on private data without noise, outside the guarantee
    (the server turns federated evaluation off under DP; this is the node's own check)."""
    cfg = _run_config(str(msg.content[wire.CONFIG][wire.RUN_CONFIG]))
    if cfg.dp:
        return _refused(msg, wire.DP_POLICY_ERROR_CODE, (
            f"{wire.DP_POLICY_REFUSED}: federated evaluation under DP would send un-noised "
            "metrics of private validation data; it is off with dp = true"))
    try:
        cfg, pid, _, data, model = _setup(msg, context, state_dir(msg, context)[0])
    except BaseRefused as err:
        return _refused(msg, wire.BASE_ERROR_CODE, f"{wire.BASE_REFUSED}: {err}")
    except AssignmentRefused as err:
        return _refused(msg, wire.ASSIGNMENT_ERROR_CODE, str(err))
    if cfg.eval_finetune_epochs:  # personalization baseline: fine-tune a copy, then score
        server_round = int(msg.content[wire.CONFIG].get(wire.SERVER_ROUND, 0))
        train_local(model, data.train, epochs=cfg.eval_finetune_epochs, batch_size=cfg.batch_size,
                    lr=float(cfg.lr), momentum=float(cfg.momentum),
                    seed=derive_seed(cfg.seed, FINETUNE_TAG, server_round, pid))
    loss, accuracy = evaluate(model, data.val)
    metrics = MetricRecord({
        wire.NUM_EXAMPLES: len(data.val),
        wire.VAL_LOSS: loss,
        wire.VAL_ACCURACY: accuracy,
    })
    if strategies.spec(cfg.strategy).traits.personalized or cfg.eval_finetune_epochs:  # the spread
        metrics[wire.VAL_ACCURACY_SQ] = accuracy ** 2
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)
