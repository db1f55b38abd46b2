"""The equivalence oracle (verification/mathcheck/oracle.py): math-verify in a bounded process."""

from __future__ import annotations

import threading
import time

import pytest
from mathcheck_data import sample_golds

from streams import metrics
from verification.mathcheck import (
    EquivalenceOracle,
    MathCheckSettings,
    WorkerStartError,
    extract_answer,
    validity_issue,
    vote,
)
from verification.mathcheck.oracle import MATH_VERIFY


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
    slow = [v for v, _ in oracle._ask_worker(pairs)]  # the worker's verdicts on the same pairs
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


def test_a_worker_that_dies_between_the_liveness_check_and_the_send_is_replaced(
    oracle, monkeypatch
):
    assert oracle.equivalent("(6)", "6 + 0")
    starts = oracle.worker_starts
    dead = oracle._worker
    dead.proc.kill()
    dead.proc.wait()
    dead.conn.close()  # its socket is gone too: the send fails
    monkeypatch.setattr(dead.proc, "poll", lambda: None)  # ... after the check said alive
    assert oracle.equivalent("(7)", "7 + 0") is True
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
    assert validity_issue(garbage, garbage) in {
        None,
        "trivial_answer",
        "proof_problem",
        "garbled_answer",
    }
    assert isinstance(vote([garbage, garbage, None], oracle, 0.25).agree, list)


def test_cache_evicts_the_least_recently_used_pair(monkeypatch):
    o = EquivalenceOracle(MathCheckSettings(cache_size=2))
    asked: list[tuple[str, str]] = []

    def worker(keys, budget=None):  # stands in for math-verify: records what reaches it
        asked.extend(keys)
        return [(True, MATH_VERIFY)] * len(keys)

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
    monkeypatch.setattr(
        o,
        "_ask_worker",
        lambda keys, budget=None: asked.extend(keys) or [(False, MATH_VERIFY)] * len(keys),
    )
    assert not o.equivalent("x", "a") and not o.equivalent("x", "a")
    assert asked == [("a", "x"), ("a", "x")]


def calls(outcome: str) -> float:
    return metrics.counter_value(metrics.MATH_ORACLE_CALLS, outcome=outcome)


def test_a_hanging_check_is_bounded_counted_and_the_oracle_goes_on():
    settings = MathCheckSettings(equivalence_timeout_s=0.5)
    with EquivalenceOracle(settings) as o:
        assert o.equivalent("(2)", "2 + 0")  # worker up and warm
        first_worker = o._worker.proc.pid
        exported = metrics.counter_value(metrics.MATH_ORACLE_TIMEOUTS)
        timeouts, answered = calls("timeout"), calls("math_verify")
        t0 = time.monotonic()
        # The tower hangs sympy; in one batch with pairs before and after it.
        verdicts = o.equivalent_many(
            [("a+a", "2a"), ("2^{2^{2^{2^{100}}}}", "3"), ("b+b", "2b"), ("c-c", "0")]
        )
        elapsed = time.monotonic() - t0
        assert verdicts == [True, False, True, True]
        assert elapsed < 20.0  # its timeout and a new worker's start; the tower never ends
        assert o.timeouts == 1 and o.crashes == 0
        assert metrics.counter_value(metrics.MATH_ORACLE_TIMEOUTS) == exported + 1
        assert calls("timeout") == timeouts + 1 and calls("math_verify") == answered + 3
        assert o._worker.proc.pid != first_worker and o.worker_starts == 2  # respawned
        assert o.equivalent("(z+1)^2", "z^2+2z+1") is True  # and it keeps answering
        cached = calls("cache")
        assert o.equivalent("3", "2^{2^{2^{2^{100}}}}") is False  # remembered, not re-run
        assert calls("cache") == cached + 1 and o.timeouts == 1


def test_a_worker_dying_under_a_check_is_a_crash_not_a_timeout(monkeypatch):
    with EquivalenceOracle(MathCheckSettings(equivalence_timeout_s=30)) as o:
        assert o.equivalent("(2)", "2 + 0")
        crashed, exported = calls("crashed"), metrics.counter_value(metrics.MATH_ORACLE_TIMEOUTS)
        receive = o._receive

        def dying(worker, index, budget):  # the pair is sent: killed under it, as by the OOM
            monkeypatch.setattr(o, "_receive", receive)  # killer; once, at that point, not on
            worker.proc.kill()  # a timer that a loaded machine could make land elsewhere
            return receive(worker, index, budget)

        monkeypatch.setattr(o, "_receive", dying)
        t0 = time.monotonic()
        assert o.equivalent("2^{2^{2^{2^{100}}}}", "7") is False
        assert time.monotonic() - t0 < 10.0  # noticed at once, not after the 30 s bound
        assert o.crashes == 1 and o.timeouts == 0
        assert calls("crashed") == crashed + 1
        assert metrics.counter_value(metrics.MATH_ORACLE_TIMEOUTS) == exported
        assert o.equivalent("y^2+2y+1", "(y+1)^2") is True and o.worker_starts == 2


def test_calls_are_counted_by_outcome(monkeypatch):
    o = EquivalenceOracle(MathCheckSettings(max_answer_chars=10))
    monkeypatch.setattr(
        o, "_ask_worker", lambda keys, budget=None: [(True, MATH_VERIFY)] * len(keys)
    )
    before = {k: calls(k) for k in ("text", "cache", "too_long", "math_verify")}
    o.equivalent_many([("18", "18.0"), ("x", "y"), ("x", "y"), ("x" * 11, "y"), ("y", "x")])
    after = {k: calls(k) - before[k] for k in before}
    # (x, y) three times in one batch: one question to the worker, three checks answered by it
    assert after == {"text": 1, "cache": 0, "too_long": 1, "math_verify": 3}
    o.equivalent("y", "x")
    assert calls("cache") - before["cache"] == 1


def test_worker_that_cannot_start_in_time_is_an_error_not_a_verdict():
    with EquivalenceOracle(MathCheckSettings(worker_start_timeout_s=0.01)) as o:
        with pytest.raises(WorkerStartError):
            o.equivalent("x^2", "x \\cdot x")
        assert o._worker is None  # nothing left running


def test_nul_and_broken_text_are_not_deleted_into_another_answer(oracle):
    """``1\\x002`` equalled ``12`` (NUL deleted) and math-verify reads ``2`` out of
    ``1\\ufffd 2``: an answer holding either equals only identical text (issue 21)."""
    garbled = calls("garbled")
    assert not oracle.equivalent("1\x002", "12")
    assert not oracle.equivalent("1\x00 2", "12")
    assert not oracle.equivalent("12\x1f", "12")  # \x1f is "white space" to str.strip
    assert not oracle.equivalent("1\ufffd 2", "2")
    assert oracle.equivalent("1\x002", "1\x002")
    assert calls("garbled") == garbled + 4


def test_after_an_overrun_the_pairs_sharing_its_answers_are_not_asked():
    tower = "(10^{10^{8}})!"
    with EquivalenceOracle(MathCheckSettings(equivalence_timeout_s=0.5)) as o:
        assert o.equivalent("(2)", "2 + 0")
        hostile = calls("hostile")
        verdicts = o.equivalent_many([("x+1", tower), ("2x", tower), ("a+a", "2a"), ("3", tower)])
        assert verdicts == [False, False, True, False]
        assert o.timeouts == 1 and calls("hostile") == hostile + 2
        assert o.worker_starts == 2  # one restart: the unrelated pair went to a new worker
