"""Math verification: answer extraction, equivalence, majority voting, validity filters.

The verify stage samples ``rollouts`` solutions per problem; the majority answer (clustered by
mathematical equivalence) becomes the reference, and each rollout passes if it agrees with it
(PromptCoT 2.0, section "Verification").

Equivalence is decided by math-verify. It bounds its own time with ``signal.alarm`` (main thread
only) and raises when called from other threads, and some inputs make sympy run for ever
(``2^{2^{2^{100}}}`` compared with a number). So math-verify runs with its timeouts disabled in a
separate worker *process*; the parent bounds every call and kills/restarts the worker when a
call overruns. A timeout counts as "not equivalent".
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Self

from pydantic import Field

from streams.settings import Section

log = logging.getLogger(__name__)


class MathCheckSettings(Section):
    """Math verification knobs (composed into the global Settings by the lead)."""

    rollouts: int = Field(8, ge=1, description="Solutions sampled per problem (paper: 8).")
    min_agreement: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Share of ALL rollouts the majority cluster needs to become the reference.",
    )
    equivalence_timeout_s: float = Field(
        2.0, gt=0.0, description="Wall-clock bound on one equivalence check in the worker process."
    )
    worker_start_timeout_s: float = Field(
        60.0,
        gt=0.0,
        description="Bound on starting the worker (imports sympy; slow on busy hosts).",
    )
    max_answer_chars: int = Field(
        512,
        ge=1,
        description="Longer answers are equal only to identical text (never parsed): final "
        "answers are short, long ones are derivation spill-over and slow to parse.",
    )
    cache_size: int = Field(100_000, ge=0, description="Normalized pairs remembered per oracle.")


# --------------------------------------------------------------------------------------------
# Extraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_MAX_BOX_ATTEMPTS = 16  # bounds work on enormous, brace-broken outputs
_MAX_ANSWER_SCAN = 4096  # a boxed body longer than this is not a final answer
_GSM8K_RE = re.compile(r"^[ \t]*####[ \t]*(.+?)[ \t]*$", re.MULTILINE)
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
    gsm8k = _GSM8K_RE.match(last_line)
    if gsm8k and _clean(gsm8k.group(1)):
        return _clean(gsm8k.group(1))
    for pattern in (_FINAL_IS_RE, _ANSWER_COLON_RE):
        last = None
        for last in pattern.finditer(completion):
            pass
        if last is not None and (found := _clean(_first_clause(last.group(1)))):
            return found
    numbers = _NUMBER_RE.findall(_CALC_ANNOTATION_RE.sub(" ", last_line))
    return numbers[-1] if numbers else None


# --------------------------------------------------------------------------------------------
# Normalization and the exact fast path

_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_PLAIN_NUMBER_RE = re.compile(r"^[+-]?\d+(?:\.\d+)?$")
_INT_RE = re.compile(r"^[+-]?\d+$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac\{([+-]?\d+)\}\{(\d+)\}$|^([+-]?\d+)/(\d+)$")
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
    s = re.sub(r"\s+", " ", s).strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s


def _exact_value(s: str) -> Fraction | None:
    """Exact value of a plain number or integer fraction; None for anything else."""
    if len(s) > 64:  # Fraction of a huge literal is cheap, but keep the fast path trivial
        return None
    if _PLAIN_NUMBER_RE.match(s):
        return Fraction(s)
    m = _FRAC_RE.match(s)
    if m:
        sign, num, den = (
            (m.group(1), m.group(2), m.group(3)) if m.group(2) else ("", m.group(4), m.group(5))
        )
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign == "-" else value
    return None


def _fast_verdict(a: str, b: str) -> bool | None:
    """Decide without math-verify when the answer is certain; None means 'ask the worker'."""
    if a == b:
        return True
    va, vb = _exact_value(a), _exact_value(b)
    if va is None or vb is None:
        return None
    if va == vb:
        return True
    # Distinct integers are certainly different; for decimals math-verify's rounding
    # (0.333333 == 1/3) decides, so those still go to the worker.
    if _INT_RE.match(a) and _INT_RE.match(b):
        return False
    return None


# --------------------------------------------------------------------------------------------
# Worker process (runs math-verify with its own timeouts disabled)


_WARMUP_PAIRS = (
    ("\\frac{1}{2}", "0.5"),
    ("t^2+2t+1", "(t+1)^2"),
    ("t^3-1", "(t-1)(t^2+t+1)"),
    ("(1,2)", "\\{1,2\\}"),
    ("[0,1)", "(0,1]"),
    ("t=3", "3"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("10\\%", "0.1"),
    ("\\pi", "3"),
    ("\\begin{pmatrix}1&2\\end{pmatrix}", "(1,2)"),
    ("7\\text{ cm}", "\\$7"),
)


def _worker_main(fd: int) -> None:
    """Child entry point: answer ('pairs', [(a, b), ...]) with one (index, bool) per pair."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" warnings
    from functools import lru_cache

    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    @lru_cache(maxsize=8192)
    def parsed(answer: str) -> tuple:
        # Boxing makes the whole answer the extraction target, not some number inside it.
        return tuple(
            parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=None)
        )

    def same(a: str, b: str) -> bool:
        try:
            pa, pb = list(parsed(a)), list(parsed(b))
            if not pa or not pb:
                return False
            # verify() is asymmetric (gold vs prediction); equivalence here is symmetric.
            return bool(
                verify(pa, pb, timeout_seconds=None) or verify(pb, pa, timeout_seconds=None)
            )
        except Exception:  # noqa: BLE001 -- sympy raises a zoo of types on odd input
            return False

    # Warm-up: sympy imports simplification, sets, intervals... lazily; cold, the first check of
    # each kind takes 0.1-1.2 s and would eat the per-check budget. Startup has its own bound.
    for a, b in _WARMUP_PAIRS:
        same(a, b)
    conn = Connection(fd)
    conn.send(("ready",))
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return  # parent went away
        if kind == "pairs":
            for index, (a, b) in enumerate(payload):
                conn.send((index, same(a, b)))


class WorkerStartError(RuntimeError):
    """The math-verify worker process could not be started."""


class _Worker:
    """One child process and its socket; not thread-safe (the oracle holds a lock)."""

    def __init__(self, start_timeout_s: float) -> None:
        parent_sock, child_sock = socket.socketpair()
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        code = (
            "import sys; from workers.mathcheck import _worker_main; _worker_main(int(sys.argv[1]))"
        )
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            parent_sock.close()
            raise WorkerStartError(f"cannot spawn the math-verify worker: {exc}") from exc
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        if not self.conn.poll(start_timeout_s):
            self.close()
            raise WorkerStartError(f"math-verify worker not ready after {start_timeout_s} s")
        try:
            ready = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.close()
            raise WorkerStartError("math-verify worker died while starting") from exc
        if ready != ("ready",):
            self.close()
            raise WorkerStartError(f"unexpected worker greeting {ready!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()


class EquivalenceOracle:
    """Mathematical equivalence of answers, bounded per check, cached, safe to share by threads.

    >>> with EquivalenceOracle() as oracle:
    ...     oracle.equivalent("0.5", "\\\\frac{1}{2}")
    True

    The worker process starts lazily on the first check that needs math-verify (identical
    normalized text and exact plain numbers never do). Each check may take at most
    ``equivalence_timeout_s``; on overrun the worker is killed (and restarted on the next need)
    and the pair counts as not equivalent. Verdicts, timeouts included, are cached.
    """

    def __init__(self, settings: MathCheckSettings | None = None) -> None:
        self.settings = settings or MathCheckSettings()
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._cache: OrderedDict[tuple[str, str], bool] = OrderedDict()
        self.timeouts = 0  # checks that hit equivalence_timeout_s (a metric for the stage)
        self.worker_starts = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.close()
                self._worker = None

    def equivalent(self, a: str, b: str) -> bool:
        return self.equivalent_many([(a, b)])[0]

    def equivalent_many(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """Verdicts for many pairs with one round trip to the worker (results stream back).

        Raises WorkerStartError only if a needed worker cannot start (an infrastructure
        failure the caller should retry, not a verdict).
        """
        verdicts: list[bool | None] = []
        pending: dict[tuple[str, str], list[int]] = {}
        with self._lock:
            for i, (a, b) in enumerate(pairs):
                key = self._key(a, b)
                verdict = _fast_verdict(*key)
                if verdict is None:
                    verdict = self._cache_get(key)
                if verdict is None and max(map(len, key)) > self.settings.max_answer_chars:
                    verdict = False  # too long to be a final answer: identical text only
                verdicts.append(verdict)
                if verdict is None:
                    pending.setdefault(key, []).append(i)
            if pending:
                keys = list(pending)
                for key, verdict in zip(keys, self._ask_worker(keys), strict=True):
                    self._cache_put(key, verdict)
                    for i in pending[key]:
                        verdicts[i] = verdict
        return [bool(v) for v in verdicts]

    @staticmethod
    def _key(a: str, b: str) -> tuple[str, str]:
        na, nb = normalize_answer(_as_text(a)), normalize_answer(_as_text(b))
        return (na, nb) if na <= nb else (nb, na)  # equivalence is symmetric: one cache entry

    def _cache_get(self, key: tuple[str, str]) -> bool | None:
        verdict = self._cache.get(key)
        if verdict is not None:
            self._cache.move_to_end(key)
        return verdict

    def _cache_put(self, key: tuple[str, str], verdict: bool) -> None:
        if self.settings.cache_size <= 0:
            return
        self._cache[key] = verdict
        if len(self._cache) > self.settings.cache_size:
            self._cache.popitem(last=False)

    def _ask_worker(self, keys: list[tuple[str, str]]) -> list[bool]:
        """Send the pairs; wait for each verdict at most the timeout; kill and resume on overrun."""
        results: list[bool] = []
        try:
            while len(results) < len(keys):
                remaining = keys[len(results) :]
                worker = self._ensure_worker()
                if worker.proc.poll() is not None:  # died since the last call (e.g. OOM-killed)
                    self._drop_worker()
                    worker = self._ensure_worker()
                worker.conn.send(("pairs", remaining))
                for offset in range(len(remaining)):
                    verdict = self._receive(worker, offset)
                    if verdict is None:  # overran or crashed: this pair is "not equivalent"
                        log.warning(
                            "equivalence check abandoned: %.80r vs %.80r", *remaining[offset]
                        )
                        self.timeouts += 1
                        self._drop_worker()
                        results.append(False)
                        break
                    results.append(verdict)
        except BaseException:
            # Interrupted mid-exchange (KeyboardInterrupt, a send error...): unread verdicts
            # would be taken for the next batch's, so this worker cannot be reused.
            self._drop_worker()
            raise
        return results

    def _receive(self, worker: _Worker, expected_index: int) -> bool | None:
        try:
            if not worker.conn.poll(self.settings.equivalence_timeout_s):
                return None
            index, verdict = worker.conn.recv()
        except (EOFError, OSError):
            return None
        if index != expected_index:  # protocol desync should be impossible; be safe
            return None
        return bool(verdict)

    def _ensure_worker(self) -> _Worker:
        if self._worker is None:
            self._worker = _Worker(self.settings.worker_start_timeout_s)
            self.worker_starts += 1
        return self._worker

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


def _as_text(value: object) -> str:
    """Answers come from model output: coerce, and drop lone surrogates / NULs math can't hold."""
    text = value if isinstance(value, str) else str(value)
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")


# --------------------------------------------------------------------------------------------
# Voting


@dataclass(frozen=True)
class VoteResult:
    """Outcome of clustering the rollouts' answers.

    ``share`` is the largest cluster's size over ALL rollouts (missing answers included);
    ``agree[i]`` says whether rollout i is in the reference cluster (all False without one);
    ``reason`` is None when a reference was chosen, else "no_answer" (no rollout answered),
    "no_consensus" (largest share < min_agreement) or "tied_majority" (two largest clusters of
    equal size: which one is right would be a coin flip).
    """

    reference: str | None
    share: float
    agree: list[bool]
    n_clusters: int
    n_missing: int
    reason: str | None

    @property
    def pass_rate(self) -> float:
        return sum(self.agree) / len(self.agree) if self.agree else 0.0


def vote(
    answers: Sequence[str | None], oracle: EquivalenceOracle, min_agreement: float
) -> VoteResult:
    """Majority answer by mathematical equivalence.

    Distinct normalized answers are visited most frequent first (ties: first seen); each joins
    the first cluster whose representative it is equivalent to, else founds a cluster. One
    oracle round trip per distinct answer (against all representatives at once).
    """
    normalized = [
        normalize_answer(_as_text(a)) if a is not None and _as_text(a).strip() else None
        for a in answers
    ]
    n_missing = sum(1 for n in normalized if n is None)
    counts = Counter(n for n in normalized if n is not None)
    if not counts:
        return VoteResult(None, 0.0, [False] * len(answers), 0, n_missing, "no_answer")

    representatives: list[str] = []
    cluster_of: dict[str, int] = {}
    for text, _count in counts.most_common():  # most_common keeps first-seen order on ties
        verdicts = oracle.equivalent_many([(rep, text) for rep in representatives])
        joined = next((c for c, same in enumerate(verdicts) if same), None)
        if joined is None:
            joined = len(representatives)
            representatives.append(text)
        cluster_of[text] = joined

    sizes = Counter()
    for text, count in counts.items():
        sizes[cluster_of[text]] += count
    ranked = sizes.most_common()
    best_cluster, best_size = ranked[0]
    share = best_size / len(answers)
    n_clusters = len(representatives)
    if share < min_agreement:
        reason = "no_consensus"
    elif len(ranked) > 1 and ranked[1][1] == best_size:
        reason = "tied_majority"
    else:
        agree = [n is not None and cluster_of[n] == best_cluster for n in normalized]
        return VoteResult(representatives[best_cluster], share, agree, n_clusters, n_missing, None)
    return VoteResult(None, share, [False] * len(answers), n_clusters, n_missing, reason)


# --------------------------------------------------------------------------------------------
# Validity filters

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
_CHOICES_IN_PROBLEM_RE = re.compile(
    r"\(\s*[A-E]\s*\)|\\textbf\{\s*\(\s*[A-E]\s*\)|^\s*[A-E][.)]\s", re.MULTILINE
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
    - "trivial_answer": the reference is empty after normalization (only brackets/punctuation
      left), or it is not a plain number and it restates the problem: it equals the whole
      problem or one of the problem's whole math spans (``$...$``, ``\\(...\\)``,
      ``\\[...\\]``), e.g. "Simplify $\\frac{6}{8}$" answered "\\frac{6}{8}". Integers and decimals are
      never "trivial" by this rule: small numbers legitimately recur in problems (a count
      asked about may equal a given); and only whole spans count, as a substring rule would
      also reject answers such as ``\\sqrt{2}`` that merely occur inside a longer formula.
    - "degenerate_answer": the reference says there is no answer or is unbounded ("none",
      "no solution", "undefined", "does not exist", "\\infty", "\\emptyset", "cannot be
      determined", ...): these are guessable and usually mark a broken problem.
    - "multiple_choice_letter": the reference is a bare letter A-E and the problem lists lettered
      choices: a 1-in-5 guess, and the letter does not carry the answer's content.

    ``reference=None`` (no consensus) only gets the problem-level check; the vote's reason
    already explains the missing reference.
    """
    problem_text = _as_text(problem)
    if _PROOF_RE.search(problem_text):
        return "proof_problem"
    if reference is None:
        return None
    ref = normalize_answer(_as_text(reference))
    if not ref.strip("{}()[]$.,;: \\"):
        return "trivial_answer"
    if not _PLAIN_NUMBER_RE.match(ref) and _squash(ref) in _restatements(problem_text):
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


_MATH_SPAN_RE = re.compile(r"\$\$(.+?)\$\$|\$([^$]+)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


def _restatements(problem: str) -> set[str]:
    """The problem's whole text and each whole math span, squashed."""
    spans = {_squash(problem)}
    for match in _MATH_SPAN_RE.finditer(problem):
        span = next(g for g in match.groups() if g is not None)
        spans.add(_squash(span))
    spans.discard("")
    return spans


__all__ = (
    "EquivalenceOracle",
    "MathCheckSettings",
    "VoteResult",
    "WorkerStartError",
    "extract_answer",
    "normalize_answer",
    "validity_issue",
    "vote",
)
