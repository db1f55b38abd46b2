"""verdicts -> traces: the verified solutions of accepted problems, for supervised fine-tuning
of the solver (the design's second post-training mode; the trainer's sft stage reads them).

- solver traces: the rollouts that passed, i.e. finished within the token budget, stated a
  final answer and agree with the reference (math), or passed every test (code); at most
  ``traces.max_solver_traces_per_problem`` distinct texts per problem;
- one teacher trace per accepted problem where a teacher voted (the first of its rollouts
  that agrees with the reference).

Math traces come only from verified references (``Verdict.reference_source`` teacher or
designer): under the opt-in "majority" rule, and in verdicts written before the source was
recorded, a "passing" rollout agrees with the solver's own plurality, which is no evidence that
it is right.

A stage of its own, like pairs, rather than an output of verify: a verdict holds everything a
trace is made of (the teacher's rollouts included), so traces can be rebuilt from the verdicts
topic, and the verify stage, the expensive one, emits one record per candidate.
"""

from __future__ import annotations

from llm.prompts import SOLVER_BY_DOMAIN
from streams.records import Rollout, SolverTrace, Verdict
from streams.topics import TRACES, VERDICTS
from verification.mathcheck.reference import DESIGNER, TEACHER
from workers.stage import Emit, Stage

VERIFIED_SOURCES = (TEACHER, DESIGNER)


def build_traces(verdict: Verdict, prompt: str, cap: int) -> list[SolverTrace]:
    """The traces of an accepted verdict (none for a rejected one); ids name (problem, source,
    rollout index), so a redelivered verdict gives the same traces."""
    if not verdict.accepted:
        return []
    if verdict.domain == "math" and verdict.reference_source not in VERIFIED_SOURCES:
        return []
    traces: list[SolverTrace] = []
    seen: set[str] = set()
    for index, rollout in enumerate(verdict.rollouts):
        if len(traces) >= cap:
            break
        if rollout.passed and rollout.text.strip() and rollout.text not in seen:
            seen.add(rollout.text)
            traces.append(_trace(verdict, prompt, "solver", index, rollout))
    teacher = next(
        ((i, r) for i, r in enumerate(verdict.teacher_rollouts) if r.passed and r.text.strip()),
        None,
    )
    if teacher is not None:
        traces.append(_trace(verdict, prompt, "teacher", *teacher))
    return traces


def _trace(verdict: Verdict, prompt: str, source: str, index: int, rollout: Rollout) -> SolverTrace:
    return SolverTrace.derived_from(
        verdict,
        problem_id=verdict.subject_id,
        source=source,
        index=index,
        domain=verdict.domain,
        prompt=prompt,
        completion=rollout.text,
        reference_answer=verdict.reference_answer,
        n_tokens=rollout.n_tokens,
    )


class TracesStage(Stage[Verdict]):
    name = "traces"
    input = VERDICTS
    outputs = (TRACES,)

    def process(self, records: list[Verdict]) -> list[Emit]:
        cap = self.settings.traces.max_solver_traces_per_problem
        emits = []
        for verdict in records:
            if not verdict.accepted:
                continue
            # The solver's user message, as pairs carry it: trainers apply their chat template.
            prompt = SOLVER_BY_DOMAIN[verdict.domain].user_text(problem=verdict.problem)
            emits += [self.emit(TRACES, t) for t in build_traces(verdict, prompt, cap)]
        return emits
