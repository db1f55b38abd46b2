"""Verification of code problems: parse the solver's program and the test writer's tests, run
every rollout against every test in the sandbox, and decide which rollouts pass.

Formats (what the prompts ask the models for):
- Solver: exactly one fenced ```python block, a program that reads stdin and writes stdout.
- Test writer: one fenced ```json block per call holding {"input": str, "output": str} or a
  non-empty list of such objects. Strict: no other keys, both values strings.
Anything inside a <think>...</think> block is ignored (reasoning may sketch code or tests).

Reason codes are short snake_case strings, listed below as constants.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from verification.sandbox import Limits, ProgramTest, Sandbox, TestOutcome, normalize_output

# Parse errors (CodeParseError.reason).
NO_CODE_BLOCK = "no_code_block"
MULTIPLE_CODE_BLOCKS = "multiple_code_blocks"
EMPTY_PROGRAM = "empty_program"
NO_TEST_BLOCK = "no_test_block"
MULTIPLE_TEST_BLOCKS = "multiple_test_blocks"
MALFORMED_JSON = "malformed_json"
MALFORMED_TESTS = "malformed_tests"

# Why one rollout failed (CodeReport.failure_reasons); parse errors above also appear there.
WRONG_ANSWER = "wrong_answer"
RUNTIME_ERROR = "runtime_error"
TIME_LIMIT = "time_limit"
OUTPUT_LIMIT = "output_limit"
SANDBOX_ERROR = "sandbox_error"

# Why the problem cannot be verified at all (CodeReport.rejection).
NO_VALID_TESTS = "no_valid_tests"
NO_RUNNABLE_ROLLOUTS = "no_runnable_rollouts"

# Suspect-test rule: how many rollouts must agree on an output before a test that nobody
# reproduces is blamed on the test writer instead of the solvers.
SUSPECT_MIN_AGREEING = 2

_THINK_END = re.compile(r"</think>", re.IGNORECASE)
_FENCE = re.compile(r"```([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "python3", "py"}


class CodeParseError(ValueError):
    """A model output that does not follow the format; ``reason`` is a reason code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _answer_part(completion: str) -> str:
    """The text after the last </think> (the whole text when there is none)."""
    parts = _THINK_END.split(completion)
    return parts[-1]


def _fenced_blocks(text: str, tags: set[str]) -> list[str]:
    return [body for tag, body in _FENCE.findall(text) if tag.lower() in tags]


def extract_program(completion: str) -> str:
    """The solver's program: the single ```python block of the answer."""
    blocks = _fenced_blocks(_answer_part(completion), _PYTHON_TAGS)
    if not blocks:
        raise CodeParseError(NO_CODE_BLOCK)
    if len(blocks) > 1:
        raise CodeParseError(MULTIPLE_CODE_BLOCKS, f"{len(blocks)} python blocks")
    program = blocks[0]
    if not program.strip():
        raise CodeParseError(EMPTY_PROGRAM)
    return program


def _test_from_json(item: object) -> ProgramTest:
    if not isinstance(item, dict):
        raise CodeParseError(MALFORMED_TESTS, f"a test is a {type(item).__name__}, not an object")
    if set(item) != {"input", "output"}:
        raise CodeParseError(MALFORMED_TESTS, f"keys {sorted(item)} != ['input', 'output']")
    if not isinstance(item["input"], str) or not isinstance(item["output"], str):
        raise CodeParseError(MALFORMED_TESTS, "input and output must be strings")
    return ProgramTest(item["input"].encode(), item["output"].encode())


def parse_tests(completion: str) -> list[ProgramTest]:
    """The tests of one test-writer call: its single ```json block (object or list)."""
    blocks = _fenced_blocks(_answer_part(completion), {"json"})
    if not blocks:
        raise CodeParseError(NO_TEST_BLOCK)
    if len(blocks) > 1:
        raise CodeParseError(MULTIPLE_TEST_BLOCKS, f"{len(blocks)} json blocks")
    try:
        data = json.loads(blocks[0])
    except json.JSONDecodeError as exc:
        raise CodeParseError(MALFORMED_JSON, str(exc)) from exc
    items = data if isinstance(data, list) else [data]
    if not items:
        raise CodeParseError(MALFORMED_TESTS, "empty list")
    return [_test_from_json(item) for item in items]


def dedup_tests(tests: Sequence[ProgramTest]) -> tuple[list[ProgramTest], int]:
    """Drop repeated tests (same whitespace-normalized input). When repeats disagree on the
    normalized output the writer contradicted itself and every copy is dropped. Returns the kept
    tests in first-seen order and how many were dropped."""
    by_input: dict[bytes, list[ProgramTest]] = {}
    for test in tests:
        by_input.setdefault(normalize_output(test.input), []).append(test)
    kept = []
    for copies in by_input.values():
        expected = {normalize_output(t.output or b"") for t in copies}
        if len(expected) == 1:
            kept.append(copies[0])
    return kept, len(tests) - len(kept)


def suspect_tests(
    expected: Sequence[bytes], observed: Sequence[Sequence[bytes | None]]
) -> set[int]:
    """Indices of tests that are probably wrong.

    ``observed[r][t]`` is rollout r's stdout on test t, or None when that run did not finish
    cleanly (crash, time limit, output limit). Outputs are compared whitespace-normalized.
    Test t is suspect when BOTH hold:
      1. no rollout reproduces its expected output, and
      2. the rollouts agree among themselves: one output is produced by a strict majority of all
         rollouts that were run (more than half of ``len(observed)``, failed runs counting
         against it) and by at least SUSPECT_MIN_AGREEING of them.
    Then the test writer, not the solvers, most likely erred and the test is dropped. When all
    rollouts share one bug this also drops a correct test; those problems then look easy (high
    pass rate) and the difficulty filter discards them, which is the safe direction.
    """
    suspects = set()
    n_rollouts = len(observed)
    for t, want in enumerate(expected):
        wanted = normalize_output(want)
        outputs = [normalize_output(run[t]) for run in observed if run[t] is not None]
        if wanted in outputs:
            continue
        if not outputs:
            continue
        _, agreeing = Counter(outputs).most_common(1)[0]
        if agreeing * 2 > n_rollouts and agreeing >= SUSPECT_MIN_AGREEING:
            suspects.add(t)
    return suspects


@dataclass
class CodeReport:
    """Verdict of one code problem."""

    passed: list[bool]  # per rollout: every kept test passed
    failure_reasons: list[str | None]  # per rollout: None when it passed
    tests_kept: list[ProgramTest]
    tests_suspect: list[ProgramTest] = field(default_factory=list)
    duplicates_dropped: int = 0
    test_parse_errors: list[str] = field(default_factory=list)  # reason per bad writer call
    rejection: str | None = None  # the problem cannot be verified

    @property
    def pass_rate(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


def _failure_reason(outcome: TestOutcome) -> str:
    if outcome.error:
        return SANDBOX_ERROR
    if outcome.timed_out or (outcome.killed in (24, 9) and outcome.exit_code is None):
        return TIME_LIMIT  # SIGXCPU / SIGKILL at the CPU limit count as a time limit
    if outcome.output_truncated:
        return OUTPUT_LIMIT
    if outcome.exit_code != 0 or outcome.killed is not None:
        return RUNTIME_ERROR
    return WRONG_ANSWER


def _clean_stdout(outcome: TestOutcome) -> bytes | None:
    return outcome.stdout if outcome.ok else None


def verify_code(
    rollouts: Sequence[str],
    test_completions: Sequence[str],
    sandbox: Sandbox,
    limits: Limits | None = None,
) -> CodeReport:
    """Verify one code problem from its solver rollouts and test-writer outputs.

    Rollouts run with at most ``sandbox.settings.slots`` at a time, each rollout's tests inside
    one sandboxed process. A rollout without a parsable program fails with its parse reason.
    """
    n = len(rollouts)
    tests: list[ProgramTest] = []
    parse_errors = []
    for completion in test_completions:
        try:
            tests.extend(parse_tests(completion))
        except CodeParseError as exc:
            parse_errors.append(exc.reason)
    tests, duplicates = dedup_tests(tests)
    report = CodeReport(
        passed=[False] * n,
        failure_reasons=[None] * n,
        tests_kept=tests,
        duplicates_dropped=duplicates,
        test_parse_errors=parse_errors,
    )

    programs: dict[int, str] = {}
    for index, completion in enumerate(rollouts):
        try:
            programs[index] = extract_program(completion)
        except CodeParseError as exc:
            report.failure_reasons[index] = exc.reason
    if not tests:
        report.rejection = NO_VALID_TESTS
        for i in programs:  # runnable, but there was nothing to run them against
            report.failure_reasons[i] = NO_VALID_TESTS
        return report
    if not programs:
        report.rejection = NO_RUNNABLE_ROLLOUTS
        return report

    with ThreadPoolExecutor(max_workers=sandbox.settings.slots) as pool:
        futures = {i: pool.submit(sandbox.run_tests, p, tests, limits) for i, p in programs.items()}
        outcomes = {i: f.result() for i, f in futures.items()}

    # unparsable rollouts were "run" too: they count against agreement in the suspect rule
    observed = [
        [_clean_stdout(o) for o in outcomes[i]] if i in outcomes else [None] * len(tests)
        for i in range(n)
    ]
    suspects = suspect_tests([t.output or b"" for t in tests], observed)
    report.tests_kept = [t for k, t in enumerate(tests) if k not in suspects]
    report.tests_suspect = [t for k, t in enumerate(tests) if k in suspects]
    if not report.tests_kept:
        report.rejection = NO_VALID_TESTS
        for i in outcomes:
            report.failure_reasons[i] = NO_VALID_TESTS
        return report

    for i, results in outcomes.items():
        failing = [o for k, o in enumerate(results) if k not in suspects and not o.passed]
        report.passed[i] = not failing
        report.failure_reasons[i] = _failure_reason(failing[0]) if failing else None
    return report
