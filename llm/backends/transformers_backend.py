"""In-process transformers backend: batched generation (left padding) and teacher-forced scoring
by one forward pass. The default on a CPU-only machine."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import torch

from llm.backends.base import (
    Backend,
    BackendSettings,
    Completion,
    ContextOverflowError,
    Score,
    adapter_base,
    continuation_span,
    failed_completions,
    failed_score,
    mark_empty,
    truncate_at_stop,
    weights_version,
)
from streams import memory


@dataclass(frozen=True)
class _Served:
    """Everything a reload swaps at once."""

    base_path: str
    tokenizer: Any
    model: Any
    version: str
    eos_ids: list[int]


def _stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    gen_eos = model.generation_config.eos_token_id
    if gen_eos is not None:
        ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    # Chat models end a turn with <|im_end|> even when EOS is another token.
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(ids)


class TransformersBackend(Backend):
    # One generate() holds the model (and torch's RNG) for its whole batch: concurrent calls
    # queue on the lock, so the runtime should send whole micro-batches, one at a time.
    continuous_batching = False

    def __init__(self, settings: BackendSettings):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
        self.settings = settings
        self._lock = threading.RLock()  # generate() samples from torch's global RNG
        self.label = ""  # what this instance is for (llm/roles.py sets the roles it serves)
        self._install(self._build(settings.model))
        memory.hold(self)

    # -- loading ------------------------------------------------------------------------------

    def _build(self, model_path: str) -> _Served:
        """Tokenizer, model and version for ``model_path``: a model of our own on the process's
        shared copy of the base (llm/shared_base.py), with the LoRA adapter on top when the folder
        is one. The adapter stays unmerged: merging would write into the shared base."""
        from transformers import AutoTokenizer

        from llm.shared_base import shared_base

        adapter = model_path if adapter_base(model_path) else None
        base_path = adapter_base(model_path) or model_path
        tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
        base = shared_base(base_path, self.settings.dtype, self.settings.device)
        model = base.model()
        version = base.version
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
            version += f"+lora:{weights_version(adapter)}"
        model.eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return _Served(base_path, tokenizer, model, version, _stop_token_ids(model, tokenizer))

    def _install(self, served: _Served) -> None:
        with self._lock:
            self._base_path = served.base_path
            self.tokenizer = served.tokenizer
            self.model = served.model
            self.model_version = served.version
            self._eos_ids = served.eos_ids

    def reload(self, model_path: str) -> None:
        """Serve ``model_path``: a full model folder, or a LoRA adapter on the base it names.
        Built beside the one served (calls go on meanwhile), then swapped in."""
        self._install(self._build(model_path))

    def memory_components(self) -> list[tuple[str, Any]]:
        """What this instance holds, for the memory account (streams/memory.py)."""
        model = self.model
        return [] if model is None else [(self.label or f"backend {self.settings.model}", model)]

    def render_messages(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return super().render_messages(messages)

    def close(self) -> None:
        with self._lock:
            self.model = None  # type: ignore[assignment]

    # -- generation ---------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        # Prompts are fully rendered (BOS included by the chat template where a model wants it).
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(
        self,
        prompts: list[str],
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 256,
        stop: list[str] | None = None,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        results: list[list[Completion] | None] = [None] * len(prompts)
        jobs: list[tuple[int, list[int], int]] = []  # (prompt index, ids, token budget)
        limit = self.settings.max_model_len
        for i, prompt in enumerate(prompts):
            ids = self._encode(prompt)
            if not ids or len(ids) >= limit:
                results[i] = failed_completions(n, ContextOverflowError.reason, len(ids))
            else:
                # Shrink the budget rather than fail: the item comes back "length" if it runs out.
                jobs.append((i, ids, min(max_tokens, limit - len(ids))))
        with self._lock, torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            # Micro-batches of whole prompts (each expands to n sequences).
            per_batch = max(1, self.settings.max_batch_size // max(1, n))
            for start in range(0, len(jobs), per_batch):
                chunk = jobs[start : start + per_batch]
                outs = self._generate_chunk(chunk, n, temperature, top_p, stop)
                for (i, _, _), completions in zip(chunk, outs):
                    results[i] = completions
        return [r if r is not None else [] for r in results]

    def _generate_chunk(
        self,
        chunk: list[tuple[int, list[int], int]],
        n: int,
        temperature: float,
        top_p: float,
        stop: list[str] | None,
    ) -> list[list[Completion]]:
        pad = self.tokenizer.pad_token_id
        width = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, ids, _) in enumerate(chunk):  # left padding: generation continues at the end
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        budget = max(b for _, _, b in chunk)
        # Expand rows ourselves: generate() refuses num_return_sequences > 1 when greedy.
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention = attention.repeat_interleave(n, dim=0)
        kwargs: dict[str, Any] = {
            "max_new_tokens": budget,
            "eos_token_id": self._eos_ids,
            "pad_token_id": pad,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
        out = self.model.generate(
            input_ids=input_ids.to(self.model.device),
            attention_mask=attention.to(self.model.device),
            **kwargs,
        )
        generated = out[:, width:].tolist()
        results: list[list[Completion]] = []
        for row, (_, ids, own_budget) in enumerate(chunk):
            completions = []
            for k in range(n):
                completions.append(self._finish(generated[row * n + k], len(ids), own_budget, stop))
            results.append(completions)
        return results

    def _finish(
        self, tokens: list[int], n_prompt: int, budget: int, stop: list[str] | None
    ) -> Completion:
        """Cut one generated row at EOS / stop string / its own budget and decode it."""
        eos = set(self._eos_ids)
        finish = "length"
        kept: list[int] = []
        for t in tokens[:budget]:
            kept.append(t)
            if t in eos:
                finish = "stop"
                break
        body = [t for t in kept if t not in eos]
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        text, hit = truncate_at_stop(text, stop)
        if hit:
            finish = "stop"
            # Count the tokens up to the stop string, like a server that stopped there.
            kept = self._tokens_through(body, text)
        return mark_empty(Completion(text, n_prompt, len(kept), finish))

    def _tokens_through(self, body: list[int], text: str) -> list[int]:
        for j in range(1, len(body) + 1):
            if len(self.tokenizer.decode(body[:j], skip_special_tokens=True)) > len(text):
                return body[:j]
        return body

    # -- scoring ------------------------------------------------------------------------------

    def prompt_logprobs(
        self, texts: list[str]
    ) -> list[tuple[list[int], list[tuple[int, int]], list[float | None]]]:
        """For each text: token ids, character offsets, and each token's log-prob given the
        tokens before it (None for the first). One right-padded forward pass per micro-batch."""
        encoded = [
            self.tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts
        ]
        out: list[tuple[list[int], list[tuple[int, int]], list[float | None]]] = []
        bs = self.settings.max_batch_size
        with self._lock, torch.inference_mode():
            for start in range(0, len(encoded), bs):
                chunk = encoded[start : start + bs]
                width = max(1, max(len(e["input_ids"]) for e in chunk))
                ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, e in enumerate(chunk):
                    ids[row, : len(e["input_ids"])] = torch.tensor(e["input_ids"], dtype=torch.long)
                    mask[row, : len(e["input_ids"])] = 1
                logits = self.model(
                    input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device)
                ).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)
                picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1).to(logp.device)).squeeze(-1)
                for row, e in enumerate(chunk):
                    length = len(e["input_ids"])
                    values: list[float | None] = [None] + picked[row, : length - 1].tolist()
                    out.append(
                        (
                            list(e["input_ids"]),
                            [tuple(o) for o in e["offset_mapping"]],
                            values[:length],
                        )
                    )
        return out

    def score(self, prompts: list[str], continuations: list[str]) -> list[Score]:
        if len(prompts) != len(continuations):
            raise ValueError("prompts and continuations differ in length")
        results: list[Score | None] = [None] * len(prompts)
        todo: list[int] = []
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            n_tokens = len(self._encode(p + c))
            if n_tokens > self.settings.max_model_len:
                results[i] = failed_score(ContextOverflowError.reason)
            else:
                todo.append(i)
        scored = self.prompt_logprobs([prompts[i] + continuations[i] for i in todo])
        for i, (ids, offsets, values) in zip(todo, scored):
            first = max(1, continuation_span(offsets, len(prompts[i])))  # token 0 has no context
            lps = [float(v) for v in values[first:] if v is not None]
            tokens = [self.tokenizer.decode([t]) for t in ids[first:]]
            results[i] = Score(sum(lps), lps, tokens)
        return [r for r in results if r is not None]
