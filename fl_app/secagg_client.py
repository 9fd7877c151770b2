"""SecAgg+, client side: Flower's ``secaggplus_mod`` behind a gate, and a layout adapter.

The protocol itself is Flower's (``flwr.client.mod.secaggplus_mod``: key agreement,
Shamir shares, masking, quantization); the server half is ``strategies/secagg.py``.
Two small pieces make it serve the Message-API train handler unchanged:

- ``secagg_gate`` applies the mod only to train messages that carry SecAgg+ stage
  configs (the mod raises on a plain train message), so one ClientApp serves runs with
  and without secure aggregation;
- ``_upload`` turns the handler's reply (``arrays`` / ``metrics``) into the legacy FitRes
  layout the mod reads (``compat.fitres_to_recorddict``). What it uploads is the
  *update*: y - x for the keys of the model it was sent, other arrays (SCAFFOLD's
  Delta c_i) as they are, in sorted key order, float64. It refuses (the node then counts
  as dropped and the server removes its masks) a reply that is not finite, whose
  ``num-examples`` exceeds the protocol's ``max_weight`` (the mod would only warn and the
  sum would overflow), or whose handler failed; and it counts the values the clipping
  range will cut (``secagg-clipped``, a plaintext metric), so that clipping is never
  silent.

Quantization rounds stochastically with NumPy's global generator; the adapter seeds it
from the run's seed, the round and the partition just before the mod quantizes, so a
seeded run is reproducible. The masks come from ``os.urandom`` inside the mod and stay
secret.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

from strategies.secagg import CLIPPED

from . import wire


def secagg_gate(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run ``secaggplus_mod`` on a train message that carries SecAgg+ stage configs."""
    if (msg.metadata.message_type == MessageType.TRAIN
            and RECORD_KEY_CONFIGS in msg.content.config_records):
        def adapted(inner: Message, ctx: Context) -> Message:
            return _upload(inner, call_next(inner, ctx), ctx)

        return secaggplus_mod(msg, context, adapted)
    return call_next(msg, context)


def upload_arrays(sent: dict[str, np.ndarray], reply: dict[str, np.ndarray]) -> list[np.ndarray]:
    """What a client uploads: reply - sent for the sent keys, other reply arrays as they
    are, in sorted key order, float64 (the server undoes it in ``strategies.secagg``)."""
    return [reply[k].astype(np.float64) - sent[k].astype(np.float64) if k in sent
            else reply[k].astype(np.float64) for k in sorted(reply)]


def clipped_count(arrays: list[np.ndarray], num_examples: float, max_weight: float,
                  clipping_range: float) -> int:
    """How many values ``secaggplus_mod`` will clip: it scales by n / max_weight, then
    clips to +-clipping_range."""
    ratio = num_examples / max_weight
    return int(sum(np.count_nonzero(np.abs(a) * ratio > clipping_range) for a in arrays))


def _upload(request: Message, reply: Message, context: Context) -> Message:
    if reply.has_error():
        raise RuntimeError(f"the train handler failed: {reply.error.reason}")
    arrays, metrics = reply.content[wire.ARRAYS], reply.content[wire.METRICS]
    sent = {k: a.numpy() for k, a in request.content[wire.ARRAYS].items()}
    values = upload_arrays(sent, {k: a.numpy() for k, a in arrays.items()})
    if not all(np.all(np.isfinite(v)) for v in values):
        raise ValueError("the reply is not finite; not uploading it")
    protocol = context.state.config_records[RECORD_KEY_STATE]
    max_weight = float(protocol["max_weight"])
    clipping_range = float(protocol["clipping_range"])
    n = float(metrics[wire.NUM_EXAMPLES])
    if not 0 < n <= max_weight:
        raise ValueError(f"num-examples = {n:g} is not in (0, secagg-max-weight = "
                         f"{max_weight:g}]: the weighted sum would overflow; raise "
                         "'secagg-max-weight'")
    plain = {k: v for k, v in metrics.items() if k != wire.NUM_EXAMPLES}
    plain[CLIPPED] = clipped_count(values, n, max_weight, clipping_range)
    fitres = FitRes(status=Status(code=Code.OK, message=""),
                    parameters=ndarrays_to_parameters(values),
                    num_examples=int(n) if float(n).is_integer() else n,  # type: ignore[arg-type]
                    metrics=plain)
    _seed_quantization(request, context)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=request)


def _seed_quantization(request: Message, context: Context) -> None:
    """Seed NumPy's global generator, which the mod's stochastic rounding draws from,
    from the run's seed, the round and this node's partition (stable across runs). The
    run config was validated by the train handler that just ran; only its seed is read."""
    import json

    from .training import derive_seed

    config = request.content[wire.CONFIG]
    seed = int(json.loads(str(config[wire.RUN_CONFIG]))["seed"])
    partition = int(context.node_config.get(wire.PARTITION_ID, 0))
    np.random.seed(derive_seed(seed, int(config[wire.SERVER_ROUND]), partition, 0x5EC))
