"""Flower's built-in Bulyan (El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of
Distributed Learning in Byzantium", ICML 2018), unchanged, plus a record of which
replies its Multi-Krum selection stage kept (``last_selected``: node ids), so that a
simulated attack can report how many attackers got through.

Flower's Bulyan (``flwr/serverapp/strategy/bulyan.py``) selects theta = n - 2f replies
with Multi-Krum in one step and then averages, coordinate-wise, the beta = theta - 2f
values closest to the median; it skips rounds with fewer than 4f + 3 replies.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Bulyan
from flwr.serverapp.strategy.multikrum import select_multikrum

from .krum import ROBUST_REFUSALS
from .spec import StrategySpec, Traits, fedavg_kwargs


class _RecordingRule:
    """Flower's ``select_multikrum``, remembering what it selected."""

    __name__ = "select_multikrum"  # Bulyan.summary() logs the rule's name

    def __init__(self) -> None:
        self.chosen: list[RecordDict] = []

    def __call__(self, contents: list[RecordDict], num_malicious: int, num_select: int):
        self.chosen = select_multikrum(contents, num_malicious, num_select)
        return self.chosen


class RecordingBulyan(Bulyan):
    """Bulyan with ``last_selected``, the node ids its selection stage kept."""

    def __init__(self, **kwargs) -> None:
        rule = _RecordingRule()
        super().__init__(selection_rule=rule, **kwargs)
        self.rule = rule
        self.last_selected: list[int] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.rule.chosen = []
        result = super().aggregate_train(server_round, replies)
        node_of = {id(m.content): int(m.metadata.src_node_id) for m in replies}
        self.last_selected = [node_of[id(c)] for c in self.rule.chosen if id(c) in node_of]
        return result


SPEC = StrategySpec(
    name="bulyan",
    reference="El Mhamdi et al., The Hidden Vulnerability of Distributed Learning in "
              "Byzantium, ICML 2018 (Flower's flwr/serverapp/strategy/bulyan.py)",
    build=lambda b: RecordingBulyan(**fedavg_kwargs(b.cfg), num_malicious_nodes=b.cfg.num_malicious),
    traits=Traits(min_replies=lambda f: 4 * f + 3, selects=True, refusals=ROBUST_REFUSALS),
)
