"""A reference answer the solver did not choose, and the rollouts that agree with it.

Where the reference comes from (``verify.math.reference``, docs/verification.md):

- ``teacher``: the majority of a teacher model's own rollouts (``teacher_reference``);
- ``designer``: the answer p_θ's rationale states ("... so the answer is N"), accepted only when
  the rationale has ``a op b = c`` steps (``verify.math.designer_min_steps``) and every one
  checks (``designer_reference``, ``check_arithmetic``);
- ``majority``: the plurality of the solver's own rollouts (self-agreement, not verification).

A rollout votes only with a *final answer*: the last ``\\boxed{...}`` or an explicit "the answer
is X" / "final answer is X" (``final_answer``), and only when it was not cut by the token
budget. The last-number fallback of ``extract_answer`` is for reading a solution, never for
voting: a truncated rollout ends on whatever number it was writing.

Every function here is linear in its input (a hand-written scanner, bounded runs), so hostile
model text costs time in proportion to its length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

# The extraction steps of answers.py that state an answer, without its fallbacks.
from verification.mathcheck.answers import (
    _FINAL_IS_RE,
    _clean,
    _first_clause,
    _last_boxed,
    as_text,
    normalize_answer,
)
from verification.mathcheck.voting import vote

if TYPE_CHECKING:
    from verification.mathcheck.oracle import EquivalenceOracle

# Reason codes (stable: they go into verdicts).
NO_REFERENCE = "no_reference"  # no answer stated (designer) or no teacher majority
DESIGNER_ARITHMETIC = "designer_arithmetic"  # a step of the designer's rationale does not check
# Where a verdict's reference came from (Verdict.reference_source).
TEACHER, DESIGNER, MAJORITY = "teacher", "designer", "majority"
# Why a solver rollout did not pass (Rollout.failure); WRONG_ANSWER is the one preference pairs
# take as "rejected": a final answer that disagrees with the reference.
TRUNCATED, NO_ANSWER, WRONG_ANSWER = "truncated", "no_answer", "disagrees"


# --------------------------------------------------------------------------------------------
# Final answers


def final_answer(completion: str) -> str | None:
    """The answer a solution states as final: its last ``\\boxed{...}`` / ``\\fbox{...}``, else
    its last "the answer is X" / "final answer is X" (first clause of the rest of the line);
    None otherwise (no ``####`` line, no "answer:", no last-number fallback)."""
    if not isinstance(completion, str) or not completion:
        return None
    boxed = _last_boxed(completion)
    if boxed:
        return boxed
    last = None
    for last in _FINAL_IS_RE.finditer(completion):  # noqa: B007 - keep the last match
        pass
    if last is not None and (found := _clean(_first_clause(last.group(1)))):
        return found
    return None


def voting_answer(text: str, ok: bool, truncated: bool) -> tuple[str | None, str | None]:
    """(final answer, why it cannot vote) of one rollout: a failed or truncated rollout, or one
    with no final answer, does not vote."""
    if not ok:
        return None, "generation_failed"
    if truncated:
        return None, TRUNCATED
    answer = final_answer(text)
    return (answer, None) if answer is not None else (None, NO_ANSWER)


# --------------------------------------------------------------------------------------------
# Arithmetic of "a op b = c" steps

_MAX_DIGITS = 30  # a longer literal is not arithmetic a rationale does by hand: not checked
_MAX_SIDE_TOKENS = 32  # sides longer than this are not checked (bounds the parser)
# A rationale longer than this is not design notes: no reference (bounds the whole check).
MAX_RATIONALE_CHARS = 20_000
_OPS = {"+": "+", "-": "-", "−": "-", "–": "-", "*": "*", "×": "*", "·": "*", "/": "/", "÷": "/"}
_CURRENCY = "$€£"
_SKIPPED = " \t\u00a0" + _CURRENCY  # between tokens of one line; a line break ends a run


@dataclass(frozen=True)
class _Tok:
    """A token: "num", "op", "(", ")", "=", "and" (in a mixed number: "1 and 1/3"), "var" (a
    letter in the algebra: the side it is in is not arithmetic) or "|" (ends a run)."""

    kind: str
    value: Fraction | str | None = None
    decimals: int = 0  # digits after the decimal point of a number literal
    percent: bool = False  # a number literal written with "%"
    fraction: bool = False  # "3/4" written tight: one number, and a division done
    glued: bool = False  # "-" directly before a digit: may be a sign
    text: str = ""  # a number as written (commas and currency signs aside)


_BREAK = _Tok("|")


def _is_digit(ch: str) -> bool:
    return "0" <= ch <= "9"  # str.isdigit also takes "²"


def _digits_at(text: str, i: int) -> int:
    """Index after the ASCII digits starting at ``i``."""
    while i < len(text) and _is_digit(text[i]):
        i += 1
    return i


def _char(text: str, i: int) -> str:
    return text[i] if 0 <= i < len(text) else ""


def _visible(text: str, i: int, step: int) -> str:
    """The first character from ``i`` on (``step`` 1) or before it (-1) that is not a space or
    a currency sign."""
    if step < 0:
        i -= 1
    while 0 <= i < len(text) and text[i] in _SKIPPED:
        i += step
    return _char(text, i)


def _number_follows(text: str, j: int) -> bool:
    """Does a number (or a parenthesis) start at the first visible character from ``j``?"""
    while j < len(text) and text[j] in _SKIPPED:
        j += 1
    ch = _char(text, j)
    return _is_digit(ch) or ch == "(" or (ch == "." and _is_digit(_char(text, j + 1)))


def _fraction_at(text: str, j: int) -> bool:
    """Is the first visible thing from ``j`` a tight fraction ("2/3")?"""
    while j < len(text) and text[j] in _SKIPPED:
        j += 1
    end = _digits_at(text, j)
    return end > j and _char(text, end) == "/" and _is_digit(_char(text, end + 1))


def _scan(text: str) -> list[_Tok]:
    """Tokens of ``text`` in one pass: numbers (thousands commas, decimals, tight fractions, a
    trailing %, currency signs dropped), operators, parentheses, "=", letters in the algebra
    ("3x + 2 = 11", "0.25G"), unit words between a number and an operator dropped ("10 points
    + 14"), and a break for anything else (a word, sentence punctuation, LaTeX)."""
    toks: list[_Tok] = []
    n, i = len(text), 0
    while i < n:
        ch = text[i]
        if ch in "\n\r":
            tok = _BREAK  # one line, one run: a chain never continues on the next line
            i += 1
        elif ch.isspace() or ch in _CURRENCY:
            i += 1
            continue
        elif _is_digit(ch) or (
            ch == "." and _is_digit(_char(text, i + 1)) and not _is_digit(_char(text, i - 1))
        ):
            i, tok = _number(text, i)
        elif ch.isalpha():
            j = i
            while j < n and text[j].isalpha():
                j += 1
            tok = _word(text, i, j, toks[-1] if toks else None)
            i = j
        elif ch in _OPS:
            tok = _Tok("op", _OPS[ch], glued=ch in "-−–" and _is_digit(_char(text, i + 1)))
            i += 1
        elif ch in "()":
            tok = _Tok(ch)
            i += 1
        elif ch == "=":
            while i < n and text[i] == "=":  # "==" is one "="
                i += 1
            tok = _Tok("=")
        else:  # sentence punctuation, LaTeX, any other symbol
            tok = _BREAK
            i += 1
        if tok is None or (tok is _BREAK and toks and toks[-1] is _BREAK):
            continue
        toks.append(tok)
    return toks


def _word(text: str, i: int, j: int, before: _Tok | None) -> _Tok | None:
    """What the word ``text[i:j]`` is in arithmetic (None: nothing, it is dropped):

    - "x" between numbers is times ("12 x 2", "3x4", "60 minutes x 3/4"); "of" after a
      percentage is times ("15% of 80"); "and" between a whole number and a fraction makes a
      mixed number ("1 and 1/3");
    - a unit between a number and an operator is dropped ("10 points + 14", "5 apples = ...");
    - a letter glued to a number, a parenthesis or an operator, or next to an operator, is
      algebra ("3x - 2", "0.25G", "(5/4)x", "X*11/4"): the side it is in is not checked;
    - any other word ends the run ("sold 48/2 = 24 clips").
    """
    word = text[i:j]
    after, before_char = _visible(text, j, 1), _visible(text, i, -1)
    after_number = before is not None and before.kind in ("num", ")")
    if word in ("x", "X") and after_number and _number_follows(text, j):
        return _Tok("op", "*")
    if word == "of" and before is not None and before.percent and _number_follows(text, j):
        return _Tok("op", "*")
    if word == "and" and before is not None and before.kind == "num" and _fraction_at(text, j):
        return _Tok("and")
    operator_after = after in _OPS or after == "="
    # A unit between a number and an operator other than a dash (after a word, a dash is as
    # often punctuation): "10 points + 14", "60 minutes x 3/4"; never before "=" (a label:
    # "2 kg = 2 * 1000").
    times_after = after in "xX" and _number_follows(text, text.index(after, j) + 1)
    if (
        before is not None
        and before.kind == "num"
        and (_is_digit(before_char) or before_char == "%")
        and not _is_digit(_char(text, i - 1))
        and ((after in _OPS and after not in "-−–") or times_after)
    ):
        return None
    glued = any(
        c and (_is_digit(c) or c in _OPS or c in "()=")
        for c in (_char(text, i - 1), _char(text, j))
    )
    if glued or before_char in _OPS or before_char == "=" or operator_after:
        return _Tok("var")
    return _BREAK


def _integer(text: str, i: int) -> tuple[int, str]:
    """(end, digits) of a whole number at ``i``, thousands groups read ("1,000"; not "1,0001",
    "1, 2" or "(1,2)"; after a currency sign a space too: "$80 000")."""
    end = _digits_at(text, i)
    whole = text[i:end]
    separators = ", " if _char(text, i - 1) in _CURRENCY and end - i <= 3 else ","
    while _char(text, end) in separators and _digits_at(text, end + 1) == end + 4:
        whole += text[end + 1 : end + 4]
        end += 4
    return end, whole


def _number(text: str, i: int) -> tuple[int, _Tok]:
    end, whole = _integer(text, i)
    decimals = ""
    if _char(text, end) == "." and (after := _digits_at(text, end + 1)) > end + 1:
        decimals, end = text[end + 1 : after], after
    if (len(whole) > 1 and whole[0] == "0") or len(whole) + len(decimals) > _MAX_DIGITS:
        return end, _BREAK  # a clock time or a code ("0900"), or no hand arithmetic
    value = Fraction(int((whole or "0") + decimals), 10 ** len(decimals))
    fraction = False
    # A tight fraction is one number ("2/ 1/5" is 2 / (1/5)), and still a division done.
    if not decimals and _char(text, end) == "/" and _is_digit(_char(text, end + 1)):
        denominator_end, denominator = _integer(text, end + 1)
        if _char(text, denominator_end) != "." and 0 < len(denominator) <= _MAX_DIGITS:
            if int(denominator) == 0:
                return denominator_end, _BREAK
            value, fraction, end = value / int(denominator), True, denominator_end
    percent = _visible(text, end, 1) == "%"
    if percent:  # of the denominator, in a fraction: "168/20%" is 168 / 0.2
        value = value * 100 if fraction else value / 100
        end = text.index("%", end) + 1
    written = text[i:end].replace(",", "").replace(" ", "")
    return end, _Tok("num", value, len(decimals), percent, fraction, text=written)


class _Unparsable(ValueError):
    pass


def _evaluate(toks: Sequence[_Tok]) -> Fraction:
    """Value of an arithmetic expression (+ - * / x, parentheses, a glued sign, implicit
    multiplication before a parenthesis, mixed numbers "1 1/2"); _Unparsable when the tokens
    are not one expression."""
    pos = 0

    def peek(ahead: int = 0) -> _Tok | None:
        return toks[pos + ahead] if pos + ahead < len(toks) else None

    def expr(depth: int) -> Fraction:
        nonlocal pos
        value = term(depth)
        while (t := peek()) is not None and t.kind == "op" and t.value in ("+", "-"):
            pos += 1
            right = term(depth)
            value = value + right if t.value == "+" else value - right
        return value

    def term(depth: int) -> Fraction:
        nonlocal pos
        value = factor(depth)
        while (t := peek()) is not None and (
            (t.kind == "op" and t.value in ("*", "/")) or t.kind == "("
        ):
            if t.kind == "op":
                pos += 1
            right = factor(depth)
            if t.kind == "op" and t.value == "/":
                if right == 0:
                    raise _Unparsable("division by zero")
                value /= right
            else:
                value *= right
        return value

    def factor(depth: int) -> Fraction:
        nonlocal pos
        if depth > 16:
            raise _Unparsable("nested too deep")
        t = peek()
        if t is None:
            raise _Unparsable("expression ends early")
        if t.kind == "op" and t.value == "-" and t.glued:
            pos += 1
            return -factor(depth + 1)
        if t.kind == "num":
            pos += 1
            value = t.value
            assert isinstance(value, Fraction)
            glue = 1 if (nxt := peek()) is not None and nxt.kind == "and" else 0
            part = peek(glue)
            if (
                value.denominator == 1
                and not t.fraction
                and part is not None
                and part.kind == "num"
                and part.fraction
                and 0 < part.value < 1  # type: ignore[operator]
            ):  # a mixed number: "1 1/2", "5 and 2/3"
                pos += glue + 1
                return value + part.value  # type: ignore[operator]
            return value
        if t.kind == "(":
            pos += 1
            value = expr(depth + 1)
            if (close := peek()) is None or close.kind != ")":
                raise _Unparsable("unclosed parenthesis")
            pos += 1
            return value
        raise _Unparsable(f"unexpected {t.kind}")

    if not toks:
        raise _Unparsable("empty")
    value = expr(0)
    if pos != len(toks):
        raise _Unparsable("trailing tokens")
    return value


def _computes(toks: Sequence[_Tok]) -> bool:
    """Does the side compute (an operator other than a leading sign, or a tight fraction)?"""
    return any(
        (t.kind == "op" and not (t.glued and i == 0)) or (t.kind == "num" and t.fraction)
        for i, t in enumerate(toks)
    )


@dataclass(frozen=True)
class _Side:
    value: Fraction
    toks: tuple[_Tok, ...]

    @property
    def literal(self) -> _Tok | None:
        """The side's one number literal (a written result), else None."""
        return self.toks[0] if len(self.toks) == 1 and not self.toks[0].fraction else None


def _longest(toks: list[_Tok], from_end: bool) -> _Side | None:
    """The longest suffix (``from_end``) or prefix of ``toks`` that is one expression: the words
    before "48/2 = 24" end the left side, the words after it end the right side. A side with a
    letter of the algebra in it is not arithmetic: None."""
    if any(t.kind == "var" for t in toks):
        return None
    toks = toks[-_MAX_SIDE_TOKENS:] if from_end else toks[:_MAX_SIDE_TOKENS]
    for k in range(len(toks), 0, -1):
        part = toks[len(toks) - k :] if from_end else toks[:k]
        if from_end and part[0].kind == "op" and not part[0].glued:
            continue  # a dash before a side ("Answer - 5 + 3") is not a minus
        try:
            return _Side(_evaluate(part), tuple(part))
        except _Unparsable:
            continue
    return None


def _whole(toks: list[_Tok]) -> _Side | None:
    if len(toks) > _MAX_SIDE_TOKENS:
        return None
    try:
        return _Side(_evaluate(toks), tuple(toks))
    except _Unparsable:
        return None


def _equal(a: _Side, b: _Side) -> bool:
    """Equal, up to one unit in the last decimal a written result shows ("1/3 = 0.33",
    "2/3 = 0.666..."); a side with a percentage in it may also equal the other side in percent
    ("60/100 x 100 = 60%", "9 / 27 * 100% = 33.33").
    """
    shown = [lit.decimals for lit in (a.literal, b.literal) if lit is not None and lit.decimals]
    tolerance = Fraction(1, 10 ** min(shown)) if shown else Fraction(0)
    if abs(a.value - b.value) <= tolerance:
        return True
    return any(
        any(t.percent for t in p.toks) and abs(p.value * 100 - other.value) <= tolerance
        for p, other in ((a, b), (b, a))
    )


def _render(toks: Sequence[_Tok]) -> str:
    out = []
    for t in toks:
        if t.kind == "num":
            out.append(t.text.replace("/", " / ") if t.fraction else t.text)
        elif t.kind == "op":
            out.append(str(t.value))
        else:
            out.append(t.kind)
    return " ".join(out)


@dataclass(frozen=True)
class ArithmeticCheck:
    """The ``a op b = c`` steps found in a text: how many were checked, and the ones that do
    not hold (rendered, e.g. ``"48 / 2 = 25"``)."""

    checked: int = 0
    failed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed


def check_arithmetic(text: str) -> ArithmeticCheck:
    """Check every arithmetic equality chain of ``text`` (``48/2 = 24``, ``12 x 2 = $24``,
    ``100 - 50 - 30 - 15 = 5``, ``a = b = c``): numbers with thousands commas, decimals and
    percentages (``25%`` is 1/4), currency signs dropped, units and other words end a side.
    Only chains where some side computes (has an operator) count; a side that is not one
    expression splits the chain there. Linear in the text: one scan, bounded sides."""
    text = as_text(text)
    checked, failed = 0, []
    run: list[_Tok] = []
    for tok in [*_scan(text), _BREAK]:
        if tok.kind != "|":
            run.append(tok)
            continue
        if any(t.kind == "=" for t in run):
            c, f = _check_run(run)
            checked += c
            failed += f
        run = []
    return ArithmeticCheck(checked, failed)


def _check_run(run: list[_Tok]) -> tuple[int, list[str]]:
    sides: list[list[_Tok]] = [[]]
    for t in run:
        if t.kind == "=":
            sides.append([])
        else:
            sides[-1].append(t)
    parsed: list[_Side | None] = []
    for k, side in enumerate(sides):
        if k == 0:
            parsed.append(_longest(side, from_end=True))
        elif k == len(sides) - 1:
            parsed.append(_longest(side, from_end=False))
        else:
            parsed.append(_whole(side))
    checked, failed = 0, []
    chain: list[_Side] = []
    for side in [*parsed, None]:  # None ends the last chain
        if side is not None:
            chain.append(side)
            continue
        if len(chain) >= 2 and any(_computes(s.toks) for s in chain):
            for a, b in zip(chain, chain[1:]):
                checked += 1
                if not _equal(a, b):
                    failed.append(f"{_render(a.toks)} = {_render(b.toks)}")
        chain = []
    return checked, failed


# --------------------------------------------------------------------------------------------
# References


@dataclass(frozen=True)
class Reference:
    """A reference answer, or why there is none (``reason``), and where it came from."""

    answer: str | None
    source: str
    reason: str | None = None
    detail: str = ""


def designer_reference(rationale: str, min_steps: int = 1) -> Reference:
    """The answer the designer's rationale states, if it states one, at least ``min_steps`` of
    its arithmetic steps were checked (a bare "so the answer is N" is a claim, not a checked
    answer) and every one of them holds. A stated "the answer is 1 + 18 = 19" gives 19 (the
    chain itself is checked with the rest)."""
    rationale = as_text(rationale)
    if len(rationale) > MAX_RATIONALE_CHARS:
        return Reference(
            None, DESIGNER, NO_REFERENCE, f"rationale over {MAX_RATIONALE_CHARS} characters"
        )
    stated = final_answer(rationale)
    if stated is None:
        return Reference(None, DESIGNER, NO_REFERENCE, "the rationale states no final answer")
    if "=" in stated:
        stated = stated.rsplit("=", 1)[1].strip()
    if not normalize_answer(stated):
        return Reference(None, DESIGNER, NO_REFERENCE, "the rationale's stated answer is empty")
    arithmetic = check_arithmetic(rationale)
    if not arithmetic.ok:
        shown = "; ".join(arithmetic.failed[:3])
        return Reference(
            None,
            DESIGNER,
            DESIGNER_ARITHMETIC,
            f"{len(arithmetic.failed)} of {arithmetic.checked} steps do not check: {shown}",
        )
    if arithmetic.checked < min_steps:
        return Reference(
            None,
            DESIGNER,
            NO_REFERENCE,
            f"{arithmetic.checked} arithmetic steps checked; a stated answer needs {min_steps}",
        )
    return Reference(stated, DESIGNER, None, f"{arithmetic.checked} arithmetic steps checked")


def teacher_reference(
    answers: Sequence[str | None], oracle: EquivalenceOracle, min_agreement: float
) -> Reference:
    """The majority of the teacher's final answers (``None`` for a rollout that cannot vote)
    when its cluster holds at least ``min_agreement`` of the teacher's rollouts."""
    result = vote(answers, oracle, min_agreement)
    detail = (
        f"teacher: {result.n_clusters} answer clusters, {result.n_missing} without a final "
        f"answer, majority share {result.share:.2f}"
    )
    if result.reference is None:
        return Reference(None, TEACHER, NO_REFERENCE, f"{result.reason}; {detail}")
    return Reference(result.reference, TEACHER, None, detail)


def agreement(
    reference: str, answers: Sequence[str | None], oracle: EquivalenceOracle
) -> list[bool]:
    """Which answers are equivalent to ``reference`` (None never is): one oracle round trip
    for the distinct answers."""
    keys = [
        normalize_answer(as_text(a)) if a is not None and as_text(a).strip() else None
        for a in answers
    ]
    distinct = list(dict.fromkeys(k for k in keys if k is not None))
    verdicts = dict(
        zip(distinct, oracle.equivalent_many([(reference, k) for k in distinct]), strict=True)
    )
    return [k is not None and verdicts[k] for k in keys]
