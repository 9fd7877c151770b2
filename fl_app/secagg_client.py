"""SecAgg+, client side: Flower's ``secaggplus_mod`` behind a gate, and a layout adapter.

The protocol itself is Flower's (``flwr.client.mod.secaggplus_mod``: key agreement,
Shamir shares, masking, quantization); the server half is ``strategies/secagg.py``.
Three small pieces make it serve the Message-API train handler unchanged and close
holes a malicious server or Flower's mask expansion would leave:

- ``secagg_gate`` applies the mod only to train messages that carry SecAgg+ stage
  configs (the mod raises on a plain train message), so one ClientApp serves runs with
  and without secure aggregation. Before the mod sees a request it refuses (an error
  reply, the mod untouched) what an honest server never sends: a setup whose
  reconstruction threshold is half the shares or less, and an unmask request that lists
  a node as both active and dead, lists this node as dead, or repeats a node (Flower's
  mod would answer with both kinds of share: the server could strip every mask off one
  client's upload).
- Mask expansion. While the gate runs the mod, the mod's masks come from
  ``strategies.secagg_prg.mask_arrays`` (AES-256-CTR keyed by HKDF-SHA256 of the whole
  32-byte seed) instead of Flower's ``pseudo_rand_gen`` (32-bit MT19937 seed). The mod
  looks the function up as the module global ``pseudo_rand_gen`` of
  ``flwr.client.mod.secure_aggregation.secaggplus_mod`` (``from ..secaggplus_utils
  import pseudo_rand_gen``, called twice in ``_collect_masked_vectors``); that one
  attribute is replaced, once, at import, by a dispatcher that calls ``mask_arrays``
  inside ``cryptographic_masks()`` (a ``ContextVar``, set only by the gate: per thread
  and per task) and Flower's own function everywhere else, so anything else in the
  process that uses Flower's mod keeps Flower's behaviour. If Flower stops calling it
  by that name, the import fails loudly instead of masking with the old expansion.
  The server unmasks with the same ``mask_arrays``.
- ``_upload`` turns the handler's reply (``arrays`` / ``metrics``) into the legacy FitRes
  layout the mod reads (``compat.fitres_to_recorddict``). What it uploads is the
  *update*: y - x for the keys of the model it was sent, other arrays (SCAFFOLD's
  Delta c_i) as they are, in sorted key order, float64, and then one array of
  ``strategies.secagg.SUMMED_SIZE`` values that carries the training loss and accuracy
  (and whether this client's clipping range cut a value) into the masked sum. In
  plaintext it sends only num-examples and, under DP, ``dp-epsilon``
  (``strategies.secagg.PLAINTEXT_METRICS``): no loss, accuracy, timing, step count or
  clipping count of its own. It refuses (the node then counts as dropped and the server
  removes its masks) a reply or a metric that is not finite, a ``num-examples`` above
  the protocol's ``max_weight`` (the mod would only warn and the sum would overflow),
  or a failed handler.

Quantization rounds stochastically with NumPy's global generator; the adapter seeds it
from the run's seed, the round and the partition just before the mod quantizes, so a
seeded run is reproducible. The masks' seeds come from ``os.urandom`` inside the mod and
stay secret.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
from flwr.app import Context, Error, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarray_to_bytes, ndarrays_to_parameters
from flwr.common.secure_aggregation import secaggplus_utils
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat

from strategies.secagg import (
    PLAINTEXT_METRICS,
    SUMMED_MEANS,
    summed_metrics,
    threshold_problem,
)
from strategies.secagg_prg import MAX_RANGE, mask_arrays

from fl_common import wire

SECAGG_REFUSED_CODE = 4273  # error code of a stage request this client refuses to answer
QUANTIZATION_TAG = 0x5EC  # separates the stochastic-rounding seed from other uses of `seed`

# ------------------------------------------------------------------ the mask expansion
_MOD = sys.modules[secaggplus_mod.__module__]  # flwr.client.mod.secure_aggregation.secaggplus_mod
_FLOWER_PRG = secaggplus_utils.pseudo_rand_gen
_GATE_PRG = mask_arrays  # what the mod expands masks with under the gate
_IN_GATE: ContextVar[bool] = ContextVar("secagg_cryptographic_masks", default=False)


def _dispatching_prg(seed: bytes, num_range: int,
                     dimensions_list: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """``secaggplus_mod``'s ``pseudo_rand_gen``: ours under the gate, Flower's elsewhere."""
    if _IN_GATE.get():
        return _GATE_PRG(seed, num_range, dimensions_list)
    return _FLOWER_PRG(seed, num_range, dimensions_list)


def _install_mask_expansion() -> None:
    current = getattr(_MOD, "pseudo_rand_gen", None)
    if current is _dispatching_prg or getattr(current, "__qualname__", "") == "_dispatching_prg":
        return  # installed already (this module imported twice, e.g. reloaded)
    if current is not _FLOWER_PRG:
        raise RuntimeError(
            f"{_MOD.__name__}.pseudo_rand_gen is not Flower's secaggplus_utils.pseudo_rand_gen "
            f"(got {current!r}): Flower changed how its SecAgg+ mod expands masks, so "
            "fl_app/secagg_client.py cannot replace the 32-bit expansion; review it")
    _MOD.pseudo_rand_gen = _dispatching_prg


_install_mask_expansion()


@contextmanager
def cryptographic_masks() -> Iterator[None]:
    """Within this block (this thread / task only), Flower's mod expands its masks with
    ``strategies.secagg_prg.mask_arrays``."""
    token = _IN_GATE.set(True)
    try:
        yield
    finally:
        _IN_GATE.reset(token)


# ------------------------------------------------------------------ the gate
def secagg_gate(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Run ``secaggplus_mod`` on a train message that carries SecAgg+ stage configs."""
    if (msg.metadata.message_type == MessageType.TRAIN
            and RECORD_KEY_CONFIGS in msg.content.config_records):
        reason = refusal(msg)
        if reason:
            return Message(error=Error(code=SECAGG_REFUSED_CODE, reason=reason), reply_to=msg)

        def adapted(inner: Message, ctx: Context) -> Message:
            return _upload(inner, call_next(inner, ctx), ctx)

        stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)  # the mod pops it
        with cryptographic_masks():
            out = secaggplus_mod(msg, context, adapted)
        if stage == Stage.COLLECT_MASKED_VECTORS and not out.has_error():
            _narrow_upload(out)
        return out
    return call_next(msg, context)


def _narrow_upload(reply: Message) -> None:
    """Send the masked vector as uint32, not the mod's int64: every value is below the
    modulus, at most 2^32 (the setup refuses more), so nothing is lost, and the upload
    is as large as a plain float32 reply instead of twice that."""
    record = reply.content.config_records[RECORD_KEY_CONFIGS]
    record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(bytes_to_ndarray(b).astype(np.uint32))
                                     for b in record[Key.MASKED_PARAMETERS]]


def refusal(msg: Message) -> str | None:
    """Why this client refuses the server's stage request, or None (see the module doc)."""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP:
        shares, threshold = configs.get(Key.SHARE_NUMBER), configs.get(Key.THRESHOLD)
        if not isinstance(threshold, int) or not isinstance(shares, int) or threshold < 2:
            return (f"SecAgg+ setup refused: reconstruction threshold {threshold!r} of "
                    f"{shares!r} shares is not an integer >= 2")
        if threshold_problem(shares, threshold):
            return (f"SecAgg+ setup refused: the server asks for a reconstruction threshold "
                    f"of {threshold} of {shares} shares; it must exceed half the shares, or "
                    f"a server could collect both kinds of share of one client")
        mod_range = configs.get(Key.MOD_RANGE)
        if not isinstance(mod_range, int) or not 2 <= mod_range <= MAX_RANGE:
            return f"SecAgg+ setup refused: modulus {mod_range!r} is not in [2, 2^32]"
    elif stage == Stage.UNMASK:
        active = configs.get(Key.ACTIVE_NODE_ID_LIST)
        dead = configs.get(Key.DEAD_NODE_ID_LIST)
        if not isinstance(active, list) or not isinstance(dead, list):
            return "SecAgg+ unmask refused: no active / dead node lists"
        both = sorted(set(active) & set(dead))
        if both:
            return (f"SecAgg+ unmask refused: node(s) {both} listed as both active and dead "
                    "(answering would give the server both the mask-seed share and the "
                    "pairwise-key share of a node)")
        if msg.metadata.dst_node_id in dead:
            return "SecAgg+ unmask refused: this node is listed as dead"
        if len(set(active)) != len(active) or len(set(dead)) != len(dead):
            return "SecAgg+ unmask refused: a node is listed twice"
    return None


# ------------------------------------------------------------------ the upload
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
    travelling = [*PLAINTEXT_METRICS, *SUMMED_MEANS]
    for name in travelling:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise ValueError(f"metric '{name}' = {value!r} is not finite; not uploading")
    protocol = context.state.config_records[RECORD_KEY_STATE]
    max_weight = float(protocol["max_weight"])
    clipping_range = float(protocol["clipping_range"])
    target_range = int(protocol["target_range"])
    n = float(metrics[wire.NUM_EXAMPLES])
    if not 0 < n <= max_weight:
        raise ValueError(f"num-examples = {n:g} is not in (0, secagg-max-weight = "
                         f"{max_weight:g}]: the weighted sum would overflow; raise "
                         "'secagg-max-weight'")
    summed = dict(metrics=dict(metrics), num_examples=n, max_weight=max_weight,
                  clipping_range=clipping_range, quantization_range=target_range)
    extra = summed_metrics(clipped=False, **summed)
    clipped = clipped_count([*values, extra], n, max_weight, clipping_range) > 0
    extra = summed_metrics(clipped=clipped, **summed)
    plain = {k: metrics[k] for k in PLAINTEXT_METRICS if k in metrics}
    fitres = FitRes(status=Status(code=Code.OK, message=""),
                    parameters=ndarrays_to_parameters([*values, extra]),
                    num_examples=int(n) if float(n).is_integer() else n,  # type: ignore[arg-type]
                    metrics=plain)
    _seed_quantization(request, context)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=request)


def _seed_quantization(request: Message, context: Context) -> None:
    """Seed NumPy's global generator, which the mod's stochastic rounding draws from,
    from the run's seed, the round and this node's partition (stable across runs). The
    run config was validated by the train handler that just ran; only its seed is read."""
    import json

    from fl_common.randomness import derive_seed

    config = request.content[wire.CONFIG]
    seed = int(json.loads(str(config[wire.RUN_CONFIG]))["seed"])
    from .assignment import partition_id

    # the handler's partition: in simulation the server's assignment, which the stage
    # message carries (it travels through fl_app.nodes.AssigningGrid) and Context.state keeps
    partition = partition_id(context, request)
    np.random.seed(derive_seed(seed, int(config[wire.SERVER_ROUND]), partition, QUANTIZATION_TAG))


__all__ = ["SECAGG_REFUSED_CODE", "clipped_count", "cryptographic_masks",
           "refusal", "secagg_gate", "upload_arrays"]
