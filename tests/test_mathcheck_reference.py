"""A reference the solver did not choose (verification/mathcheck/reference.py): final answers
that may vote, the arithmetic checker, the designer's and the teacher's references."""

from __future__ import annotations

import pytest

from verification.mathcheck import EquivalenceOracle, MathCheckSettings
from verification.mathcheck import reference as ref
from verification.mathcheck.reference import (
    agreement,
    check_arithmetic,
    designer_reference,
    final_answer,
    teacher_reference,
    voting_answer,
)


@pytest.fixture(scope="module")
def oracle():
    with EquivalenceOracle(MathCheckSettings()) as o:
        yield o


@pytest.mark.parametrize(
    "text,answer",
    [
        ("so \\boxed{18}. Then more text 7", "18"),
        ("First \\boxed{3}, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("Adding up, the answer is 42. We are done, 7 apples left.", "42"),
        ("The final answer is: $x = 3$", "x = 3"),
        ("The total is 56.", None),  # the last-number fallback is not a final answer
        ("#### 56", None),
        ("Answer: 56", None),
        ("\\boxed{", None),  # a box cut off by the budget
        ("", None),
    ],
)
def test_only_a_box_or_an_explicit_statement_is_a_final_answer(text, answer):
    assert final_answer(text) == answer


def test_a_truncated_or_failed_rollout_cannot_vote_whatever_it_says():
    assert voting_answer("\\boxed{5}", ok=True, truncated=False) == ("5", None)
    assert voting_answer("\\boxed{5} and then", ok=True, truncated=True) == (None, "truncated")
    assert voting_answer("the sum is 5", ok=True, truncated=False) == (None, "no_answer")
    assert voting_answer("\\boxed{5}", ok=False, truncated=False)[0] is None


@pytest.mark.parametrize(
    "text",
    [
        "Natalia sold 48/2 = 24 clips in May.",
        "Working 50 minutes, she earned 0.2 x 50 = $10.",
        "Betty needs 100 - 50 - 30 - 15 = $5 more.",
        "1. She reads 12 x 2 = 24 pages",  # a list number is no operand
        "There are 80/100 * 10 = 8 more purple flowers",
        "15% of $80 = (15/100)*$80 = $12",
        "$1,234.50 + $0.50 = $1,235 in all",
        "He has 2(3 + 4) = 14 marbles",
        "10 points + 14 + 6 = 30 points",  # units between a number and an operator
        "60 minutes x 3/4 = 45 minutes",
        "She ate 1 1/2 + 2 1/2 = 4 pies, and 17/3 = 5 and 2/3 loads",  # mixed numbers
        "2/ 1/5 = 10 cupcakes",  # a tight fraction is one number
        "1/3 = 0.33, 2/3 = 0.666...",  # rounded and cut results
        "60/100 x 100 = 60% of them; 100% - 80% = 20% are children",
        "That is 0900-0130 = 0730 hours",  # clock times are not arithmetic
        "2 kg = 2 * 1000 = 2000 g",  # a label before "=" is not the left side
        "Let x be the number: 26 = 5 + 3x, so 21 = 3x and x = 7",  # algebra is not checked
        "Answer - 5 + 3 = 8",  # a dash after a word is punctuation
    ],
)
def test_arithmetic_that_holds_checks(text):
    result = check_arithmetic(text)
    assert result.ok, result.failed


@pytest.mark.parametrize(
    "text,failed",
    [
        ("Natalia sold 48/2 = 25 clips in May.", "48 / 2 = 25"),
        ("Mr. Mathews made $4200+$3000 = $8600", "4200 + 3000 = 8600"),
        ("a = 2 + 2 = 4 = 5", "4 = 5"),
        ("She pays 40 * 25% = 12 dollars", "40 * 25% = 12"),
        ("7/2 = 3 boxes", "7 / 2 = 3"),  # an integer result is exact
        ("(5 + 3) * 2 = 18", "( 5 + 3 ) * 2 = 18"),
    ],
)
def test_arithmetic_that_does_not_hold_is_named(text, failed):
    result = check_arithmetic(text)
    assert not result.ok and result.failed == [failed]


def test_only_chains_that_compute_are_counted():
    assert check_arithmetic("On day 1 = Monday, 5 = 5").checked == 0
    assert check_arithmetic("no numbers at all = none").checked == 0
    assert check_arithmetic("48/2 = 24 and 24 + 48 = 72 = 72").checked == 3
    line_break = "He had 5 + 3 = 8\n9 pens"  # a chain never runs on to the next line
    assert check_arithmetic(line_break).ok


def test_the_designer_reference_is_the_stated_answer_when_the_steps_check():
    rationale = (
        "Concepts to combine: division; addition.\n"
        "1. Natalia sold 48/2 = 24 clips in May.\n"
        "2. Natalia sold 48+24 = 72 clips altogether in April and May.\n"
        "Ask for the final quantity, so the answer is 72."
    )
    got = designer_reference(rationale)
    assert (got.answer, got.source, got.reason) == ("72", "designer", None)
    assert "2 arithmetic steps checked" in got.detail
    chained = designer_reference("so the answer is 1 + 18 = 19.")
    assert chained.answer == "19"  # the chain's result, the chain checked with the rest
    assert designer_reference("so the answer is 1 + 18 = 20.").reason == "designer_arithmetic"


def test_no_stated_answer_or_a_wrong_step_leaves_no_reference():
    missing = designer_reference("Combine 48/2 = 24 with a second month.")
    assert (missing.answer, missing.reason) == (None, "no_reference")
    wrong = designer_reference("48/2 = 25 clips, so the answer is 73.")
    assert (wrong.answer, wrong.reason) == (None, "designer_arithmetic")
    assert "48 / 2 = 25" in wrong.detail
    long = designer_reference("1 + 1 = 2. " * 3000 + "So the answer is 2.")
    assert (long.answer, long.reason) == (None, "no_reference")


def test_a_bare_claim_with_no_step_checked_is_no_reference():
    """A reference is "checked" only when the oracle checked something: p_θ's cold-started
    rationales state an answer with no ``a op b = c`` step at all (5 of 30 in bench.reference's
    run), and that claim is no more independent than a guess."""
    bare = designer_reference("Convert the capacity to volume. So the answer is 1000.")
    assert (bare.answer, bare.reason) == (None, "no_reference")
    assert "0 arithmetic steps checked" in bare.detail
    one = designer_reference("Multiply: 10 * 100 = 1000, so the answer is 1000.")
    assert one.answer == "1000"
    assert designer_reference("So the answer is 1000.", min_steps=0).answer == "1000"


def test_every_cold_start_rationale_of_the_first_seeds_gives_the_gold_answer():
    """The rationales p_θ is trained on (workers/annotation.py) state the seed's answer with
    steps that check: the designer's reference of a faithful p_θ is the right answer, or none
    where the steps the rationale kept have no ``a op b = c`` in them (73 of the first 512)."""
    from workers.annotation import annotate_from_seed
    from workers.seeds import load_seeds

    seeds = load_seeds("gsm8k", "train", 64)
    gold = 0
    for seed in seeds:
        _, rationale = annotate_from_seed(seed, 5)
        got = designer_reference(rationale)
        if got.answer is None:
            assert check_arithmetic(rationale).checked == 0, rationale
            assert got.reason == "no_reference"
            continue
        assert got.answer.replace(",", "") == seed.answer, rationale
        gold += 1
    assert gold >= 48, gold  # three in four at least


def test_the_teacher_reference_is_its_majority(oracle):
    got = teacher_reference(["49", "49.0", None, "50"], oracle, 0.5)
    assert (got.answer, got.source, got.reason) == ("49", "teacher", None)
    split = teacher_reference(["1", "2", None, None], oracle, 0.5)
    assert (split.answer, split.reason) == (None, "no_reference")
    assert teacher_reference([None] * 4, oracle, 0.5).reason == "no_reference"


def test_agreement_is_by_equivalence_and_none_never_agrees(oracle):
    assert agreement("50", ["50", "50.0", "\\frac{100}{2}", None, "49"], oracle) == [
        True,
        True,
        True,
        False,
        False,
    ]


@pytest.mark.parametrize(
    "shape",
    [
        "1+" * 5000 + "1 = 7",  # one huge run
        "(1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1) = 5 . " * 400,
        "( " * 8000 + "1 = 1",  # deep, unclosed parentheses
        ("1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 ) = 2 ; " * 150),
        "9" * 19_000 + " = 1",
        "x = " * 5000,
    ],
)
def test_hostile_text_costs_work_linear_in_its_length(shape, monkeypatch):
    """Work is counted, not timed: every token the parser is handed, over all its attempts."""
    handed = 0
    evaluate = ref._evaluate

    def counting(toks):
        nonlocal handed
        handed += len(toks)
        return evaluate(toks)

    monkeypatch.setattr(ref, "_evaluate", counting)
    check_arithmetic(shape)
    designer_reference(shape[: ref.MAX_RATIONALE_CHARS])
    assert handed <= 40 * len(shape), handed


@pytest.mark.parametrize(
    "name", ["200 KB of \\(", "10,000 brackets", "power towers", "a lone surrogate", "NUL", "sums"]
)
def test_a_hostile_designer_rationale_is_read_in_bounded_time(name):
    """The designer's rationale is model text: its answer and its arithmetic are read in time
    linear in it (10 s is a behaviour bound for a loaded 2-core machine, not a speed goal)."""
    import time

    from hostile_text import TEXTS

    text = TEXTS.get(name) or "12+3*4=24 and (1+2)*3=9, " * 8_000  # 200 KB of steps to check
    started = time.monotonic()
    found = designer_reference(text + " so the answer is 7")
    assert time.monotonic() - started < 10.0
    assert found is not None
