"""Text normalization shared by the hash, n-gram and embedding checks.

Three levels, from strict to loose:
- ``clean_problem_text``: what gets embedded and stored — ChatML and the fixed benchmark prompt
  boilerplate removed, so only the problem statement counts.
- ``hash_key``: exact-duplicate key — Unicode NFKC, casefolded, whitespace collapsed.
- ``ngram_tokens``: contamination tokens — words lowercased, punctuation and LaTeX commands dropped,
  every number -> "<num>", every single-letter identifier -> "<v>" (so renamed variables and
  reformatted numbers such as 1,000 / 1000 / 1000.0 still share n-grams).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_CHATML_TAG = re.compile(r"<\|im_(?:start|end)\|>(?:system|user|assistant)?\n?")
_THINK_OPEN = re.compile(r"<think>\s*$")
# Fixed wrappers of the benchmark prompts (PromptCoT 2.0 evaluation sets). Problems are model
# text: a run of white space may start a match only where it starts ((?<!\s)), and is crossed
# possessively (*+), or the engine rescans the run from each of its characters, quadratic in a
# problem of 200 KB of newlines (issue 21). A match may so take the spaces before the line
# break too; clean_problem_text strips them anyway.
_CODE_PREAMBLE = re.compile(
    r"^\s*You will be given a question \(problem specification\)(?:.*?(?<!\s))?"
    r"[^\S\n]*+\n\s*+Question:\s*+",
    re.DOTALL,
)
_CODE_TRAILER = re.compile(
    r"(?<!\s)[^\S\n]*+\n\s*+Read the inputs from stdin solve the problem.*\Z", re.DOTALL
)
_CODE_FORMAT_TRAILER = re.compile(
    r"(?<!\s)[^\S\n]*+\n\s*+You will use the following starter code.*\Z", re.DOTALL
)
_MATH_TRAILER = re.compile(
    r"(?<!\s)\s*+Please reason step by step, and put your final answer within \\boxed\{\}\.?"
    r"\s*\Z"
)
_WHITESPACE = re.compile(r"\s+")

# Order matters: LaTeX commands first (dropped), then numbers (with , . separators), then words.
_NGRAM_TOKEN = re.compile(r"\\[A-Za-z]+|\d+(?:[.,]\d+)*|[^\W\d_]+")


def decode_text(text: str | bytes) -> str:
    """Bytes from the wire may not be UTF-8: decode with replacement rather than fail."""
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    return text


def clean_problem_text(text: str | bytes) -> str:
    """The problem statement alone: no ChatML tags, no fixed instruction wrapper."""
    text = decode_text(text)
    text = _CHATML_TAG.sub("", text)
    text = _THINK_OPEN.sub("", text)
    text = _CODE_PREAMBLE.sub("", text, count=1)
    text = _CODE_TRAILER.sub("", text)
    text = _CODE_FORMAT_TRAILER.sub("", text)
    text = _MATH_TRAILER.sub("", text)
    return text.strip()


def hash_key(text: str) -> str:
    """Exact-duplicate key: same problem modulo Unicode form, case and whitespace."""
    normalized = _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:32]


def ngram_tokens(text: str) -> list[str]:
    """Tokens for n-gram overlap, robust to renamed single-letter variables and number formats."""
    text = unicodedata.normalize("NFKC", text)
    tokens: list[str] = []
    for match in _NGRAM_TOKEN.finditer(text):
        token = match.group(0)
        if token[0] == "\\":
            continue  # \frac, \leq, \tfrac...: formatting, not content
        if token[0].isdigit():
            tokens.append("<num>")
        elif len(token) == 1:
            tokens.append("<v>")
        else:
            tokens.append(token.casefold())
    return tokens


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    """All n-grams; a text shorter than n contributes itself whole (short problems still match)."""
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}
