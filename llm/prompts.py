"""Prompt templates and strict output parsers for every model role.

Templates are data (system text, user text with ``{fields}``, an assistant prefix that is
pre-filled into the assistant turn, stop strings), versioned, and identified by a short content
hash that is stamped on records, so a change of wording is visible in lineage.

Answers and programs are parsed by the verifiers (verification/mathcheck/,
verification/codecheck.py).
Parsers here take the model's *completion* (the text generated after the assistant prefix) and
re-attach the prefix themselves. A closing delimiter that is also a stop string may be missing
(backends strip stop strings, as vLLM and OpenAI do); a completion cut by ``max_tokens`` is
rejected with ``truncated`` when the caller says so.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------------------------------------
# Errors


class ParseError(ValueError):
    """A model output that does not follow its template. ``reason`` is a short stable code used
    as a metric label and a rejection reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Chat rendering


# Fallback when no tokenizer is at hand (e.g. a remote OpenAI-compatible server): ChatML, the
# format of SmolLM2, Qwen and the tiny test model.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml(messages: list[dict[str, str]]) -> str:
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return body + "<|im_start|>assistant\n"


def render_chat(
    tokenizer_or_backend: Any, system: str, user: str, assistant_prefix: str = ""
) -> str:
    """The full prompt string: chat template with a generation prompt, then the pre-filled start
    of the assistant turn. Accepts a HF tokenizer, a backend (uses its ``render_messages``) or
    None (ChatML)."""
    messages = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": user})
    target = tokenizer_or_backend
    if target is not None and hasattr(target, "render_messages"):
        text = target.render_messages(messages)
    elif target is not None and getattr(target, "chat_template", None):
        text = target.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = chatml(messages)
    return text + assistant_prefix


# ---------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class Template:
    """One prompt. ``user`` holds ``str.format`` fields; ``assistant_prefix`` is pre-filled so
    small models start in the right format; ``stop`` ends generation at the closing delimiter."""

    name: str
    version: int
    system: str
    user: str
    assistant_prefix: str = ""
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def hash(self) -> str:
        """Short content hash of everything that changes what the model sees."""
        payload = json.dumps(
            [self.name, self.version, self.system, self.user, self.assistant_prefix, self.stop]
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:10]

    @property
    def id(self) -> str:
        """Stable label for lineage, e.g. ``synthesis@v1+3f2a9c01de``."""
        return f"{self.name}@v{self.version}+{self.hash}"

    def user_text(self, **fields: Any) -> str:
        return self.user.format(**fields)

    def render(self, tokenizer_or_backend: Any, **fields: Any) -> str:
        """The prompt string ready for ``Backend.generate``."""
        return render_chat(
            tokenizer_or_backend, self.system, self.user_text(**fields), self.assistant_prefix
        )

    def full_output(self, completion: str) -> str:
        """The assistant turn as the model 'said' it: prefix + completion."""
        if self.assistant_prefix and completion.startswith(self.assistant_prefix):
            return completion
        return self.assistant_prefix + completion


RATIONALE_OPEN, RATIONALE_CLOSE = "<rationale>", "</rationale>"
PROBLEM_OPEN, PROBLEM_CLOSE = "<problem>", "</problem>"

CONCEPT_ANNOTATION = Template(
    name="concepts",
    version=1,
    system="You are an expert in educational assessment. You name the foundational knowledge a "
    "problem tests.",
    user="Read the problem below and list {k} foundational concepts a student must know to "
    "solve it. Write one short concept per line, numbered 1 to {k}, and nothing else.\n\n"
    "Problem:\n{problem}",
    assistant_prefix="Concepts:\n1.",
)

RATIONALE_ANNOTATION = Template(
    name="rationale_annotation",
    version=1,
    system="You are a problem designer who explains how problems are built.",
    user="Here are the foundational concepts and a problem that was built from them.\n\n"
    "Concepts:\n{concepts}\n\nProblem:\n{problem}\n\n"
    "Explain, step by step, how a designer starting only from these concepts would arrive at "
    "exactly this problem, so that another designer following your notes would write the same "
    f"problem. Put the notes between {RATIONALE_OPEN} and {RATIONALE_CLOSE}.",
    assistant_prefix=f"{RATIONALE_OPEN}\n",
    stop=(RATIONALE_CLOSE,),
)

# q_φ(z | c, x): the model's own, shorter wording; same output format as the annotation.
RATIONALE_MODEL = Template(
    name="rationale_model",
    version=1,
    system="You reconstruct the design notes behind a problem.",
    user="Concepts:\n{concepts}\n\nProblem:\n{problem}\n\n"
    f"Write the design notes that lead from the concepts to this problem, between "
    f"{RATIONALE_OPEN} and {RATIONALE_CLOSE}.",
    assistant_prefix=f"{RATIONALE_OPEN}\n",
    stop=(RATIONALE_CLOSE,),
)

# p_θ(z, x | c): rationale first, then the problem, each between explicit delimiters. The
# assistant turn starts with the opening delimiter; generation stops at the problem's end.
SYNTHESIS = Template(
    name="synthesis",
    version=1,
    system="You design new, hard, self-contained problems.",
    user="Concepts:\n{concepts}\n\nDifficulty: {difficulty}\nKind: {kind}\n\n"
    f"First plan how to combine the concepts between {RATIONALE_OPEN} and {RATIONALE_CLOSE}. "
    f"Then write one {{kind}} between {PROBLEM_OPEN} and {PROBLEM_CLOSE}.",
    assistant_prefix=f"{RATIONALE_OPEN}\n",
    stop=(PROBLEM_CLOSE,),
)

SOLVER_MATH = Template(
    name="solver_math",
    version=1,
    system="You solve mathematics problems carefully.",
    user="Solve the problem. Reason step by step, then give the final answer as \\boxed{{...}} "
    "on the last line.\n\nProblem:\n{problem}",
)

SOLVER_CODE = Template(
    name="solver_code",
    version=1,
    system="You write correct, efficient Python 3 programs.",
    user="Solve the problem with a Python 3 program that reads from standard input and writes "
    "to standard output. Reply with exactly one ```python fenced code block.\n\n"
    "Problem:\n{problem}",
)

TEST_WRITER = Template(
    name="test_writer",
    version=1,
    system="You write unit tests for programming problems.",
    user='Write one test case for the problem below: a JSON object with the keys "input" '
    '(the exact standard input) and "output" (the exact expected standard output), in one '
    "```json fenced block.\n\nProblem:\n{problem}",
    assistant_prefix="```json\n",
    stop=("\n```",),
)

# The decontamination judge (models.judge): is a candidate a benchmark problem in other words?
# One word after the prefilled "Verdict:", read by parse_judge_verdict.
PARAPHRASE_JUDGE = Template(
    name="paraphrase_judge",
    version=1,
    system="You compare two problems and decide whether they are the same problem.",
    user="Problem A:\n{candidate}\n\nProblem B:\n{benchmark}\n\n"
    "Is Problem A the same problem as Problem B told in other words? Different names, story, "
    "notation or sentence order do not matter. A different question, or a number that changes "
    "the answer, makes them different problems. Answer with one word: SAME or DIFFERENT.",
    assistant_prefix="Verdict:",
    stop=("\n",),
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        CONCEPT_ANNOTATION,
        RATIONALE_ANNOTATION,
        RATIONALE_MODEL,
        SYNTHESIS,
        SOLVER_MATH,
        SOLVER_CODE,
        TEST_WRITER,
        PARAPHRASE_JUDGE,
    )
}

# The solver's template for each domain (verify, pairs and DPO must agree on it).
SOLVER_BY_DOMAIN: dict[str, Template] = {"math": SOLVER_MATH, "code": SOLVER_CODE}

# What the SYNTHESIS template's {kind} field says for each domain.
KIND_BY_DOMAIN = {
    "math": "competition mathematics problem with a single final answer",
    "code": "competitive programming problem that reads standard input and writes standard output",
}


def format_concepts(concepts: Sequence[str]) -> str:
    """Concepts as the numbered list every template expects."""
    return "\n".join(f"{i}. {c.strip()}" for i, c in enumerate(concepts, 1))


def synthesis_fields(concepts: Sequence[str], difficulty: str, domain: str) -> dict[str, str]:
    return {
        "concepts": format_concepts(concepts),
        "difficulty": difficulty,
        "kind": KIND_BY_DOMAIN[domain],
    }


def synthesis_parts(rationale: str, problem: str) -> tuple[str, str]:
    """The p_θ completion split in its z part and x part, for teacher-forced scoring
    (R(z) = log p(z|c) + log p(x|z,c)) and SFT targets. Concatenated they are exactly what the
    model should generate after SYNTHESIS.assistant_prefix."""
    z_part = f"{rationale.strip()}\n{RATIONALE_CLOSE}\n{PROBLEM_OPEN}\n"
    x_part = f"{problem.strip()}\n{PROBLEM_CLOSE}"
    return z_part, x_part


def rationale_completion(rationale: str) -> str:
    """The q_φ / annotation completion after the prefix, for SFT targets."""
    return f"{rationale.strip()}\n{RATIONALE_CLOSE}"


def concepts_completion(concepts: Sequence[str]) -> str:
    """The concept-extraction completion after the prefix ``Concepts:\\n1.``."""
    return format_concepts(concepts)[len("1.") :]


def test_completion(test_input: str, test_output: str) -> str:
    """The test-writer completion after the prefix."""
    return json.dumps({"input": test_input, "output": test_output}) + "\n```"


# ---------------------------------------------------------------------------------------------
# Parsers


@dataclass(frozen=True)
class Synthesis:
    rationale: str
    problem: str


def _check_truncated(truncated: bool) -> None:
    if truncated:
        raise ParseError("truncated", "generation hit max_tokens")


def _between(text: str, open_tag: str, close_tag: str, *, close_optional: bool) -> str | None:
    start = text.find(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    if end < 0:
        if not close_optional:
            return None
        end = len(text)
    return text[start:end].strip()


# The item ends at its last non-space character: a lazy body before ``\s*$`` retried the
# trailing white space at every length, quadratic in a line of a teacher's output (issue 21).
_NUMBERED = re.compile(r"^\s*(\d+)[.)]\s*+(.*\S)\s*$")


def parse_concepts(completion: str, k: int | None = None, *, truncated: bool = False) -> list[str]:
    """Numbered list -> concepts (deduplicated, in order). With ``k``, at least k are required
    and only the first k are kept."""
    text = CONCEPT_ANNOTATION.full_output(completion)
    concepts: list[str] = []
    for line in text.splitlines():
        m = _NUMBERED.match(line)
        if m and m.group(2).strip(" .") and m.group(2) not in concepts:
            concepts.append(m.group(2).strip())
    if not concepts:
        raise ParseError("missing_concepts", "no numbered concept lines")
    if k is not None and len(concepts) < k:
        # A cut-off list is the usual cause of too few concepts: say so.
        _check_truncated(truncated)
        raise ParseError("too_few_concepts", f"{len(concepts)} < {k}")
    return concepts[:k] if k is not None else concepts


def parse_rationale(completion: str, *, truncated: bool = False) -> str:
    """``<rationale> ... </rationale>`` (the closing tag may be the stripped stop string)."""
    _check_truncated(truncated)
    text = RATIONALE_MODEL.full_output(completion)
    rationale = _between(text, RATIONALE_OPEN, RATIONALE_CLOSE, close_optional=True)
    if rationale is None:
        raise ParseError("missing_rationale")
    if RATIONALE_OPEN in rationale or PROBLEM_OPEN in rationale:
        raise ParseError("malformed_rationale", "nested delimiters")
    if not rationale:
        raise ParseError("empty_rationale")
    return rationale


def parse_synthesis(completion: str, *, truncated: bool = False) -> Synthesis:
    """Rationale then problem. Rejects outputs missing either part (the paper's rule)."""
    _check_truncated(truncated)
    text = SYNTHESIS.full_output(completion)
    rationale = _between(text, RATIONALE_OPEN, RATIONALE_CLOSE, close_optional=False)
    if rationale is None:
        raise ParseError("missing_rationale", "no closed rationale block")
    if not rationale:
        raise ParseError("empty_rationale")
    after = text[text.find(RATIONALE_CLOSE) + len(RATIONALE_CLOSE) :]
    problem = _between(after, PROBLEM_OPEN, PROBLEM_CLOSE, close_optional=True)
    if problem is None:
        raise ParseError("missing_problem")
    if PROBLEM_OPEN in problem or RATIONALE_OPEN in problem:
        raise ParseError("malformed_problem", "nested delimiters")
    if not problem:
        raise ParseError("empty_problem")
    return Synthesis(rationale=rationale, problem=problem)


_VERDICT = re.compile(r"\b(NOT\s+(?:THE\s+)?SAME|SAME|DIFFERENT)\b")


def parse_judge_verdict(completion: str) -> bool:
    """The judge's answer: True for SAME, False for DIFFERENT (or NOT SAME); the first verdict
    word counts, whatever the case or markup around it (``**Same**.``)."""
    text = completion.strip()
    if not text:
        raise ParseError("empty_verdict")
    found = _VERDICT.search(text[:200].upper())
    if found is None:
        raise ParseError("malformed_verdict", text[:80])
    return found.group(1) == "SAME"
