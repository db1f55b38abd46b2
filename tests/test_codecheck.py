"""Code verification: parsers, dedup, the suspect-test rule, and real Codeforces tests run in
the real sandbox."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

import corpora
from verification import codecheck as cc
from verification.codecheck import CodeParseError, extract_program, parse_tests, verify_code
from verification.sandbox import Limits, ProgramTest, Sandbox, SandboxSettings

CODEFORCES = corpora.path("benchmarks", "codeforces.jsonl")
LIMITS = Limits(cpu_seconds=2, wall_seconds=3, memory_mb=256, max_processes=8)


def fenced(tag: str, body: str) -> str:
    return f"```{tag}\n{body}\n```"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    sb = Sandbox(SandboxSettings(slots=2, limits=LIMITS))
    yield sb
    sb.close()


def codeforces_tests(row: int) -> list[ProgramTest]:
    with CODEFORCES.open() as f:
        for i, line in enumerate(f):
            if i == row:
                io = json.loads(json.loads(line)["input_output"])
                return [
                    ProgramTest(a.encode(), b.encode())
                    for a, b in zip(io["inputs"], io["outputs"], strict=True)
                ]
    raise IndexError(row)


# --- parsers --------------------------------------------------------------------------------------


def test_extract_program_takes_the_single_python_block() -> None:
    answer = "<think>maybe ```python\nprint(0)\n``` no</think>\nHere:\n" + fenced(
        "python", "print(1)"
    )
    assert extract_program(answer).strip() == "print(1)"


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        ("just prose, no code", cc.NO_CODE_BLOCK),
        (fenced("cpp", "int main(){}"), cc.NO_CODE_BLOCK),
        (fenced("python", "print(1)") + fenced("python", "print(2)"), cc.MULTIPLE_CODE_BLOCKS),
        (fenced("python", "   "), cc.EMPTY_PROGRAM),
        ("<think>" + fenced("python", "print(1)") + "</think> I give up", cc.NO_CODE_BLOCK),
    ],
)
def test_extract_program_rejects(completion: str, reason: str) -> None:
    with pytest.raises(CodeParseError) as info:
        extract_program(completion)
    assert info.value.reason == reason


def test_parse_tests_object_and_list() -> None:
    one = parse_tests(fenced("json", '{"input": "1 2\\n", "output": "3\\n"}'))
    assert one == [ProgramTest(b"1 2\n", b"3\n")]
    many = parse_tests(
        "tests:\n"
        + fenced("json", json.dumps([{"input": "1", "output": "é"}, {"input": "2", "output": "4"}]))
    )
    assert many == [ProgramTest(b"1", "é".encode()), ProgramTest(b"2", b"4")]


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        ("no block", cc.NO_TEST_BLOCK),
        (fenced("json", '{"input": "1"}'), cc.MALFORMED_TESTS),
        (fenced("json", '{"output": "1"}'), cc.MALFORMED_TESTS),
        (fenced("json", '{"input": 1, "output": "1"}'), cc.MALFORMED_TESTS),
        (fenced("json", '{"input": "1", "output": ["1"]}'), cc.MALFORMED_TESTS),
        (fenced("json", '{"input": "1", "output": "1", "note": "x"}'), cc.MALFORMED_TESTS),
        (fenced("json", "[]"), cc.MALFORMED_TESTS),
        (fenced("json", '["1", "2"]'), cc.MALFORMED_TESTS),
        (fenced("json", '{"input": "1", "output": '), cc.MALFORMED_JSON),
        (fenced("json", '{"input": "1", "output": "2"}') * 2, cc.MULTIPLE_TEST_BLOCKS),
    ],
)
def test_parse_tests_rejects(completion: str, reason: str) -> None:
    with pytest.raises(CodeParseError) as info:
        parse_tests(completion)
    assert info.value.reason == reason


def test_dedup_normalizes_whitespace_and_drops_contradictions() -> None:
    tests = [
        ProgramTest(b"1 2\n", b"3"),
        ProgramTest(b"1  2", b"3\n"),
        ProgramTest(b"5", b"6"),
        ProgramTest(b"5\n", b"7"),
        ProgramTest(b"9", b"9"),
    ]
    kept, dropped = cc.dedup_tests(tests)
    assert kept == [ProgramTest(b"1 2\n", b"3"), ProgramTest(b"9", b"9")]
    assert dropped == 3


# --- the suspect rule -----------------------------------------------------------------------------


def test_suspect_when_rollouts_agree_and_nobody_matches() -> None:
    expected = [b"3", b"10", b"7"]
    observed = [[b"3", b"9", b"7"], [b"3\n", b"9 ", b"8"], [b"4", b"9", b"1"], [None, None, b"2"]]
    # test 1: 3 of 4 rollouts say 9, nobody says 10 -> suspect
    # test 0: someone reproduces 3 -> kept; test 2: no majority -> kept
    assert cc.suspect_tests(expected, observed) == {1}


def test_not_suspect_without_a_strict_majority_or_with_one_rollout() -> None:
    assert cc.suspect_tests([b"1"], [[b"2"], [b"2"], [None], [b"3"]]) == set()  # 2 of 4
    assert cc.suspect_tests([b"1"], [[b"2"]]) == set()  # one rollout cannot out-vote a test


# --- sandbox runs ---------------------------------------------------------------------------------

MIN_MAX = (
    "t = int(input())\nfor _ in range(t):\n    x, y = map(int, input().split())\n"
    "    print(min(x, y), max(x, y))\n"
)
MIN_MAX_WRONG = (
    "t = int(input())\nfor _ in range(t):\n    x, y = map(int, input().split())\n    print(x, y)\n"
)
BINARY_CUT = (
    "t = int(input())\nfor _ in range(t):\n    s = input().strip()\n"
    "    pieces = 1 + sum(a != b for a, b in zip(s, s[1:]))\n"
    "    print(pieces - ('01' in s))\n"
)
BINARY_CUT_WRONG = (
    "t = int(input())\nfor _ in range(t):\n    s = input().strip()\n"
    "    print(1 + sum(a != b for a, b in zip(s, s[1:])))\n"
)


@pytest.mark.parametrize(
    ("row", "right", "wrong"), [(0, MIN_MAX, MIN_MAX_WRONG), (3, BINARY_CUT, BINARY_CUT_WRONG)]
)
def test_codeforces_shipped_tests(sandbox: Sandbox, row: int, right: str, wrong: str) -> None:
    tests = codeforces_tests(row)
    assert tests
    assert all(o.passed for o in sandbox.run_tests(right, tests, LIMITS))
    assert not all(o.passed for o in sandbox.run_tests(wrong, tests, LIMITS))


def test_verify_code_on_codeforces_problem(sandbox: Sandbox) -> None:
    shipped = codeforces_tests(0)
    writer = [
        fenced(
            "json",
            json.dumps([{"input": t.input.decode(), "output": t.output.decode()} for t in shipped]),
        ),
        fenced("json", '{"input": "2\\n5 1\\n0 0\\n", "output": "1 5\\n0 0\\n"}'),
        "I could not write a test",
        fenced("json", '{"input": "1\\n3 3"}'),
    ]
    rollouts = [
        fenced("python", MIN_MAX),
        fenced("python", MIN_MAX_WRONG),
        "no code here",
        fenced("python", "while True:\n    pass"),
    ]
    report = verify_code(rollouts, writer, sandbox, LIMITS)
    assert report.rejection is None
    assert report.passed == [True, False, False, False]
    assert report.failure_reasons == [None, cc.WRONG_ANSWER, cc.NO_CODE_BLOCK, cc.TIME_LIMIT]
    assert len(report.tests_kept) == 2 and report.tests_suspect == []
    assert report.test_parse_errors == [cc.NO_TEST_BLOCK, cc.MALFORMED_TESTS]
    assert report.pass_rate == 0.25


def test_verify_code_drops_a_suspect_test(sandbox: Sandbox) -> None:
    writer = [
        fenced("json", '{"input": "2 3", "output": "5"}'),
        fenced("json", '{"input": "4 4", "output": "9"}'),
    ]  # wrong: 4+4 is 8
    adder = fenced("python", "print(sum(map(int, input().split())))")
    report = verify_code([adder, adder, fenced("python", "print(0)")], writer, sandbox, LIMITS)
    assert report.tests_suspect == [ProgramTest(b"4 4", b"9")]
    assert report.passed == [True, True, False]


def test_verify_code_rejections(sandbox: Sandbox) -> None:
    good_test = fenced("json", '{"input": "1", "output": "1"}')
    assert (
        verify_code([fenced("python", "print(1)")], ["nothing"], sandbox).rejection
        == cc.NO_VALID_TESTS
    )
    report = verify_code(["no code", "neither"], [good_test], sandbox)
    assert report.rejection == cc.NO_RUNNABLE_ROLLOUTS
    assert report.failure_reasons == [cc.NO_CODE_BLOCK, cc.NO_CODE_BLOCK]


def test_binary_output_fails_cleanly(sandbox: Sandbox) -> None:
    writer = [fenced("json", '{"input": "", "output": "ok"}')]
    binary = fenced("python", "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\x00ok')")
    report = verify_code([binary, fenced("python", "print('ok')")], writer, sandbox, LIMITS)
    assert report.passed == [False, True]
    assert report.failure_reasons[0] == cc.WRONG_ANSWER
