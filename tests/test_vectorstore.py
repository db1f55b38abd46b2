"""vectorstore: real all-MiniLM-L6-v2, real LanceDB folders, the shipped benchmark sets."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from vectorstore import dedup as d
from vectorstore.benchmarks import load_benchmarks, resolve_path
from vectorstore.calibrate import edit_numbers, edit_reorder, load_gsm8k, load_paraphrase_set
from vectorstore.decontam import ContaminationIndex
from vectorstore.dedup import CandidateText, DedupFilter
from vectorstore.diversity import (
    centroid_distance,
    concept_coverage,
    mean_nearest_seed_distance,
    mean_pairwise_distance,
)
from vectorstore.embedder import Embedder, EmptyTextError
from vectorstore.paraphrase import SkeletonJudge
from vectorstore.report import write_map
from vectorstore.settings import BenchmarkSetSpec, DecontamSettings, StoreSettings
from vectorstore.store import ProblemStore, StoredProblem
from vectorstore.text import hash_key, ngram_tokens

pytestmark = pytest.mark.slow

# Problems written for these tests: not in GSM8K or any benchmark set.
NOVEL = [
    (
        "A lighthouse keeper climbs 117 steps to the lamp twice each night. How many steps does he "
        "climb in a 30-day month?"
    ),
    "Find the number of positive integers n below 1000 such that n^2 + 3n + 5 is divisible by 11.",
    (
        "A rectangular garden is three times as long as it is wide and its perimeter is 96 meters. "
        "What is its area in square meters?"
    ),
    (
        "Given a string of lowercase letters, print the length of the longest substring in which "
        "every vowel appears an even number of times."
    ),
    (
        "Let ABC be a triangle with AB = 13, BC = 14 and CA = 15. Compute the radius of the circle "
        "tangent to BC and to the extensions of AB and AC."
    ),
    (
        "A baker sells muffins in boxes of 6 and boxes of 10. What is the largest number of "
        "muffins "
        "that cannot be bought exactly using these boxes, if boxes of 15 are also available?"
    ),
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def _subset(spec: BenchmarkSetSpec, rows: int, folder) -> BenchmarkSetSpec:
    """The first rows of a shipped set under the same name (so ids such as gsm8k_test:0 hold)."""
    lines = resolve_path(spec.path).read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
    path = folder / f"{spec.name}.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return spec.model_copy(update={"path": str(path)})


@pytest.fixture(scope="module")
def contamination(embedder: Embedder, tmp_path_factory) -> ContaminationIndex:
    """All math sets in full; GSM8K test and the (long) code sets cut to their first rows, given
    as user-supplied extra sets: embedding all 2.2k items would dominate the test time."""
    folder = tmp_path_factory.mktemp("bench")
    defaults = {s.name: s for s in DecontamSettings().benchmark_sets}
    settings = DecontamSettings(
        cache_dir=folder / "cache",
        benchmark_sets=[defaults[n] for n in ("aime24", "aime25", "hmmt25")],
        extra_benchmark_sets=[
            _subset(defaults["gsm8k_test"], 150, folder),
            _subset(defaults["lcb_v5"], 20, folder),
            _subset(defaults["codeforces"], 20, folder),
        ],
    )
    index = ContaminationIndex.from_settings(embedder, settings)
    assert len(index.items) == 90 + 150 + 20 + 20
    assert len(list((folder / "cache").glob("benchmarks-*.npy"))) == 1
    return index


def test_benchmark_embeddings_are_reused_from_the_cache(embedder, contamination):
    embedded_before = embedder.texts_embedded
    again = ContaminationIndex.from_settings(embedder, contamination.settings)
    assert embedder.texts_embedded == embedded_before  # nothing re-embedded
    np.testing.assert_array_equal(again.vectors, contamination.vectors)
    assert [i.id for i in again.items] == [i.id for i in contamination.items]


@pytest.fixture(scope="module")
def benchmark_text() -> dict[str, str]:
    return {b.id: b.text for b in load_benchmarks(DecontamSettings().benchmark_sets)}


@pytest.fixture()
def dedup(embedder, contamination, tmp_path) -> DedupFilter:
    store = ProblemStore(embedder.dim, StoreSettings(uri=str(tmp_path / "lance")))
    return DedupFilter(embedder, contamination, store)


def check(dedup: DedupFilter, items: list[CandidateText]) -> list[d.FilterDecision]:
    """Screen and decide in one process, as the filter stage does."""
    return dedup.decide_and_commit(dedup.embed_and_screen(items))


def _clean_gsm8k_train(embedder, contamination: ContaminationIndex, count: int) -> list[str]:
    """Train problems that are not template copies of an indexed test problem (a few are)."""
    texts = [t for t in load_gsm8k("train")[:60] if contamination.ngram_match(t) is None]
    matches = contamination.embedding_matches(embedder.embed(texts))
    kept = [t for t, m in zip(texts, matches, strict=True) if m is None][:count]
    assert len(kept) == count, "not enough clean train problems"
    return kept


# Text handling -------------------------------------------------------------------------------


def test_benchmark_prompts_are_reduced_to_the_statement(benchmark_text):
    code = benchmark_text["lcb_v5:3"]
    assert code.startswith("Takahashi and Aoki played rock-paper-scissors")
    assert "You will be given a question" not in code and "<|im_" not in code
    assert "Read the inputs from stdin" not in code
    math = benchmark_text["aime24:0"]
    assert math.startswith("Let $x,y$") and math.endswith("Find $m+n$.")
    assert len(benchmark_text) == 30 + 30 + 30 + 279 + 131 + 408 + 1319


def test_ngram_tokens_hide_variable_names_and_number_formats():
    a = ngram_tokens("Let $x$ be 1000 and $y = \\frac{3}{4}$.")
    b = ngram_tokens("let  a be 1,000.0 and b=\\tfrac{7}{8}")
    assert a == b == ["let", "<v>", "be", "<num>", "and", "<v>", "<num>", "<num>"]
    assert hash_key("Two  Apples\n") == hash_key("two apples") != hash_key("two apple")


# The benchmark wrappers as they were matched before issue 21: the specification of what
# clean_problem_text removes, quadratic in a run of white space, exact on short text.
_SPEC_WRAPPERS = [
    re.compile(
        r"^\s*You will be given a question \(problem specification\).*?\n\s*Question:\s*",
        re.DOTALL,
    ),
    re.compile(r"\n\s*Read the inputs from stdin solve the problem.*\Z", re.DOTALL),
    re.compile(r"\n\s*You will use the following starter code.*\Z", re.DOTALL),
    re.compile(
        r"\s*Please reason step by step, and put your final answer within \\boxed\{\}\.?\s*\Z"
    ),
]


def test_problem_text_is_cleaned_as_the_old_expressions_did():
    import vectorstore.text as t

    pieces = [
        "\n", " ", "\t", "x", ".", "Question:",
        "You will be given a question (problem specification)",
        "Read the inputs from stdin solve the problem", "You will use the following starter code",
        "Please reason step by step, and put your final answer within \\boxed{}",
    ]  # fmt: skip
    rng = random.Random(21)
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        expected = t._THINK_OPEN.sub("", t._CHATML_TAG.sub("", text))
        for i, spec in enumerate(_SPEC_WRAPPERS):
            expected = spec.sub("", expected, count=1 if i == 0 else 0)
        assert t.clean_problem_text(text) == expected.strip(), repr(text)


@pytest.mark.parametrize("unit", ["\n", " ", "\n \t", "\\("], ids=["nl", "space", "mixed", "open"])
def test_cleaning_200_kb_of_model_text_takes_under_5_s(unit):
    """The wrappers' white-space runs were rescanned from each of their characters: 20 KB of
    newlines took 3.3 s, 200 KB about 5 minutes (issue 21). 5 s is a behaviour bound for a
    loaded 2-core machine (measured: milliseconds), not a speed goal."""
    from vectorstore.text import clean_problem_text

    text = unit * (200_000 // len(unit))
    started = time.monotonic()
    for hostile in (
        text,
        "x" + text + "Read",
        "You will be given a question (problem specification)" + text,
    ):
        clean_problem_text(hostile)
        hash_key(hostile)
        ngram_tokens(hostile)
    assert time.monotonic() - started < 5.0


# Embedder ------------------------------------------------------------------------------------


def test_embedder_normalizes_counts_and_truncates(embedder):
    before_texts, before_tokens = embedder.texts_embedded, embedder.tokens_embedded
    before_truncated = embedder.texts_truncated
    enormous = "The quick brown fox jumps over the lazy dog. " * 50_000  # ~2.2 MB
    vectors = embedder.embed(["How many eggs?", enormous, b"caf\xe9 \xff problem"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.texts_embedded == before_texts + 3
    assert embedder.texts_truncated == before_truncated + 1
    # The enormous text costs at most max_seq_length tokens.
    assert 3 < embedder.tokens_embedded - before_tokens <= 256 + 2 * 16
    assert embedder.prepare(b"caf\xe9") == "caf\ufffd"
    with pytest.raises(EmptyTextError):
        embedder.embed(["fine", "  \n\t "])


# Dedup ---------------------------------------------------------------------------------------


def test_distinct_kept_and_paraphrased_duplicates_rejected(dedup, embedder, contamination):
    originals = _clean_gsm8k_train(embedder, contamination, 12) + NOVEL
    first = check(dedup, [CandidateText(f"p{i}", t, "math") for i, t in enumerate(originals)])
    assert [x.reason for x in first] == [None] * len(originals)
    assert dedup.store.count() == len(originals)

    rng = random.Random(3)
    copies = []
    for i, text in enumerate(originals[:12]):
        copies.append(
            CandidateText(f"ws{i}", "  " + text.upper().replace(" ", "   ") + "\n", "math")
        )
        copies.append(CandidateText(f"nm{i}", edit_numbers(text, rng), "math"))
        copies.append(CandidateText(f"ro{i}", edit_reorder(text, rng), "math"))
    decisions = {x.id: x for x in check(dedup, copies)}
    for i in range(12):
        assert decisions[f"ws{i}"].reason == d.EXACT_DUPLICATE
        assert decisions[f"ws{i}"].nearest_id == f"p{i}"
        for kind in ("nm", "ro"):  # changed numbers, reordered sentences
            assert decisions[f"{kind}{i}"].reason == d.NEAR_DUPLICATE, decisions[f"{kind}{i}"]
            assert decisions[f"{kind}{i}"].nearest_id == f"p{i}"
    assert dedup.store.count() == len(originals)  # nothing rejected was written


def test_near_duplicates_within_one_batch(dedup):
    text = NOVEL[0]
    twin = (
        text.replace("117", "143")
        .replace("30-day", "31-day")
        .replace("lighthouse keeper", "light-house keeper")
    )
    decisions = check(
        dedup,
        [
            CandidateText("a", text, "math"),
            CandidateText("b", twin, "math"),
            CandidateText("c", NOVEL[2], "math"),
        ],
    )
    assert [x.accepted for x in decisions] == [True, False, True]
    assert decisions[1].reason == d.NEAR_DUPLICATE and decisions[1].nearest_id == "a"
    assert decisions[1].similarity >= dedup.settings.near_duplicate_threshold


def test_a_stored_id_keeps_its_first_decision_whatever_its_new_text(dedup):
    """Ids name the unit of work: a candidate regenerated under the same id (a redelivery whose
    sampling came out differently) is the same decision, never a second row."""
    first = [CandidateText(f"other-{i}", NOVEL[i], "math") for i in (0, 2)]
    first.append(CandidateText("cand-1", NOVEL[1], "math"))
    assert all(x.accepted for x in check(dedup, first))
    again = check(dedup, [CandidateText("cand-1", NOVEL[3], "math")])
    assert again[0].accepted
    assert dedup.store.count() == 3  # no second row for cand-1
    assert dedup.store.get("cand-1")["text"].startswith(NOVEL[1][:40])


def test_redelivered_item_is_accepted_once_and_stored_once(dedup):
    item = CandidateText("same-id", NOVEL[1], "math", {"parents": ["cs-1"]})
    assert check(dedup, [item])[0].accepted
    again = check(dedup, [item, item])
    assert [x.accepted for x in again] == [True, True]
    assert dedup.store.count() == 1
    assert dedup.store.get("same-id")["metadata"] == {"parents": ["cs-1"]}


def test_benchmark_copies_rejected_with_the_benchmark_id(dedup, benchmark_text):
    aime = benchmark_text["aime24:0"]
    renamed = aime.replace("x", "p").replace("y", "q").replace("z", "r").replace("m", "s")
    reformatted = aime.replace("{1 \\over 2}", "{1.0 \\over 2.0}").replace("\n", "  \n\n ")
    code = benchmark_text["lcb_v5:3"].replace("N", "M").replace("S", "T")
    first_line = resolve_path("benchmarks/aime25.jsonl").read_text(encoding="utf-8").splitlines()[0]
    raw_prompt = json.loads(first_line)["prompt"]
    items = [
        CandidateText("exact", aime, "math"),
        CandidateText("renamed", renamed, "math"),
        CandidateText("reformatted", reformatted, "math"),
        CandidateText("code", code, "code"),
        CandidateText("chatml", raw_prompt, "math"),
    ]
    decisions = {x.id: x for x in check(dedup, items)}
    expected = {
        "exact": "aime24:0",
        "renamed": "aime24:0",
        "reformatted": "aime24:0",
        "code": "lcb_v5:3",
        "chatml": "aime25:0",
    }
    for item_id, benchmark_id in expected.items():
        assert decisions[item_id].reason == d.BENCHMARK_NGRAM_OVERLAP, decisions[item_id]
        assert decisions[item_id].nearest_id == benchmark_id
    assert dedup.store.count() == 0


def test_reworded_benchmark_problem_caught_by_embedding(dedup, benchmark_text):
    # No 13-gram in common with gsm8k_test:0, same problem.
    reworded = (
        "Every day, the ducks Janet owns produce 16 eggs. Three of them go into her breakfast each "
        "morning, while four are used daily for muffins she bakes for friends. The rest are sold "
        "at the farmers' market at $2 apiece. Daily, how many dollars does Janet earn there?"
    )
    screened = dedup.embed_and_screen([CandidateText("r", reworded, "math")])[0]
    assert screened.ngram_match is None
    decision = dedup.decide_and_commit([screened])[0]
    assert decision.reason == d.BENCHMARK_NEAR_DUPLICATE
    assert decision.nearest_id == "gsm8k_test:0"
    assert decision.similarity >= dedup.contamination.settings.embedding_threshold


class CountingJudge:
    """The real cheap judge, with its calls counted."""

    def __init__(self, judge):
        self.judge_, self.calls, self.pairs = judge, 0, []

    def judge(self, pairs):
        self.calls += 1
        self.pairs += pairs
        return self.judge_.judge(pairs)


@pytest.fixture()
def judged(embedder, contamination, tmp_path) -> DedupFilter:
    cheap = SkeletonJudge.for_benchmarks(
        (i.text for i in contamination.items), contamination.settings.judge
    )
    store = ProblemStore(embedder.dim, StoreSettings(uri=str(tmp_path / "lance")))
    return DedupFilter(embedder, contamination, store, judge=CountingJudge(cheap))


PARAPHRASES = {i.id: i for i in load_paraphrase_set()}


def test_a_reworded_benchmark_problem_under_the_threshold_is_caught_by_the_judge(judged, dedup):
    """New names, new story, numbers kept: under the embedding threshold, so the checks before
    the judge let it through (``dedup`` has no judge); the judge catches it."""
    para = PARAPHRASES["para:gsm8k_test:9"]
    item = CandidateText("p", para.text, "math")
    assert check(dedup, [item])[0].accepted  # without the judge: not caught
    [decision] = check(judged, [item])
    assert decision.reason == d.BENCHMARK_PARAPHRASE, decision
    assert decision.nearest_id == "gsm8k_test:9" == para.source
    settings = judged.contamination.settings
    assert settings.judge.lower_bound <= decision.similarity < settings.embedding_threshold
    assert decision.judged[0].benchmark_id == "gsm8k_test:9" and decision.judged[0].verdict.same
    assert judged.verdicts["same"] >= 1 and judged.store.count() == 0


def test_a_near_miss_passes_and_its_judged_pairs_are_kept(judged):
    miss = PARAPHRASES["miss:gsm8k_test:9"]  # 50 hours worked instead of 45
    [decision] = check(judged, [CandidateText("m", miss.text, "math")])
    assert decision.accepted
    assert [j.benchmark_id for j in decision.judged][0] == "gsm8k_test:9"
    assert not any(j.verdict.same for j in decision.judged)
    assert "new 50" in decision.judged[0].verdict.detail
    assert judged.store.count() == 1


def test_a_candidate_seen_again_is_not_judged_again(judged):
    para = PARAPHRASES["para:gsm8k_test:2"]
    items = [CandidateText("a", para.text, "math"), CandidateText("a", para.text, "math")]
    first = check(judged, items)  # twice in one batch: one judgement per pair
    calls, pairs = judged.judge.calls, len(judged.judge.pairs)
    assert calls == 1 and pairs == len(first[0].judged) >= 1
    again = check(judged, [items[0]])  # redelivered later (past the runtime's journal)
    assert judged.judge.calls == calls and len(judged.judge.pairs) == pairs
    assert again[0].reason == first[0].reason == first[1].reason == d.BENCHMARK_PARAPHRASE
    assert again[0].judged == first[0].judged


def test_empty_enormous_and_non_utf8_text(dedup):
    enormous = NOVEL[4] + " Note that the triangle is acute." * 100_000
    items = [
        CandidateText("empty", "", "math"),
        CandidateText("blank", b" \n\t ", "math"),
        CandidateText("chatml-only", "<|im_start|>user\n<|im_end|>\n", "math"),
        CandidateText("huge", enormous, "math"),
        CandidateText("bytes", NOVEL[3].encode() + b" \xff\xfe", "code"),
    ]
    decisions = {x.id: x for x in check(dedup, items)}
    for item_id in ("empty", "blank", "chatml-only"):
        assert decisions[item_id].reason == d.EMPTY_TEXT
    assert decisions["huge"].accepted and decisions["bytes"].accepted
    assert len(dedup.store.get("huge")["text"]) == dedup.embedder.settings.max_chars
    assert "\ufffd" in dedup.store.get("bytes")["text"]


def test_single_owner_lets_no_duplicate_through_from_two_concurrent_screeners(
    dedup, embedder, contamination
):
    """Two screeners (threads) embed interleaved copies of the same problems; one owner decides."""
    originals = _clean_gsm8k_train(embedder, contamination, 10) + NOVEL
    group_of = {}
    stream_a, stream_b = [], []
    for g, text in enumerate(originals):
        variants = [text, text.replace(".", " ."), edit_reorder(text, random.Random(g))]
        for v, variant in enumerate(variants):
            item = CandidateText(f"g{g}v{v}", variant, "math")
            group_of[item.id] = g
            (stream_a if (g + v) % 2 else stream_b).append(item)
    screened: queue.Queue = queue.Queue()

    def screener(stream):
        for start in range(0, len(stream), 4):
            screened.put(dedup.embed_and_screen(stream[start : start + 4]))

    threads = [threading.Thread(target=screener, args=(s,)) for s in (stream_a, stream_b)]
    for t in threads:
        t.start()
    decisions = []
    while any(t.is_alive() for t in threads) or not screened.empty():
        try:
            batch = screened.get(timeout=0.2)
        except queue.Empty:
            continue
        decisions += dedup.decide_and_commit(batch)  # the one owner
    for t in threads:
        t.join()

    assert len(decisions) == 3 * len(originals)
    accepted = [x.id for x in decisions if x.accepted]
    accepted_groups = [group_of[i] for i in accepted]
    assert sorted(accepted_groups) == list(range(len(originals)))  # exactly one per group
    assert dedup.store.count() == len(originals)


# Store ---------------------------------------------------------------------------------------


def _unit_rows(rng, n, dim):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_store_builds_ann_index_and_compacts(tmp_path):
    dim = 32
    settings = StoreSettings(uri=str(tmp_path / "db"), index_min_rows=600, optimize_every_writes=3)
    store = ProblemStore(dim, settings)
    rng = np.random.default_rng(0)
    vectors = _unit_rows(rng, 1000, dim)
    for start in range(0, 1000, 100):
        store.add(
            [
                StoredProblem(
                    f"id{i}", f"text {i}", hash_key(f"text {i}"), "math", vectors[i], {"i": i}
                )
                for i in range(start, start + 100)
            ]
        )
        assert store.has_vector_index == (start + 100 >= 600)
    assert store.count() == 1000
    assert store.optimizations == 3  # after writes 3, 6, 9
    assert any("vector" in ix.columns for ix in store._table.list_indices())
    found = store.nearest(vectors[[5, 650, 999]], k=2)
    assert [hits[0][0] for hits in found] == ["id5", "id650", "id999"]
    assert all(hits[0][1] > 0.99 and len(hits) == 2 for hits in found)
    assert store.ids_by_hash([hash_key("text 7"), hash_key("missing")]) == {
        hash_key("text 7"): "id7"
    }

    reopened = ProblemStore(dim, settings)
    assert reopened.has_vector_index and reopened.count() == 1000
    assert reopened.nearest(vectors[:1])[0][0][0] == "id0"


def test_empty_store_lookups(tmp_path):
    store = ProblemStore(8, StoreSettings(uri=str(tmp_path / "db")))
    assert store.nearest(np.ones((2, 8), dtype=np.float32)) == [[], []]
    assert store.ids_by_hash(["abc"]) == {}


def test_processes_opening_a_new_store_at_once_all_open_it(tmp_path):
    """Filter workers start on one empty folder: the table is created once and all use it (a
    check-then-create race failed one of them with "Table 'problems' already exists"; then
    Lance's "Retryable commit conflict" failed 5 of 160 openers, 8 at once on 20 folders)."""
    barrier = threading.Barrier(8)
    errors: list[Exception] = []

    def open_store(uri: str) -> None:
        barrier.wait()
        try:
            ProblemStore(8, StoreSettings(uri=uri))
        except Exception as exc:  # noqa: BLE001 - the failure is what is asserted
            errors.append(exc)

    for attempt in range(20):  # a fresh folder each time: the race is on the first creation
        uri = str(tmp_path / f"store{attempt}")
        threads = [threading.Thread(target=open_store, args=(uri,)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert ProblemStore(8, StoreSettings(uri=str(tmp_path / "store19"))).count() == 0


# Diversity and report ------------------------------------------------------------------------


def test_diversity_measures():
    same = np.tile(np.array([[1.0, 0.0, 0.0]], dtype=np.float32), (4, 1))
    basis = np.eye(3, dtype=np.float32)
    assert mean_pairwise_distance(same) == pytest.approx(0.0, abs=1e-6)
    assert mean_pairwise_distance(basis) == pytest.approx(1.0, abs=1e-6)
    assert mean_pairwise_distance(same[:1]) == 0.0
    assert centroid_distance(same, same) == pytest.approx(0.0, abs=1e-6)
    assert centroid_distance(basis[:1], basis[1:2]) == pytest.approx(1.0, abs=1e-6)
    assert mean_nearest_seed_distance(basis[:2], basis) == pytest.approx(1 / 3, abs=1e-6)
    assert (
        concept_coverage(
            [["Primes", "modular arithmetic"], ["primes"]],
            ["primes", "Modular Arithmetic", "graphs", "dp"],
        )
        == 0.5
    )


def test_write_map_writes_png(embedder, tmp_path):
    seeds = load_gsm8k("test")[:20]
    out = write_map(seeds, NOVEL, tmp_path / "map" / "diversity.png", embedder=embedder)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
