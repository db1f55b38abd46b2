"""Seed loading from the shipped corpora and the lexicon annotator on real rows."""

from __future__ import annotations

import json

import pytest

import corpora
from workers.lexicon import annotate_with_lexicon, load_lexicon, score_concepts
from workers.seeds import build_default_pool, codeforces_statement, gsm8k_final_answer, load_seeds


def test_gsm8k_seeds_counts_and_answers():
    train = load_seeds("gsm8k", "train")
    assert len(train) == 7473
    assert len(load_seeds("gsm8k", "test")) == 1319
    first = train[0]
    assert first.domain == "math" and first.source == "gsm8k" and first.source_id == "train-0"
    assert first.text.startswith("Natalia sold clips") and first.answer == "72"
    # Every answer is a number once thousands separators are dropped ("1,000" -> "1000").
    for seed in train:
        float(seed.answer)
    assert len({s.id for s in train}) == len(train)
    assert len(load_seeds("gsm8k", "train", limit=10)) == 10
    assert [s.id for s in load_seeds("gsm8k", "train", limit=3, skip=7)] == [
        s.id for s in train[7:10]
    ]


def test_gsm8k_answer_parsing():
    assert gsm8k_final_answer("... so 2,125 dollars.\n#### 2,125") == "2125"
    assert gsm8k_final_answer("x\n#### -3.5") == "-3.5"
    with pytest.raises(ValueError):
        gsm8k_final_answer("no answer line")


def test_codeforces_seeds_are_bare_statements_with_tests():
    seeds = load_seeds("codeforces")
    raw = [json.loads(line) for line in corpora.path("benchmarks", "codeforces.jsonl").open()]
    assert len(seeds) == len(raw) == 408
    for seed, row in zip(seeds, raw):
        assert seed.domain == "code"
        for marker in (
            "<|im_start|>",
            "<|im_end|>",
            "<think>",
            "You will be given a question",
            "Question:",
            "Read the inputs from stdin",
            "# YOUR CODE HERE",
        ):
            assert marker not in seed.text
        assert len(seed.text) > 50
        io = json.loads(row["input_output"])
        assert [t["input"] for t in seed.tests] == io["inputs"]
        assert [t["output"] for t in seed.tests] == io["outputs"]
    first = seeds[0]
    assert first.text.startswith("You are given two integers $x$ and $y$.")
    assert first.text.endswith("the maximum of $x$ and $y$.")
    assert first.tests[0]["input"].startswith("10\n1 9") and first.tests[0]["output"].startswith(
        "1 9\n4 8"
    )
    assert sum(len(s.tests) for s in seeds) > 408  # some problems carry several tests


def test_codeforces_statement_strips_wrapper():
    prompt = (
        "<|im_start|>user\nYou will be given a question (problem specification) and will "
        "generate ...\n\n"
        "Question: Print 42.\n\nRead the inputs from stdin solve the problem ...\n```python\n```\n"
        "<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert codeforces_statement(prompt) == "Print 42."


def test_unknown_source_and_split_rejected():
    with pytest.raises(ValueError):
        load_seeds("aime24")
    with pytest.raises(ValueError):
        load_seeds("gsm8k", "validation")
    with pytest.raises(ValueError):
        load_seeds("codeforces", "test")


def test_lexicon_size_and_names():
    lexicon = load_lexicon()
    assert len(lexicon["math"]) >= 140 and len(lexicon["code"]) >= 75


def test_lexicon_annotates_most_gsm8k_rows_with_two_or_more_concepts():
    seeds = load_seeds("gsm8k", "train", limit=1500)
    annotated = [annotate_with_lexicon(s.text, "math", 5) for s in seeds]
    share = sum(len(c) >= 2 for c in annotated) / len(annotated)
    print(f"gsm8k train[:1500]: {share:.1%} of rows get >= 2 lexicon concepts")
    assert share > 0.9
    assert all(len(c) <= 5 and len(set(c)) == len(c) for c in annotated)
    # Specific content is found: the first row halves April's sales and sums two months.
    assert {"fractions of a quantity", "addition of quantities"} <= set(annotated[0])


def test_lexicon_scores_and_ranking():
    text = (
        "A shirt costs $40 and is on sale at 25% off. What is the sale price after an 8% sales tax?"
    )
    scored = dict(score_concepts(text, "math"))
    assert scored["discounts and sale prices"] > 0 and scored["percent of a quantity"] > 0
    assert scored["sales tax and tips"] > 0
    top = annotate_with_lexicon(text, "math", 3)
    assert "discounts and sale prices" in top
    assert annotate_with_lexicon("zzz qqq", "math", 5) == []
    assert "graph traversal (DFS/BFS)" in annotate_with_lexicon(
        "You are given an undirected graph with n vertices and m edges. Find the shortest path.",
        "code",
        5,
    )
    with pytest.raises(ValueError):
        annotate_with_lexicon("text", "physics", 5)


def test_codeforces_rows_get_concepts():
    seeds = load_seeds("codeforces", limit=120)
    annotated = [annotate_with_lexicon(s.text, "code", 5) for s in seeds]
    share = sum(len(c) >= 2 for c in annotated) / len(annotated)
    print(f"codeforces[:120]: {share:.1%} of rows get >= 2 lexicon concepts")
    assert share > 0.8


def test_shipped_pool_is_up_to_date():
    """The shipped pool.json is what `promptcot seeds build-pool` makes from today's
    lexicon: a lexicon edit without a rebuild fails here."""
    from workers.concepts import load_pool

    assert build_default_pool().to_json() == load_pool().to_json()
