"""`promptcot dlq`: the dead letters, counted, shown, and replayed to their source topic after a
fix (streams/deadletters.py; each dead letter at most once)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from promptcot.cli.app import BootstrapOpt, ConfigOpt, app, console, load, require_cluster

if TYPE_CHECKING:
    from streams.records import DeadLetter

dlq_app = typer.Typer(help="Dead letters: count, show, replay after a fix.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

SHOW_BYTES = 4000  # of a payload shown; the rest is summarized


@dlq_app.command("counts")
def dlq_counts(config: ConfigOpt = None, bootstrap: BootstrapOpt = None) -> None:
    """Dead letters by source topic and reason, with how many were replayed."""
    from streams.deadletters import coordinates, counts, dead_letters, replayed_copies, replays

    settings = load(config, bootstrap)
    where = require_cluster(settings)
    letters = dead_letters(settings.kafka, where)
    done = replays(settings.kafka, where)
    replayed = counts(letter for letter in letters if coordinates(letter) in done)
    again = {coordinates(d) for d in letters} & replayed_copies(done)
    table = Table("source topic", "reason", "dead letters", "replayed")
    for (topic, reason), n in sorted(counts(letters).items()):
        table.add_row(topic, reason, str(n), str(replayed[(topic, reason)]))
    console.print(table)
    console.print(
        f"{len(letters)} dead letters of {len({coordinates(d) for d in letters})} source "
        f"records, {len(done)} replayed, {len(again)} failed again after a replay"
    )


@dlq_app.command("show")
def dlq_show(
    dead_letter_id: Annotated[str, typer.Argument(help="A dead letter id (dlq_...).")],
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """One dead letter: where it came from, why, and its payload (JSON if it is, else hex)."""
    from streams.deadletters import coordinates, copy_of, dead_letters, replays

    settings = load(config, bootstrap)
    where = require_cluster(settings)
    letter = next((d for d in dead_letters(settings.kafka, where) if d.id == dead_letter_id), None)
    if letter is None:
        raise KeyError(f"no dead letter {dead_letter_id!r} (`promptcot dlq counts` lists them)")
    console.print_json(letter.model_dump_json(exclude={"payload_b64"}))
    replay = replays(settings.kafka, where).get(coordinates(letter))
    if replay is not None:
        console.print(
            f"replayed to {replay.source_topic}[{replay.replayed_partition}]@"
            f"{replay.replayed_offset}"
        )
    cut = f" (first {len(copy_of(letter)):,} of {letter.payload_size:,} bytes)"
    if letter.payload_truncated:
        console.print("the dead letter's copy was cut short" + cut)
    text = payload_text(copy_of(letter), letter.payload_truncated)
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def payload_text(payload: bytes, truncated: bool = False) -> str:
    """JSON, pretty, if the payload is JSON; a copy cut short (which no longer parses) as the
    text it is; hex otherwise; cut at SHOW_BYTES in every case."""
    shown, rest = payload[:SHOW_BYTES], len(payload) - SHOW_BYTES
    tail = f"\n... {rest:,} more bytes" if rest > 0 else ""
    try:
        return "payload (JSON):\n" + json.dumps(json.loads(payload), indent=2)[:SHOW_BYTES] + tail
    except (UnicodeDecodeError, ValueError):
        pass
    if truncated:
        try:  # the cut may split the last character
            return f"payload (start of the text):\n{shown.decode('utf-8', 'strict')}{tail}"
        except UnicodeDecodeError:
            pass
    return f"payload ({len(payload):,} bytes, hex):\n{shown.hex(' ')}{tail}"


@dlq_app.command("replay")
def dlq_replay(
    reason: Annotated[str | None, typer.Option(help="Only dead letters with this reason.")] = None,
    topic: Annotated[
        str | None, typer.Option(help="Only those from this source topic (short or full name).")
    ] = None,
    ids: Annotated[
        list[str] | None, typer.Option("--id", help="Only these dead letter ids (repeatable).")
    ] = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
    again: Annotated[
        bool,
        typer.Option(
            "--again", help="Also replayed copies that failed again (held back by default)."
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option(help="Say what would be replayed, send nothing.")
    ] = False,
    config: ConfigOpt = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Send a selection of dead letters back to their source topic (after a fix), each source
    record at most once; the bytes come from the source topic at the dead letter's coordinates
    (the dead letter's own copy if they are gone and it is whole). A replayed copy that failed
    again is held back unless --again; a record that cannot be sent is reported and skipped,
    the rest still go (exit code 1 then)."""
    from streams.clients import resolve_topic
    from streams.deadletters import Selection, choose, dead_letters, plans, replay, replays

    if not (reason or topic or ids or replay_all):
        raise typer.BadParameter("choose what to replay: --reason, --topic, --id or --all")
    settings = load(config, bootstrap)
    source = resolve_topic(settings.kafka, topic)[0] if topic else None
    where = require_cluster(settings)
    selection = Selection(reason, source, frozenset(ids) if ids else None)
    done = replays(settings.kafka, where)
    choice = choose(dead_letters(settings.kafka, where), done, selection, again)
    to_send, unsent = plans(settings.kafka, where, choice.fresh)
    sent = to_send
    if not dry_run:
        replayed, refused = replay(settings.kafka, where, to_send)
        unsent += refused
        landed = {r.dead_letter_ids[0] for r in replayed}
        sent = [p for p in to_send if p.first.id in landed]
    for p in sent:
        console.print(
            f"{'would replay' if dry_run else 'replayed'} {where_of(p.first)} ({p.first.reason}; "
            f"{len(p.letters)} dead letter(s)), {len(p.payload):,} bytes from the "
            f"{p.bytes_from.replace('_', ' ')}",
            highlight=False,
        )
    for u in unsent:
        console.print(
            f"[red]not sent[/] {where_of(u.first)} ({u.first.reason}): {u.why}", highlight=False
        )
    summary = f"{len(sent)} records; {choice.replayed_before} replayed before"
    if unsent:
        summary += f"; {len(unsent)} not sent"
    if choice.failed_again:
        summary += (
            f"; {choice.failed_again} failed again after a replay (held back: --again replays them)"
        )
    console.print(f"{'would replay' if dry_run else 'replayed'} {summary}", highlight=False)
    if unsent:
        raise typer.Exit(1)


def where_of(letter: DeadLetter) -> str:
    """A dead letter's source record as topic[partition]@offset."""
    return f"{letter.source_topic}[{letter.partition}]@{letter.offset}"
