"""The decontamination judge without models or embeddings: the paraphrase set itself, the numbers
a problem states, the cheap judge on the set's pairs, and the model judge's prompt, parsing and
fallback with a scripted backend (the real model path runs in tests/test_filter_workers.py)."""

from __future__ import annotations

import time
from collections import Counter
from fractions import Fraction

import pytest
from scripted_backend import ScriptedBackend

from llm.prompts import PARAPHRASE_JUDGE, ParseError, parse_judge_verdict
from llm.roles import Role
from promptcot.settings import Settings
from vectorstore.benchmarks import load_benchmarks
from vectorstore.calibrate import load_paraphrase_set
from vectorstore.paraphrase import (
    JudgePair,
    SkeletonJudge,
    number_diff,
    problem_numbers,
)
from vectorstore.settings import DecontamSettings, JudgeSettings
from workers.judge import ModelJudge, build_judge

SET = load_paraphrase_set()
BENCHMARK = {b.id: b.text for b in load_benchmarks(DecontamSettings().benchmark_sets)}


@pytest.fixture(scope="module")
def cheap() -> SkeletonJudge:
    return SkeletonJudge.for_benchmarks(BENCHMARK.values(), JudgeSettings())


def _pair(item_id: str) -> JudgePair:
    item = next(i for i in SET if i.id == item_id)
    return JudgePair(item.text, item.source, BENCHMARK[item.source], 0.7)


def test_the_set_has_40_paraphrases_and_40_near_misses_of_existing_benchmark_items():
    kinds = Counter(i.kind for i in SET)
    assert kinds["paraphrase"] >= 40 and kinds["near_miss"] >= 40
    assert set(kinds) == {"paraphrase", "near_miss"}
    assert len({i.id for i in SET}) == len(SET)
    assert all(i.source in BENCHMARK for i in SET), "every item names a real benchmark item"
    assert {i.source.split(":")[0] for i in SET} == {"aime24", "aime25", "hmmt25", "gsm8k_test"}
    assert all(i.change for i in SET if i.kind == "near_miss"), "a near miss says what changed"
    assert all(i.text != BENCHMARK[i.source] for i in SET)


def test_numbers_are_read_as_values_whatever_their_spelling():
    assert problem_numbers("It costs $1,000 or 6{,}000{,}000 cents") == {1000, 6_000_000}
    half = Fraction(1, 2)
    for text in ("$j+0.5$", r"$\frac{1}{2}$", r"$\tfrac12$", r"${1 \over 2}$", "half", "1:2"):
        assert half in problem_numbers(text), text
    assert problem_numbers("a regular octagon, three dozen eggs, a third of them") == {8, 3, 12}
    assert problem_numbers(r"$\log_2 x$ and $\sqrt{3}$") == {2, 3}
    assert problem_numbers("from 1:00 PM to 5:30 PM") == {1, 0, 5, 30}  # a clock, not a ratio


def test_numbers_one_and_two_do_not_count_a_new_number_does():
    same = number_diff("Both of the two boxes hold 15 apples", "A box has 15 apples; one box")
    assert same.same
    changed = number_diff("Each box holds 16 apples", "Each box holds 15 apples")
    assert changed.new == {16} and changed.missing == {15}


def test_rare_shared_numbers_are_worth_more_bits_than_common_ones(cheap):
    rarity = cheap.rarity
    assert rarity.bits({Fraction(4)}) < 2 < rarity.bits({Fraction(3), Fraction(60)})
    assert rarity.bits({Fraction(80_000), Fraction(50_000), Fraction(150)}) > 20


@pytest.mark.parametrize(
    "item_id", ["para:gsm8k_test:9", "para:aime24:21", "para:gsm8k_test:2", "para:aime25:3"]
)
def test_the_cheap_judge_calls_a_paraphrase_the_same_problem(cheap, item_id):
    [verdict] = cheap.judge([_pair(item_id)])
    assert verdict.same and verdict.judge == "skeleton@v1" and "numbers: same" in verdict.detail


@pytest.mark.parametrize(
    "item_id", ["miss:gsm8k_test:9", "miss:aime24:21", "miss:gsm8k_test:2", "miss:aime24:2"]
)
def test_the_cheap_judge_calls_a_near_miss_with_other_numbers_different(cheap, item_id):
    [verdict] = cheap.judge([_pair(item_id)])
    assert not verdict.same and "new" in verdict.detail


def test_the_cheap_judge_wants_evidence_not_just_equal_numbers(cheap):
    """Two different short problems that happen to state only a "4": not the same problem."""
    pair = JudgePair("Find the 4th prime.", "x", "How many squares does a 4 by 4 board have?", 0.7)
    [verdict] = cheap.judge([pair])
    assert number_diff(pair.candidate, pair.benchmark).same and not verdict.same


# The model judge ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer,same",
    [
        (" SAME", True),
        (" **Same**.", True),
        ("same problem", True),
        (" DIFFERENT", False),
        ("Different: the question changed", False),
        (" Not the same", False),
        ("NOT SAME", False),
    ],
)
def test_judge_verdicts_are_read_whatever_the_case_and_markup(answer, same):
    assert parse_judge_verdict(answer) is same


@pytest.mark.parametrize(
    "answer,reason", [("", "empty_verdict"), ("  \n", "empty_verdict"), ("Maybe?", "malformed")]
)
def test_unreadable_judge_answers_are_parse_errors(answer, reason):
    with pytest.raises(ParseError) as e:
        parse_judge_verdict(answer)
    assert e.value.reason.startswith(reason)


def _model_judge(respond, cheap) -> tuple[ModelJudge, ScriptedBackend]:
    backend = ScriptedBackend(respond, version="teacher@v3")
    return ModelJudge(backend, JudgeSettings(kind="model"), fallback=cheap), backend


def test_the_model_judge_asks_once_per_pair_and_records_its_answer(cheap):
    para, miss = _pair("para:aime24:9"), _pair("miss:aime24:9")
    judge, backend = _model_judge(
        lambda prompt, _: " SAME" if para.candidate in prompt else " DIFFERENT", cheap
    )
    verdicts = judge.judge([para, miss])
    assert [v.same for v in verdicts] == [True, False]
    assert all(v.judge == "teacher@v3" and v.template == PARAPHRASE_JUDGE.id for v in verdicts)
    assert not any(v.malformed for v in verdicts)
    assert len(backend.prompts) == 2
    assert all(p.endswith(PARAPHRASE_JUDGE.assistant_prefix) for p in backend.prompts)
    assert BENCHMARK["aime24:9"] in backend.prompts[0]


def test_an_unreadable_model_answer_never_rejects_by_itself(cheap):
    """Malformed output falls back to the cheap signal, marked and visible: a near miss stays a
    near miss, and a paraphrase the cheap signal catches is still caught."""
    judge, _ = _model_judge(lambda prompt, _: "I would need to think about it", cheap)
    miss, para = judge.judge([_pair("miss:gsm8k_test:9"), _pair("para:gsm8k_test:9")])
    assert miss.malformed and not miss.same
    assert para.malformed and para.same
    assert "malformed_verdict" in miss.detail and "skeleton@v1" in miss.detail
    empty, _ = _model_judge(lambda prompt, _: "", cheap)
    [verdict] = empty.judge([_pair("miss:gsm8k_test:9")])
    assert verdict.malformed and not verdict.same and "empty_completion" in verdict.detail


def test_settings_choose_the_judge_and_a_model_judge_needs_a_model():
    texts = list(BENCHMARK.values())[:50]

    def judge(kind: str, **models):
        return build_judge(
            Settings(vectorstore={"decontam": {"judge": {"kind": kind}}}, models=models), texts
        )

    assert judge("off") is None
    assert isinstance(judge("skeleton"), SkeletonJudge)
    with pytest.raises(ValueError, match="models.judge.model is not set"):
        judge("model")  # the embedded SmolLM2 cannot judge: refused, not silently used
    scripted = ScriptedBackend(lambda prompt, _: " SAME")
    settings = Settings(vectorstore={"decontam": {"judge": {"kind": "model"}}})
    built = build_judge(settings, texts, {Role.JUDGE: scripted})
    assert isinstance(built, ModelJudge) and built.backend is scripted


@pytest.mark.parametrize(
    "text",
    [
        "7" * 20_000,  # past Python's 4,300-digit int conversion limit
        "1" * 6_000 + ":5 and 3/" + "9" * 5_000,
        "\\frac" + " " * 8_000 + "x",  # whitespace where a regex could backtrack
        "{" + " " * 8_000 + "\\over 3}",
    ],
)
def test_hostile_text_is_read_quickly_and_never_raises(text, cheap):
    start = time.perf_counter()
    problem_numbers(text)
    cheap.judge([JudgePair(text, "x", BENCHMARK["aime24:0"], 0.6)])
    assert time.perf_counter() - start < 0.2
