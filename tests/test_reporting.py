"""`promptcot report` (promptcot.reporting) and the rolling diversity window of the filter stage,
with the real embedding model (loaded once for the module). Kept small: the machine is shared."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from promptcot.reporting import write_report
from promptcot.settings import Settings
from streams import metrics
from streams.records import Problem
from vectorstore.embedder import Embedder
from vectorstore.settings import EmbedderSettings
from workers.diversity_window import DiversityWindow
from workers.stages.sink import problems_table

VARIED_MATH = [
    "A shop sells pens at $3 each. If Maria buys 7 pens and pays with a $50 bill, how much "
    "change does she get?",
    "A train leaves at 9:40 and arrives at 13:15. How many minutes does the trip take?",
    "Find the number of positive divisors of 360.",
    "The area of a circle is 49 pi square centimeters. What is its circumference?",
    "How many ways can 5 different books be arranged on a shelf if two particular books must "
    "be adjacent?",
    "Solve for x: 3x^2 - 12x + 9 = 0.",
    "A recipe needs 2/3 cup of sugar per batch. How much sugar do 9 batches need?",
    "What is the probability of rolling a sum of 8 with two fair six-sided dice?",
]
NEAR_IDENTICAL_MATH = [
    f"Tom has {a} apples and buys {b} more apples at the market. How many apples does Tom have now?"
    for a, b in [(3, 4), (5, 2), (7, 6), (8, 1), (2, 9), (4, 4), (6, 3), (9, 5)]
]
CODE = [
    "Given an array of n integers, print the length of the longest strictly increasing "
    "contiguous subarray.",
    "You are given a string s. Determine whether it can be rearranged into a palindrome; "
    "print YES or NO.",
]
MATH_CONCEPTS = [
    ["unit price", "profit and revenue"],
    ["elapsed time"],
    ["fractions of a quantity"],
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(EmbedderSettings(torch_threads=1))


def _problem(i: int, text: str, domain: str, concepts: list[str]) -> Problem:
    return Problem(
        candidate_id=f"cand-{domain}-{i}-{abs(hash(text)) % 10**8}",
        domain=domain,
        difficulty="AMC12" if domain == "math" else "codeforces-1200",
        concepts=concepts,
        problem=text,
        rationale="r",
        pass_rate=0.5,
        n_rollouts=4,
    )


def _settings(tmp: Path, math_texts: list[str], code_texts: list[str] = ()) -> Settings:
    problems = [
        _problem(i, t, "math", MATH_CONCEPTS[i % len(MATH_CONCEPTS)])
        for i, t in enumerate(math_texts)
    ] + [
        _problem(i, t, "code", ["greedy algorithms", "not-in-pool"])
        for i, t in enumerate(code_texts)
    ]
    sink = tmp / "out" / "problems"
    sink.mkdir(parents=True)
    if problems:
        half = len(problems) // 2  # two part files, and one problem written twice (redelivery)
        pq.write_table(problems_table(problems[: half + 1]), sink / "part-1.parquet")
        pq.write_table(problems_table(problems[half:]), sink / "part-2.parquet")
    return Settings(
        sink={"output_dir": str(tmp / "out")},
        vectorstore={"store": {"uri": str(tmp / "vectorstore")}},
    )


def _check_ranges(summary: dict) -> None:
    for key in ("mean_pairwise_distance", "centroid_distance", "mean_nearest_seed_distance"):
        assert 0.0 <= summary[key] <= 2.0, (key, summary[key])
    for cov in summary["concept_coverage"].values():
        assert 0.0 <= cov["coverage"] <= 1.0
        assert cov["used"] <= cov["pool"]


def test_report_writes_map_and_sane_measures(tmp_path: Path, embedder: Embedder) -> None:
    settings = _settings(tmp_path, VARIED_MATH, CODE)
    out = tmp_path / "map.png"
    summary = write_report(settings, out, n_seeds=12, embedder=embedder)

    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(json.dumps(summary)) == summary  # JSON-able, as `promptcot report` prints
    assert summary["source"] == "sink"
    assert summary["synthetic"] == {"total": 10, "plotted": 10, "by_domain": {"code": 2, "math": 8}}
    assert summary["seeds"]["by_source"] == {"codeforces": 6, "gsm8k": 6}  # code problems exist
    _check_ranges(summary)
    assert summary["mean_pairwise_distance"] > 0.3  # varied topics
    for domain in ("math", "code"):
        assert 0.0 <= summary["by_domain"][domain]["mean_nearest_seed_distance"] <= 2.0
    math_cov = summary["concept_coverage"]["math"]
    assert math_cov["used"] == 4 and math_cov["coverage"] == pytest.approx(
        4 / math_cov["pool"], abs=1e-4
    )
    assert summary["concept_coverage"]["code"]["used"] == 1  # "not-in-pool" is not counted


def test_near_identical_problems_are_less_diverse(tmp_path: Path, embedder: Embedder) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    same = write_report(
        _settings(tmp_path / "a", NEAR_IDENTICAL_MATH),
        tmp_path / "a.png",
        n_seeds=6,
        embedder=embedder,
    )
    varied = write_report(
        _settings(tmp_path / "b", VARIED_MATH), tmp_path / "b.png", n_seeds=6, embedder=embedder
    )
    _check_ranges(same)
    assert same["seeds"]["by_source"] == {"gsm8k": 6}  # no code problems: no Codeforces seeds
    assert same["mean_pairwise_distance"] < 0.5 * varied["mean_pairwise_distance"]


def test_no_synthetic_problems_is_a_clear_error(tmp_path: Path, embedder: Embedder) -> None:
    settings = _settings(tmp_path, [])
    with pytest.raises(ValueError, match="no accepted synthetic problems"):
        write_report(settings, tmp_path / "map.png", n_seeds=5, embedder=embedder)
    assert not (tmp_path / "map.png").exists()
    assert not (tmp_path / "vectorstore").exists()  # the report never creates a store


def test_falls_back_to_the_vector_store(tmp_path: Path, embedder: Embedder) -> None:
    from vectorstore.store import ProblemStore, StoredProblem

    settings = _settings(tmp_path, [])
    texts = VARIED_MATH[:3]
    store = ProblemStore(embedder.dim, settings.vectorstore.store)
    store.add(
        [
            StoredProblem(
                id=f"p{i}",
                text=t,
                text_hash=f"{i:x}",
                domain="math",
                vector=v,
                metadata={"concepts": ["elapsed time"]},
            )
            for i, (t, v) in enumerate(zip(texts, embedder.embed(texts), strict=True))
        ]
    )
    assert [r["id"] for r in store.rows()] == ["p0", "p1", "p2"]
    summary = write_report(settings, tmp_path / "map.png", n_seeds=4, embedder=embedder)
    assert summary["source"] == "store" and summary["synthetic"]["total"] == 3
    assert summary["concept_coverage"]["math"]["used"] == 1
    _check_ranges(summary)


def test_diversity_window_rolls_over_and_tracks_variety(embedder: Embedder) -> None:
    same = embedder.embed(NEAR_IDENTICAL_MATH[:4])
    varied = embedder.embed(VARIED_MATH[:4])
    seed_centroid = embedder.embed(NEAR_IDENTICAL_MATH[4:]).mean(axis=0)
    pool = ["unit price", "elapsed time", "probability", "divisors"]

    window = DiversityWindow(size=4)
    window.add(same, [["unit price"]] * 4)
    before = window.measures(seed_centroid, pool)
    assert len(window) == 4
    assert before["concept_coverage"] == 0.25
    assert before["seed_centroid_distance"] < 0.1  # the window sits on the seed sample

    window.add(varied[:2], [["elapsed time"], ["probability"]])
    assert len(window) == 4  # bounded: the two oldest fell out
    window.add(varied[2:], [["divisors"], []])
    after = window.measures(seed_centroid, pool)
    assert len(window) == 4
    np.testing.assert_allclose(window.vectors, varied)  # only the varied ones remain
    assert after["mean_pairwise_distance"] > before["mean_pairwise_distance"] + 0.2
    assert after["seed_centroid_distance"] > before["seed_centroid_distance"]
    assert after["concept_coverage"] == 0.75  # "unit price" rolled out
    for value in after.values():
        assert 0.0 <= value <= 2.0
    with pytest.raises(ValueError):
        window.add(varied[:2], [["x"]])  # one concept list per vector


def test_filter_stage_sets_diversity_gauges(embedder: Embedder) -> None:
    from workers.stages.filter import FilterStage

    stage = FilterStage.__new__(FilterStage)  # no broker, no contamination index: just the hook
    stage.settings = Settings()
    stage.dedup = SimpleNamespace(embedder=embedder)
    stage.window = DiversityWindow(256)
    stage._seed_centroid = None
    stage._pool = None
    vectors = embedder.embed(VARIED_MATH[:3])
    candidates = [SimpleNamespace(concepts=c) for c in MATH_CONCEPTS]
    screened = [SimpleNamespace(vector=v) for v in vectors]
    decisions = [SimpleNamespace(accepted=a) for a in (True, True, False)]
    stage._update_diversity(candidates, screened, decisions)

    assert len(stage.window) == 2 and stage._seed_centroid is not None
    gauge = {
        m: metrics.DIVERSITY.labels(measure=m)._value.get()
        for m in ("mean_pairwise_distance", "seed_centroid_distance", "concept_coverage")
    }
    assert gauge["mean_pairwise_distance"] > 0.3
    assert 0.0 < gauge["seed_centroid_distance"] <= 2.0
    assert 0.0 < gauge["concept_coverage"] <= 1.0
