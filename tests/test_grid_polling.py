"""PromptPollingGrid (strategies/grid_wrapper.py): the same replies as Flower's deployment
grid (``HttpGrid.send_and_receive``), seen soon after they arrive instead of in 3 s steps.

Both are driven by one virtual clock: a scripted SuperLink whose replies become
pullable at given times, and a ``sleep`` that advances the clock, so the seconds below
are exact, not measured."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from flwr.superlink.grid import http_grid
from flwr.superlink.grid.http_grid import HttpGrid

from strategies.grid_wrapper import PromptPollingGrid


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class ScriptedLink:
    """push_messages gives ids m0, m1, ...; reply i can be pulled from ``arrivals[i]``
    seconds after the push, once."""

    def __init__(self, clock: Clock, arrivals: list[float]) -> None:
        self.clock, self.arrivals = clock, arrivals
        self.pushed_at = None
        self.pulled: set[str] = set()
        self.pulls: list[float] = []  # when each pull happened, relative to the push

    def push_messages(self, messages):
        messages = list(messages)
        assert len(messages) == len(self.arrivals)
        self.pushed_at = self.clock.now
        return [f"m{i}" for i in range(len(messages))]

    def pull_messages(self, message_ids):
        elapsed = self.clock.now - self.pushed_at
        self.pulls.append(elapsed)
        ready = [mid for mid in message_ids
                 if mid not in self.pulled and self.arrivals[int(mid[1:])] <= elapsed]
        self.pulled.update(ready)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid),
                                arrived=self.arrivals[int(mid[1:])]) for mid in ready]


def flowers(arrivals, timeout, monkeypatch):
    """Flower's own HttpGrid.send_and_receive on the scripted link (its 3 s sleep)."""
    clock = Clock()
    link = ScriptedLink(clock, arrivals)
    monkeypatch.setattr(http_grid.time, "time", clock.time)
    monkeypatch.setattr(http_grid.time, "sleep", clock.sleep)
    replies = HttpGrid.send_and_receive(link, [object()] * len(arrivals), timeout=timeout)
    monkeypatch.undo()
    return replies, clock, link


def ours(arrivals, timeout, **kwargs):
    clock = Clock()
    link = ScriptedLink(clock, arrivals)
    grid = PromptPollingGrid(link, clock=clock.time, sleep=clock.sleep, **kwargs)
    replies = grid.send_and_receive([object()] * len(arrivals), timeout=timeout)
    return replies, clock, link


def ids(replies):
    return sorted(r.metadata.reply_to_message_id for r in replies)


@pytest.mark.parametrize("timeout", [None, 60.0])
@pytest.mark.parametrize("arrivals", [[0.0], [0.3, 7.0, 7.1], [12.5, 2.0, 30.0, 0.01]])
def test_the_same_replies_as_flowers_grid_and_each_seen_within_the_longest_pause(
        arrivals, timeout, monkeypatch):
    theirs, their_clock, _ = flowers(arrivals, timeout, monkeypatch)
    mine, my_clock, link = ours(arrivals, timeout)
    assert ids(mine) == ids(theirs) == [f"m{i}" for i in range(len(arrivals))]
    last = max(arrivals)
    waited_mine = my_clock.now - 1000.0 - last
    waited_theirs = their_clock.now - 1000.0 - last
    assert 0 <= waited_mine <= 0.8 + 1e-9  # the default longest pause
    # Flower's pulls at 0, 3, 6, ... s: the last reply is seen at the next multiple of 3
    assert waited_theirs == pytest.approx(-last % 3.0 if last % 3.0 else 0.0)
    # pauses 0.05, 0.1, 0.2, 0.4, then 0.8: about one pull a second in a long wait
    assert link.pulls[:6] == pytest.approx([0.0, 0.05, 0.15, 0.35, 0.75, 1.55][:len(link.pulls)])
    assert len(link.pulls) <= 6 + last / 0.8 + 1


def test_a_deadline_returns_what_arrived_before_it_and_never_sleeps_past_it(monkeypatch):
    arrivals = [1.0, 4.0, 50.0]  # the third is late for a 10 s timeout
    theirs, _, _ = flowers(arrivals, 10.0, monkeypatch)
    mine, clock, link = ours(arrivals, 10.0)
    assert ids(mine) == ids(theirs) == ["m0", "m1"]
    assert clock.now - 1000.0 == pytest.approx(10.0)  # Flower's overshoots to 12 s
    assert max(link.pulls) < 10.0


def test_a_zero_timeout_pulls_nothing_like_flowers(monkeypatch):
    theirs, _, their_link = flowers([0.0], 0.0, monkeypatch)
    mine, _, link = ours([0.0], 0.0)
    assert mine == theirs == [] and link.pulls == their_link.pulls == []


def test_bad_pauses_are_refused():
    with pytest.raises(ValueError, match="0 < first <= longest"):
        PromptPollingGrid(object(), first=0.0)
    with pytest.raises(ValueError, match="first=2"):
        PromptPollingGrid(object(), first=2.0, longest=1.0)
