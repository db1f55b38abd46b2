"""Concept pool and PromptCoT 1.0 concept-set sampler: properties measured over real draws."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from streams.records import AnnotatedSeed
from workers.concepts import ConceptPool, ConceptSampler, load_pool
from workers.settings import CODE_LADDER, MATH_LADDER, ConceptSettings

# A small hand-built corpus: "a" is the most frequent; {a, b, c} always go together; "x" and "y"
# only ever appear with each other.
CORPUS = (
    [("math", ["a", "b", "c"])] * 6
    + [("math", ["a", "d"])] * 2
    + [("math", ["x", "y"])] * 2
    + [("math", ["e", "f"]), ("code", ["arrays", "sorting", "greedy"])]
)


def pool() -> ConceptPool:
    return ConceptPool.from_annotated(CORPUS)


def test_pool_counts_frequencies_and_cooccurrence():
    dp = pool().domain("math")
    idx = dp.index
    assert dp.n_seeds == 11
    assert dp.counts[idx["a"]] == 8 and dp.counts[idx["x"]] == 2
    assert dp.cooccurrence[idx["a"], idx["b"]] == 6 == dp.cooccurrence[idx["b"], idx["a"]]
    assert dp.cooccurrence[idx["a"], idx["d"]] == 2
    assert dp.cooccurrence[idx["a"], idx["x"]] == 0
    assert dp.cooccurrence.diagonal().sum() == 0


def test_annotated_seed_records_and_name_cleanup_merge():
    seeds = [
        AnnotatedSeed(
            seed_id="s1",
            domain="math",
            text="t",
            concepts=["Modular  arithmetic.", "primes"],
            rationale="r",
        ),
        AnnotatedSeed(
            seed_id="s2",
            domain="math",
            text="t",
            concepts=["modular arithmetic", "Primes"],
            rationale="r",
        ),
    ]
    dp = ConceptPool.from_annotated(seeds).domain("math")
    assert dp.concepts == [
        "Modular arithmetic",
        "primes",
    ]  # first spelling kept, merged by casefold
    assert dp.counts.tolist() == [2, 2] and dp.cooccurrence[0, 1] == 2


def test_sets_have_size_no_repeats_and_a_ladder_difficulty():
    real = load_pool()
    sampler = ConceptSampler(real, ConceptSettings())
    for domain, ladder in (("math", MATH_LADDER), ("code", CODE_LADDER)):
        seen_difficulties = set()
        for _ in range(60):
            cs = sampler.sample(domain)
            assert len(cs.concepts) == 5 and len(set(cs.concepts)) == 5
            assert set(cs.concepts) <= set(real.domain(domain).concepts)
            assert cs.difficulty in ladder and cs.domain == domain
            seen_difficulties.add(cs.difficulty)
        assert len(seen_difficulties) >= 4  # the ladder is actually sampled, not a constant


def test_reproducible_with_seed_and_ids_unique():
    real = load_pool()
    first = [ConceptSampler(real, ConceptSettings(seed=7)).sample("math") for _ in range(1)]
    a = ConceptSampler(real, ConceptSettings(seed=7))
    b = ConceptSampler(real, ConceptSettings(seed=7))
    run_a = [a.sample(d) for d in ["math", "code"] * 10]
    run_b = [b.sample(d) for d in ["math", "code"] * 10]
    assert [s.id for s in run_a] == [s.id for s in run_b]
    assert run_a[0].id == first[0].id
    assert len({s.id for s in run_a}) == 20
    assert run_a[3].draw == "7:3"
    other = ConceptSampler(real, ConceptSettings(seed=8))
    assert [other.sample(d).concepts for d in ["math", "code"] * 10] != [s.concepts for s in run_a]
    # Draw k depends only on k: a sampler resumed at draw 5 continues the same stream.
    resumed = ConceptSampler(real, ConceptSettings(seed=7), first_draw=5)
    assert resumed.sample("code").id == run_a[5].id


def test_first_concept_follows_frequency():
    dp = pool().domain("math")
    sampler = ConceptSampler(pool(), ConceptSettings(set_size=1))
    draws = Counter(sampler.sample("math").concepts[0] for _ in range(3000))
    expected = dp.counts / dp.counts.sum()
    for name, i in dp.index.items():
        assert abs(draws[name] / 3000 - expected[i]) < 0.03, name
    assert draws["a"] > 3 * draws["x"]  # 8 seeds vs 2


@pytest.mark.parametrize("measure", ["log_count", "npmi"])
def test_cooccurring_concepts_preferred_at_low_temperature(measure):
    settings = ConceptSettings(set_size=2, temperature=0.05, cooccurrence_measure=measure)
    sampler = ConceptSampler(pool(), settings, rng=np.random.default_rng(0))
    dp = pool().domain("math")
    partners = Counter(
        dp.concepts[sampler.grow("math", sampler.rng, first=dp.index["x"])[1]] for _ in range(400)
    )
    assert partners["y"] / 400 > 0.95  # y is x's only co-occurring concept
    partners = Counter(
        dp.concepts[sampler.grow("math", sampler.rng, first=dp.index["b"])[1]] for _ in range(400)
    )
    assert (partners["a"] + partners["c"]) / 400 > 0.95
    assert partners["x"] + partners["y"] + partners["e"] + partners["f"] < 10


def test_embedding_term_decides_when_cooccurrence_is_flat():
    # Every concept appears alone: no co-occurrence at all, so only embeddings can steer growth.
    names = ["p0", "p1", "p2", "q0", "q1", "q2"]
    vectors = {  # two tight clusters on orthogonal axes
        "p0": [1, 0.1, 0],
        "p1": [1, -0.1, 0],
        "p2": [1, 0, 0.1],
        "q0": [0, 1, 0.1],
        "q1": [0.1, 1, 0],
        "q2": [0, 1, -0.1],
    }
    embed = lambda texts: np.array([vectors[t] for t in texts], dtype=np.float32)
    flat = ConceptPool.from_annotated([("math", [n]) for n in names], embed=embed)
    dp = flat.domain("math")
    assert np.allclose(np.linalg.norm(dp.embeddings, axis=1), 1.0, atol=1e-6)
    settings = ConceptSettings(set_size=3, temperature=0.2)
    sampler = ConceptSampler(flat, settings)
    same_cluster = 0
    for _ in range(300):
        cs = sampler.sample("math")
        same_cluster += len({c[0] for c in cs.concepts}) == 1
    # Uniform growth would keep a set in one cluster with probability (2/5)(1/4) = 10%.
    assert same_cluster / 300 > 0.8
    no_embeddings = ConceptSampler(
        ConceptPool.from_annotated([("math", [n]) for n in names]), settings
    )
    uniform_share = (
        sum(len({c[0] for c in no_embeddings.sample("math").concepts}) == 1 for _ in range(300))
        / 300
    )
    assert uniform_share < 0.25


def test_small_domain_and_missing_domain():
    sampler = ConceptSampler(pool(), ConceptSettings(set_size=5))
    cs = sampler.sample("code")  # only 3 code concepts
    assert sorted(cs.concepts) == ["arrays", "greedy", "sorting"]
    with pytest.raises(KeyError):
        sampler.sample("physics")


def test_difficulty_weights_respected():
    settings = ConceptSettings(difficulty_weights={"math": [0, 0, 0, 1, 0, 0]})
    sampler = ConceptSampler(pool(), settings)
    assert {sampler.sample("math").difficulty for _ in range(30)} == {"AIME"}
    with pytest.raises(ValueError):
        ConceptSettings(difficulty_weights={"math": [1, 2]})


def test_save_load_round_trip_with_embeddings(tmp_path):
    rng = np.random.default_rng(3)
    original = ConceptPool.from_annotated(
        CORPUS, embed=lambda texts: rng.normal(size=(len(texts), 8)), embedder_name="toy"
    )
    path = original.save(tmp_path / "pool.json")
    loaded = ConceptPool.load(path)
    assert loaded.embedder_name == "toy"
    for name, dp in original.domains.items():
        back = loaded.domain(name)
        assert back.concepts == dp.concepts and back.n_seeds == dp.n_seeds
        assert np.array_equal(back.counts, dp.counts)
        assert (back.cooccurrence != dp.cooccurrence).nnz == 0
        assert np.array_equal(back.embeddings, dp.embeddings)
    # Same pool + same seed -> same draws, whether fresh or reloaded.
    a, b = ConceptSampler(original, ConceptSettings()), ConceptSampler(loaded, ConceptSettings())
    assert [a.sample("math").id for _ in range(5)] == [b.sample("math").id for _ in range(5)]


def test_shipped_pool_is_built_from_both_corpora():
    summary = load_pool().summary()
    assert summary["math"]["concepts"] >= 80 and summary["math"]["seeds"] > 7000
    assert summary["code"]["concepts"] >= 50 and summary["code"]["seeds"] > 400
    assert 0.1 < summary["math"]["cooccurrence_density"] < 0.9
    assert summary["math"]["embeddings"] is False  # shipped without a model
