"""Which input messages a stage may acknowledge, so its committed offsets never pass unsent
outputs.

Acknowledgement to Faust follows offset order per partition (``OffsetLedger``): a message is
acknowledged only when it and every message before it on its partition are finished (its
outputs acknowledged by the broker: workers/agent.py), so the committed offset never passes a
record whose outputs are not on the broker — whatever Faust does on cancellation, and whatever
order chunks finish in (docs/runtime.md names the two Faust behaviours this guards against).
"""

from __future__ import annotations

from collections import deque
from typing import Any


class OffsetLedger:
    """Per partition, the messages received in offset order and which of them are finished.
    ``finish`` returns the events that may now be acknowledged: the finished prefix of each
    partition, in order. An unfinished message holds back every message after it."""

    def __init__(self) -> None:
        self._queues: dict[Any, deque[list]] = {}
        self.pending = 0

    def add(self, event: Any) -> None:
        self._queues.setdefault(event.message.tp, deque()).append([event, False])
        self.pending += 1

    def finish(self, events: list[Any]) -> list[Any]:
        ids = {id(e) for e in events}
        touched = {e.message.tp for e in events}
        ready = []
        for tp in touched:
            queue = self._queues.get(tp)
            if not queue:
                continue
            for entry in queue:
                if id(entry[0]) in ids:
                    entry[1] = True
            while queue and queue[0][1]:
                ready.append(queue.popleft()[0])
        self.pending -= len(ready)
        return ready
