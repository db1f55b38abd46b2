"""candidates.unique -> verdicts: decide what the factory ships.

Math: N solver rollouts, answers clustered by mathematical equivalence, the majority becomes the
reference when it reaches the agreement threshold; pass rate = share agreeing with it.
Code: the test writer writes stdin/stdout tests over several rounds, the solver writes N programs,
all tests of one program run in one sandboxed process; pass rate = share passing every test.
Then validity filters and the difficulty band (default: solved sometimes, at most half the time).
"""

from __future__ import annotations

import threading

from llm.backends.base import Completion
from llm.prompts import SOLVER_CODE, SOLVER_MATH, TEST_WRITER
from llm.roles import Role
from streams import metrics
from streams.records import ACCEPTED, CandidateProblem, Rollout, TestCase, Verdict, content_hash
from streams.topics import CANDIDATES_UNIQUE, VERDICTS
from workers.stage import Emit, ModelStage

TOO_HARD, TOO_EASY = "too_hard", "too_easy"


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
        self._oracle = None  # started on the first math batch
        self._sandbox = None  # set up on the first code batch
        # Batches may be in process together (a continuous-batching server): one of each.
        self._start_lock = threading.Lock()

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

    def _rollouts(self, template, candidates: list[CandidateProblem]) -> list[list[Completion]]:
        if not candidates:
            return []
        v = self.settings.verify
        solver = self.backend(Role.SOLVER)
        return self.generate(
            Role.SOLVER,
            [template.render(solver, problem=c.problem) for c in candidates],
            n=v.rollouts,
            temperature=v.temperature,
            top_p=v.top_p,
            max_tokens=v.max_tokens,
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
            tests=tests or [],
            pass_rate=pass_rate,
            rollouts=rollouts,
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
                models=models,
                templates=templates,
                **fields,
            ),
        )

    # --- math -----------------------------------------------------------------------------------

    def _verify_math(self, candidates: list[CandidateProblem]) -> list[Emit]:
        from verification.mathcheck import extract_answer, validity_issue, vote

        templates = {SOLVER_MATH.name: SOLVER_MATH.hash}
        models = self.model_versions(Role.SOLVER)  # before the calls: a reload may come during
        emits: list[Emit] = []
        solvable = []
        for c in candidates:  # a proof problem has no answer to vote on: don't spend rollouts
            issue = validity_issue(c.problem, None)
            if issue:
                emits.append(self._judge(c, [], templates, models, rejection=issue))
            else:
                solvable.append(c)
        for c, completions in zip(solvable, self._rollouts(SOLVER_MATH, solvable), strict=True):
            answers = [extract_answer(x.text) if x.ok else None for x in completions]
            result = vote(answers, self.oracle, self.settings.verify.math.min_agreement)
            rollouts = [
                Rollout(
                    text=x.text,
                    answer=a,
                    passed=ok,
                    n_tokens=x.n_completion_tokens,
                    failure=None
                    if ok
                    else (x.error or ("no_answer" if a is None else "disagrees")),
                )
                for x, a, ok in zip(completions, answers, result.agree, strict=True)
            ]
            rejection = result.reason or validity_issue(c.problem, result.reference)
            detail = (
                f"{result.n_clusters} answer clusters, {result.n_missing} missing, "
                f"majority share {result.share:.2f}"
            )
            emits.append(
                self._judge(
                    c,
                    rollouts,
                    templates,
                    models,
                    rejection=rejection,
                    detail=detail,
                    reference=result.reference,
                )
            )
        return emits

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
                [x.text if x.ok else "" for x in completions],
                [TEST_WRITER.full_output(t.text) + "\n```" for t in tests_raw if t.ok],
                self.sandbox,
            )
            rollouts = [
                Rollout(text=x.text, passed=passed, failure=failure, n_tokens=x.n_completion_tokens)
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
            emits.append(
                self._judge(
                    c,
                    rollouts,
                    templates,
                    models,
                    rejection=report.rejection,
                    detail=detail,
                    tests=tests,
                )
            )
        return emits
