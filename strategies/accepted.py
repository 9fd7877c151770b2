"""Which round each client's contribution last went into an aggregate that stood.

Client state that depends on the server having *used* a reply (SCAFFOLD's c_i+, FedPer's
personal layers) is kept pending on the client until the server says so: the server
records, per member (partition id in the app), the last round whose reply went into an
aggregate that was kept (``accepted``: strategy state, so a round the guard rolls back is
rolled back here too, and checkpointed), and gives each train (and evaluate) message its
own client's entry (``attach_accepted``, by the message's final destination). The
client commits its pending state when the entry names that state's round, and drops it
otherwise (reply lost, rejected, left out of a skipped round, or part of a discarded
aggregate; or trained in a round interrupted by a crash, which the resumed server's
map never saw).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import ConfigRecord, Message, RecordDict

from .secagg import contributors


class AcceptedMap:
    """A mixin for a Strategy: the accepted map and its per-message entries.

    ``record``: the name of the ConfigRecord a message carries its entry in.
    """

    def init_accepted(self, record: str, member_of: Callable[[int], int | None] | None) -> None:
        self.accepted_record = record
        self.accepted: dict[int, int] = {}  # member id -> last round its reply counted
        self.member_of = member_of  # node id -> member id (None: the node id itself)
        self.attach_later = False  # set by a wrapper that calls attach_accepted itself

    def _member(self, node: int) -> int | None:
        member = self.member_of(node) if self.member_of is not None else node
        return None if member is None else int(member)

    def attach_accepted(self, messages: list[Message]) -> list[Message]:
        """Give each message its own content: the shared records plus its client's entry
        of the accepted map (empty if none), by the message's final destination."""
        for message in messages:
            member = self._member(message.metadata.dst_node_id)
            own = ({str(member): self.accepted[member]}
                   if member is not None and member in self.accepted else {})
            content = RecordDict(dict(message.content.items()))
            content[self.accepted_record] = ConfigRecord(own)
            message.content = content
        return messages

    def mark_accepted(self, server_round: int, used: Iterable[Message]) -> None:
        """The replies in ``used`` (one per node, or a secure aggregate of several) went
        into this round's aggregate."""
        for message in used:
            for node in contributors(message):
                member = self._member(node)
                if member is not None:
                    self.accepted[member] = server_round
