"""candidates.unique -> verdicts: decide what the factory ships.

Math: a reference answer the solver did not choose (``verify.math.reference``,
verification/mathcheck/reference.py): a teacher's majority where models.teacher is configured,
else the answer the designer's rationale states, its arithmetic checked; a problem without one
is rejected before any rollout. Then N solver rollouts; pass rate = share of them whose final
answer agrees with the reference (a truncated rollout, or one with no final answer, never
passes). ``majority`` (the solver's own plurality) is an explicit opt-in: self-agreement.
Code: the test writer writes stdin/stdout tests over several rounds, the solver writes N programs,
all tests of one program run in one sandboxed process; pass rate = share passing every test.
Then validity filters and the difficulty band (default: solved sometimes, at most half the time).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from llm.backends.base import Completion
from llm.prompts import SOLVER_CODE, SOLVER_MATH, TEST_WRITER, Template
from llm.roles import Role, teacher_configured
from streams import metrics
from streams.records import ACCEPTED, CandidateProblem, Rollout, TestCase, Verdict, content_hash
from streams.topics import CANDIDATES_UNIQUE, VERDICTS
from verification.mathcheck.reference import (
    DESIGNER,
    MAJORITY,
    TEACHER,
    TRUNCATED,
    WRONG_ANSWER,
    Reference,
)
from workers.drift import DriftWindow
from workers.stage import Emit, ModelStage

if TYPE_CHECKING:
    from promptcot.settings import Settings

TOO_HARD, TOO_EASY = "too_hard", "too_easy"


def math_reference_source(settings: Settings) -> str:
    """Where math references come from: ``verify.math.reference``, "auto" resolved (the teacher
    where one is configured, else the designer)."""
    chosen = settings.verify.math.reference
    if chosen == "auto":
        return TEACHER if teacher_configured(settings.models) else DESIGNER
    if chosen == TEACHER and not teacher_configured(settings.models):
        raise ValueError(
            'verify.math.reference is "teacher" but no teacher is configured: name one in '
            'models.teacher.model, or set verify.math.reference to "auto" or "designer"'
        )
    return chosen


def difficulty_issue(pass_rate: float, low: float, high: float) -> str | None:
    """The paper's band: drop problems never solved (pass rate <= low) or solved too often
    (> high)."""
    if pass_rate <= low:
        return TOO_HARD
    if pass_rate > high:
        return TOO_EASY
    return None


class VerifyStage(ModelStage[CandidateProblem]):
    name = "verify"
    input = CANDIDATES_UNIQUE
    outputs = (VERDICTS,)
    roles = (Role.SOLVER, Role.TEST_WRITER)

    def __init__(self, settings, backends=None):
        super().__init__(settings, backends)
        self.reference_source = math_reference_source(settings)
        self._oracle = None  # started on the first math batch
        self._sandbox = None  # set up on the first code batch
        # Batches may be in process together (a continuous-batching server): one of each.
        self._start_lock = threading.Lock()
        self._drift: dict[str, DriftWindow] = {}
        self._drift_lock = threading.Lock()

    @property
    def _teacher_roles(self) -> tuple[Role, ...]:
        return (Role.TEACHER,) if self.reference_source == TEACHER else ()

    def setup(self) -> None:
        super().setup()
        for role in self._teacher_roles:
            self.backend(role)

    def _continuous(self) -> bool:
        roles = (*self.roles, *self._teacher_roles)
        return all(getattr(self.backend(r), "continuous_batching", False) for r in roles)

    @property
    def oracle(self):
        with self._start_lock:
            if self._oracle is None:
                from verification.mathcheck import EquivalenceOracle

                self._oracle = EquivalenceOracle(self.settings.verify.math)
            return self._oracle

    @property
    def sandbox(self):
        with self._start_lock:
            if self._sandbox is None:
                from verification.sandbox import Sandbox

                self._sandbox = Sandbox(self.settings.verify.sandbox)
            return self._sandbox

    def close(self) -> None:
        for resource in (self._oracle, self._sandbox):
            if resource is not None:
                resource.close()

    def process(self, records: list[CandidateProblem]) -> list[Emit]:
        math = [c for c in records if c.domain == "math"]
        code = [c for c in records if c.domain == "code"]
        return self._verify_math(math) + self._verify_code(code)

    # --- shared ---------------------------------------------------------------------------------

    def _rollouts(
        self, template: Template, candidates: list[CandidateProblem], role: Role = Role.SOLVER
    ) -> list[list[Completion]]:
        if not candidates:
            return []
        v = self.settings.verify
        teacher = role == Role.TEACHER
        model = self.backend(role)
        return self.generate(
            role,
            [template.render(model, problem=c.problem) for c in candidates],
            n=v.teacher_rollouts if teacher else v.rollouts,
            temperature=v.teacher_temperature if teacher else v.temperature,
            top_p=v.top_p,
            max_tokens=v.teacher_max_tokens if teacher else v.max_tokens,
            seed=int(content_hash([c.id for c in candidates], 8), 16),
        )

    def _judge(
        self,
        candidate: CandidateProblem,
        rollouts: list[Rollout],
        templates: dict[str, str],
        models: dict[str, str],
        *,
        rejection: str | None,
        detail: str = "",
        reference: str | None = None,
        tests: list[TestCase] | None = None,
        reference_source: str = "",
        teacher_rollouts: list[Rollout] | None = None,
    ) -> Emit:
        v = self.settings.verify
        pass_rate = sum(r.passed for r in rollouts) / len(rollouts) if rollouts else 0.0
        if rejection is None:
            rejection = difficulty_issue(pass_rate, v.min_pass_rate, v.max_pass_rate)
            detail = detail or (
                f"pass rate {pass_rate:.3f} outside ({v.min_pass_rate}, {v.max_pass_rate}]"
                if rejection
                else ""
            )
        fields = dict(
            rationale=candidate.rationale,
            reference_answer=reference,
            reference_source=reference_source,
            tests=tests or [],
            pass_rate=pass_rate,
            rollouts=rollouts,
            teacher_rollouts=teacher_rollouts or [],
        )
        if rejection is not None:
            return self.reject(
                candidate, rejection, detail, models=models, templates=templates, **fields
            )
        metrics.PASS_RATE.labels(domain=candidate.domain).observe(pass_rate)
        return self.emit(
            VERDICTS,
            Verdict.on(
                candidate,
                stage=self.name,
                reason=ACCEPTED,
                detail=detail,  # how it was judged: the reference, its source, the agreement
                models=models,
                templates=templates,
                **fields,
            ),
        )

    # --- math -----------------------------------------------------------------------------------

    def _verify_math(self, candidates: list[CandidateProblem]) -> list[Emit]:
        from verification.mathcheck import validity_issue

        source = self.reference_source
        templates = {SOLVER_MATH.name: SOLVER_MATH.hash}
        # Before the calls: a reload may come during them.
        models = self.model_versions(Role.SOLVER, *self._teacher_roles)
        emits: list[Emit] = []
        solvable = []
        for c in candidates:  # a proof problem has no answer to vote on: don't spend rollouts
            issue = validity_issue(c.problem, None)
            if issue:
                emits.append(self._judge(c, [], templates, models, rejection=issue))
            else:
                solvable.append(c)
        references = self._references(solvable)
        with_reference = []
        for c in solvable:  # no reference, nothing to agree with: don't spend rollouts either
            ref, teacher_rollouts = references[c.id]
            issue = ref.reason or (
                validity_issue(c.problem, ref.answer) if ref.answer is not None else None
            )
            if source != MAJORITY and issue:
                emits.append(
                    self._judge(
                        c,
                        [],
                        templates,
                        models,
                        rejection=issue,
                        detail=ref.detail,
                        reference=ref.answer,
                        reference_source=source,
                        teacher_rollouts=teacher_rollouts,
                    )
                )
            else:
                with_reference.append(c)
        for c, completions in zip(
            with_reference, self._rollouts(SOLVER_MATH, with_reference), strict=True
        ):
            ref, teacher_rollouts = references[c.id]
            emits.append(self._judge_math(c, completions, ref, teacher_rollouts, templates, models))
        return emits

    def _references(
        self, candidates: list[CandidateProblem]
    ) -> dict[str, tuple[Reference, list[Rollout]]]:
        """Each candidate's reference (before any solver rollout) and the teacher's rollouts it
        came from; under "majority" the solver's rollouts make it later (``_judge_math``)."""
        from verification.mathcheck.reference import designer_reference, teacher_reference

        source = self.reference_source
        if source == DESIGNER:
            steps = self.settings.verify.math.designer_min_steps
            return {c.id: (designer_reference(c.rationale, steps), []) for c in candidates}
        if source == MAJORITY:
            return {c.id: (Reference(None, MAJORITY), []) for c in candidates}
        out = {}
        min_agreement = self.settings.verify.math.teacher_min_agreement
        teacher = self._rollouts(SOLVER_MATH, candidates, role=Role.TEACHER)
        for c, completions in zip(candidates, teacher, strict=True):
            answers, why = self._voting_answers(completions)
            ref = teacher_reference(answers, self.oracle, min_agreement)
            out[c.id] = (ref, self._math_rollouts(completions, answers, why, ref.answer))
        return out

    @staticmethod
    def _voting_answers(
        completions: list[Completion],
    ) -> tuple[list[str | None], list[str | None]]:
        """Each rollout's final answer (None when it cannot vote) and why it cannot."""
        from verification.mathcheck.reference import voting_answer

        voted = [voting_answer(x.text, x.ok, x.truncated) for x in completions]
        return [a for a, _ in voted], [
            x.error or why for x, (_, why) in zip(completions, voted, strict=True)
        ]

    def _math_rollouts(
        self,
        completions: list[Completion],
        answers: list[str | None],
        why: list[str | None],
        reference: str | None,
    ) -> list[Rollout]:
        from verification.mathcheck.reference import agreement

        agree = (
            agreement(reference, answers, self.oracle)
            if reference is not None
            else [False] * len(answers)
        )
        return [
            Rollout(
                text=x.text,
                answer=a,
                passed=ok,
                n_tokens=x.n_completion_tokens,
                failure=None if ok else (reason or WRONG_ANSWER),
            )
            for x, a, reason, ok in zip(completions, answers, why, agree, strict=True)
        ]

    def _judge_math(
        self,
        c: CandidateProblem,
        completions: list[Completion],
        ref: Reference,
        teacher_rollouts: list[Rollout],
        templates: dict[str, str],
        models: dict[str, str],
    ) -> Emit:
        from verification.mathcheck import validity_issue, vote
        from verification.mathcheck.reference import agreement, designer_reference

        source = self.reference_source
        answers, why = self._voting_answers(completions)
        min_agreement = self.settings.verify.math.min_agreement
        plurality = vote(answers, self.oracle, min_agreement if source == MAJORITY else 0.0)
        if source == MAJORITY:
            ref = Reference(plurality.reference, MAJORITY, plurality.reason)
        rollouts = self._math_rollouts(completions, answers, why, ref.answer)
        n_agree = sum(r.passed for r in rollouts)
        n_truncated = sum(r.failure == TRUNCATED for r in rollouts)
        n_voting = sum(a is not None for a in answers)
        detail = (
            f"reference ({source}) {ref.answer!r}: {n_agree}/{len(rollouts)} rollouts agree, "
            f"{n_voting} stated a final answer, {n_truncated} truncated; solver plurality "
            f"{plurality.reference!r} ({plurality.n_clusters} clusters, share "
            f"{plurality.share:.2f})" + (f"; {ref.detail}" if ref.detail else "")
        )
        emit = self._judge(
            c,
            rollouts,
            templates,
            models,
            rejection=ref.reason or validity_issue(c.problem, ref.answer),
            detail=detail,
            reference=ref.answer,
            reference_source=source,
            teacher_rollouts=teacher_rollouts,
        )
        if emit.record.accepted:  # type: ignore[attr-defined]
            designer = (
                designer_reference(c.rationale, self.settings.verify.math.designer_min_steps).answer
                if source != DESIGNER
                else ref.answer
            )
            agrees = None
            if designer is not None and plurality.reference is not None:
                agrees = agreement(designer, [plurality.reference], self.oracle)[0]
            self._observe(c, ref.answer, agrees)
        return emit

    def _observe(self, c: CandidateProblem, reference: str | None, agrees: bool | None) -> None:
        """The drift gauges over the last accepted problems of the domain (workers/drift.py)."""
        with self._drift_lock:
            window = self._drift.setdefault(
                c.domain, DriftWindow(self.settings.verify.drift_window)
            )
            window.add(c.problem, reference, agrees)
            measures = window.measures()
        gauges = {
            "diversity": metrics.ACCEPTED_DIVERSITY,
            "mean_words": metrics.ACCEPTED_MEAN_WORDS,
            "trivial_answer_share": metrics.ACCEPTED_TRIVIAL_ANSWERS,
            "designer_agreement": metrics.DESIGNER_AGREEMENT,
        }
        for name, value in measures.items():
            gauges[name].labels(domain=c.domain).set(value)

    # --- code -----------------------------------------------------------------------------------

    def _verify_code(self, candidates: list[CandidateProblem]) -> list[Emit]:
        if not candidates:
            return []
        from verification.codecheck import verify_code

        v = self.settings.verify
        templates = {SOLVER_CODE.name: SOLVER_CODE.hash, TEST_WRITER.name: TEST_WRITER.hash}
        models = self.model_versions(Role.SOLVER, Role.TEST_WRITER)  # before the calls
        tw = self.backend(Role.TEST_WRITER)
        test_outs = self.generate(
            Role.TEST_WRITER,
            [TEST_WRITER.render(tw, problem=c.problem) for c in candidates],
            n=v.test_rounds,
            temperature=v.temperature,
            max_tokens=v.max_tokens,
            stop=list(TEST_WRITER.stop),
            seed=int(content_hash([c.id for c in candidates], 8), 16),
        )
        emits = []
        rollouts_by_candidate = self._rollouts(SOLVER_CODE, candidates)
        for c, tests_raw, completions in zip(
            candidates, test_outs, rollouts_by_candidate, strict=True
        ):
            report = verify_code(
                [x.text if x.ok and not x.truncated else "" for x in completions],
                [TEST_WRITER.full_output(t.text) + "\n```" for t in tests_raw if t.ok],
                self.sandbox,
            )
            rollouts = [
                Rollout(
                    text=x.text,
                    passed=passed,
                    # A program cut by the token budget is not run: it never passes.
                    failure=TRUNCATED if x.ok and x.truncated else failure,
                    n_tokens=x.n_completion_tokens,
                )
                for x, passed, failure in zip(
                    completions, report.passed, report.failure_reasons, strict=True
                )
            ]
            for failure in report.failure_reasons:
                metrics.SANDBOX_RUNS.labels(outcome=failure or "passed").inc()
            tests = [
                TestCase(
                    input=t.input.decode("utf-8", "replace"),
                    output=(t.output or b"").decode("utf-8", "replace"),
                )
                for t in report.tests_kept
            ]
            detail = (
                f"{len(tests)} tests kept, {len(report.tests_suspect)} suspect, "
                f"{report.duplicates_dropped} duplicates, writer errors: {report.test_parse_errors}"
            )
            emit = self._judge(
                c,
                rollouts,
                templates,
                models,
                rejection=report.rejection,
                detail=detail,
                tests=tests,
            )
            if emit.record.accepted:  # type: ignore[attr-defined]
                self._observe(c, None, None)
            emits.append(emit)
        return emits
