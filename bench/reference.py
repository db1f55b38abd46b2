"""Acceptance before and after the independent reference (issue 17 item 2), on the embedded
default: the same candidates and the same solver rollouts judged by

- ``before``: the rule of main at c1e012b (the plurality of the solver's 8 rollouts at 25%
  agreement, every finished-or-truncated rollout voting through the last-number fallback);
- ``designer``: this release's default without a teacher (the designer's stated answer, its
  arithmetic checked; only final answers of untruncated rollouts agree), the verify stage itself;
- ``majority``: the opt-in self-agreement rule of this release (the plurality, strict votes).

The candidates come from the cold-started p_θ (the cold start runs first if the checkpoint
folder has none), the rollouts from the embedded solver with the verify stage's settings. Each
step is kept in ``--out`` and resumed: candidates.jsonl, rollouts.jsonl, then report.json (counts
with Wilson 95% intervals, the paired table, reasons) and accepted-<rule>.md to read.

``designer`` in the report says what p_θ's rationales give the designer rule whatever the solver
does: how many state an answer whose arithmetic checks, and why the others give none. With
``--cold-start-seeds``/``--cold-start-epochs`` (a cold start of another size) and
``--designer-only`` (no rollouts) it is the dose-response of the cold start:

    python -m bench.reference --candidates 96 --out bench-out/reference
    python -m bench.reference --candidates 30 --cold-start-seeds 128 --designer-only --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from llm.backends.base import Backend, Completion, Score

RULES = ("before", "designer", "majority")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


class ReplayBackend(Backend):
    """Answers each prompt with the rollouts recorded for the problem it holds."""

    def __init__(self, recorded: dict[str, list[Completion]], render: Backend):
        self.settings = render.settings
        self.model_version = render.model_version
        self._recorded = sorted(recorded.items(), key=lambda kv: -len(kv[0]))  # longest first
        self._render = render

    def render_messages(self, messages: list[dict[str, str]]) -> str:
        return self._render.render_messages(messages)

    def generate(
        self, prompts, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None, seed=None
    ):
        out = []
        for prompt in prompts:
            found = next(c for problem, c in self._recorded if problem in prompt)
            out.append(found[:n])
        return out

    def score(self, prompts, continuations) -> list[Score]:
        raise NotImplementedError

    def reload(self, model_path: str) -> None:
        raise NotImplementedError


COLD_START: dict[str, Any] = {}  # --cold-start-seeds / --cold-start-epochs, for every step


def _settings(out: Path, **overrides: Any):
    from promptcot.settings import Settings

    trainer = {"profile": "cpu", "checkpoint_dir": str(out / "checkpoints")}
    if COLD_START:
        trainer["cold_start"] = COLD_START
    base = {"trainer": trainer, "metrics": {"port": 0}}
    return Settings(**{**base, **overrides})


def cold_start(out: Path) -> None:
    from promptcot.settings import Settings  # noqa: F401 - settings load first
    from trainer.coldstart import cold_start as run
    from trainer.coldstart import needs_cold_start
    from trainer.em import EMTrainer

    settings = _settings(out)
    trainer = EMTrainer.on_models(settings.trainer, settings.models)
    if needs_cold_start(settings, trainer):
        print("cold start ...", file=sys.stderr, flush=True)
        run(settings, trainer)


def candidates(out: Path, n: int) -> list:
    """``n`` well-formed math candidates from the cold-started p_θ (kept in candidates.jsonl)."""
    from promptcot.startup import serve_newest
    from streams.records import CandidateProblem
    from streams.topics import CANDIDATES
    from workers.concepts import ConceptSampler, load_pool
    from workers.stages.generate import GenerateStage

    path, state_path = out / "candidates.jsonl", out / "generate-state.json"
    have = [CandidateProblem.model_validate_json(x) for x in _lines(path)]
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"draws": 0}
    failures: Counter[str] = Counter(state.get("failures", {}))
    settings = _settings(out)
    serve_newest(settings)
    assert "checkpoints" in settings.models.prompt_model.model, "no cold-started p_θ"
    sampler = ConceptSampler(load_pool(), settings.concepts, first_draw=state["draws"])
    stage = GenerateStage(settings) if len(have) < n else None
    while len(have) < n:
        emits = stage.process([sampler.sample("math") for _ in range(8)])
        fresh = [e.record for e in emits if e.topic is CANDIDATES]
        failures.update(e.record.reason for e in emits if e.topic is not CANDIDATES)
        with path.open("a") as f:
            f.writelines(c.model_dump_json() + "\n" for c in fresh)
        state_path.write_text(json.dumps({"draws": sampler.draws, "failures": failures}))
        have += fresh
        print(f"candidates: {len(have)}/{n} ({dict(failures)})", file=sys.stderr, flush=True)
    return have[:n]


def rollouts(out: Path, cands: list) -> dict[str, list[Completion]]:
    """The solver's rollouts per candidate, as the verify stage samples them (rollouts.jsonl)."""
    from llm.prompts import SOLVER_MATH
    from llm.roles import Role, backend_for
    from promptcot.startup import serve_newest
    from streams.records import content_hash

    path = out / "rollouts.jsonl"
    done = {}
    for line in _lines(path):
        row = json.loads(line)
        done[row["id"]] = [Completion(**c) for c in row["completions"]]
    settings = _settings(out)
    serve_newest(settings)  # the cold-started solver, as `up` serves it
    v = settings.verify
    solver = backend_for(settings.models, Role.SOLVER)
    todo = [c for c in cands if c.id not in done]
    for start in range(0, len(todo), 4):  # the verify stage's batch
        batch = todo[start : start + 4]
        t0 = time.monotonic()
        outs = solver.generate(
            [SOLVER_MATH.render(solver, problem=c.problem) for c in batch],
            n=v.rollouts,
            temperature=v.temperature,
            top_p=v.top_p,
            max_tokens=v.max_tokens,
            seed=int(content_hash([c.id for c in batch], 8), 16),
        )
        with path.open("a") as f:
            for c, comps in zip(batch, outs, strict=True):
                done[c.id] = comps
                row = {"id": c.id, "completions": [vars(x) for x in comps]}
                f.write(json.dumps(row) + "\n")
        print(
            f"rollouts: {len(done)}/{len(cands)} ({time.monotonic() - t0:.0f} s a batch)",
            file=sys.stderr,
            flush=True,
        )
    return done


def before_rule(candidate, completions: list[Completion], oracle) -> tuple[bool, str, str | None]:
    """The math verdict of main at c1e012b (workers/stages/verify.py there), reproduced."""
    from verification.mathcheck import extract_answer, validity_issue, vote

    issue = validity_issue(candidate.problem, None)
    if issue:
        return False, issue, None
    answers = [extract_answer(x.text) if x.error is None else None for x in completions]
    result = vote(answers, oracle, 0.25)
    rejection = result.reason or validity_issue(candidate.problem, result.reference)
    if rejection is None:
        pass_rate = sum(result.agree) / len(completions)
        rejection = "too_hard" if pass_rate <= 0.0 else "too_easy" if pass_rate > 0.5 else None
    return rejection is None, rejection or "accepted", result.reference


def judge(out: Path, cands: list, recorded: dict[str, list[Completion]]) -> dict[str, Any]:
    from llm.roles import Role, backend_for
    from verification.mathcheck import EquivalenceOracle
    from workers.stages.verify import VerifyStage

    verdicts: dict[str, dict[str, tuple[bool, str, str | None, Any]]] = {r: {} for r in RULES}
    with EquivalenceOracle() as oracle:
        for c in cands:
            ok, reason, ref = before_rule(c, recorded[c.id], oracle)
            verdicts["before"][c.id] = (ok, reason, ref, None)
    render = backend_for(_settings(out).models, Role.SOLVER)
    by_problem = {c.problem: recorded[c.id] for c in cands}
    for rule in ("designer", "majority"):
        settings = _settings(out, verify={"math": {"reference": rule}})
        replay = ReplayBackend(by_problem, render)
        stage = VerifyStage(settings, backends={Role.SOLVER: replay, Role.TEST_WRITER: replay})
        try:
            for start in range(0, len(cands), 4):
                for emit in stage.process(cands[start : start + 4]):
                    v = emit.record
                    verdicts[rule][v.subject_id] = (v.accepted, v.reason, v.reference_answer, v)
        finally:
            stage.close()
    n = len(cands)
    report: dict[str, Any] = {"candidates": n, "rules": {}, "rollouts": _rollout_stats(recorded)}
    for rule in RULES:
        k = sum(ok for ok, *_ in verdicts[rule].values())
        low, high = wilson(k, n)
        report["rules"][rule] = {
            "accepted": k,
            "rate": k / n if n else 0.0,
            "wilson95": [round(low, 4), round(high, 4)],
            "reasons": dict(Counter(r for _, r, *_ in verdicts[rule].values()).most_common()),
        }
    both = sum(verdicts["before"][c.id][0] and verdicts["designer"][c.id][0] for c in cands)
    only_before = sum(
        verdicts["before"][c.id][0] and not verdicts["designer"][c.id][0] for c in cands
    )
    only_after = sum(
        verdicts["designer"][c.id][0] and not verdicts["before"][c.id][0] for c in cands
    )
    report["paired_before_designer"] = {
        "both": both,
        "before_only": only_before,
        "designer_only": only_after,
    }
    for rule in RULES:
        _write_accepted(out / f"accepted-{rule}.md", rule, cands, recorded, verdicts[rule])
    return report


def designer_stats(cands: list) -> dict[str, Any]:
    """What the candidates' rationales give the designer rule, rollouts aside: a stated answer
    with its arithmetic checked, or why not."""
    from verification.mathcheck.reference import designer_reference

    refs = [designer_reference(c.rationale) for c in cands]
    k, n = sum(ref.answer is not None for ref in refs), len(cands)
    return {
        "states_a_checked_answer": k,
        "rate": round(k / n, 4) if n else 0.0,
        "wilson95": [round(x, 4) for x in wilson(k, n)],
        "reasons": dict(Counter(ref.reason for ref in refs if ref.answer is None).most_common()),
    }


def _rollout_stats(recorded: dict[str, list[Completion]]) -> dict[str, int]:
    """What the solver's rollouts are: cut by the budget, with a final answer, or with only a
    number the old rule's last-number fallback read as one."""
    from verification.mathcheck import extract_answer
    from verification.mathcheck.reference import final_answer

    every = [x for comps in recorded.values() for x in comps]
    finished = [x for x in every if x.error is None and not x.truncated]
    return {
        "rollouts": len(every),
        "truncated": sum(x.truncated for x in every),
        "finished_with_a_final_answer": sum(final_answer(x.text) is not None for x in finished),
        "finished_without_one_but_a_last_number": sum(
            final_answer(x.text) is None and extract_answer(x.text) is not None for x in finished
        ),
    }


def _write_accepted(path: Path, rule: str, cands: list, recorded, verdicts) -> None:
    from verification.mathcheck.reference import final_answer

    lines = [f"# Accepted under rule {rule!r}\n"]
    for c in cands:
        ok, _, ref, _ = verdicts[c.id]
        if not ok:
            continue
        answers = [
            final_answer(x.text) if not x.truncated else "(truncated)" for x in recorded[c.id]
        ]
        lines += [
            f"## {c.id}\n",
            f"**Problem.** {c.problem}\n",
            f"**Rationale.** {c.rationale}\n",
            f"**Reference ({rule}).** {ref!r}\n",
            f"**Rollout final answers.** {answers}\n",
        ]
    path.write_text("\n".join(lines))


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reference", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--candidates", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("bench-out/reference"))
    parser.add_argument("--cold-start-seeds", type=int, help="trainer.cold_start.seeds")
    parser.add_argument("--cold-start-epochs", type=float, help="trainer.cold_start.epochs")
    parser.add_argument(
        "--designer-only", action="store_true", help="no rollouts: the rationales' answers only"
    )
    args = parser.parse_args(argv)
    if args.cold_start_seeds is not None:
        COLD_START["seeds"] = args.cold_start_seeds
    if args.cold_start_epochs is not None:
        COLD_START["epochs"] = args.cold_start_epochs
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    cold_start(args.out)
    cands = candidates(args.out, args.candidates)
    if args.designer_only:
        report: dict[str, Any] = {"candidates": len(cands), "cold_start": COLD_START}
    else:
        report = judge(args.out, cands, rollouts(args.out, cands))
    report["designer"] = designer_stats(cands)
    report["wall_s"] = round(time.monotonic() - t0, 1)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
