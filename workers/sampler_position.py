"""Where a concept-set sampler stands, derived from the topics: what it issued (its own draws on
the ``concepts`` topic, recognised by the seed in their draw id) and which of those already have
a verdict (the ``verdicts`` topic). A sampler holds no state of its own, so a restart, a move to
another machine or a lost disk changes nothing: the topics are the record (docs/durability.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from streams.clients import read_all
from streams.settings import KafkaSettings
from streams.topics import CONCEPTS, VERDICTS


@dataclass
class SamplerPosition:
    next_draw: int = 0  # the draw number the sampler continues with
    issued: int = 0  # distinct concept sets it issued so far
    open: set[str] = field(default_factory=set)  # issued, no verdict yet

    @property
    def closed(self) -> int:
        return self.issued - len(self.open)


def own_draw(draw: str, seed: int) -> int | None:
    """The draw number of a draw id ``"<seed>:<k>"`` issued under ``seed``, else None."""
    prefix, _, number = draw.partition(":")
    return int(number) if prefix == str(seed) and number.isdigit() else None


def restore_position(kafka: KafkaSettings, bootstrap: str, seed: int) -> SamplerPosition:
    """The position of the sampler with ``seed``: the topics as of now, read to their end."""
    draws: dict[str, int] = {}  # concept set id -> draw number; a redelivered copy counts once
    for message in read_all(kafka, bootstrap, CONCEPTS.full_name(kafka.namespace)):
        try:
            data = json.loads(message.value)
            number = own_draw(str(data.get("draw", "")), seed)
        except (ValueError, TypeError, AttributeError):
            continue  # not a concept set: the dead letters' business
        if number is not None:
            draws[str(data["id"])] = number
    closed = set()
    for message in read_all(kafka, bootstrap, VERDICTS.full_name(kafka.namespace)):
        root = _concept_set_of(message)
        if root in draws:
            closed.add(root)
    return SamplerPosition(
        next_draw=max(draws.values(), default=-1) + 1,
        issued=len(draws),
        open=set(draws) - closed,
    )


def _concept_set_of(message) -> str | None:
    """The root concept set of a verdict: from its header (no JSON parse), else its body."""
    for key, value in message.headers or ():
        if key == "x-concept-set-id":
            return value.decode(errors="replace") or None
    try:
        return json.loads(message.value)["lineage"]["concept_set_id"]
    except (ValueError, TypeError, KeyError):
        return None
