"""JSON (de)serialization of records, and the dead letter built when bytes can't be read."""

from __future__ import annotations

import base64
import json

from pydantic import ValidationError

from streams.records import DeadLetter, Record

# Reason codes for dead letters.
UNDECODABLE = "undecodable"  # not UTF-8 / not JSON
SCHEMA_INVALID = "schema_invalid"  # JSON, but not the topic's record type
MAX_ERROR_CHARS = 2000


class RecordDecodeError(ValueError):
    def __init__(self, reason: str, error: str):
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error[:MAX_ERROR_CHARS]


def encode(record: Record) -> bytes:
    return record.model_dump_json().encode("utf-8")


def decode(payload: bytes | None, record_type: type[Record]) -> Record:
    """Bytes -> record, or RecordDecodeError with a reason code."""
    if payload is None:
        raise RecordDecodeError(UNDECODABLE, "empty message (tombstone)")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordDecodeError(UNDECODABLE, str(exc)) from exc
    if not isinstance(data, dict):
        raise RecordDecodeError(
            SCHEMA_INVALID, f"expected a JSON object, got {type(data).__name__}"
        )
    try:
        return record_type.model_validate(data)
    except ValidationError as exc:
        raise RecordDecodeError(SCHEMA_INVALID, _short(exc)) from exc


def dead_letter(
    *,
    stage: str,
    error: RecordDecodeError | Exception,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    payload: bytes | None,
) -> DeadLetter:
    reason = error.reason if isinstance(error, RecordDecodeError) else "processing_error"
    return DeadLetter(
        stage=stage,
        reason=reason,
        error=str(error)[:MAX_ERROR_CHARS],
        source_topic=topic,
        partition=partition,
        offset=offset,
        key=key.decode("utf-8", "replace") if key else None,
        payload_b64=base64.b64encode(payload or b"").decode("ascii"),
    )


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5]
    )
