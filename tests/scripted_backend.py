"""A scripted model backend for stage unit tests where the model does not matter: it answers each
prompt with text a test chooses, and cuts at stop strings and at ``max_tokens`` words the way the
real backends do (so parsers see what they would see from a model)."""

from __future__ import annotations

from collections.abc import Callable

from llm.backends.base import (
    Backend,
    BackendSettings,
    Completion,
    Score,
    mark_empty,
    truncate_at_stop,
)


class ScriptedBackend(Backend):
    """``respond(prompt, sample_index) -> text``; one word is one token."""

    continuous_batching = False

    def __init__(self, respond: Callable[[str, int], str], version: str = "scripted@v1"):
        self.settings = BackendSettings(model="scripted")
        self.respond = respond
        self.model_version = version
        self.prompts: list[str] = []

    def generate(
        self, prompts, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None, seed=None
    ) -> list[list[Completion]]:
        out = []
        for prompt in prompts:
            self.prompts.append(prompt)
            samples = []
            for i in range(n):
                text, stopped = truncate_at_stop(self.respond(prompt, i), stop)
                words = text.split(" ")
                cut = len(words) > max_tokens
                text = " ".join(words[:max_tokens])
                reason = "length" if cut and not stopped else "stop"
                samples.append(
                    mark_empty(
                        Completion(text, len(prompt.split()), min(len(words), max_tokens), reason)
                    )
                )
            out.append(samples)
        return out

    def score(self, prompts, continuations) -> list[Score]:
        return [
            Score(-float(len(c.split())), [-1.0] * len(c.split()), c.split()) for c in continuations
        ]

    def reload(self, model_path: str) -> None:
        self.model_version = f"scripted@{model_path}"
