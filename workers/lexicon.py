"""Deterministic cold-start concept annotator: a curated lexicon of foundational concepts.

The embedded default has no teacher LLM to name a seed's concepts, so it falls back on
``corpora/concepts/lexicon.json`` (written by the project: ~150 math concepts from grade
school to olympiad, ~85 programming concepts). Each concept fires on triggers:

- ``keywords``: case-insensitive whole-word phrases; a trailing ``*`` on a word matches any word
  ending (``percent*`` -> percent, percentage); whitespace inside a phrase matches any whitespace.
- ``regex``: case-insensitive regular expressions, for numbers and notation (``40%``, ``3/4``).

A concept's score is ``weight x number of distinct triggers that fired`` (weight defaults to 1;
generic concepts such as "addition of quantities" carry less so specific ones outrank them).
The top ``k`` concepts by score are returned, ties broken by lexicon order. The LLM annotator
stage is the real path; this is what lets the factory start without one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import corpora


def default_lexicon_path() -> Path:
    return corpora.path("concepts", "lexicon.json")


@dataclass(frozen=True)
class Trigger:
    pattern: re.Pattern[str]
    # A literal the lower-cased text must contain for the pattern to possibly match: a substring
    # test is ~100x cheaper than a regex search, and most of ~1,800 triggers miss most texts.
    literal: str = ""

    def fires(self, text: str, lowered: str) -> bool:
        return self.literal in lowered and self.pattern.search(text) is not None


@dataclass(frozen=True)
class LexiconConcept:
    name: str
    weight: float
    triggers: tuple[Trigger, ...]

    def score(self, text: str, lowered: str | None = None) -> float:
        lowered = text.lower() if lowered is None else lowered
        return self.weight * sum(1 for trigger in self.triggers if trigger.fires(text, lowered))


def keyword_trigger(keyword: str) -> Trigger:
    """Whole-word phrase matcher. Look-arounds instead of \\b so keywords that start or end with
    punctuation (``a.m.``, ``[l_i, r_i]``) still match at their edges."""
    words = keyword.split()
    parts = [re.escape(w.rstrip("*")) + (r"\w*" if w.endswith("*") else "") for w in words]
    pattern = re.compile(r"(?<!\w)" + r"\s+".join(parts) + r"(?!\w)", re.IGNORECASE)
    return Trigger(pattern, max((w.rstrip("*").lower() for w in words), key=len))


def parse_lexicon(raw: dict) -> dict[str, tuple[LexiconConcept, ...]]:
    """The lexicon JSON -> compiled concepts per domain (validates names are unique)."""
    domains: dict[str, tuple[LexiconConcept, ...]] = {}
    for domain, entries in raw["domains"].items():
        concepts = []
        for entry in entries:
            triggers = [keyword_trigger(k) for k in entry.get("keywords", [])]
            triggers += [Trigger(re.compile(r, re.IGNORECASE)) for r in entry.get("regex", [])]
            if not triggers:
                raise ValueError(f"lexicon concept {entry['name']!r} has no trigger")
            concepts.append(
                LexiconConcept(entry["name"], float(entry.get("weight", 1.0)), tuple(triggers))
            )
        names = [c.name for c in concepts]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate concept names in lexicon domain {domain!r}")
        domains[domain] = tuple(concepts)
    return domains


@lru_cache(maxsize=4)
def load_lexicon(path: str | None = None) -> dict[str, tuple[LexiconConcept, ...]]:
    """Compiled lexicon, cached: compiling ~1,500 patterns per call would dominate annotation."""
    source = Path(path) if path else default_lexicon_path()
    return parse_lexicon(json.loads(source.read_text(encoding="utf-8")))


def score_concepts(
    text: str, domain: str, lexicon_path: str | None = None
) -> list[tuple[str, float]]:
    """Every concept that fired, best first (ties keep lexicon order: the sort is stable)."""
    concepts = load_lexicon(lexicon_path).get(domain)
    if concepts is None:
        raise ValueError(f"lexicon has no domain {domain!r}")
    lowered = text.lower()
    scored = [(c.name, c.score(text, lowered)) for c in concepts]
    return sorted((pair for pair in scored if pair[1] > 0), key=lambda pair: -pair[1])


def annotate_with_lexicon(
    text: str, domain: str, k: int = 5, lexicon_path: str | None = None
) -> list[str]:
    """At most ``k`` concept names for ``text`` (empty when nothing fires)."""
    return [name for name, _ in score_concepts(text, domain, lexicon_path)[:k]]
