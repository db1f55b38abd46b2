"""JSON (de)serialization of records, and the dead letter built when bytes can't be used.

A dead letter always fits the record size limit: the payload it carries is cut to fit (its
original size and the source coordinates say where the whole bytes are: the source topic keeps
them for its retention).
"""

from __future__ import annotations

import base64
import json
import re

from pydantic import ValidationError

from streams.records import SCHEMA_VERSION, DeadLetter, Record

# Reason codes for dead letters.
UNDECODABLE = "undecodable"  # not UTF-8 / not JSON
SCHEMA_INVALID = "schema_invalid"  # JSON, but not the topic's record type
SCHEMA_VERSION_UNSUPPORTED = "schema_version_unsupported"  # written by a newer release
RECORD_TOO_LARGE = "record_too_large"  # over kafka.max_record_bytes
OUTPUT_TOO_LARGE = "output_too_large"  # a stage produced a record over the limit from it
OUTPUT_INVALID = "output_invalid"  # a stage produced a record from it that cannot be encoded
PROCESSING_ERROR = "processing_error"  # the stage raised on it (after retries)
MAX_ERROR_CHARS = 2000
_DEAD_LETTER_OVERHEAD = 8 * 1024  # everything but the payload, generously


class RecordDecodeError(ValueError):
    def __init__(self, reason: str, error: str):
        super().__init__(f"{reason}: {error}")
        self.reason = reason
        self.error = error[:MAX_ERROR_CHARS]


def encode(record: Record) -> bytes:
    return record.model_dump_json().encode("utf-8")


_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> tuple[str, int]:
    """``text`` as valid UTF-8, and how many code points were replaced: a Python string can hold
    lone surrogates (a JSON ``"\\ud800"`` escape, bytes decoded with ``surrogateescape``) that
    no encoder takes; each becomes U+FFFD, the replacement character."""
    if text.isascii():
        return text, 0
    return _SURROGATE_RE.subn("\ufffd", text)


def decode(
    payload: bytes | None, record_type: type[Record], max_bytes: int | None = None
) -> Record:
    """Bytes -> record, or RecordDecodeError with a reason code. Records over ``max_bytes`` are
    refused before parsing; a schema version newer than this release's is refused, not misread."""
    if payload is None:
        raise RecordDecodeError(UNDECODABLE, "empty message (tombstone)")
    if max_bytes is not None and len(payload) > max_bytes:
        raise RecordDecodeError(
            RECORD_TOO_LARGE, f"{len(payload):,} bytes over the {max_bytes:,}-byte limit"
        )
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordDecodeError(UNDECODABLE, str(exc)) from exc
    if not isinstance(data, dict):
        raise RecordDecodeError(
            SCHEMA_INVALID, f"expected a JSON object, got {type(data).__name__}"
        )
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise RecordDecodeError(
            SCHEMA_VERSION_UNSUPPORTED,
            f"schema_version {version!r}; this release reads up to {SCHEMA_VERSION}",
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
    max_bytes: int = 1_000_000,
    reason: str | None = None,
) -> DeadLetter:
    """The dead letter of one source message; its encoding never exceeds ``max_bytes``."""
    if reason is None:
        reason = error.reason if isinstance(error, RecordDecodeError) else PROCESSING_ERROR
    raw = payload or b""
    keep = max(0, (max_bytes - _DEAD_LETTER_OVERHEAD) * 3 // 4)  # base64 grows 4/3
    return DeadLetter(
        stage=stage,
        reason=reason,
        error=valid_text(str(error)[:MAX_ERROR_CHARS])[0],
        source_topic=topic,
        partition=partition,
        offset=offset,
        key=key[:512].decode("utf-8", "replace") if key else None,  # bytes: never a surrogate
        payload_b64=base64.b64encode(raw[:keep]).decode("ascii"),
        payload_size=len(raw),
        payload_truncated=len(raw) > keep,
    )


def _short(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5]
    )
