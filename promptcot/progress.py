"""Live counts for `promptcot up`, read from the process's own Prometheus counters."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from streams import metrics


def _out(stage: str, topic: str) -> int:
    return int(metrics.counter_value(metrics.RECORDS_OUT, stage=stage, topic=topic))


@dataclass
class FactoryProgress:
    started: float
    stop_reason: str = ""
    first_accepted_at: float | None = None
    carried: dict[str, int] = field(default_factory=dict)  # promptcot/carryover.py

    def accepted(self) -> int:
        n = int(metrics.counter_value(metrics.ACCEPTED))
        if n and self.first_accepted_at is None:
            self.first_accepted_at = time.monotonic()
        return n

    def rejections(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for labels, value in metrics.counter_samples(metrics.REJECTED):
            key = f"{labels['stage']}: {labels['reason']}"
            out[key] = out.get(key, 0) + int(value)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def counts(self) -> dict[str, int]:
        return {
            "seeds annotated": _out("annotate", "seeds.annotated"),
            "rationales scored": _out("rationale", "rationales"),
            "concept sets issued": _out("sampler", "concepts"),
            "candidates written": _out("generate", "candidates"),
            "candidates unique": _out("filter", "candidates.unique"),
            "verified problems": self.accepted(),
            "preference pairs": _out("pairs", "pairs"),
            "solver traces": _out("traces", "traces"),
            "dead letters": int(metrics.counter_value(metrics.DEAD_LETTERS)),
            "model tokens": int(metrics.counter_value(metrics.MODEL_TOKENS)),
        }

    def model_versions(self) -> dict[str, int]:
        """role -> the version in this process's promptcot_model_version gauge: the newest the
        trainer announced here, or the one a reload follower (workers/reload.py) moved a served
        role to, whichever was set last (no entry: base)."""
        return {
            labels["role"]: int(value)
            for labels, value in metrics.gauge_samples(metrics.MODEL_VERSION)
            if value > 0
        }

    def table(self) -> Table:
        elapsed = time.monotonic() - self.started
        table = Table(title=f"PromptCoT factory - {elapsed:,.0f}s", show_header=False)
        table.add_column("what")
        table.add_column("count", justify="right")
        for name, value in self.counts().items():
            table.add_row(name, f"{value:,}")
        for reason, value in self.rejections().items():
            table.add_row(Text(f"rejected - {reason}", style="yellow"), f"{value:,}")
        if any(self.carried.values()):
            for name, value in self.carried.items():
                table.add_row(Text(f"carried over - {name}", style="cyan"), f"{value:,}")
        for role, version in sorted(self.model_versions().items()):
            table.add_row(Text(f"model version - {role}", style="cyan"), f"v{version:04d}")
        return table

    def continued(self) -> Text | None:
        """One line on what this run took over from earlier runs, or None on a first run."""
        c = self.carried
        if not any(c.values()):
            return None
        return Text(
            f"continued an earlier run: {c['concept sets issued']:,} concept sets issued before "
            f"({c['concept sets open']:,} still open), sampler resumed at draw "
            f"{c['next draw']:,}; {c['input records committed']:,} input records committed; "
            f"{c['verified problems in sink']:,} verified problems already in the sink",
            style="cyan",
        )

    def summary(self, output_dir: Path | None) -> Group:
        """The end-of-run summary; ``output_dir`` None: the run kept nothing (--ephemeral)."""
        elapsed = time.monotonic() - self.started
        accepted = self.accepted()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        lines = [
            self.table(),
            Text(
                f"stopped: {self.stop_reason or 'done'} after {elapsed:,.0f}s; peak RSS "
                f"{peak_mb:,.0f} MB"
            ),
        ]
        if (continued := self.continued()) is not None:
            lines.append(continued)
        versions = self.model_versions()
        lines.append(
            Text(
                "model versions reached: "
                + (
                    ", ".join(f"{role} v{v:04d}" for role, v in sorted(versions.items()))
                    if versions
                    else "none (every role still on its base model)"
                )
            )
        )
        if self.first_accepted_at is not None:
            lines.append(
                Text(
                    f"first verified problem after {self.first_accepted_at - self.started:,.0f}s; "
                    f"{accepted / max(elapsed, 1e-9) * 3600:,.1f} problems/hour"
                )
            )
        lines.append(where_problems_are(accepted, output_dir))
        return Group(*lines)


class ColdStartBar:
    """The cold start in `up`'s console: one bar, its current phase as the description
    ("annotating seeds", "training prompt_model", ...); a phase of unknown length pulses. Called
    as the trainer's ``Report`` (trainer/sft.py), from the thread that runs the cold start."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("cold start: {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task("starting", total=None)
        self.phase = "starting"

    def __enter__(self) -> ColdStartBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, what: str, done: int, of: int) -> None:
        if what != self.phase:  # a new task in place of the old one: a total may become unknown
            self.progress.remove_task(self.task)
            self.task = self.progress.add_task(what, total=of or None)
            self.phase = what
        self.progress.update(self.task, completed=done, total=of or None, refresh=True)


def where_problems_are(accepted: int, output_dir: Path | None) -> Text:
    """The summary's last line: where the verified problems are, or why there are none."""
    if not accepted:
        return Text(
            "no problem passed verification; the rejections above say why "
            "(a 135M model writes mostly unusable problems - see README)",
            style="bold yellow",
        )
    if output_dir is None:
        return Text(
            f"{accepted} verified problems, not kept (--ephemeral removed the sink with the run)",
            style="bold yellow",
        )
    return Text(
        f"verified problems: {Path(output_dir, 'problems').resolve()} "
        "(Parquet; `promptcot export` for one file or a HF dataset)",
        style="bold green",
    )
