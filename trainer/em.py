"""Cold start and the EM loop for the prompt model p_θ(z, x | c) and the rationale model
q_φ(z | c, x) (docs/architecture.md, "The method").

- Cold start: SFT of p_θ on c -> (z, x) and of q_φ on (c, x) -> z from annotated seeds.
- E-step: the rationale stage already sampled K rationales per seed and scored each with
  R(z) = log p_θ(x | z, c) + log p_θ(z | c); here we keep the best per seed and fine-tune q_φ on
  (c, x) -> z_best (best-of-K rejection fine-tuning).
- M-step: decode z greedily from the updated q_φ for each seed and fine-tune p_θ on c -> (z, x).
- Convergence signal: mean per-token NLL of x given (c, z) under p_θ, before and after the
  M-step, on seeds that are never trained on (chosen by a hash of the seed id).

Training goes through trainer/sft.py (TRL). Prompts and completions come from workers/prompts.py:
the targets are exactly the text the stages generate and score.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from streams.records import AnnotatedSeed, ModelUpdate, Rationale
from trainer.checkpoints import (
    CheckpointStore,
    RoleModel,
    SeenRecords,
    load_role_model,
    save_role_model,
)
from trainer.config import StepConfig, TrainerSettings
from trainer.sft import continuation_nll, sft, torch_module
from trainer.updates import WindowResult, model_update
from workers.prompts import (
    RATIONALE_MODEL,
    SYNTHESIS,
    ParseError,
    format_concepts,
    parse_rationale,
    rationale_completion,
    synthesis_fields,
    synthesis_parts,
)
from workers.roles import Role

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Training examples


@dataclass(frozen=True)
class SeedItem:
    """One seed problem with the rationale to train on (or to condition the NLL on)."""

    seed_id: str
    domain: str
    concepts: list[str]
    difficulty: str
    problem: str
    rationale: str
    source_id: str = ""  # the record the rationale came from (lineage)

    @classmethod
    def from_annotated(cls, seed: AnnotatedSeed) -> SeedItem:
        return cls(
            seed.seed_id,
            seed.domain,
            list(seed.concepts),
            seed.difficulty or "",
            seed.text,
            seed.rationale,
            seed.id,
        )

    @classmethod
    def from_rationale(cls, r: Rationale) -> SeedItem:
        # Rationale records carry no difficulty; the rationale stage scored R(z) with the seed's
        # difficulty or "" (annotated seeds have none today), so "" keeps training on the exact
        # text that was scored. A difficulty field added later is picked up here.
        difficulty = getattr(r, "difficulty", None) or ""
        return cls(r.seed_id, r.domain, list(r.concepts), difficulty, r.problem, r.text, r.id)

    def with_rationale(self, rationale: str) -> SeedItem:
        return SeedItem(
            self.seed_id,
            self.domain,
            self.concepts,
            self.difficulty,
            self.problem,
            rationale,
            self.source_id,
        )


def synthesis_prompt(tokenizer: Any, item: SeedItem) -> str:
    return SYNTHESIS.render(
        tokenizer, **synthesis_fields(item.concepts, item.difficulty, item.domain)
    )


def prompt_model_example(tokenizer: Any, item: SeedItem) -> dict[str, str]:
    """p_θ: c -> (z, x), the completion exactly as generation produces it after the prefix."""
    z_part, x_part = synthesis_parts(item.rationale, item.problem)
    return {"prompt": synthesis_prompt(tokenizer, item), "completion": z_part + x_part}


def rationale_prompt(tokenizer: Any, item: SeedItem) -> str:
    return RATIONALE_MODEL.render(
        tokenizer, concepts=format_concepts(item.concepts), problem=item.problem
    )


def rationale_model_example(tokenizer: Any, item: SeedItem) -> dict[str, str]:
    """q_φ: (c, x) -> z."""
    return {
        "prompt": rationale_prompt(tokenizer, item),
        "completion": rationale_completion(item.rationale),
    }


# ---------------------------------------------------------------------------------------------
# E-step selection and the held-out split


def best_of_k(rationales: Iterable[Rationale]) -> dict[str, Rationale]:
    """The max-reward rationale per seed. NaN/inf rewards (failed scoring) never win; ties go
    to the lowest sample index, then the id, so a redelivered window picks the same one."""
    best: dict[str, Rationale] = {}
    for r in rationales:
        if not math.isfinite(r.reward):
            continue
        cur = best.get(r.seed_id)
        if cur is None or (-r.reward, r.sample_index, r.id) < (
            -cur.reward,
            cur.sample_index,
            cur.id,
        ):
            best[r.seed_id] = r
    return best


def is_heldout(seed_id: str, fraction: float) -> bool:
    """Deterministic split by seed id: a held-out seed is held out in every window, by every
    trainer replica, so its NLL is an honest convergence signal across iterations."""
    if fraction <= 0:
        return False
    h = int(hashlib.sha256(seed_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


# ---------------------------------------------------------------------------------------------
# Scoring and decoding with an in-memory HF model


def problem_nll(model: Any, tokenizer: Any, items: Sequence[SeedItem]) -> float:
    """Mean per-token NLL of x given (c, z) under p_θ: the EM convergence signal."""
    prompts, conts = [], []
    for item in items:
        z_part, x_part = synthesis_parts(item.rationale, item.problem)
        prompts.append(synthesis_prompt(tokenizer, item) + z_part)
        conts.append(x_part)
    total, count = continuation_nll(model, tokenizer, prompts, conts)
    return total / count if count else float("nan")


def greedy_rationales(
    model: Any,
    tokenizer: Any,
    items: Sequence[SeedItem],
    max_new_tokens: int,
    batch_size: int = 8,
) -> list[str | None]:
    """z decoded greedily from q_φ for each (c, x); None where the output does not parse (no
    text, or cut by the token budget before its closing delimiter)."""
    from workers.backends.base import truncate_at_stop

    torch = torch_module()
    stop = list(RATIONALE_MODEL.stop)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos_ids = {i for i in (tokenizer.eos_token_id, eos) if isinstance(i, int) and i >= 0}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    was_training = model.training
    model.eval()
    out: list[str | None] = []
    try:
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                enc = [
                    tokenizer(rationale_prompt(tokenizer, it), add_special_tokens=False)[
                        "input_ids"
                    ]
                    for it in chunk
                ]
                width = max(len(e) for e in enc)
                ids = torch.full((len(enc), width), pad, dtype=torch.long)
                mask = torch.zeros((len(enc), width), dtype=torch.long)
                for row, e in enumerate(enc):  # left padding: generation continues at the end
                    ids[row, width - len(e) :] = torch.tensor(e)
                    mask[row, width - len(e) :] = 1
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    eos_token_id=sorted(eos_ids),
                    pad_token_id=pad,
                    stop_strings=stop,
                    tokenizer=tokenizer,
                )
                for row in gen[:, width:].tolist():
                    ended = any(t in eos_ids for t in row)
                    body = [t for t in row if t not in eos_ids and t != pad]
                    text, hit = truncate_at_stop(
                        tokenizer.decode(body, skip_special_tokens=True), stop
                    )
                    try:
                        out.append(parse_rationale(text, truncated=not (hit or ended)))
                    except ParseError:
                        out.append(None)
    finally:
        model.train(was_training)
    return out


class EMTrainer:
    """Holds p_θ and q_φ in memory between windows (loading SmolLM2 costs seconds; a window
    may be small), resuming from the newest checkpoints of both roles."""

    def __init__(self, settings: TrainerSettings, base_paths: dict[str, str]):
        self.settings = settings
        self.base_paths = base_paths
        self.store = CheckpointStore(settings.checkpoint_dir, settings.keep_last)
        self._models: dict[str, RoleModel] = {}
        self.seen = SeenRecords()
        self.seen.load(self.store, [Role.RATIONALE_MODEL, Role.PROMPT_MODEL])
        if settings.torch_threads:
            torch_module().set_num_threads(settings.torch_threads)

    def model(self, role: str, cfg: StepConfig) -> RoleModel:
        if role not in self._models:
            self._models[role] = load_role_model(
                self.store, role, self.base_paths[role], use_lora=cfg.use_lora, lora=cfg.lora
            )
        return self._models[role]

    # -- cold start ---------------------------------------------------------------------------

    def cold_start(self, seeds: Sequence[AnnotatedSeed]) -> list[ModelUpdate]:
        """SFT of both models on the annotated (c, z, x) triples (held-out seeds excluded)."""
        cfg = self.settings.cold_start
        items = [SeedItem.from_annotated(s) for s in seeds]
        train = [i for i in items if not is_heldout(i.seed_id, self.settings.heldout_fraction)]
        if not train:
            return []
        parents = [i.source_id for i in train][:64]
        p = self.model(Role.PROMPT_MODEL, cfg)
        q = self.model(Role.RATIONALE_MODEL, cfg)
        updates = []
        loss_q = sft(
            q, [rationale_model_example(q.tokenizer, i) for i in train], cfg, self.settings.seed
        )
        save_role_model(self.store, q, "cold_start", {"train_loss": loss_q})
        updates.append(
            model_update(q, "cold_start", {"train_loss": loss_q, "n_seeds": len(train)}, parents)
        )
        before = problem_nll(p.model, p.tokenizer, train)
        loss_p = sft(
            p, [prompt_model_example(p.tokenizer, i) for i in train], cfg, self.settings.seed
        )
        after = problem_nll(p.model, p.tokenizer, train)
        metrics = {
            "train_loss": loss_p,
            "n_seeds": len(train),
            "train_problem_nll_before": before,
            "train_problem_nll_after": after,
        }
        save_role_model(self.store, p, "cold_start", metrics)
        updates.append(model_update(p, "cold_start", metrics, parents))
        return updates

    # -- one EM window ------------------------------------------------------------------------

    def run_window(self, rationales: Sequence[Rationale]) -> WindowResult:
        """E-step then M-step on one window of scored rationales."""
        s = self.settings
        fresh = [r for r in rationales if r.id not in self.seen]
        if not fresh:
            return WindowResult([], f"all {len(rationales)} rationales already trained on")
        rationales = fresh
        window_ids = [r.id for r in rationales]
        best = best_of_k(rationales)
        items = [SeedItem.from_rationale(r) for _, r in sorted(best.items())]
        train = [i for i in items if not is_heldout(i.seed_id, s.heldout_fraction)]
        heldout = [i for i in items if is_heldout(i.seed_id, s.heldout_fraction)]
        if len(train) < s.e_step.min_seeds:
            return WindowResult(
                [], f"{len(train)} trainable seeds < min_seeds {s.e_step.min_seeds}"
            )
        parents = [best[i.seed_id].id for i in items]
        rewards = [best[i.seed_id].reward for i in items]
        updates: list[ModelUpdate] = []

        # E-step: q_φ learns to write the rationale that best explains each problem.
        q = self.model(Role.RATIONALE_MODEL, s.e_step)
        if s.e_step.enabled:
            loss_q = sft(
                q, [rationale_model_example(q.tokenizer, i) for i in train], s.e_step, s.seed
            )
            e_metrics = {
                "train_loss": loss_q,
                "n_seeds": len(train),
                "n_rationales": len(rationales),
                "mean_best_reward": sum(rewards) / len(rewards),
            }
            save_role_model(self.store, q, "e_step", e_metrics, window_ids)
            updates.append(model_update(q, "e_step", e_metrics, parents))

        if not s.m_step.enabled:
            self.seen.add(window_ids)
            return WindowResult(updates)
        # M-step: p_θ learns c -> (z, x) with z from the updated q_φ (greedy). A seed whose
        # decode does not parse keeps its best-of-K z: the sampled z is still a valid rationale.
        p = self.model(Role.PROMPT_MODEL, s.m_step)
        decoded = greedy_rationales(
            q.model,
            q.tokenizer,
            train,
            s.m_step.max_rationale_tokens,
            s.m_step.generation_batch_size,
        )
        m_items = [i.with_rationale(z) if z else i for i, z in zip(train, decoded)]
        fallbacks = sum(z is None for z in decoded)
        signal = heldout or train  # no held-out seed in this window: report the train NLL
        label = "heldout" if heldout else "train"
        before = problem_nll(p.model, p.tokenizer, signal)
        loss_p = sft(p, [prompt_model_example(p.tokenizer, i) for i in m_items], s.m_step, s.seed)
        after = problem_nll(p.model, p.tokenizer, signal)
        m_metrics = {
            "train_loss": loss_p,
            "n_seeds": len(train),
            "n_heldout": len(heldout),
            "greedy_fallbacks": fallbacks,
            f"{label}_problem_nll_before": before,
            f"{label}_problem_nll_after": after,
        }
        save_role_model(self.store, p, "m_step", m_metrics, window_ids)
        self.seen.add(window_ids)
        updates.append(model_update(p, "m_step", m_metrics, parents))
        log.info(
            "EM window: %d seeds (%d held out), %s NLL %.4f -> %.4f",
            len(train),
            len(heldout),
            label,
            before,
            after,
        )
        return WindowResult(updates, metrics=m_metrics)
