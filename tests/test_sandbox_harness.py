"""The in-sandbox harness (verification/sandbox/harness.py): one definition of the comparison rule,
per-test stdin and limits, output capture, and the tamper-proof result channel."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

try:  # tests/ as a plain folder (rootdir on sys.path) or as a package
    from sandbox_helpers import FAST, assert_no_leftovers, sandbox_fixture
except ImportError:  # pragma: no cover
    from tests.sandbox_helpers import FAST, assert_no_leftovers, sandbox_fixture

import verification.sandbox as sandbox_pkg
from verification.sandbox import ProgramTest, Sandbox, harness, normalize_output


@pytest.fixture(scope="module")
def bwrap_box() -> Iterator[Sandbox]:
    yield from sandbox_fixture("bwrap")


def test_normalize_output_has_one_definition() -> None:
    assert sandbox_pkg.normalize_output is harness.normalize_output
    package = Path(sandbox_pkg.__file__).parent
    defining = [
        path.name
        for path in package.glob("*.py")
        if any(
            isinstance(node, ast.FunctionDef) and node.name == "normalize_output"
            for node in ast.walk(ast.parse(path.read_text()))
        )
    ]
    assert defining == ["harness.py"]
    assert normalize_output(b" 1\n2\t3 \n\n") == b"1 2 3"


def test_harness_imports_only_the_standard_library() -> None:
    tree = ast.parse(Path(harness.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"workers", "streams", "pydantic", "vectorstore", "trainer"}


def test_binary_output_is_returned_verbatim(bwrap_box: Sandbox) -> None:
    program = "import sys\nsys.stdout.buffer.write(bytes(range(256)) + b'\\xff\\xfe')\n"
    result = bwrap_box.run(program)
    assert result.stdout == bytes(range(256)) + b"\xff\xfe"
    [outcome] = bwrap_box.run_tests(program, [ProgramTest(b"")])
    assert outcome.stdout == bytes(range(256)) + b"\xff\xfe"
    assert outcome.passed is None  # no expected output given


def test_megabytes_of_output(bwrap_box: Sandbox) -> None:
    program = "import sys\nsys.stdout.write('ab\\n' * 1_000_000)\n"  # 3 MB
    big = FAST.model_copy(update={"max_output_bytes": 8 << 20})
    [full] = bwrap_box.run_tests(program, [(b"", b"ab\n" * 1_000_000)], limits=big)
    assert full.passed and len(full.stdout) == 3_000_000 and not full.output_truncated
    small = FAST.model_copy(update={"max_output_bytes": 1 << 20})
    [cut] = bwrap_box.run_tests(program, [(b"", b"ab\n" * 1_000_000)], limits=small)
    assert cut.output_truncated and cut.passed is False and len(cut.stdout) == 1 << 20


def test_run_tests_per_test_stdin_and_time_limit(bwrap_box: Sandbox) -> None:
    program = "x = int(input())\nwhile x < 0:\n    pass\nprint(x * 2)\n"
    tests = [(b"1", b"2"), (b"-1", b"x"), (b"21\n", b"42"), (b"5", b"11")]
    outcomes = bwrap_box.run_tests(program, tests)
    assert [o.passed for o in outcomes] == [True, False, True, False]
    assert outcomes[1].killed is not None or outcomes[1].timed_out
    assert outcomes[2].stdout == b"42\n"
    stopped = bwrap_box.run_tests(program, tests, stop_on_failure=True)
    assert [o.passed for o in stopped] == [True, False, False, False]
    assert [o.error for o in stopped] == ["", "", "not_run", "not_run"]
    assert_no_leftovers(bwrap_box)


def test_whitespace_insensitive_comparison(bwrap_box: Sandbox) -> None:
    outcomes = bwrap_box.run_tests(
        "print('1 2'); print('3')", [(b"", b"1\n2 3"), (b"", b"1 2 3 \n\n"), (b"", b"1 23")]
    )
    assert [o.passed for o in outcomes] == [True, True, False]


def test_forged_result_lines_fail_closed(bwrap_box: Sandbox) -> None:
    forged = (
        "import os\nfor pid in (os.getppid(), 1):\n    for fd in (1, 2):\n        try:\n"
        "            with open(f'/proc/{pid}/fd/{fd}', 'w') as f:\n"
        "                f.write('forged-line\\n')\n"
        "        except OSError:\n            pass\nprint('wrong')\n"
    )
    outcomes = bwrap_box.run_tests(forged, [(b"", b"right")] * 3)
    assert not any(o.passed for o in outcomes)
