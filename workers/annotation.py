"""Cold-start annotation without a teacher model: a seed's (concepts, rationale) built from the
seed itself, so the embedded default has cold-start triples (c, z, x) with no LLM.

- Concepts: the lexicon annotator (workers/lexicon.py).
- Rationale: derived from the seed's worked solution. GSM8K answers are step-by-step solutions
  whose lines say how the quantities combine; the rationale names the concepts, lists those
  steps (calculator annotations ``<<48/2=24>>`` removed) and says what the question asks for,
  i.e. the design notes that lead from the concepts to exactly this problem.

The rationale is kept short (``max_chars``): p_θ learns to write one like it within the synthesis
token budget (``generation.max_rationale_tokens``), and a longer one would teach it to run out of
tokens. A seed without a worked solution (the Codeforces statements) or on which no concept fires
gets a reason code instead (``no_solution``, ``missing_concepts``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from llm.prompts import ParseError
from streams.records import SeedProblem
from workers.lexicon import annotate_with_lexicon
from workers.seeds import gsm8k_final_answer

ANNOTATOR = "lexicon+solution"  # AnnotatedSeed.annotator of seeds annotated here

_CALCULATOR = re.compile(r"<<[^>]*>>")
_FINAL_LINE = re.compile(r"^\s*####.*$", re.MULTILINE)


def solution_steps(solution: str) -> list[str]:
    """The worked solution's lines without calculator annotations or the ``#### answer`` line."""
    steps = []
    for line in _FINAL_LINE.sub("", solution).splitlines():
        text = " ".join(_CALCULATOR.sub("", line).split())
        if text:
            steps.append(text)
    return steps


def solver_gold_solution(solution: str) -> str:
    """A GSM8K worked solution in the format the solver is asked for (llm/prompts.py
    ``SOLVER_MATH``: the final answer as ``\\boxed{...}`` on the last line): its steps as
    ``solution_steps`` gives them (calculator annotations removed), then
    ``The answer is \\boxed{N}.`` with N the number after ``####``. Evaluation scores these gold
    solutions (trainer/evaluate.py); training on GSM8K solutions uses the same text."""
    steps = solution_steps(solution)
    return "\n".join([*steps, f"The answer is \\boxed{{{gsm8k_final_answer(solution)}}}."])


def solution_rationale(
    concepts: Sequence[str], solution: str, answer: str | None, max_chars: int = 480
) -> str:
    """Design notes from concepts to the problem, derived from its worked solution; at most
    ``max_chars`` long whenever the head, the tail and one "Then N more steps" line fit."""
    steps = solution_steps(solution)
    n = len(steps)
    head = (
        f"Concepts to combine: {'; '.join(c.strip() for c in concepts)}. "
        f"One word problem that takes {n} step{'s' if n != 1 else ''} to solve:"
    )
    tail = "Ask for the final quantity" + (f", so the answer is {answer}." if answer else ".")

    def more(i: int) -> str:
        return f"{i}. Then {n - i + 1} more step{'s' if n - i else ''} of the same kind."

    lines = [head]
    used = len(head) + 1 + len(tail)  # the text is the lines joined by newlines
    for i, step in enumerate(steps, 1):
        line = f"{i}. {step}"
        # A step is taken only if room stays for the line that says how many steps follow.
        reserve = len(more(i + 1)) + 1 if i < n else 0
        if used + len(line) + 1 + reserve > max_chars:
            lines.append(more(i))
            break
        lines.append(line)
        used += len(line) + 1
    lines.append(tail)
    return "\n".join(lines)


def annotate_from_seed(seed: SeedProblem, k: int, max_chars: int = 480) -> tuple[list[str], str]:
    """(concepts, rationale) of a seed without a model; ParseError with a reason code if the
    seed cannot be annotated this way."""
    concepts = annotate_with_lexicon(seed.text, seed.domain, k)
    if not concepts:
        raise ParseError("missing_concepts", "no lexicon concept fires on this seed")
    if not (seed.solution or "").strip():
        raise ParseError("no_solution", "no worked solution to derive a rationale from")
    steps = solution_steps(seed.solution or "")
    if not steps:
        raise ParseError("no_solution", "the worked solution has no steps")
    return concepts, solution_rationale(concepts, seed.solution or "", seed.answer, max_chars)
