"""In-process vLLM backend on vLLM's asynchronous engine (``AsyncLLM``). vLLM is imported lazily:
this module imports without it, and the backend raises a clear error when it is missing.

The engine runs on one asyncio loop per backend (a background thread). Every ``generate`` or
``score`` call, from any thread, submits its prompts to the engine as they come and gets each
back as soon as it finishes, so one process keeps the engine's batch full (up to its
``max_num_seqs``) while many threads each wait for their own records (docs/models.md, "Keeping
engines saturated").

Scoring uses ``prompt_logprobs`` on our own token ids (we tokenize prompt+continuation, so the
boundary rule is the same as the transformers backend's). New weights: a LoRA adapter folder is
attached per request (needs ``enable_lora``) on the base model it names (the engine restarts on
that base if it serves another); a full model folder restarts the engine (weight sync into a
live CPU engine does not work: docs/models.md, "vLLM on CPU"). A restart stops the old engine
(its engine-core process and its memory) before the new one starts: one engine per backend.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm.backends.base import (
    Backend,
    BackendError,
    BackendSettings,
    Completion,
    ContextOverflowError,
    Score,
    adapter_base,
    continuation_span,
    failed_completions,
    failed_score,
    mark_empty,
    weights_version,
)
from llm.backends.event_loop import LoopThread, gather_or_cancel


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001  (ImportError, or a broken CUDA-linked extra)
        return False
    return True


class VLLMBackend(Backend):
    continuous_batching = True

    def __init__(self, settings: BackendSettings):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default is large
        self.settings = settings
        self._lock = threading.RLock()
        # Calls and engine restarts exclude each other: a restart waits for the calls on the
        # old engine (they would die with it), calls wait for the new engine.
        self._gate = threading.Condition()
        self._calls = 0
        self._swapping = False
        self._lora: Any = None
        self._lora_count = 0
        self._request_ids = itertools.count()
        self._loop = LoopThread("vllm-backend", "the vLLM backend")
        base = adapter_base(settings.model)  # a LoRA checkpoint: its base, then the adapter
        self._start(base or settings.model)
        if base:
            self._attach(settings.model)

    def _start(self, model_path: str) -> None:
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise BackendError(f"vllm is not installed: {exc} (see ops/vllm-venv.sh)") from exc
        s = self.settings
        args: dict[str, Any] = {
            "model": model_path,
            "dtype": s.dtype,
            "max_model_len": s.max_model_len,
            "seed": s.seed,
            "enforce_eager": True,  # no CUDA graphs / compile: starts faster, needed on CPU
            "enable_lora": s.enable_lora,
        }
        if s.enable_lora:
            args["max_lora_rank"] = s.max_lora_rank
        if s.device != "cpu":
            args["gpu_memory_utilization"] = s.gpu_memory_utilization
        else:
            # vllm-cpu kills its engine when chunked prefill cuts a seeded request mid-prompt
            # (docs/models.md, "vLLM on CPU"); whole prompts per step avoid it.
            args["enable_chunked_prefill"] = False
        args.update(s.extra_engine_args)
        self._model_path = model_path

        async def create() -> Any:  # on the backend's loop: the engine binds its tasks there
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

        self.engine = self._loop.run(create())
        self.tokenizer = self.engine.get_tokenizer()
        self.model_version = weights_version(model_path)

    @property
    def max_in_flight(self) -> int:
        return int(self.engine.vllm_config.scheduler_config.max_num_seqs)

    async def _all(self, requests: list[tuple[Any, Any]]) -> list[Any]:
        """Final outputs of (prompt, sampling params) requests, in order, each submitted at
        once; an error cancels (and so aborts in the engine) the rest of this call."""
        engine, lora = self.engine, self._lora

        async def one(prompt: Any, params: Any) -> Any:
            final = None
            request_id = f"promptcot-{next(self._request_ids)}"
            async for out in engine.generate(prompt, params, request_id, lora_request=lora):
                final = out
            return final

        return await gather_or_cancel([one(p, sp) for p, sp in requests])

    def reload(self, model_path: str) -> None:
        """Serve ``model_path``: a full model folder (engine restart), or a LoRA adapter on the
        base it names (engine restart only if that is not the base being served). Calls made
        meanwhile wait for the new engine; if it fails to start, the old weights come back."""
        with self._lock:
            base = adapter_base(model_path)
            weights = base or model_path
            if base is None or Path(base).resolve() != Path(self._model_path).resolve():
                with self._restarting():
                    old = (self._model_path, self._lora, self.model_version)
                    self._shutdown()
                    self._lora = None
                    try:
                        self._start(weights)
                    except Exception:
                        self._start(old[0])  # with the adapter it had, if any
                        self._lora, self.model_version = old[1], old[2]
                        raise
            if base:
                self._attach(model_path)

    @contextlib.contextmanager
    def _restarting(self) -> Iterator[None]:
        with self._gate:
            self._swapping = True
            while self._calls:
                self._gate.wait()
        try:
            yield
        finally:
            with self._gate:
                self._swapping = False
                self._gate.notify_all()

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        with self._gate:
            while self._swapping:
                self._gate.wait()
            self._calls += 1
        try:
            yield
        finally:
            with self._gate:
                self._calls -= 1
                self._gate.notify_all()

    def _attach(self, adapter: str) -> None:
        if not self.settings.enable_lora:
            raise BackendError("a LoRA adapter needs BackendSettings.enable_lora=True")
        from vllm.lora.request import LoRARequest

        self._lora_count += 1  # vLLM caches adapters by id: a new one per version
        self._lora = LoRARequest(Path(adapter).name, self._lora_count, adapter)
        self.model_version = f"{weights_version(self._model_path)}+lora:{weights_version(adapter)}"

    def _shutdown(self) -> None:
        """Stop the engine and free what it holds. Dropping the reference is not enough: the
        engine core runs in a process of its own until it is shut down."""
        engine = getattr(self, "engine", None)
        self.engine = None
        if engine is not None:
            engine.shutdown()
        del engine
        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # noqa: BLE001  (nothing initialised, or an older vLLM)
            pass
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def close(self) -> None:
        with self._lock:
            self._shutdown()
            self._loop.stop(timeout_s=30)

    def render_messages(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return super().render_messages(messages)

    def _encode(self, text: str) -> list[int]:
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
        with self._serving():
            return self._generate(prompts, n, temperature, top_p, max_tokens, stop, seed)

    def _generate(
        self,
        prompts: list[str],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        stop: list[str] | None,
        seed: int | None,
    ) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        results: list[list[Completion] | None] = [None] * len(prompts)
        requests, params, index = [], [], []
        limit = self.settings.max_model_len
        for i, prompt in enumerate(prompts):
            ids = self._encode(prompt)
            if not ids or len(ids) >= limit:  # vLLM would fail the whole batch
                results[i] = failed_completions(n, ContextOverflowError.reason, len(ids))
                continue
            requests.append(TokensPrompt(prompt_token_ids=ids))
            params.append(
                SamplingParams(
                    n=n,
                    temperature=temperature,
                    top_p=top_p if temperature > 0 else 1.0,
                    max_tokens=min(max_tokens, limit - len(ids)),
                    stop=list(stop) if stop else None,
                    # One seed per prompt of the call (seed + its index in the call).
                    seed=None if seed is None else seed + i,
                    output_kind=RequestOutputKind.FINAL_ONLY,
                )
            )
            index.append(i)
        if requests:
            outputs = self._loop.run(self._all(list(zip(requests, params))))
            for i, out in zip(index, outputs):
                n_prompt = len(out.prompt_token_ids)
                results[i] = [
                    mark_empty(
                        Completion(
                            c.text,
                            n_prompt,
                            len(c.token_ids),
                            "length" if c.finish_reason == "length" else "stop",
                        )
                    )
                    for c in out.outputs
                ]
        return [r or [] for r in results]

    def score(self, prompts: list[str], continuations: list[str]) -> list[Score]:
        with self._serving():
            return self._score(prompts, continuations)

    def _score(self, prompts: list[str], continuations: list[str]) -> list[Score]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if len(prompts) != len(continuations):
            raise ValueError("prompts and continuations differ in length")
        results: list[Score | None] = [None] * len(prompts)
        todo: list[tuple[int, list[int], int]] = []
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            enc = self.tokenizer(p + c, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            # vLLM needs one token of room to "generate".
            if len(ids) + 1 > self.settings.max_model_len:
                results[i] = failed_score(ContextOverflowError.reason)
                continue
            first = max(1, continuation_span([tuple(o) for o in enc["offset_mapping"]], len(p)))
            todo.append((i, ids, first))
        if todo:
            params = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                prompt_logprobs=0,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            outputs = self._loop.run(
                self._all([(TokensPrompt(prompt_token_ids=ids), params) for _, ids, _ in todo])
            )
            for (i, ids, first), out in zip(todo, outputs):
                lps, toks = [], []
                for pos in range(first, len(ids)):
                    entry = out.prompt_logprobs[pos]
                    lp = entry[ids[pos]]
                    lps.append(float(lp.logprob))
                    toks.append(lp.decoded_token or self.tokenizer.decode([ids[pos]]))
                results[i] = Score(sum(lps), lps, toks)
        return [r for r in results if r is not None]
