"""Validity filters: (problem, reference answer) pairs unfit for the dataset, with stable codes."""

from __future__ import annotations

import re
from collections.abc import Iterator

from verification.mathcheck.answers import GARBLED_RE, PLAIN_NUMBER_RE, as_text, normalize_answer

_PROOF_RE = re.compile(
    r"\b(?:prove|show|demonstrate|verify|justify|establish)\s+(?:that|why|the following)\b"
    r"|\bprove\b|\bproof\b|\bdisprove\b",
    re.IGNORECASE,
)
_DEGENERATE = {
    "none",
    "no solution",
    "no solutions",
    "no real solution",
    "no real solutions",
    "undefined",
    "does not exist",
    "dne",
    "not exist",
    "doesn't exist",
    "inf",
    "infinity",
    "infinite",
    "\\infty",
    "+\\infty",
    "-\\infty",
    "∞",
    "oo",
    "nan",
    "\\emptyset",
    "\\varnothing",
    "∅",
    "\\{\\}",
    "{}",
    "impossible",
    "n/a",
    "null",
    "cannot be determined",
    "can not be determined",
    "not enough information",
    "insufficient information",
    "indeterminate",
    "no answer",
    "unknown",
}
_TEXT_WRAPPER_RE = re.compile(r"^\\(?:text|mathrm|textbf|mbox)\{(.*)\}$")
_CHOICE_LETTER_RE = re.compile(r"^\(?([A-E])\)?$")
# A line may open with spaces, not with blank lines: ``^\s*`` retried at every line start of
# 200 KB of newlines is quadratic (issue 21), and finds nothing ``^[^\S\n]*`` does not.
_CHOICES_IN_PROBLEM_RE = re.compile(
    r"\(\s*[A-E]\s*\)|\\textbf\{\s*\(\s*[A-E]\s*\)|^[^\S\n]*[A-E][.)]\s", re.MULTILINE
)


def _answer_words(reference: str) -> str:
    """Reference without a \\text{} wrapper, lower-cased, spaces collapsed (for word lists)."""
    s = normalize_answer(reference)
    m = _TEXT_WRAPPER_RE.match(s)
    if m:
        s = m.group(1)
    return re.sub(r"\s+", " ", s).strip().strip(".").lower()


def validity_issue(problem: str, reference: str | None) -> str | None:
    """Why a (problem, reference answer) is unfit for the dataset; None when it is fine.

    Checked in order (codes are stable, they go into verdict records):

    - "proof_problem": the problem asks for a proof ("prove", "proof", "show/demonstrate/
      justify ... that"): no single final answer to check by voting.
    - "garbled_answer": the reference holds a control character (tab and line breaks aside) or
      U+FFFD (where a model server sent broken text): no answer is written with them.
    - "trivial_answer": the reference is empty after normalization (only brackets/punctuation
      left), or it is not a plain number and it restates the problem: it equals the whole
      problem or one of the problem's whole math spans (``$...$``, ``\\(...\\)``,
      ``\\[...\\]``), e.g. "Simplify $\\frac{6}{8}$" answered "\\frac{6}{8}". Integers and
      decimals are never "trivial" by this rule: small numbers legitimately recur in problems
      (a count asked about may equal a given); and only whole spans count, as a substring rule
      would also reject answers such as ``\\sqrt{2}`` that merely occur inside a longer formula.
    - "degenerate_answer": the reference says there is no answer or is unbounded ("none",
      "no solution", "undefined", "does not exist", "\\infty", "\\emptyset", "cannot be
      determined", ...): these are guessable and usually mark a broken problem.
    - "multiple_choice_letter": the reference is a bare letter A-E and the problem lists lettered
      choices: a 1-in-5 guess, and the letter does not carry the answer's content.

    ``reference=None`` (no consensus) only gets the problem-level check; the vote's reason
    already explains the missing reference.
    """
    problem_text = as_text(problem)
    if _PROOF_RE.search(problem_text):
        return "proof_problem"
    if reference is None:
        return None
    if GARBLED_RE.search(as_text(reference)):
        return "garbled_answer"
    ref = normalize_answer(as_text(reference))
    if not ref.strip("{}()[]$.,;: \\"):
        return "trivial_answer"
    if not PLAIN_NUMBER_RE.match(ref) and _squash(ref) in _restatements(problem_text):
        return "trivial_answer"
    if _answer_words(ref) in _DEGENERATE:
        return "degenerate_answer"
    if _CHOICE_LETTER_RE.match(_answer_words(ref).upper()) and _CHOICES_IN_PROBLEM_RE.search(
        problem_text
    ):
        return "multiple_choice_letter"
    return None


def _squash(text: str) -> str:
    """Whitespace- and delimiter-insensitive text for verbatim-copy checks."""
    return re.sub(r"[\s$]+", "", normalize_answer(text))


_SPAN_OPENER_RE = re.compile(r"\$|\\[(\[]")
_CLOSER = {"\\(": "\\)", "\\[": "\\]"}


def math_spans(text: str) -> Iterator[str]:
    """The bodies of the whole math spans of ``text``, left to right: ``$$...$$``, ``$...$``,
    ``\\(...\\)``, ``\\[...\\]`` (the shortest non-empty body; a span never starts inside
    another).

    Linear in ``len(text)``: the regular expression this replaces (lazy ``.+?`` per opener)
    rescanned the rest of the text from every unclosed opener, 75 s for 200 KB of ``\\(``
    (issue 21). Here a closer not found past one point is never looked for again past it."""
    absent: dict[str, int] = {}  # closer -> a position past which it does not occur
    i = 0
    while m := _SPAN_OPENER_RE.search(text, i):
        start = m.start()
        if text.startswith("$$", start):
            opener, closer = "$$", "$$"
        elif m.group() == "$":
            opener, closer = "$", "$"
        else:
            opener, closer = m.group(), _CLOSER[m.group()]
        first = start + len(opener) + 1  # a body has at least one character
        end = (
            -1
            if first > len(text) or first >= absent.get(closer, len(text) + 1)
            else text.find(closer, first)
        )
        if end < 0:
            absent[closer] = min(first, absent.get(closer, first))
            i = start + 1
            continue
        yield text[start + len(opener) : end]
        i = end + len(closer)


def _restatements(problem: str) -> set[str]:
    """The problem's whole text and each whole math span, squashed."""
    spans = {_squash(problem)}
    for span in math_spans(problem):
        spans.add(_squash(span))
    spans.discard("")
    return spans
