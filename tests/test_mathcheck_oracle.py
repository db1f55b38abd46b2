"""The equivalence oracle (workers/mathcheck/oracle.py): math-verify in a bounded process."""

from __future__ import annotations

import threading
import time

import pytest
from mathcheck_data import sample_golds

from workers.mathcheck import (
    EquivalenceOracle,
    MathCheckSettings,
    extract_answer,
    validity_issue,
    vote,
)


@pytest.fixture(scope="module")
def oracle():
    with EquivalenceOracle(MathCheckSettings()) as o:
        yield o


def reformatted(gold: str) -> list[str]:
    g = int(gold.replace(",", ""))
    forms = [
        f"{g}.0",
        f"\\frac{{{2 * g}}}{{2}}",
        f"${g}$",
        f"{g}.00",
        f"\\boxed{{{g}}}",
        f"{g:,}",
        f"{g}\\text{{ dollars}}",
        f"\\${g}",
        f"{g} + 0",
        f"\\dfrac{{{3 * g}}}{{3}}",
    ]
    return forms


def off_by_one(gold: str) -> list[str]:
    g = int(gold.replace(",", ""))
    return [
        str(g + 1),
        f"{g - 1}.0",
        f"\\frac{{{2 * g + 2}}}{{2}}",
        f"{g + 1}\\text{{ dollars}}",
        f"\\${g - 1}",
    ]


def test_equivalence_accepts_reformatted_real_gold_answers(oracle):
    golds = sample_golds(200)
    pairs = [(g, form) for g in golds for form in reformatted(g)]
    verdicts = oracle.equivalent_many(pairs)
    rejected = [p for p, ok in zip(pairs, verdicts, strict=True) if not ok]
    assert rejected == []


def test_equivalence_rejects_off_by_one_real_gold_answers(oracle):
    golds = sample_golds(200)
    pairs = [(g, form) for g in golds for form in off_by_one(g)]
    verdicts = oracle.equivalent_many(pairs)
    accepted = [p for p, ok in zip(pairs, verdicts, strict=True) if ok]
    assert accepted == []


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("0.5", "\\frac{1}{2}", True),
        ("1,000", "1000", True),
        ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", True),
        ("x^2+2x+1", "(x+1)^2", True),
        ("5\\sqrt{3}", "\\sqrt{75}", True),
        ("\\pi", "3.14", False),
        ("-5", "5", False),
        ("1/3", "0.3333", False),
        ("123456789012", "123456789013", False),
    ],
)
def test_equivalence_cases(oracle, a, b, same):
    assert oracle.equivalent(a, b) is same
    assert oracle.equivalent(b, a) is same  # symmetric


def test_exact_fast_path_agrees_with_math_verify(oracle):
    # The fast path skips the worker for plain numbers; it must say what math-verify says.
    pairs = [
        ("18", "18.0"),
        ("0.5", "\\frac{1}{2}"),
        ("-3", "\\frac{-6}{2}"),
        ("7", "8"),
        ("1000", "1000.000"),
        ("12", "-12"),
    ]
    fast = oracle.equivalent_many(pairs)
    slow = oracle._ask_worker(pairs)  # the worker's verdict on the same pairs
    assert fast == slow == [True, True, True, False, True, False]


def test_pathological_input_is_bounded_and_oracle_recovers(oracle):
    assert oracle.equivalent("(2)", "2 + 0")  # worker up
    timeouts, starts = oracle.timeouts, oracle.worker_starts
    bound = oracle.settings.equivalence_timeout_s
    t0 = time.monotonic()
    # sympy evaluates this tower when comparing: unbounded without the process bound.
    assert oracle.equivalent("2^{2^{2^{2^{100}}}}", "3") is False
    elapsed = time.monotonic() - t0
    assert oracle.timeouts == timeouts + 1
    assert elapsed < bound + 5.0  # the timeout plus killing the worker, not the computation
    # Still answers (a fresh worker), both ways, and the bad pair is remembered.
    assert oracle.equivalent("y^2+2y+1", "(y+1)^2") is True
    assert oracle.equivalent("\\pi", "3") is False
    assert oracle.worker_starts == starts + 1
    assert oracle.equivalent("2^{2^{2^{2^{100}}}}", "3") is False
    assert oracle.timeouts == timeouts + 1  # cached: not recomputed


def test_oracle_survives_a_killed_worker(oracle):
    assert oracle.equivalent("(4)", "4 + 0")
    starts = oracle.worker_starts
    oracle._worker.proc.kill()  # our own child: simulate an OOM kill
    oracle._worker.proc.wait()
    assert oracle.equivalent("(5)", "5 + 0") is True
    assert oracle.worker_starts == starts + 1


def test_oracle_is_usable_from_threads(oracle):
    golds = sample_golds(40, seed=11)
    results: dict[int, list[bool]] = {}

    def check(k: int) -> None:
        mine = golds[k::4]
        pairs = [(g, f"{int(g.replace(',', ''))}\\text{{ m}}") for g in mine]
        pairs += [(g, f"({int(g.replace(',', '')) + 2})") for g in mine]
        results[k] = oracle.equivalent_many(pairs)

    threads = [threading.Thread(target=check, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        n = len(golds[k::4])
        assert results[k] == [True] * n + [False] * n


def test_oracle_starts_no_process_when_text_decides():
    with EquivalenceOracle() as o:
        assert o.equivalent("$18$", "\\boxed{18}") and not o.equivalent("18", "19")
        assert o.worker_starts == 0


@pytest.mark.parametrize(
    "garbage",
    [
        "\udcff\udc80 lone surrogates",
        "nul\x00byte",
        bytes(range(256)).decode("latin-1"),
        b"\xff\xfe\x00\x81 broken utf8".decode("utf-8", "surrogateescape"),
        "{" * 50_000,
        "\\boxed{" * 20_000,
        "\\frac{" * 2_000 + "1" + "}" * 2_000,
        "9" * 2_000_000,
        "x" * 600 + "=1",
        ")(*&^%$#@!",
    ],
)
def test_garbage_does_not_crash(oracle, garbage):
    t0 = time.monotonic()
    extracted = extract_answer(garbage)
    assert extracted is None or isinstance(extracted, str)
    assert time.monotonic() - t0 < 5.0  # no quadratic blow-up on enormous text
    assert isinstance(oracle.equivalent(garbage, "1"), bool)
    assert oracle.equivalent(garbage, garbage) is True  # identical text, never parsed
    assert validity_issue(garbage, garbage) in {None, "trivial_answer", "proof_problem"}
    assert isinstance(vote([garbage, garbage, None], oracle, 0.25).agree, list)


def test_cache_evicts_the_least_recently_used_pair(monkeypatch):
    o = EquivalenceOracle(MathCheckSettings(cache_size=2))
    asked: list[tuple[str, str]] = []

    def worker(keys):  # stands in for math-verify: records what reaches it
        asked.extend(keys)
        return [True] * len(keys)

    monkeypatch.setattr(o, "_ask_worker", worker)
    assert o.equivalent("x", "a") and o.equivalent("y", "b")
    assert o.equivalent("a", "x")  # a hit (keys are symmetric): (a, x) is now the most recent
    assert o.equivalent("z", "c")  # a third pair: (b, y), the least recently used, goes
    assert asked == [("a", "x"), ("b", "y"), ("c", "z")]
    assert o.equivalent("x", "a") and o.equivalent("c", "z")  # still cached
    assert len(asked) == 3
    assert o.equivalent("y", "b")  # evicted: asked again
    assert asked[3:] == [("b", "y")]


def test_cache_size_zero_remembers_nothing(monkeypatch):
    o = EquivalenceOracle(MathCheckSettings(cache_size=0))
    asked: list[tuple[str, str]] = []
    monkeypatch.setattr(o, "_ask_worker", lambda keys: asked.extend(keys) or [False] * len(keys))
    assert not o.equivalent("x", "a") and not o.equivalent("x", "a")
    assert asked == [("a", "x"), ("a", "x")]
