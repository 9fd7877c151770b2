"""User-level (central) DP, client side: Flower's ``fixedclipping_mod`` behind a gate.

In ``dp-mode = "user"`` each client's whole contribution is protected (McMahan, Ramage,
Talwar, Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018):
the client clips its model update to L2 norm C (Flower's ``fixedclipping_mod``), the
server averages and adds Gaussian noise (``strategies/user_dp.py``). The mod only runs
on train messages that carry the clipping norm (the server's DP wrapper puts it there);
every other message passes through, so the same ClientApp serves non-DP runs.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fl_common import wire


def central_dp_gate(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply ``fixedclipping_mod`` to a train message that asks for clipping.

    Flower's mod accepts exactly one ConfigRecord; a strategy's own per-client record
    (FedPer's accepted entry) is set aside while the mod checks the message and put back
    before the handler runs, so the handler sees the message as the server sent it."""
    config = msg.content.get(wire.CONFIG) if msg.metadata.message_type == MessageType.TRAIN else None
    if config is None or KEY_CLIPPING_NORM not in config:
        return call_next(msg, context)
    extra = {name: record for name, record in msg.content.config_records.items()
             if name != wire.CONFIG}
    for name in extra:
        del msg.content[name]

    def handler(inner: Message, ctxt: Context) -> Message:
        for name, record in extra.items():
            inner.content[name] = record
        return call_next(inner, ctxt)

    return fixedclipping_mod(msg, context, handler)
