"""A ``Grid`` around another that delegates everything: subclasses override only what
they add (SecAgg+ rounds, strategies/secagg.py; the simulation's partition assignment,
fl_app/nodes.py; prompt reply polling on the deployment runtime, below)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

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


class PromptPollingGrid(DelegatingGrid):
    """``send_and_receive`` that looks for replies soon after they arrive.

    Flower 1.42's deployment grid (``flwr/superlink/grid/http_grid.py``,
    ``HttpGrid.send_and_receive``) pushes the messages, then pulls replies and sleeps a
    fixed 3 s between pulls: every stage of a deployed round (query, train, evaluate,
    each of SecAgg+'s four stages) waits 1.5 s on average, up to 3 s, after its last
    reply has reached the SuperLink. This one pulls ``first`` s after the push and
    doubles the pause up to ``longest`` (0.05, 0.1, ... 0.8 s by default): a reply is
    seen at most ``longest`` after it arrives, at about one cheap pull a second in a
    long training phase. Everything else is Flower's: the same push, the same pulls,
    the same replies and the same ``timeout`` rule (None waits for every reply; the
    replies pulled before the deadline are returned).
    """

    def __init__(self, grid, *, first: float = 0.05, longest: float = 0.8,  # type: ignore[no-untyped-def]
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not 0 < first <= longest:
            raise ValueError(f"PromptPollingGrid needs 0 < first <= longest; got first={first}, "
                             f"longest={longest}")
        super().__init__(grid)
        self.first, self.longest = first, longest
        self._clock, self._sleep = clock, sleep

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        waiting = set(self.grid.push_messages(messages))
        del messages
        end = self._clock() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        pause = self.first
        while timeout is None or self._clock() < end:
            pulled = list(self.grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting:
                break
            # never sleep past the deadline Flower would keep
            self._sleep(pause if timeout is None else max(0.0, min(pause, end - self._clock())))
            pause = min(2 * pause, self.longest)
        return replies
