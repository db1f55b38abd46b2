"""Supervised fine-tuning of the solver on verified traces (the design's second post-training
mode): windows of the traces topic, on the solver's one lineage (trainer/solver.py), so each SFT
version is the next solver version whatever trained the one before (DPO or SFT), and the anchor
DPO measures against from then on (trainer/anchor.py). Traces of held-out problems (by a hash of
the problem id, as for pairs) are never trained on: the per-token NLL of their completions,
before and after each update, is the signal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from streams.records import SolverTrace
from trainer.engine import EngineOptions, continuation_nll
from trainer.role_models import RoleModel
from trainer.settings import SolverSFTConfig, StepConfig, WindowConfig
from trainer.sft import sft
from trainer.solver import SolverWindows, solver_prompt

log = logging.getLogger(__name__)


def trace_row(tokenizer: Any, trace: SolverTrace) -> dict[str, str]:
    return {
        "prompt": solver_prompt(tokenizer, trace.domain, trace.prompt),
        "completion": trace.completion,
    }


def completion_nll(model: Any, tokenizer: Any, rows: Sequence[dict[str, str]]) -> float:
    """Mean NLL per completion token of the rows under ``model``."""
    total, count = continuation_nll(
        model, tokenizer, [r["prompt"] for r in rows], [r["completion"] for r in rows]
    )
    return total / count if count else float("nan")


class SolverSFTLoop(SolverWindows[SolverTrace]):
    step = "sft"
    noun = "trace"
    heldout_file = "heldout-traces.jsonl"

    @property
    def cfg(self) -> SolverSFTConfig:
        return self.settings.sft

    def usable(self, record: SolverTrace) -> bool:
        return bool(record.completion.strip() and record.prompt.strip())

    def row(self, tokenizer: Any, record: SolverTrace) -> dict[str, str]:
        return trace_row(tokenizer, record)

    def train(self, rm: RoleModel, rows: list[dict[str, str]]) -> tuple[dict[str, Any], dict]:
        s = self.settings
        signal, label = self.signal_rows(rows)
        before = completion_nll(rm.model, rm.tokenizer, signal)
        losses = sft(rm, rows, self.cfg, EngineOptions.of(s))
        after = completion_nll(rm.model, rm.tokenizer, signal)
        metrics = {
            **losses.metrics(),
            "n_traces": len(rows),
            f"n_{label}_traces": len(signal),
            f"{label}_trace_nll_before": before,
            f"{label}_trace_nll_after": after,
        }
        log.info("SFT window: %d traces, %s NLL %.4f -> %.4f", len(rows), label, before, after)
        return metrics, {}


class SolverColdStart(SolverSFTLoop):
    """The solver's cold start (trainer/coldstart.py ``solver_cold_start``): one window of the
    cold-start seeds' worked solutions (``GoldSolution``, shaped like a trace), with the cold
    start's step settings, as version ``cold_start`` of the solver's lineage. Held-out seeds'
    solutions are its signal, in a pool of their own."""

    step = "cold_start"
    noun = "worked solution"
    heldout_file = "heldout-gold.jsonl"

    @property
    def cfg(self) -> SolverSFTConfig:
        steps = self.settings.cold_start.model_dump(include=set(StepConfig.model_fields))
        return SolverSFTConfig(**steps, window=WindowConfig(min_records=1))
