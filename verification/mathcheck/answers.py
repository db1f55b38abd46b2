"""Final answers of solutions: extraction (last box, then fallbacks) and normalization.

``extract_answer`` finds what a solution states as its final answer; ``normalize_answer`` gives
the canonical text used for caching and the identical-text fast path. Neither decides
mathematical equivalence: that is the oracle's job (``oracle.py``).
"""

from __future__ import annotations

import re

from streams.serde import valid_text

# --------------------------------------------------------------------------------------------
# Extraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MAX_BOX_ATTEMPTS = 16  # bounds work on enormous, brace-broken outputs
_MAX_ANSWER_SCAN = 4096  # a boxed body longer than this is not a final answer
_FINAL_IS_RE = re.compile(
    r"(?:final answer|the answer)\s*(?:is\b\s*[:：]?|[:：=])[ \t]*([^\n]+)", re.IGNORECASE
)
_ANSWER_COLON_RE = re.compile(r"\banswer\s*[:：][ \t]*([^\n]+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_CALC_ANNOTATION_RE = re.compile(r"<<[^<>\n]*>>")  # GSM8K calculator traces: <<9*2=18>>


def _balanced_body(text: str, open_at: int) -> str | None:
    """Body of the ``{...}`` group opening at ``open_at``; None if unbalanced (truncated)."""
    depth = 0
    i = open_at
    end = min(len(text), open_at + _MAX_ANSWER_SCAN)
    while i < end:
        ch = text[i]
        if ch == "\\":  # \{ and \} are literal braces, not grouping
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
        i += 1
    return None


def _boxed_after(text: str, cmd_end: int) -> str | None:
    """Argument of a box command ending at ``cmd_end``: ``{balanced}`` or a bare ``\\boxed 5``."""
    i = cmd_end
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        return _balanced_body(text, i)
    if i == cmd_end:  # "\boxedx": another command (e.g. \boxedsymbol), not a box
        return None
    m = re.match(r"[^\s$]+", text[i : i + _MAX_ANSWER_SCAN])
    return m.group(0) if m else None


def _last_boxed(text: str) -> str | None:
    hits: list[tuple[int, int]] = []
    for cmd in _BOX_COMMANDS:
        pos = len(text)
        for _ in range(_MAX_BOX_ATTEMPTS):
            pos = text.rfind(cmd, 0, pos)
            if pos < 0:
                break
            hits.append((pos, pos + len(cmd)))
    for _start, cmd_end in sorted(hits, reverse=True)[:_MAX_BOX_ATTEMPTS]:
        body = _boxed_after(text, cmd_end)
        if body is not None and _clean(body):
            return _clean(body)
    return None


def _clean(answer: str) -> str:
    """Trim decoration around an extracted answer: spaces, markdown bold, $..$, a final period."""
    s = answer.strip()
    for _ in range(3):  # decorations nest: **$x$.**
        before = s
        s = s.strip().strip("*").strip()
        if s.endswith((".", ",", ";")):  # sentence punctuation; "3.5" never ends with "."
            s = s[:-1].rstrip()
        if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
            s = s.strip("$").strip()
        if s == before:
            break
    return s


def _first_clause(rest: str) -> str:
    """'42. So we are done' -> '42'; a leading $...$ span wins (it is the answer's math)."""
    rest = rest.strip().lstrip("*").strip()
    m = re.match(r"\${1,2}([^$]+)\${1,2}", rest)
    if m:
        return m.group(1)
    return re.split(r"\.(?:\s|$)|;|\bbecause\b|\bsince\b", rest, maxsplit=1)[0]


def extract_answer(completion: str) -> str | None:
    """The final answer of a solution, or None when it states none.

    Tried in order; the first that yields non-empty text wins:

    1. the last ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces, escaped ``\\{`` ignored;
       ``\\boxed 5`` without braces too; an unbalanced, truncated box is skipped);
    2. a GSM8K-style ``#### X`` as the last non-empty line (elsewhere ``####`` is far more
       often a markdown heading, "#### Step 2");
    3. the last "final answer is X" / "the answer is X" (rest of the line, first clause);
    4. the last "answer: X";
    5. the last number on the last non-empty line (GSM8K ``<<calc>>`` annotations removed).

    Returned text is trimmed of spaces, markdown bold, surrounding ``$`` and a final period;
    it is otherwise raw (see ``normalize_answer`` for comparison).
    """
    if not isinstance(completion, str) or not completion:
        return None
    boxed = _last_boxed(completion)
    if boxed:
        return boxed
    tail = completion.rstrip()
    last_line = tail[tail.rfind("\n") + 1 :]
    # By hand, not ``####[ \t]*(.+?)[ \t]*$``: the lazy body retried the trailing-space run at
    # every length, quadratic in a line of spaces (issue 21).
    marked = last_line.strip(" \t")
    if marked.startswith("####") and (found := _clean(marked[4:].strip(" \t"))):
        return found
    for pattern in (_FINAL_IS_RE, _ANSWER_COLON_RE):
        last = None
        for last in pattern.finditer(completion):  # noqa: B007 - keep the last match
            pass
        if last is not None and (found := _clean(_first_clause(last.group(1)))):
            return found
    numbers = _NUMBER_RE.findall(_CALC_ANNOTATION_RE.sub(" ", last_line))
    return numbers[-1] if numbers else None


# --------------------------------------------------------------------------------------------
# Normalization

# White space, less the control characters Python counts as space (\x0b, \x0c, \x1c-\x1f,
# \x85): collapsing those to a space would make ``1\x1f2`` read as ``1 2``.
_SPACES_RE = re.compile(r"[^\S\x0b\x0c\x1c-\x1f\x85]+")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
PLAIN_NUMBER_RE = re.compile(r"^[+-]?\d+(?:\.\d+)?$")
_MATH_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def normalize_answer(answer: str) -> str:
    """Canonical text for caching and the identical-text fast path (never changes the math).

    Strips surrounding spaces, one outer box, math delimiters (``$``, ``\\(``, ``\\[``), a final
    period, LaTeX spacing (``\\,``, ``\\!``, ``\\;``, ``\\ ``), ``\\left``/``\\right``; maps
    ``\\dfrac``/``\\tfrac`` to ``\\frac``; drops thousands separators of plain numbers
    (``1,000`` -> ``1000``; ``(1,2)`` untouched); collapses whitespace.
    """
    s = answer.strip()
    for cmd in _BOX_COMMANDS:
        if s.startswith(cmd) and s.endswith("}") and s[len(cmd) :].lstrip().startswith("{"):
            open_at = s.index("{", len(cmd))
            inner = _balanced_body(s, open_at)
            if inner is not None and open_at + len(inner) + 2 == len(s):  # box is the whole text
                s = inner.strip()
    s = s.removesuffix(".").rstrip()  # "$18$." : sentence period outside the math
    for left, right in _MATH_WRAPPERS:
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)].strip()
    s = re.sub(r"\\[,!;:]|\\ ", " ", s)
    s = re.sub(r"\\left(?![a-zA-Z])|\\right(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = _SPACES_RE.sub(" ", s).strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s


# Characters no answer is written with: control characters (tab and line breaks aside) and
# U+FFFD, what stands where a model server sent broken text. Never deleted (``1\x002`` is not
# ``12``): an answer holding one equals only identical text and is no reference to ship.
GARBLED_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")


def answer_key(answer: str) -> str:
    """The text an answer is compared by: normalized, or, when it holds a garbled character, as
    it is (normalizing strips white space, which to Python includes \x1c-\x1f: ``12\x1f``
    would become ``12``)."""
    text = as_text(answer)
    return text if GARBLED_RE.search(text) else normalize_answer(text)


def as_text(value: object) -> str:
    """Answers come from model output: coerce, and make lone surrogates U+FFFD (no encoder takes
    them); nothing is deleted, so no two different texts become one."""
    return valid_text(value if isinstance(value, str) else str(value))[0]
