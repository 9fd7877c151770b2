"""A ``Grid`` around another that delegates everything: subclasses override only what
they add (SecAgg+ rounds, strategies/secagg.py; the simulation's partition assignment,
fl_app/nodes.py)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class DelegatingGrid(Grid):
    """Every call goes to ``self.grid``."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        self.grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # type: ignore[no-untyped-def]
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)
