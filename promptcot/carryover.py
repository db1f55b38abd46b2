"""What a `promptcot up` run takes over from the runs before it: the sampler's position, the
consumer group's committed offsets (both in the broker) and the problems already in the sink.
Shown in the live table and the summary, so a restart visibly continues."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from streams.cluster import kafka_python_config
from workers.sampler_position import restore_position
from workers.stages.sink import read_problems

if TYPE_CHECKING:
    from promptcot.settings import Settings


def carried_over(settings: Settings, bootstrap: str, group: str) -> dict[str, int]:
    """Counts of what this run starts from; all zero on a first run."""
    position = restore_position(settings.kafka, bootstrap, settings.concepts.seed)
    offsets = committed_offsets(settings, bootstrap, group)
    return {
        "concept sets issued": position.issued,
        "concept sets closed": position.closed,
        "concept sets open": len(position.open),
        "next draw": position.next_draw,
        "input records committed": sum(offsets.values()),
        "verified problems in sink": len(
            read_problems(Path(settings.sink.output_dir) / "problems")
        ),
    }


def committed_offsets(settings: Settings, bootstrap: str, group: str) -> dict[str, int]:
    """topic:partition -> committed offset of ``group`` (empty for a new group)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**kafka_python_config(settings.kafka, bootstrap))
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {
        f"{tp.topic}:{tp.partition}": meta.offset
        for tp, meta in offsets.items()
        if meta.offset >= 0
    }
