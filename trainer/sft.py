"""Supervised fine-tuning of an in-memory model on prompt/completion examples (the loss on the
completion tokens only, each completion ending its turn), through the training engine
(trainer/engine.py), and greedy decoding with an in-memory model. torch is imported when called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from trainer.engine import (
    Encoded,
    EngineOptions,
    StepReport,
    WindowLosses,
    completion_logps,
    encode,
    model_device,
    pad_id,
    train_steps,
    with_eos,
)
from trainer.role_models import RoleModel
from trainer.settings import StepConfig

# (what is being done, done so far, of how many; 0: not known): how long work such as the cold
# start reports its progress to whoever shows it (`up`'s console: promptcot/progress.py).
Report = Callable[[str, int, int], None]


class SFTObjective:
    """Mean NLL per completion token over a global batch."""

    def __init__(self, encoded: list[Encoded], pad: int, chunk: int):
        self.encoded = [e for e in encoded if e.n_target > 0]  # nothing left to learn from
        self.pad, self.chunk = pad, chunk

    def __len__(self) -> int:
        return len(self.encoded)

    def units(self, items: Sequence[int]) -> float:
        return float(sum(self.encoded[i].n_target for i in items))

    def loss(self, model: Any, items: Sequence[int]) -> Any:
        batch = [self.encoded[i] for i in items]
        sums, _ = completion_logps(model, batch, pad_id=self.pad, chunk=self.chunk)
        return -sums.sum()


def sft(
    rm: RoleModel,
    examples: list[dict[str, str]],
    cfg: StepConfig,
    options: EngineOptions | None = None,
    on_step: StepReport | None = None,
) -> WindowLosses:
    """Fine-tune ``rm.model`` in place on prompt/completion examples, a window of optimiser
    steps of the role's own optimiser; returns each step's loss. ``on_step`` hears of each
    optimiser step."""
    options = options or EngineOptions()
    tok = rm.tokenizer
    encoded = [
        encode(tok, ex["prompt"], with_eos(tok, ex["completion"]), cfg.max_seq_len)
        for ex in examples
    ]
    objective = SFTObjective(encoded, pad_id(tok), options.chunk_tokens)
    return train_steps(rm, objective, cfg, options, on_step)


def torch_module():
    import torch

    return torch


def greedy_decode(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 8,
) -> list[tuple[str, bool]]:
    """(text, finished) per prompt, decoded greedily on the model's device: the text is cut at
    the first stop string; ``finished`` is False when the token budget ran out first."""
    from llm.backends.base import truncate_at_stop

    torch = torch_module()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos_ids = {i for i in (tokenizer.eos_token_id, eos) if isinstance(i, int) and i >= 0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    device = model_device(model)
    was_training = model.training
    model.eval()
    out: list[tuple[str, bool]] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                enc = [
                    tokenizer(p, add_special_tokens=False)["input_ids"]
                    for p in prompts[start : start + batch_size]
                ]
                width = max(len(e) for e in enc)
                ids = torch.full((len(enc), width), pad, dtype=torch.long)
                mask = torch.zeros((len(enc), width), dtype=torch.long)
                for row, e in enumerate(enc):  # left padding: generation continues at the end
                    ids[row, width - len(e) :] = torch.tensor(e)
                    mask[row, width - len(e) :] = 1
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=sorted(eos_ids),
                    pad_token_id=pad,
                    stop_strings=list(stop) or None,
                    tokenizer=tokenizer,
                )
                for row in gen[:, width:].tolist():
                    ended = any(t in eos_ids for t in row)
                    body = [t for t in row if t not in eos_ids and t != pad]
                    text, hit = truncate_at_stop(
                        tokenizer.decode(body, skip_special_tokens=True), list(stop)
                    )
                    out.append((text, hit or ended))
    finally:
        model.train(was_training)
    return out
