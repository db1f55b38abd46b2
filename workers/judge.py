"""The decontamination judge behind the filter's gray zone (vectorstore/paraphrase.py), chosen by
``vectorstore.decontam.judge.kind``: the cheap signal (``skeleton``, no model) or the ``judge``
model role (``model``: a teacher, e.g. the annotator's server on a cluster).

The model reads each pair with the ``paraphrase_judge`` template and answers SAME or DIFFERENT.
An answer that cannot be read (empty, no verdict word, a prompt over the context) never rejects
on its own: the pair gets the cheap signal's verdict, marked ``malformed`` and counted. A model
server that is away raises, and the runtime retries the batch (docs/runtime.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from llm.backends.base import Backend
from llm.prompts import PARAPHRASE_JUDGE, ParseError, parse_judge_verdict
from llm.roles import Role, backend_for
from vectorstore.paraphrase import JudgePair, PairJudge, PairVerdict, SkeletonJudge
from vectorstore.settings import JudgeSettings
from workers.stage import ModelStage

if TYPE_CHECKING:
    from promptcot.settings import Settings


class ModelJudge:
    def __init__(self, backend: Backend, settings: JudgeSettings, fallback: PairJudge):
        self.backend = backend
        self.settings = settings
        self.fallback = fallback  # decides the pairs whose answer cannot be read

    def judge(self, pairs: Sequence[JudgePair]) -> list[PairVerdict]:
        if not pairs:
            return []
        cut = self.settings.max_problem_chars
        prompts = [
            PARAPHRASE_JUDGE.render(
                self.backend, candidate=p.candidate[:cut], benchmark=p.benchmark[:cut]
            )
            for p in pairs
        ]
        version = self.backend.model_version  # before the call: a reload may come during it
        completions = self.backend.generate(
            prompts,
            n=1,
            temperature=0.0,
            max_tokens=self.settings.max_tokens,
            stop=list(PARAPHRASE_JUDGE.stop),
        )
        ModelStage.count_tokens(Role.JUDGE, (c for samples in completions for c in samples))
        out = []
        for pair, (completion, *_) in zip(pairs, completions, strict=True):
            try:
                if not completion.ok:
                    raise ParseError(completion.error or "error")
                same = parse_judge_verdict(completion.text)
            except ParseError as e:
                cheap = self.fallback.judge([pair])[0]
                detail = f"unreadable answer ({e.reason}); {cheap.judge}: {cheap.detail}"
                out.append(
                    PairVerdict(
                        cheap.same, version, detail[:300], PARAPHRASE_JUDGE.id, malformed=True
                    )
                )
                continue
            answer = " ".join(completion.text.split())[:80]
            out.append(PairVerdict(same, version, f"answer: {answer}", PARAPHRASE_JUDGE.id))
        return out


def build_judge(
    settings: Settings,
    benchmark_texts: Iterable[str],
    backends: Mapping[str, Backend] | None = None,
) -> PairJudge | None:
    """The judge the settings name (None when off). ``backends`` may hand in the ``judge`` role's
    backend (a scripted one in tests); else the process's backend for the role serves it."""
    cfg = settings.vectorstore.decontam.judge
    if cfg.kind == "off":
        return None
    cheap = SkeletonJudge.for_benchmarks(benchmark_texts, cfg)
    if cfg.kind == "skeleton":
        return cheap
    backend = (backends or {}).get(Role.JUDGE)
    if backend is None:
        if not settings.models.judge.model:
            # The embedded default model (SmolLM2-135M) cannot judge: refuse, don't pretend.
            raise ValueError(
                "vectorstore.decontam.judge.kind is 'model' but models.judge.model is not set: "
                "name the judge model (a teacher), or use kind 'skeleton'"
            )
        backend = backend_for(settings.models, Role.JUDGE)
    return ModelJudge(backend, cfg, fallback=cheap)
