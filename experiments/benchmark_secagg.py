"""What SecAgg+ costs: a training round with and without secure aggregation, as a ratio.

    python -m experiments.benchmark_secagg                       # 10, 20, 50 clients
    python -m experiments.benchmark_secagg --clients 10 --repeat 1

For n clients of a Fashion-MNIST split (60,000 x 0.9 / n training samples each), one
local epoch (batch 32, lr 0.05, one thread) of the app's CNN (46,826 parameters) and of a
~1M-parameter MLP (784-1024-256-10: 1,068,810 parameters), and with ``--models
cnn-lora4`` FedLoRA's client model (the CNN on bases/cnn-fmnist-mnist.npz with rank-4
adapters: 4,846 values travel and are masked, against 46,826), in one process:

- ``train``: one client's local epoch, times n (the clients of a round share the machine);
- ``plain``: the round's messages serialized and parsed as between SuperLink and
  SuperNode (Flower's protobuf serde), and ``Guarded(FedAvg)`` aggregating the n replies;
- ``secagg``: the same round through ``strategies.secagg.SecureAggregationGrid`` and
  Flower's ``secaggplus_mod`` on every node (4 stages, serialized; key agreement,
  Shamir shares, masking, unmasking), defaults of the run config (5 shares, threshold 3).

Ratio = (train + secagg) / (train + plain): the compute a round costs. Not included: the
three extra message round trips per round, whose latency depends on the transport
(measured separately in flwr run, docs/secure-aggregation.md). Results are appended to
docs/benchmarks/secagg_overhead.jsonl (``--no-record``: printed only, e.g. under a
profiler); each record names the mask expansion the clients and the server used
(``mask_prg``: since issue 20, AES-256-CTR keyed by HKDF-SHA256 of the seed,
strategies/secagg_prg.py; records without the field used Flower's MT19937
``pseudo_rand_gen``).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fl_common import wire
from fl_app.config import default_run_config
from fl_app.model import build_model
from fl_app.training import train_local
from partitions import DataConfig, dataset_info, load_client_data
from strategies.guard import ExampleLimits, Guarded
from strategies.secagg import SecAggSettings, SecureAggregationGrid
from strategies.validation import array_spec
from tests.helpers import LoopbackGrid, Node, wire_roundtrip

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "secagg_overhead.jsonl"
MASK_PRG = "aes-256-ctr/hkdf-sha256"  # strategies/secagg_prg.py, on clients and server


def mlp_1m(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256),
                         nn.ReLU(), nn.Linear(256, num_classes))


LORA_BASE = Path(__file__).resolve().parent.parent / "bases" / "cnn-fmnist-mnist.npz"


def make_model(kind: str) -> nn.Module:
    """``cnn``, ``mlp-1m``, or ``cnn-lora<r>``: the CNN on the Fashion-MNIST base of bases/
    with rank-r adapters (FedLoRA's client model: only the adapters and the head train)."""
    if kind.startswith("cnn-lora"):
        from strategies.fedlora import LoRAAdapters

        model = build_model(dataset_info("fashion-mnist"), seed=0)
        rank = int(kind[len("cnn-lora"):])
        LoRAAdapters(rank, 2.0 * rank, "auto", True, str(LORA_BASE), 0).prepare(model, str(LORA_BASE))
        return model
    return build_model(dataset_info("fashion-mnist"), seed=0) if kind == "cnn" else mlp_1m()


def travelling(model: nn.Module) -> dict[str, np.ndarray]:
    """What a reply carries: every trainable parameter (the whole model, or FedLoRA's
    adapters and head)."""
    if all(p.requires_grad for p in model.parameters()):
        return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    return {k: p.detach().numpy().copy() for k, p in model.named_parameters() if p.requires_grad}


def epoch_seconds(kind: str, n_clients: int) -> float:
    data = load_client_data(DataConfig("fashion-mnist", "iid", 0.5, 2, 2, 0.1, 0), 0, n_clients).train
    model = make_model(kind)
    started = time.perf_counter()
    train_local(model, data, epochs=1, batch_size=32, lr=0.05, seed=1)
    return time.perf_counter() - started


def round_seconds(kind: str, n: int, secure: bool) -> float:
    x = travelling(make_model(kind))
    rng = np.random.default_rng(1)
    nodes = {1000 + i: Node(1000 + i, i, {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
                                          for k, v in x.items()}, 60_000 * 0.9 / n)
             for i in range(n)}
    loop = LoopbackGrid(nodes)
    strategy = Guarded(FedAvg(fraction_train=1.0, min_train_nodes=n, min_available_nodes=n),
                       example_limits=ExampleLimits(default=10**6))
    config = ConfigRecord({wire.RUN_CONFIG: json.dumps(default_run_config())})
    arrays = ArrayRecord({k: Array(v) for k, v in x.items()})
    started = time.perf_counter()
    messages = strategy.configure_train(1, arrays, config, loop)
    if secure:
        settings = SecAggSettings(num_shares=5, threshold=3, clipping_range=8.0,
                                  quantization_range=2**22, max_weight=60_000 * 0.9 / n,
                                  timeout=600.0)
        grid = SecureAggregationGrid(loop, settings, reply_spec=array_spec, rng=random.Random(0))
        replies = grid.send_and_receive(messages)
    else:
        replies = []
        for msg in messages:
            msg = wire_roundtrip(msg)
            node = nodes[msg.metadata.dst_node_id]
            replies.append(wire_roundtrip(node.handler(msg, node.context)))
    out, _ = strategy.aggregate_train(1, replies)
    assert out is not None
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp-1m"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--flower-prg", action="store_true",
                        help="expand masks with Flower's 32-bit pseudo_rand_gen on clients and "
                             "server (the code before issue 20), for a before/after comparison")
    parser.add_argument("--no-record", action="store_true",
                        help="print the figures without appending them to " + str(OUT.name))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    prg = MASK_PRG
    if args.flower_prg:  # measurement only: the insecure expansion, on both sides
        import fl_app.secagg_client
        import strategies.secagg
        from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

        fl_app.secagg_client._GATE_PRG = pseudo_rand_gen
        strategies.secagg.mask_arrays = pseudo_rand_gen
        prg = "flower-mt19937 (measurement only)"
    from flwr.supercore.task_identity import TaskIdentity  # messages outside a Flower process

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    for kind in args.models:
        params = sum(v.size for v in travelling(make_model(kind)).values())  # the values masked
        for n in args.clients:
            best = {"epoch": float("inf"), "plain": float("inf"), "secagg": float("inf")}
            for _ in range(args.repeat):  # interleaved: the machine is shared
                best["epoch"] = min(best["epoch"], epoch_seconds(kind, n))
                best["plain"] = min(best["plain"], round_seconds(kind, n, secure=False))
                best["secagg"] = min(best["secagg"], round_seconds(kind, n, secure=True))
            train = n * best["epoch"]
            ratio = (train + best["secagg"]) / (train + best["plain"])
            row = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "machine": platform.node(), "model": kind, "parameters": params, "clients": n,
                   "epoch_s": best["epoch"], "train_s": train, "plain_s": best["plain"],
                   "secagg_s": best["secagg"], "protocol_over_plain_s": best["secagg"] - best["plain"],
                   "round_ratio": ratio, "mask_prg": prg}
            print(f"{kind:7s} ({params:,} params) n={n:3d}: train {train:6.1f} s, plain messaging+"
                  f"aggregation {best['plain']:.2f} s, secagg {best['secagg']:.2f} s -> round "
                  f"{ratio:.3f}x", flush=True)
            if not args.no_record:
                with OUT.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
